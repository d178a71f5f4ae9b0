//! A linear layer `x W + b` (`W` held as `[in, out]`), with an optional LoRA path beside it:
//! `x W + s · (dropout(x) A) B`, two thin matmuls, so no weight-sized delta is formed per forward.

use crate::layers::dropout::Dropout;
use crate::params::{P1, P2, Weights};
use burn::prelude::*;

/// A low-rank adapter: `A` `[in, r]`, `B` `[r, out]`, scale `alpha / r` (rsLoRA: `alpha / √r`).
#[derive(Debug, Clone, PartialEq)]
pub struct Lora {
    pub a: P2,
    pub b: P2,
    pub rank: usize,
    pub scale: f64,
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

    pub fn forward(&self, w: &Weights, x: Tensor<2>, dropout: &mut Option<Dropout>) -> Tensor<2> {
        let y = match &self.lora {
            Some(l) => {
                let xa = match dropout.as_mut() {
                    Some(d) => d.apply_p(x.clone(), d.lora_p),
                    None => x.clone(),
                };
                // The scale goes on the rank-r activations, the smaller side.
                x.matmul(w.matrix(self.weight))
                    + (xa.matmul(w.matrix(l.a)) * l.scale).matmul(w.matrix(l.b))
            }
            None => x.matmul(w.matrix(self.weight)),
        };
        match self.bias {
            Some(b) => y + w.vector(b).unsqueeze_dim(0),
            None => y,
        }
    }
}
