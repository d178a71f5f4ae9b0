//! Rotary position embedding in Hugging Face's rotate-half layout: the default frequencies and
//! the scalings open models ship with (linear, Llama 3, LongRoPE), over all of a head or its first
//! `rotary_dim` dimensions (Phi-3's partial rotary). A layer without RoPE (SmolLM3's NoPE
//! layers) has none at all.

use crate::config::{FieldError, ModelConfig};
use serde_json::{Map, Value};

/// How the base frequencies are rescaled for longer contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (Gemma 3's global layers).
    Linear {
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Phi-3's LongRoPE: per-frequency factors, short ones up to the original context and long
    /// ones beyond it, and cos/sin scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// One layer's rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// Dimensions rotated at the start of each head (the head width unless partial).
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
}

impl Rope {
    /// Inverse frequencies of the `rotary_dim / 2` pairs, for a sequence reaching `positions`.
    pub fn inv_freq(&self, positions: usize) -> Vec<f64> {
        let d = self.rotary_dim;
        let base = |i: usize| self.theta.powf(2.0 * i as f64 / d as f64);
        let half = d / 2;
        match &self.scaling {
            RopeScaling::None => (0..half).map(|i| 1.0 / base(i)).collect(),
            RopeScaling::Linear { factor } => (0..half).map(|i| 1.0 / base(i) / factor).collect(),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                ..
            } => {
                let ext = if positions > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                // transformers computes these in f32.
                (0..half)
                    .map(|i| {
                        let b = (self.theta as f32).powf(2.0 * i as f32 / d as f32);
                        1.0 / (ext[i] as f32 * b) as f64
                    })
                    .collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                (0..half)
                    .map(|i| {
                        let f = 1.0 / base(i);
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The Llama 3 scaling whose per-frequency divisors (`f / inv_freq`) are `divisors`: what a
    /// GGUF file holds instead of the parameters (llama.cpp's `rope_freqs` tensor). Only the ratios
    /// of the three lengths change the divisors, so `low_freq_factor` is taken as 1 (as every Llama
    /// 3.x has it), and as 1 and 4 when fewer than two frequencies lie between the bands. `Some(None)`
    /// for divisors that scale nothing; `None` when no Llama 3 scaling reproduces them.
    pub fn llama3_from_divisors(
        theta: f64,
        rotary_dim: usize,
        divisors: &[f32],
    ) -> Option<RopeScaling> {
        let half = rotary_dim / 2;
        if half == 0 || divisors.len() != half || divisors.iter().any(|v| v.is_nan() || *v < 1.0) {
            return None;
        }
        let v: Vec<f64> = divisors.iter().map(|&x| x as f64).collect();
        let factor = v.iter().copied().fold(1.0, f64::max);
        if factor <= 1.0 + 1e-6 {
            return Some(RopeScaling::None);
        }
        let wavelen =
            |i: usize| 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / rotary_dim as f64);
        let tol = 1e-4;
        let middle: Vec<usize> = (0..half)
            .filter(|&i| v[i] > 1.0 + tol && v[i] < factor * (1.0 - tol))
            .collect();
        // With low = 1: smooth(i) = a / wavelen(i) - b, a = original / (high - 1), b = 1 / (high - 1).
        let smooth = |i: usize| (1.0 / v[i] - 1.0 / factor) / (1.0 - 1.0 / factor);
        let (high, original) = match middle.as_slice() {
            [] => {
                let last_one = (0..half).rev().find(|&i| v[i] <= 1.0 + tol).map(wavelen);
                let first_scaled = (0..half)
                    .find(|&i| v[i] >= factor * (1.0 - tol))
                    .map(wavelen);
                let original = match (last_one, first_scaled) {
                    (Some(a), Some(b)) => (4.0 * a * b).sqrt(),
                    (None, Some(b)) => b / 2.0,
                    (Some(a), None) => 8.0 * a,
                    (None, None) => return None,
                };
                (4.0, original)
            }
            [i] => {
                let b = 1.0 / 3.0;
                (4.0, (smooth(*i) + b) * wavelen(*i) / b)
            }
            [first, .., last] => {
                let (s1, s2, w1, w2) = (
                    smooth(*first),
                    smooth(*last),
                    wavelen(*first),
                    wavelen(*last),
                );
                let a = (s1 - s2) / (1.0 / w1 - 1.0 / w2);
                let b = a / w1 - s1;
                if !(a > 0.0 && b > 0.0) {
                    return None;
                }
                (1.0 + 1.0 / b, a / b)
            }
        };
        if !((1.0..1e12).contains(&original) && high.is_finite()) {
            return None;
        }
        let scaling = RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: high,
            original_max_position_embeddings: original.round() as usize,
        };
        let rope = Rope {
            theta,
            rotary_dim,
            scaling: scaling.clone(),
        };
        let inv = rope.inv_freq(0);
        let reproduced = (0..half).all(|i| {
            let f = 1.0 / theta.powf(2.0 * i as f64 / rotary_dim as f64);
            ((f / inv[i]) - v[i]).abs() <= 1e-3 * v[i]
        });
        reproduced.then_some(scaling)
    }

    /// The factor on cos and sin (LongRoPE's attention factor; 1 otherwise).
    pub fn attention_factor(&self) -> f64 {
        match &self.scaling {
            RopeScaling::LongRope {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }

    /// Appends the cos and sin rows (`rotary_dim` wide) of `position` to `cos`/`sin`.
    pub fn push_row(
        &self,
        inv_freq: &[f64],
        position: usize,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let half = inv_freq.len();
        let a = self.attention_factor();
        for j in 0..2 * half {
            let angle = position as f64 * inv_freq[j % half];
            cos.push((angle.cos() * a) as f32);
            sin.push((angle.sin() * a) as f32);
        }
    }

    /// The RoPE a config describes: `params` is transformers' `rope_parameters` (v5) or
    /// `rope_scaling` (v4) object, or `None`; `default_theta` applies when neither names a base.
    pub fn from_hf(
        config: &ModelConfig,
        params: Option<&Map<String, Value>>,
        default_theta: f64,
    ) -> Result<Self, FieldError> {
        let hf = &config.hf;
        let num = |m: Option<&Map<String, Value>>, k: &str| m?.get(k)?.as_f64();
        let theta = num(params, "rope_theta")
            .or_else(|| hf.get("rope_theta")?.as_f64())
            .unwrap_or(default_theta);
        let partial = num(params, "partial_rotary_factor")
            .or_else(|| hf.get("partial_rotary_factor")?.as_f64())
            .unwrap_or(1.0);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(("rope_theta".into(), format!("{theta} must be positive")));
        }
        if !(partial > 0.0 && partial <= 1.0) {
            return Err((
                "partial_rotary_factor".into(),
                format!("{partial} is outside (0, 1]"),
            ));
        }
        let rotary_dim = (config.head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err((
                "partial_rotary_factor".into(),
                format!("gives {rotary_dim} rotated dimensions, which must be even and positive"),
            ));
        }
        let kind = params
            .and_then(|m| m.get("rope_type").or_else(|| m.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let field = |k: &str| {
            num(params, k).ok_or_else(|| (format!("rope_scaling.{k}"), "is missing".to_string()))
        };
        let positive = |k: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err((format!("rope_scaling.{k}"), format!("{v} must be positive")))
            }
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: positive("factor", field("factor")?)?,
            },
            "llama3" => {
                let low = positive("low_freq_factor", field("low_freq_factor")?)?;
                let high = positive("high_freq_factor", field("high_freq_factor")?)?;
                if high <= low {
                    return Err((
                        "rope_scaling.high_freq_factor".into(),
                        "must be larger than low_freq_factor".into(),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: positive("factor", field("factor")?)?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: positive(
                        "original_max_position_embeddings",
                        field("original_max_position_embeddings")?,
                    )? as usize,
                }
            }
            "longrope" | "su" => {
                let factors = |k: &str| -> Result<Vec<f64>, FieldError> {
                    let list = params
                        .and_then(|m| m.get(k))
                        .and_then(Value::as_array)
                        .ok_or_else(|| (format!("rope_scaling.{k}"), "is missing".to_string()))?;
                    let v: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
                    if v.len() != rotary_dim / 2 || v.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                        return Err((
                            format!("rope_scaling.{k}"),
                            format!("needs {} positive numbers", rotary_dim / 2),
                        ));
                    }
                    Ok(v)
                };
                let original = num(params, "original_max_position_embeddings")
                    .or_else(|| hf.get("original_max_position_embeddings")?.as_f64())
                    .map(|v| v as usize)
                    .unwrap_or(config.max_position_embeddings)
                    .max(1);
                let factor = num(params, "factor")
                    .unwrap_or(config.max_position_embeddings as f64 / original as f64);
                let attention_factor = match num(params, "attention_factor") {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor,
                }
            }
            other => {
                return Err((
                    "rope_scaling.rope_type".into(),
                    format!("`{other}` is not supported (default, linear, llama3, longrope are)"),
                ));
            }
        };
        Ok(Self {
            theta,
            rotary_dim,
            scaling,
        })
    }
}

/// The RoPE parameters object of a config with one RoPE for all layers: v5's `rope_parameters`,
/// else v4's `rope_scaling`.
pub fn rope_params(hf: &Map<String, Value>) -> Option<&Map<String, Value>> {
    hf.get("rope_parameters")
        .and_then(Value::as_object)
        .or_else(|| hf.get("rope_scaling").and_then(Value::as_object))
}
