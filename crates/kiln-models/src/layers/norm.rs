//! RMSNorm, `x / sqrt(mean(x²) + eps) · w`, or Gemma's `· (1 + w)`; statistics in f32 whatever
//! the compute type, as transformers takes them.

use crate::dtype::{float_dtype, to_dtype};
use crate::fused;
use crate::params::{P1, Weights};
use burn::prelude::*;
use burn::tensor::FloatDType;

#[derive(Debug, Clone, PartialEq)]
pub struct RmsNorm {
    pub weight: P1,
    pub eps: f64,
    /// Gemma's norms scale by `1 + w` (their weights are stored around 0).
    pub one_plus: bool,
}

impl RmsNorm {
    /// Normalises the rows of `x` `[n, d]`.
    pub fn forward(&self, w: &Weights, x: Tensor<2>) -> Tensor<2> {
        let mut weight = w.vector(self.weight);
        let dtype = float_dtype(&x);
        if self.one_plus {
            weight = to_dtype(weight, FloatDType::F32).add_scalar(1.0);
        }
        if dtype == FloatDType::F32 {
            return fused::rms_norm(x, to_dtype(weight, FloatDType::F32), self.eps);
        }
        let weight = to_dtype(weight, FloatDType::F32);
        to_dtype(
            fused::rms_norm(x.cast(FloatDType::F32), weight, self.eps),
            dtype,
        )
    }

    /// Normalises each head of `x` `[b, s, heads, d]` (Qwen3's and Gemma 3's q/k norms).
    pub fn forward_heads(&self, w: &Weights, x: Tensor<4>) -> Tensor<4> {
        let [b, s, h, d] = x.dims();
        self.forward(w, x.reshape([b * s * h, d]))
            .reshape([b, s, h, d])
    }
}
