//! The Llama family's shape, normalised across Hugging Face's `llama`, `mistral` and `qwen2`
//! configs and GGUF metadata.

use kiln_config::ModelConfig;
use serde::{Deserialize, Serialize};

/// Bounds no real model reaches (the largest open models have widths near 2^15 and vocabularies
/// near 2^18): a file beyond them is damaged or hostile.
const MAX_WIDTH: usize = 1 << 22;
const MAX_LAYERS: usize = 1 << 12;
const MAX_HEADS: usize = 1 << 12;
const MAX_HEAD_DIM: usize = 1 << 12;
const MAX_PARAMS: usize = 1 << 42;

/// Llama 3's frequency-dependent RoPE scaling (`rope_scaling.rope_type: llama3`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The model's shape: the fields of Hugging Face's `config.json` that the Llama family's
/// computation depends on, normalised across `llama`, `mistral` and `qwen2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`: decides the `config.json` written back.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width; HF's default is `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn from_model_config(m: &ModelConfig, vocab_size: usize) -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size: m.vocab_size.unwrap_or(vocab_size),
            hidden_size: m.hidden_size,
            intermediate_size: m.intermediate_size,
            num_hidden_layers: m.num_hidden_layers,
            num_attention_heads: m.num_attention_heads,
            num_key_value_heads: m.kv_heads(),
            head_dim: m.head_dim(),
            max_position_embeddings: m.max_position_embeddings,
            rms_norm_eps: m.rms_norm_eps,
            rope_theta: m.rope_theta,
            rope_scaling: None,
            tie_word_embeddings: m.tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
        }
    }

    /// Checks the shape before anything is sized from it: every width positive and within what
    /// any real model uses, heads divisible by key/value heads, an even head width (RoPE), a
    /// parameter count that does not overflow, and finite RoPE and norm constants. Returns the
    /// field and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bounded = |field: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err((field.to_string(), format!("{v} is outside 1..={max}")))
            } else {
                Ok(())
            }
        };
        bounded("vocab_size", self.vocab_size, MAX_WIDTH)?;
        bounded("hidden_size", self.hidden_size, MAX_WIDTH)?;
        bounded("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        bounded("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        bounded("num_attention_heads", self.num_attention_heads, MAX_HEADS)?;
        bounded("num_key_value_heads", self.num_key_value_heads, MAX_HEADS)?;
        bounded("head_dim", self.head_dim, MAX_HEAD_DIM)?;
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err((
                "num_key_value_heads".into(),
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err((
                "head_dim".into(),
                format!("{} must be even for RoPE", self.head_dim),
            ));
        }
        let finite_positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((field.to_string(), format!("{v} must be a positive number")))
            }
        };
        finite_positive("rope_theta", self.rope_theta)?;
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err((
                "rms_norm_eps".into(),
                format!("{} is not usable", self.rms_norm_eps),
            ));
        }
        if let Some(r) = &self.rope_scaling {
            finite_positive("rope_scaling.factor", r.factor)?;
            finite_positive("rope_scaling.low_freq_factor", r.low_freq_factor)?;
            finite_positive("rope_scaling.high_freq_factor", r.high_freq_factor)?;
            if r.high_freq_factor <= r.low_freq_factor {
                return Err((
                    "rope_scaling.high_freq_factor".into(),
                    "must be larger than low_freq_factor".into(),
                ));
            }
            bounded(
                "rope_scaling.original_max_position_embeddings",
                r.original_max_position_embeddings,
                usize::MAX >> 8,
            )?;
        }
        let params = self.checked_num_params();
        if params.is_none_or(|n| n > MAX_PARAMS) {
            return Err((
                "hidden_size".into(),
                "the parameter count this shape implies is beyond any model kiln can hold".into(),
            ));
        }
        Ok(())
    }

    /// [`num_params`](Self::num_params) without overflow: `None` where it would overflow.
    pub fn checked_num_params(&self) -> Option<usize> {
        let d = self.hidden_size;
        let q = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        let attn = d
            .checked_mul(q)?
            .checked_mul(2)?
            .checked_add(d.checked_mul(kv)?.checked_mul(2)?)?;
        let mlp = d.checked_mul(self.intermediate_size)?.checked_mul(3)?;
        let layer = attn
            .checked_add(mlp)?
            .checked_add(q + 2 * kv + 3 * self.intermediate_size + 4 * d)?;
        let embed = self.vocab_size.checked_mul(d)?;
        embed
            .checked_mul(2)?
            .checked_add(self.num_hidden_layers.checked_mul(layer)?)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// `config.json` as `transformers` writes it for this architecture.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
        });
        let map = v.as_object_mut().expect("object literal");
        let arch = match self.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        map.insert("architectures".into(), serde_json::json!([arch]));
        if self.model_type == "qwen2" {
            map.insert("use_sliding_window".into(), false.into());
        } else {
            map.insert("attention_bias".into(), self.o_bias.into());
            map.insert("mlp_bias".into(), self.mlp_bias.into());
        }
        if self.model_type == "mistral" {
            map.insert("sliding_window".into(), serde_json::Value::Null);
        }
        if let Some(r) = &self.rope_scaling {
            map.insert(
                "rope_scaling".into(),
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": r.factor,
                    "low_freq_factor": r.low_freq_factor,
                    "high_freq_factor": r.high_freq_factor,
                    "original_max_position_embeddings": r.original_max_position_embeddings,
                }),
            );
        }
        v
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = d * q * 2 + d * kv * 2;
        let mlp = 3 * d * self.intermediate_size;
        let biases = if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { d } else { 0 }
            + if self.mlp_bias {
                2 * self.intermediate_size + d
            } else {
                0
            };
        let layer = attn + mlp + biases + 2 * d;
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * layer + d
    }

    /// RoPE inverse frequencies, with Llama 3 scaling applied when configured.
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim;
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64))
            .collect();
        let Some(r) = &self.rope_scaling else {
            return base;
        };
        let old = r.original_max_position_embeddings as f64;
        let low_wavelen = old / r.low_freq_factor;
        let high_wavelen = old / r.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / r.factor
                } else {
                    let smooth = (old / wavelen - r.low_freq_factor)
                        / (r.high_freq_factor - r.low_freq_factor);
                    (1.0 - smooth) * f / r.factor + smooth * f
                }
            })
            .collect()
    }
}
