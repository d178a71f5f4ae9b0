//! Dropout whose masks come from kiln's own seeded stream, so a step is reproducible on every
//! backend and a recomputed block can replay the same masks.

use crate::dtype::{float_dtype, to_dtype};
use burn::prelude::*;
use kiln_data::Rng;

#[derive(Debug, Clone)]
pub struct Dropout {
    /// On attention probabilities and residual branches.
    pub p: f64,
    /// On the input of LoRA paths.
    pub lora_p: f64,
    pub rng: Rng,
}

impl Dropout {
    pub fn apply<const D: usize>(&mut self, x: Tensor<D>) -> Tensor<D> {
        let p = self.p;
        self.apply_p(x, p)
    }

    pub fn apply_p<const D: usize>(&mut self, x: Tensor<D>, p: f64) -> Tensor<D> {
        if p <= 0.0 {
            return x;
        }
        let shape = x.shape();
        let n = shape.num_elements();
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if self.rng.next_f64() < self.p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &x.device());
        let dtype = float_dtype(&x);
        x * to_dtype(mask, dtype)
    }
}

/// Dropout on a residual branch, when dropout is on.
pub fn residual(x: Tensor<2>, dropout: &mut Option<Dropout>) -> Tensor<2> {
    match dropout.as_mut() {
        Some(d) => d.apply(x),
        None => x,
    }
}
