//! One decoder block: `h = x + [post-norm](attn(norm(x)))`, `out = h + [post-norm](mlp(norm(h)))`.
//! Llama-style families have the two pre-norms; Gemma adds the two post-norms ("sandwich").

use crate::layers::attention::{Attention, LayerCache};
use crate::layers::consts::ForwardConsts;
use crate::layers::dropout::{self, Dropout};
use crate::layers::linear::Linear;
use crate::layers::mlp::Mlp;
use crate::layers::norm::RmsNorm;
use crate::params::Weights;
use burn::prelude::*;

#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub attn_out_norm: Option<RmsNorm>,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
    pub mlp_out_norm: Option<RmsNorm>,
}

impl Block {
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = self.attn.linears();
        v.extend(self.mlp.linears());
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = self.attn.linears_mut();
        v.extend(self.mlp.linears_mut());
        v
    }

    /// The block on `[batch × seq, hidden]` activations.
    pub fn forward(
        &self,
        w: &Weights,
        x: Tensor<2>,
        consts: &ForwardConsts,
        dropout: &mut Option<Dropout>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<2> {
        let mut a = self.attn.forward(
            w,
            self.attn_norm.forward(w, x.clone()),
            consts,
            dropout,
            cache,
        );
        if let Some(n) = &self.attn_out_norm {
            a = n.forward(w, a);
        }
        let x = x + dropout::residual(a, dropout);
        let mut m = self
            .mlp
            .forward(w, self.mlp_norm.forward(w, x.clone()), dropout);
        if let Some(n) = &self.mlp_out_norm {
            m = n.forward(w, m);
        }
        x + dropout::residual(m, dropout)
    }
}
