//! Grouped-query self-attention with what open families add to Llama's: q/k norms per head
//! (Qwen3, Gemma 3), a fused q/k/v projection (Phi-3), partial or no RoPE (Phi-3, SmolLM3), a
//! sliding window (Gemma), a tanh soft-cap on the scores (Gemma 2) and the family's score scale.

use crate::dtype::{float_dtype, to_dtype};
use crate::fused;
use crate::layers::consts::ForwardConsts;
use crate::layers::dropout::Dropout;
use crate::layers::linear::Linear;
use crate::layers::norm::RmsNorm;
use crate::params::Weights;
use burn::prelude::*;
use burn::tensor::FloatDType;

/// The q, k and v projections: three linears, or one whose output rows are `[q | k | v]`.
// Declared once per block and never moved on a hot path: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum QkvProjection {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// Keys and values (after RoPE) of one layer: `[1, t, kv, hd]`.
/// A sliding-window layer keeps only the last `window - 1` positions.
pub type LayerCache = Option<(Tensor<4>, Tensor<4>)>;

#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub qkv: QkvProjection,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The factor on the scores (`head_dim^-0.5`, Gemma: `query_pre_attn_scalar^-0.5`).
    pub scale: f64,
    /// Index of this layer's RoPE in the architecture's list; `None` for a NoPE layer.
    pub rope: Option<usize>,
    /// Keys further back than this many positions are not attended to.
    pub window: Option<usize>,
    /// Scores pass through `tanh(s / c) · c`.
    pub softcap: Option<f64>,
}

impl Attention {
    /// Every linear of the layer.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = match &self.qkv {
            QkvProjection::Separate { q, k, v } => vec![q, k, v],
            QkvProjection::Fused(l) => vec![l],
        };
        v.push(&self.o_proj);
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = match &mut self.qkv {
            QkvProjection::Separate { q, k, v } => vec![q, k, v],
            QkvProjection::Fused(l) => vec![l],
        };
        v.push(&mut self.o_proj);
        v
    }

    pub fn forward(
        &self,
        w: &Weights,
        x: Tensor<2>,
        consts: &ForwardConsts,
        dropout: &mut Option<Dropout>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<2> {
        let (batch, seq) = (consts.batch, consts.seq);
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            QkvProjection::Separate { q, k, v } => (
                q.forward(w, x.clone(), dropout),
                k.forward(w, x.clone(), dropout),
                v.forward(w, x, dropout),
            ),
            QkvProjection::Fused(l) => {
                let y = l.forward(w, x, dropout);
                (
                    y.clone().narrow(1, 0, h * hd),
                    y.clone().narrow(1, h * hd, kvh * hd),
                    y.narrow(1, (h + kvh) * hd, kvh * hd),
                )
            }
        };
        // Normalised and rotated in the projections' own `[batch, seq, heads, hd]` layout, then
        // viewed as `[batch, heads, seq, hd]`.
        let mut q = q.reshape([batch, seq, h, hd]);
        let mut k = k.reshape([batch, seq, kvh, hd]);
        if let Some(n) = &self.q_norm {
            q = n.forward_heads(w, q);
        }
        if let Some(n) = &self.k_norm {
            k = n.forward_heads(w, k);
        }
        if let Some(r) = self.rope {
            let table = &consts.ropes[r];
            q = table.rotate(q);
            k = table.rotate(k);
        }
        let v = v.reshape([batch, seq, kvh, hd]);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 1), Tensor::cat(vec![pv, v], 1)),
                    None => (k, v),
                };
                let total = k.dims()[1];
                *slot = Some(match self.window {
                    // Later queries see at most the last `window - 1` of these keys.
                    Some(win) if total > win.saturating_sub(1) => {
                        let keep = win.saturating_sub(1);
                        (
                            k.clone().narrow(1, total - keep, keep),
                            v.clone().narrow(1, total - keep, keep),
                        )
                    }
                    _ => (k.clone(), v.clone()),
                });
                (k, v)
            }
            None => (k, v),
        };
        let runs = consts.runs(self.window);
        // Dropout on the attention probabilities needs them: that case alone materialises the
        // scores. Everything else (training, recompute, evaluation, generation) attends in
        // tiles.
        let out = match dropout.as_mut().filter(|d| d.p > 0.0) {
            Some(d) => {
                let bias = runs.bias(&q.device());
                materialised(q, k, v, bias, (self.scale, self.softcap), Some(d))
            }
            None => fused::attention(
                q,
                k,
                v,
                runs.first.clone(),
                fused::AttentionParams {
                    scale: self.scale,
                    softcap: self.softcap,
                },
            ),
        };
        self.o_proj
            .forward(w, out.reshape([batch * seq, h * hd]), dropout)
    }
}

/// Attention over materialised scores: q `[b, s, heads, hd]`, k and v `[b, t, kv_heads, hd]`,
/// `bias` the additive mask `[1 or b, 1, s, t]`, optional dropout on the probabilities. Gives
/// `[b, s, heads, hd]`. The tape keeps `b × heads × s × t` probabilities.
pub fn materialised(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<4>,
    (scale, softcap): (f64, Option<f64>),
    dropout: Option<&mut Dropout>,
) -> Tensor<4> {
    let [batch, _, h, hd] = q.dims();
    let [_, total, kvh, _] = k.dims();
    let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
    let (k, v) = if kvh == h {
        (k, v)
    } else {
        let rep = h / kvh;
        let expand = |t: Tensor<4>| {
            t.unsqueeze_dim::<5>(2)
                .expand([batch, kvh, rep, total, hd])
                .reshape([batch, h, total, hd])
        };
        (expand(k), expand(v))
    };
    // The scale goes on q, not on the b·h·s² scores: the same product, fewer multiplications.
    let mut scores = (q * scale).matmul(k.swap_dims(2, 3));
    // The softmax (and its mask) in f32 whatever the compute type, as transformers does.
    let dtype = float_dtype(&scores);
    scores = to_dtype(scores, FloatDType::F32);
    if let Some(c) = softcap {
        scores = (scores / c).tanh() * c;
    }
    let mut probs = to_dtype(fused::softmax_bias(scores, bias), dtype);
    if let Some(d) = dropout {
        probs = d.apply(probs);
    }
    probs.matmul(v).swap_dims(1, 2)
}
