//! A linear layer `x W + b` (`W` held as `[in, out]`), with an optional LoRA path beside it:
//! `x W + s · (dropout(x) A) B`, two thin matmuls, so no weight-sized delta is formed per forward.
//! DoRA (Liu et al. 2024, as PEFT computes it) rescales each output by `m / ‖W + s·AB‖`, the
//! column norm taken as a constant (no gradient), so it is the one weight-sized product formed.

use crate::fused;
use crate::layers::dropout::Dropout;
use crate::params::{P1, P2, Weights};
use burn::prelude::*;

/// A low-rank adapter: `A` `[in, r]`, `B` `[r, out]`, scale `alpha / r` (rsLoRA: `alpha / √r`),
/// and DoRA's magnitude `[out]` when it is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Lora {
    pub a: P2,
    pub b: P2,
    pub rank: usize,
    pub scale: f64,
    pub magnitude: Option<P1>,
}

impl Lora {
    /// DoRA's per-output factor `m / ‖W + s·AB‖` `[1, out]`, the norm detached (DoRA §4.3).
    pub fn dora_factor(&self, w: &Weights, weight: P2) -> Option<Tensor<2>> {
        let m = w.vector(self.magnitude?);
        let delta = w.matrix(self.a).detach().matmul(w.matrix(self.b).detach()) * self.scale;
        let merged = w.dense(weight).detach() + delta;
        let norm = merged.powi_scalar(2).sum_dim(0).sqrt();
        Some(m.unsqueeze_dim(0) / norm)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// The module's Hugging Face path (`model.layers.3.self_attn.q_proj`).
    pub path: String,
    pub weight: P2,
    pub bias: Option<P1>,
    pub lora: Option<Lora>,
    pub d_in: usize,
    pub d_out: usize,
}

impl Linear {
    /// The module's own name (`q_proj`): what LoRA targets and PEFT's `target_modules` name.
    pub fn module(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(&self.path)
    }

    /// The block the module belongs to, if any.
    pub fn layer(&self) -> Option<usize> {
        self.path
            .strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    /// `x W`, the base weight's product alone (a quantized weight de-quantised on the fly).
    fn base(&self, w: &Weights, x: Tensor<2>) -> Tensor<2> {
        match w.quantized(self.weight) {
            Some(q) => fused::qmatmul(x, q),
            None => x.matmul(w.matrix(self.weight)),
        }
    }

    pub fn forward(&self, w: &Weights, x: Tensor<2>, dropout: &mut Option<Dropout>) -> Tensor<2> {
        let y = match &self.lora {
            Some(l) => {
                let dropped = dropout.as_mut().map(|d| d.apply_p(x.clone(), d.lora_p));
                let xa = dropped.clone().unwrap_or_else(|| x.clone());
                // The scale goes on the rank-r activations, the smaller side.
                let low_rank = (xa.matmul(w.matrix(l.a)) * l.scale).matmul(w.matrix(l.b));
                let base = self.base(w, x);
                match l.dora_factor(w, self.weight) {
                    None => base + low_rank,
                    // PEFT: x W + (g - 1) · dropout(x) W + g · s · dropout(x) A B.
                    Some(g) => match dropped {
                        None => (base + low_rank) * g,
                        Some(xd) => {
                            let base_dropped = self.base(w, xd);
                            base + base_dropped * (g.clone() - 1.0) + low_rank * g
                        }
                    },
                }
            }
            None => self.base(w, x),
        };
        match self.bias {
            Some(b) => y + w.vector(b).unsqueeze_dim(0),
            None => y,
        }
    }
}
