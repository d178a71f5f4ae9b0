//! What the training step's tape keeps per block, from the family's declaration: the memory
//! profile the planner (`kiln_train::plan`) sizes activations by.

use crate::arch::Architecture;
use crate::layers::{Activation, Block, GateUpProjection, QkvProjection};

/// f32 elements the tape keeps for one block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockProfile {
    /// Per token.
    pub per_token: f64,
    /// Per token with dropout on (its masks).
    pub per_token_dropout: f64,
    /// Attention heads: tiled attention keeps a number per head and token; attention with
    /// dropout on its probabilities materialises `heads × seq²` scores per sequence (per unit
    /// below).
    pub heads: usize,
    /// Per attention score, when scores are materialised.
    pub per_score: f64,
    /// Per attention score with dropout on.
    pub per_score_dropout: f64,
    /// Per token, what the block's backward holds for a moment beyond its tape (the planner
    /// adds the largest block's once).
    pub backward_per_token: f64,
}

/// Per-element counts fitted to Flex's measured peaks with kiln's fused operations (a Llama
/// block: docs/PERFORMANCE.md): the two RMSNorms' inputs and outputs and the residual gradient
/// in flight (5 × hidden), the scaled queries and the attention output (2 × q), the rotated keys
/// and the values (2 × kv), the SwiGLU's gate, up and product (3 × ffn), the softmax output (1
/// per score; its backward works in place). What other families add is counted by the same
/// rule, an output kept per extra operation, and checked on one shape per family
/// (docs/PERFORMANCE.md, "Per model family").
const PER_NORM: f64 = 2.0;
/// A norm whose output goes straight into the residual sum (Gemma's post-norms) keeps only its
/// input: the addition keeps nothing.
const PER_POST_NORM: f64 = 1.0;
const RESIDUAL: f64 = 1.0;
const PER_Q: f64 = 2.0;
const PER_KV: f64 = 2.0;
const PER_FFN: f64 = 3.0;
/// GELU(tanh) composed of element-wise operations keeps the tanh, 1 + tanh and the GELU itself.
const PER_FFN_GELU: f64 = 3.0;
/// A fused gate/up projection keeps one more FFN width than two linears (measured; the q/k/v
/// slices of a fused projection are copied out and keep nothing more).
const PER_FFN_FUSED: f64 = 1.0;
/// The gradient of a slice is the whole fused output, zero outside the slice: two such
/// buffers are alive while the slices' gradients are summed.
const FUSED_SLICE_GRADIENTS: f64 = 2.0;
const PER_SCORE: f64 = 1.0;
const PER_SCORE_SOFTCAP: f64 = 2.0;
const PER_SCORE_DROPOUT: f64 = 1.0;
const PER_HIDDEN_DROPOUT: f64 = 1.0;

impl Block {
    pub fn profile(&self) -> BlockProfile {
        let a = &self.attn;
        let d = a.o_proj.d_out as f64;
        let q = (a.heads * a.head_dim) as f64;
        let kv = (a.kv_heads * a.head_dim) as f64;
        let ff = self.mlp.width as f64;
        let post_norms =
            self.attn_out_norm.is_some() as u8 as f64 + self.mlp_out_norm.is_some() as u8 as f64;
        let mut per_token =
            (PER_NORM * 2.0 + PER_POST_NORM * post_norms + RESIDUAL) * d + PER_Q * q + PER_KV * kv;
        per_token += match self.mlp.activation {
            Activation::Silu => PER_FFN * ff,
            Activation::GeluTanh => (PER_FFN + PER_FFN_GELU) * ff,
        };
        // q/k norms keep their outputs.
        per_token += (a.q_norm.is_some() as u8 as f64) * q + (a.k_norm.is_some() as u8 as f64) * kv;
        let mut backward_per_token: f64 = 0.0;
        if matches!(a.qkv, QkvProjection::Fused(_)) {
            backward_per_token = backward_per_token.max(FUSED_SLICE_GRADIENTS * (q + 2.0 * kv));
        }
        if matches!(self.mlp.gate_up, GateUpProjection::Fused(_)) {
            per_token += PER_FFN_FUSED * ff;
            backward_per_token = backward_per_token.max(FUSED_SLICE_GRADIENTS * 2.0 * ff);
        }
        BlockProfile {
            per_token,
            per_token_dropout: per_token + PER_HIDDEN_DROPOUT * d,
            heads: a.heads,
            per_score: PER_SCORE
                + if a.softcap.is_some() {
                    PER_SCORE_SOFTCAP
                } else {
                    0.0
                },
            per_score_dropout: PER_SCORE_DROPOUT,
            backward_per_token,
        }
    }
}

impl Architecture {
    /// Each block's profile.
    pub fn memory_profile(&self) -> Vec<BlockProfile> {
        self.blocks.iter().map(Block::profile).collect()
    }
}
