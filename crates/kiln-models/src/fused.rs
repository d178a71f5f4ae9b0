//! Fused operations of the training step, as a Burn backend extension: RMSNorm, rotary position
//! embedding, the attention softmax with its additive mask, SwiGLU and the weighted per-row
//! cross-entropy, each with a hand-written backward.
//!
//! - On Flex (the CPU) each runs as one of `kiln_kernels`' kernels: one pass over memory, split
//!   across cores, vectorised `exp`, instead of the several allocating passes of the composed
//!   operations and their several more in backward.
//! - On the CubeCL backends (wgpu: Metal, Vulkan) the trait's default bodies compose Burn's own
//!   operations, which the fusion compiler then merges; the backward is the same formula. The
//!   de-quantisation of QLoRA's frozen matrices is a CubeCL kernel of kiln's (`fused_cube`).
//! - Under autodiff the forward saves what its backward needs (often less than the composed
//!   operations' tape held) and the backward calls the backend's fused backward.
//!
//! The model calls the functions at the bottom of this file; `reference` holds the same
//! formulas written with the tensor API, which the tests compare against, values and gradients.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{BoolTensor, FloatTensor, IndexingUpdateOp, IntTensor};
use burn::backend::{
    AutodiffBackend, Backend, Cube, DType, Dispatch, Flex, Shape, Slice, TensorData,
    TensorMetadata, backend_extension,
};
use burn::prelude::*;

/// kiln's fused operations. Shapes: `x` rows are the last dimension; see each function below.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait FusedOps: Backend {
    /// RMSNorm of `x` `[n, d]` with weight `[d]`.
    fn kiln_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        composed::rms_norm::<Self>(x, weight, eps)
    }

    /// Gradients of [`FusedOps::kiln_rms_norm`] for `x` and `weight`.
    fn kiln_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::rms_norm_backward::<Self>(x, weight, grad, eps)
    }

    /// `silu(gate) · up`, both `[n, f]`.
    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::swiglu::<Self>(gate, up)
    }

    /// Gradients of [`FusedOps::kiln_swiglu`] for `gate` and `up`.
    fn kiln_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::swiglu_backward::<Self>(gate, up, grad)
    }

    /// Softmax over the last dimension of `scores + bias`: scores `[b, h, s, t]`, bias
    /// `[b or 1, 1, s, t]` (a constant: no gradient flows into it).
    fn kiln_softmax_bias(scores: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::softmax_bias::<Self>(scores, bias)
    }

    /// Gradient of a softmax over the last dimension from its output.
    fn kiln_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed::softmax_backward::<Self>(probs, grad)
    }

    /// Rotary embedding (rotate-half) of `x` `[b, s, h, d]` by tables `[b or 1, s, d]`; `inverse`
    /// rotates by `-sin` (the backward).
    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        composed::rope::<Self>(x, cos, sin, inverse)
    }

    /// Per-row `weight · (logsumexp(logits) − logits[target])`: logits `[n, v]`, targets and
    /// weights `[n]` (constants). Gives `[n]`.
    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed::cross_entropy::<Self>(logits, targets, weights)
    }

    /// Gradient of [`FusedOps::kiln_cross_entropy`] for the logits, from the gradient `[n]` of
    /// its output.
    fn kiln_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed::cross_entropy_backward::<Self>(logits, targets, weights, grad)
    }

    /// Attention computed in tiles, never as scores of every query and key
    /// (`kiln_kernels::attention`): q `[b, s, heads, hd]`, k and v `[b, t, kv_heads, hd]` (t ≥ s:
    /// the last s keys are the queries' own positions), `first` `[1 or b, s]` i32, the first
    /// key each query sees (the last is its own position). Gives the output `[b, s, heads, hd]`
    /// in q's type and each row's log-sum-exp `[b, heads, s]` in f32 (what the backward needs).
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        first: IntTensor<Self>,
        params: AttentionParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::attention::<Self>(q, k, v, first, params)
    }

    /// Gradients of [`FusedOps::kiln_attention`] for q, k and v from the output's gradient.
    #[allow(clippy::too_many_arguments)]
    fn kiln_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        first: IntTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        params: AttentionParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed::attention_backward::<Self>(q, k, v, first, (out, lse), grad, params)
    }

    /// `x · Wᵀ` for a quantized `W` (`crate::quant`): `x` `[n, cols]` gives `[n, rows]`, `W`'s
    /// codes `[rows, words]`, scales and biases `[rows, groups]` (the bias is read only when
    /// the layout has one; callers without pass the scales again).
    fn kiln_qmatmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scale: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        shape: QuantShape,
    ) -> FloatTensor<Self> {
        composed::qmatmul::<Self>(x, codes, scale, bias, shape)
    }

    /// Gradient of [`FusedOps::kiln_qmatmul`] for `x`: `grad · W`, `[n, cols]`.
    fn kiln_qmatmul_backward(
        grad: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scale: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        shape: QuantShape,
    ) -> FloatTensor<Self> {
        composed::qmatmul_backward::<Self>(grad, codes, scale, bias, shape)
    }

    /// The quantized rows in f32, `[rows, cols]` (rows: those of `codes`).
    fn kiln_dequantize(
        codes: IntTensor<Self>,
        scale: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        shape: QuantShape,
    ) -> FloatTensor<Self> {
        composed::dequantize::<Self>(codes, scale, bias, shape)
    }

    /// One AdamW update (`kiln_kernels::adamw`'s formula) of a flat parameter `p` with moments
    /// `m`, `v` and gradient `g` (all `[n]`); `clip` `[1]` scales the gradient; where `apply`
    /// `[1]` is false, `p`, `m` and `v` come back unchanged. Gives the new `(p, m, v)`.
    /// `rates` `[4]` holds `hyper`'s `[lr, decay, bc1, bc2]` on the device ([`adamw_rates`]),
    /// for the backends that read them there (a captured step can't read host scalars).
    #[allow(clippy::too_many_arguments)]
    fn kiln_adamw(
        p: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        clip: FloatTensor<Self>,
        apply: BoolTensor<Self>,
        rates: FloatTensor<Self>,
        hyper: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = rates;
        composed::adamw::<Self>(p, m, v, g, clip, apply, hyper)
    }

    /// `data` written into `tensor`'s own buffer where the backend can (a captured step reads
    /// its inputs from the buffers it was captured with), else a new tensor of `data`.
    fn kiln_overwrite(tensor: FloatTensor<Self>, data: TensorData) -> FloatTensor<Self> {
        let device = tensor.device();
        Self::float_from_data(data, &device)
    }

    /// [`FusedOps::kiln_overwrite`] for integer tensors.
    fn kiln_overwrite_int(tensor: IntTensor<Self>, data: TensorData) -> IntTensor<Self> {
        let device = tensor.device();
        Self::int_from_data(data, &device)
    }
}

use crate::quant::{QuantMatrix, QuantShape};
pub use kiln_kernels::AdamW as AdamWStep;

/// The constants of an attention call besides its tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    /// The factor on `q · k`.
    pub scale: f64,
    /// Scores pass through `c · tanh(s / c)` when set.
    pub softcap: Option<f64>,
}

/// The GPU backends: Burn's operations, merged by its fusion compiler; quantized matrices are
/// de-quantised by kiln's CubeCL kernel (`fused_cube`), attention is kiln's kernels
/// (`attention_cube`), AdamW one kernel a parameter (`adamw_cube`).
impl FusedOps for Cube {
    fn kiln_adamw(
        p: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        clip: FloatTensor<Self>,
        apply: BoolTensor<Self>,
        rates: FloatTensor<Self>,
        hyper: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if crate::adamw_cube::takes([&p, &m, &v, &g, &clip, &rates]) {
            crate::adamw_cube::adamw(p, m, v, g, clip, apply, rates, hyper)
        } else {
            // New buffers, and the rates as host scalars: a captured step must not take this.
            crate::adamw_cube::note_not_in_place();
            composed::adamw::<Self>(p, m, v, g, clip, apply, hyper)
        }
    }

    fn kiln_overwrite(tensor: FloatTensor<Self>, data: TensorData) -> FloatTensor<Self> {
        crate::overwrite_cube::overwrite(tensor, data)
    }

    fn kiln_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        crate::rms_norm_cube::rms_norm(x, weight, eps)
    }

    fn kiln_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        crate::rms_norm_cube::rms_norm_backward(x, weight, grad, eps)
    }

    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if crate::swiglu_cube::takes(&gate, &up) {
            crate::swiglu_cube::swiglu(gate, up)
        } else {
            composed::swiglu::<Self>(gate, up)
        }
    }

    fn kiln_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if crate::swiglu_cube::takes(&gate, &up) && gate.shape() == grad.shape() {
            crate::swiglu_cube::swiglu_backward(gate, up, grad)
        } else {
            composed::swiglu_backward::<Self>(gate, up, grad)
        }
    }

    fn kiln_softmax_bias(scores: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        if crate::softmax_cube::takes(&scores, &bias) {
            crate::softmax_cube::softmax_bias(scores, bias)
        } else {
            composed::softmax_bias::<Self>(scores, bias)
        }
    }

    fn kiln_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if probs.shape() == grad.shape() {
            crate::softmax_cube::softmax_backward(probs, grad)
        } else {
            composed::softmax_backward::<Self>(probs, grad)
        }
    }

    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if crate::cross_entropy_cube::takes(&logits, &targets) {
            crate::cross_entropy_cube::cross_entropy(logits, targets, weights)
        } else {
            composed::cross_entropy::<Self>(logits, targets, weights)
        }
    }

    fn kiln_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if crate::cross_entropy_cube::takes(&logits, &targets) {
            crate::cross_entropy_cube::cross_entropy_backward(logits, targets, weights, grad)
        } else {
            composed::cross_entropy_backward::<Self>(logits, targets, weights, grad)
        }
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        if crate::rope_cube::takes(&x, &cos, &sin) {
            crate::rope_cube::rope(x, cos, sin, inverse)
        } else {
            composed::rope::<Self>(x, cos, sin, inverse)
        }
    }

    fn kiln_overwrite_int(tensor: IntTensor<Self>, data: TensorData) -> IntTensor<Self> {
        crate::overwrite_cube::overwrite(tensor, data)
    }

    fn kiln_dequantize(
        codes: IntTensor<Self>,
        scale: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        shape: QuantShape,
    ) -> FloatTensor<Self> {
        crate::fused_cube::dequantize(codes, scale, bias, shape)
    }

    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        first: IntTensor<Self>,
        params: AttentionParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        crate::attention_cube::attention(q, k, v, first, params)
    }

    fn kiln_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        first: IntTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        params: AttentionParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        crate::attention_cube::attention_backward(q, k, v, first, out, lse, grad, params)
    }
}

/// The formulas on any backend's primitive operations (the GPU path, and the CPU's for other
/// float types than f32).
mod composed {
    use super::*;
    use burn::tensor::FloatDType;

    /// The score of a key a query does not see (finite: WGSL has no infinities).
    const MASKED: f32 = -1e9;

    fn last(t: &impl TensorMetadata) -> usize {
        t.shape().num_dims() - 1
    }

    fn row_vector<B: Backend>(w: FloatTensor<B>) -> FloatTensor<B> {
        let d = w.shape().num_elements();
        B::float_reshape(w, Shape::new([1, d]))
    }

    fn column<B: Backend>(v: FloatTensor<B>) -> FloatTensor<B> {
        let n = v.shape().num_elements();
        B::float_reshape(v, Shape::new([n, 1]))
    }

    /// `1 / sqrt(mean(x²) + eps)` per row, `[n, 1]`.
    fn inv_rms<B: Backend>(x: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
        let ms = B::float_mean_dim(B::float_mul(x.clone(), x), 1);
        B::float_recip(B::float_sqrt(B::float_add_scalar(ms, eps.into())))
    }

    pub fn rms_norm<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
        let inv = inv_rms::<B>(x.clone(), eps);
        B::float_mul(B::float_mul(x, inv), row_vector::<B>(w))
    }

    pub fn rms_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        eps: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let w_shape = w.shape();
        let inv = inv_rms::<B>(x.clone(), eps);
        let n = B::float_mul(x, inv.clone());
        let gw = B::float_mul(g.clone(), row_vector::<B>(w));
        let c = B::float_mean_dim(B::float_mul(gw.clone(), n.clone()), 1);
        let dx = B::float_mul(inv, B::float_sub(gw, B::float_mul(n.clone(), c)));
        let dw = B::float_reshape(B::float_sum_dim(B::float_mul(g, n), 0), w_shape);
        (dx, dw)
    }

    pub fn swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
        B::float_mul(B::float_mul(gate.clone(), B::sigmoid(gate)), up)
    }

    pub fn swiglu_backward<B: Backend>(
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        g: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let s = B::sigmoid(gate.clone());
        let gs = B::float_mul(g, s.clone());
        let dup = B::float_mul(gs.clone(), gate.clone());
        // d silu(a) / da = s · (1 + a · (1 − s))
        let one_minus_s = B::float_add_scalar(B::float_neg(s), 1.0.into());
        let slope = B::float_add_scalar(B::float_mul(gate, one_minus_s), 1.0.into());
        let dgate = B::float_mul(B::float_mul(gs, up), slope);
        (dgate, dup)
    }

    pub fn softmax_bias<B: Backend>(x: FloatTensor<B>, bias: FloatTensor<B>) -> FloatTensor<B> {
        let dim = last(&x);
        B::softmax(B::float_add(x, bias), dim)
    }

    pub fn softmax_backward<B: Backend>(y: FloatTensor<B>, g: FloatTensor<B>) -> FloatTensor<B> {
        let dim = last(&y);
        let d = B::float_sum_dim(B::float_mul(g.clone(), y.clone()), dim);
        B::float_mul(y, B::float_sub(g, d))
    }

    /// `x` `[b, n, kv, hd]` in f32 with heads first, each K/V head repeated for its query heads:
    /// `[b, heads, n, hd]`.
    fn heads_first<B: Backend>(x: FloatTensor<B>, heads: usize) -> FloatTensor<B> {
        let [b, n, kv, hd] = x.shape().dims::<4>();
        let x = B::float_swap_dims(B::float_cast(x, FloatDType::F32), 1, 2);
        if kv == heads {
            return x;
        }
        let rep = heads / kv;
        let x = B::float_reshape(x, Shape::new([b, kv, 1, n, hd]));
        let x = B::float_expand(x, Shape::new([b, kv, rep, n, hd]));
        B::float_reshape(x, Shape::new([b, heads, n, hd]))
    }

    /// The gradient of [`heads_first`]'s output back in `x`'s layout: each K/V head's query
    /// heads summed, `[b, n, kv, hd]`.
    fn heads_back<B: Backend>(g: FloatTensor<B>, kv: usize) -> FloatTensor<B> {
        let [b, heads, n, hd] = g.shape().dims::<4>();
        let g = if kv == heads {
            g
        } else {
            let g = B::float_reshape(g, Shape::new([b, kv, heads / kv, n, hd]));
            B::float_reshape(B::float_sum_dim(g, 2), Shape::new([b, kv, n, hd]))
        };
        B::float_swap_dims(g, 1, 2)
    }

    /// Where query i does not see key j, `[b, heads, s, t]`: before `first[i]` or after its
    /// own position.
    fn hidden<B: Backend>(first: IntTensor<B>, [b, heads, s, t]: [usize; 4]) -> BoolTensor<B> {
        let device = first.device();
        let settings = burn::backend::get_or_init_device_settings::<B>(&device);
        let (int, bool) = (settings.int_dtype, settings.bool_dtype);
        let rows = first.shape()[0];
        let first = B::int_reshape(B::int_cast(first, int), Shape::new([rows, 1, s, 1]));
        let keys = B::int_reshape(
            B::int_arange(0..t as i64, &device, int),
            Shape::new([1, 1, 1, t]),
        );
        let own = B::int_add_scalar(B::int_arange(0..s as i64, &device, int), (t - s).into());
        let own = B::int_reshape(own, Shape::new([1, 1, s, 1]));
        let before = B::bool_expand(
            B::int_lower(keys.clone(), first, bool),
            Shape::new([rows, 1, s, t]),
        );
        let after = B::bool_expand(B::int_greater(keys, own, bool), Shape::new([rows, 1, s, t]));
        B::bool_expand(B::bool_or(before, after), Shape::new([b, heads, s, t]))
    }

    /// The scores in f32 `[b, heads, s, t]`, soft-capped, hidden ones at `MASKED`; and the raw
    /// scaled scores (what the cap's slope needs).
    fn attention_scores<B: Backend>(
        q: &FloatTensor<B>,
        k: &FloatTensor<B>,
        first: IntTensor<B>,
        p: AttentionParams,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let [b, s, heads, _] = q.shape().dims::<4>();
        let t = k.shape()[1];
        let (qh, kh) = (
            heads_first::<B>(q.clone(), heads),
            heads_first::<B>(k.clone(), heads),
        );
        let raw = B::float_mul_scalar(B::float_matmul(qh, B::float_transpose(kh)), p.scale.into());
        let capped = match p.softcap {
            Some(c) => B::float_mul_scalar(
                B::float_tanh(B::float_div_scalar(raw.clone(), c.into())),
                c.into(),
            ),
            None => raw.clone(),
        };
        let hide = hidden::<B>(first, [b, heads, s, t]);
        (B::float_mask_fill(capped, hide, MASKED.into()), raw)
    }

    pub fn attention<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        first: IntTensor<B>,
        p: AttentionParams,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let [b, s, heads, _] = q.shape().dims::<4>();
        let dtype = q.dtype();
        let (scores, _) = attention_scores::<B>(&q, &k, first, p);
        let m = B::float_max_dim(scores.clone(), 3);
        let e = B::float_exp(B::float_sub(scores, m.clone()));
        let z = B::float_sum_dim(e.clone(), 3);
        let probs = B::float_div(e, z.clone());
        let out = B::float_matmul(probs, heads_first::<B>(v, heads));
        let out = B::float_cast(B::float_swap_dims(out, 1, 2), dtype.into());
        let lse = B::float_reshape(B::float_add(m, B::float_log(z)), Shape::new([b, heads, s]));
        (out, lse)
    }

    pub fn attention_backward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        first: IntTensor<B>,
        (out, lse): (FloatTensor<B>, FloatTensor<B>),
        grad: FloatTensor<B>,
        p: AttentionParams,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let [b, s, heads, _] = q.shape().dims::<4>();
        let kv = k.shape()[2];
        let dtypes = (q.dtype(), k.dtype(), v.dtype());
        let (scores, raw) = attention_scores::<B>(&q, &k, first, p);
        let lse = B::float_reshape(lse, Shape::new([b, heads, s, 1]));
        let probs = B::float_exp(B::float_sub(scores, lse));
        let (dout, out) = (heads_first::<B>(grad, heads), heads_first::<B>(out, heads));
        let (qh, kh) = (heads_first::<B>(q, heads), heads_first::<B>(k, heads));
        let vh = heads_first::<B>(v, heads);
        let dp = B::float_matmul(dout.clone(), B::float_transpose(vh));
        let delta = B::float_sum_dim(B::float_mul(dout.clone(), out), 3);
        let mut ds = B::float_mul(probs.clone(), B::float_sub(dp, delta));
        if let Some(c) = p.softcap {
            let t = B::float_tanh(B::float_div_scalar(raw, c.into()));
            let slope = B::float_add_scalar(B::float_neg(B::float_mul(t.clone(), t)), 1.0.into());
            ds = B::float_mul(ds, slope);
        }
        let ds = B::float_mul_scalar(ds, p.scale.into());
        let dq = B::float_swap_dims(B::float_matmul(ds.clone(), kh), 1, 2);
        let dk = heads_back::<B>(B::float_matmul(B::float_transpose(ds), qh), kv);
        let dv = heads_back::<B>(B::float_matmul(B::float_transpose(probs), dout), kv);
        (
            B::float_cast(dq, dtypes.0.into()),
            B::float_cast(dk, dtypes.1.into()),
            B::float_cast(dv, dtypes.2.into()),
        )
    }

    pub fn rope<B: Backend>(
        x: FloatTensor<B>,
        cos: FloatTensor<B>,
        sin: FloatTensor<B>,
        inverse: bool,
    ) -> FloatTensor<B> {
        let [b, s, h, d] = x.shape().dims::<4>();
        let table = |t: FloatTensor<B>| {
            let tb = t.shape()[0];
            B::float_reshape(t, Shape::new([tb, s, 1, d]))
        };
        let half = d / 2;
        let part = |range: core::ops::Range<usize>| {
            B::float_slice(
                x.clone(),
                &[
                    Slice::from(0..b),
                    Slice::from(0..s),
                    Slice::from(0..h),
                    Slice::from(range),
                ],
            )
        };
        let (x1, x2) = (part(0..half), part(half..d));
        let rotated = B::float_cat(vec![B::float_neg(x2), x1], 3);
        let sin = if inverse {
            B::float_neg(table(sin))
        } else {
            table(sin)
        };
        B::float_add(B::float_mul(x, table(cos)), B::float_mul(rotated, sin))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn adamw<B: Backend>(
        p: FloatTensor<B>,
        m: FloatTensor<B>,
        v: FloatTensor<B>,
        g: FloatTensor<B>,
        clip: FloatTensor<B>,
        apply: BoolTensor<B>,
        h: AdamWStep,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let n = p.shape().num_elements();
        let scalar = |x: f32| -> burn::backend::Scalar { (x as f64).into() };
        let g = B::float_mul(g, clip);
        let m1 = B::float_add(
            B::float_mul_scalar(m.clone(), scalar(h.beta1)),
            B::float_mul_scalar(g.clone(), scalar(1.0 - h.beta1)),
        );
        let v1 = B::float_add(
            B::float_mul_scalar(v.clone(), scalar(h.beta2)),
            B::float_mul_scalar(B::float_mul(g.clone(), g), scalar(1.0 - h.beta2)),
        );
        let denom = B::float_add_scalar(
            B::float_sqrt(B::float_div_scalar(v1.clone(), scalar(h.bc2))),
            scalar(h.eps),
        );
        let step = B::float_mul_scalar(
            B::float_div(B::float_div_scalar(m1.clone(), scalar(h.bc1)), denom),
            scalar(h.lr),
        );
        let p1 = B::float_sub(B::float_mul_scalar(p.clone(), scalar(h.decay)), step);
        let skip = B::bool_expand(B::bool_not(apply), Shape::new([n]));
        (
            B::float_mask_where(p1, skip.clone(), p),
            B::float_mask_where(m1, skip.clone(), m),
            B::float_mask_where(v1, skip, v),
        )
    }

    /// The codes unpacked (shift and mask per slot of a word), less the zero, times the
    /// group's scale, plus its bias: the kernel's formula in the backend's own operations.
    pub fn dequantize<B: Backend>(
        codes: IntTensor<B>,
        scale: FloatTensor<B>,
        bias: FloatTensor<B>,
        q: QuantShape,
    ) -> FloatTensor<B> {
        let l = q.layout;
        let rows = codes.shape()[0];
        let (words, groups) = (l.words_per_row(q.cols), l.groups_per_row(q.cols));
        let mask = (1i64 << l.bits) - 1;
        let slots: Vec<IntTensor<B>> = (0..l.codes_per_word())
            .map(|k| {
                let shifted = B::bitwise_right_shift_scalar(
                    codes.clone(),
                    ((l.bits as usize * k) as i64).into(),
                );
                let code = B::bitwise_and_scalar(shifted, mask.into());
                B::int_reshape(code, Shape::new([rows, words, 1]))
            })
            .collect();
        let codes = B::int_reshape(B::int_cat(slots, 2), Shape::new([rows, groups, l.group]));
        let levels = B::float_sub_scalar(
            B::int_into_float(codes, burn::tensor::FloatDType::F32),
            (l.zero as f64).into(),
        );
        let grouped = |t: FloatTensor<B>| B::float_reshape(t, Shape::new([rows, groups, 1]));
        let mut w = B::float_mul(levels, grouped(scale));
        if l.has_bias {
            w = B::float_add(w, grouped(bias));
        }
        B::float_reshape(w, Shape::new([rows, q.cols]))
    }

    /// `W` in `x`'s float type (the backend's de-quantisation: a kernel where it has one).
    fn dense_like<B: FusedOps>(
        x: &FloatTensor<B>,
        codes: IntTensor<B>,
        scale: FloatTensor<B>,
        bias: FloatTensor<B>,
        q: QuantShape,
    ) -> FloatTensor<B> {
        let w = B::kiln_dequantize(codes, scale, bias, q);
        match x.dtype() {
            DType::F32 => w,
            other => B::float_cast(w, other.into()),
        }
    }

    /// Row ranges of `rows` that de-quantise into at most the kernels' scratch size each.
    /// An empty matrix is one empty tile, so that the products keep their shapes.
    fn tiles(rows: usize, cols: usize) -> Vec<core::ops::Range<usize>> {
        if rows == 0 {
            return std::iter::once(0..0).collect();
        }
        let per = (kiln_kernels::quant::SCRATCH_ELEMENTS / cols.max(1)).clamp(1, rows.max(1));
        (0..rows)
            .step_by(per)
            .map(|r| r..(r + per).min(rows))
            .collect()
    }

    /// Rows `r` of a quantized matrix's codes, scales and biases.
    fn rows_of<B: Backend>(
        codes: &IntTensor<B>,
        scale: &FloatTensor<B>,
        bias: &FloatTensor<B>,
        r: core::ops::Range<usize>,
    ) -> (IntTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let rows = Slice::from(r);
        let all = |width: usize| Slice::from(0..width);
        (
            B::int_slice(codes.clone(), &[rows, all(codes.shape()[1])]),
            B::float_slice(scale.clone(), &[rows, all(scale.shape()[1])]),
            B::float_slice(bias.clone(), &[rows, all(bias.shape()[1])]),
        )
    }

    /// `x · Wᵀ`, one tile of W's rows at a time (no weight-sized f32 copy), the tiles' columns
    /// of the output concatenated.
    pub fn qmatmul<B: FusedOps>(
        x: FloatTensor<B>,
        codes: IntTensor<B>,
        scale: FloatTensor<B>,
        bias: FloatTensor<B>,
        q: QuantShape,
    ) -> FloatTensor<B> {
        let rows = codes.shape()[0];
        let parts: Vec<FloatTensor<B>> = tiles(rows, q.cols)
            .into_iter()
            .map(|r| {
                let (c, s, b) = rows_of::<B>(&codes, &scale, &bias, r);
                let w = dense_like::<B>(&x, c, s, b, q);
                B::float_matmul(x.clone(), B::float_transpose(w))
            })
            .collect();
        match parts.len() {
            1 => parts.into_iter().next().expect("one tile"),
            _ => B::float_cat(parts, 1),
        }
    }

    /// `grad · W`, summed over tiles of W's rows in order.
    pub fn qmatmul_backward<B: FusedOps>(
        grad: FloatTensor<B>,
        codes: IntTensor<B>,
        scale: FloatTensor<B>,
        bias: FloatTensor<B>,
        q: QuantShape,
    ) -> FloatTensor<B> {
        let rows = codes.shape()[0];
        let n = grad.shape()[0];
        tiles(rows, q.cols)
            .into_iter()
            .map(|r| {
                let g = B::float_slice(grad.clone(), &[Slice::from(0..n), Slice::from(r.clone())]);
                let (c, s, b) = rows_of::<B>(&codes, &scale, &bias, r);
                let w = dense_like::<B>(&g, c, s, b, q);
                B::float_matmul(g, w)
            })
            .reduce(B::float_add)
            .expect("at least one tile")
    }

    fn target_index<B: Backend>(targets: IntTensor<B>) -> IntTensor<B> {
        let n = targets.shape().num_elements();
        B::int_reshape(targets, Shape::new([n, 1]))
    }

    pub fn cross_entropy<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
        weights: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let n = logits.shape()[0];
        let lsm = B::log_softmax(logits, 1);
        let picked = B::float_gather(1, lsm, target_index::<B>(targets));
        let picked = B::float_reshape(picked, Shape::new([n]));
        B::float_neg(B::float_mul(picked, weights))
    }

    pub fn cross_entropy_backward<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
        weights: FloatTensor<B>,
        g: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let gw = column::<B>(B::float_mul(g, weights));
        let p = B::float_mul(B::softmax(logits, 1), gw.clone());
        B::float_scatter(
            1,
            p,
            target_index::<B>(targets),
            B::float_neg(gw),
            IndexingUpdateOp::Add,
        )
    }
}

/// The CPU: `kiln_kernels` on the tensors' f32 storage.
mod cpu {
    use super::*;

    /// The f32 values of `t` in row-major order, without a copy when it is contiguous.
    pub fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
        match t.as_slice::<f32>() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            // One copy into row-major order, handed over without a second.
            None => std::borrow::Cow::Owned(
                t.to_contiguous()
                    .into_data()
                    .try_into_vec::<f32>()
                    .unwrap_or_default(),
            ),
        }
    }

    /// `t` as a tensor whose storage is exactly its values, row-major, owned by it alone: safe
    /// to overwrite in place (copied only when shared or strided).
    pub fn owned(t: FlexTensor) -> FlexTensor {
        let exact = t.is_unique()
            && t.layout().contiguous_offsets() == Some((0, t.layout().num_elements()))
            && t.bytes().len() == t.layout().num_elements() * 4;
        if exact {
            t
        } else {
            tensor(values(&t).into_owned(), t.layout().shape().clone())
        }
    }

    pub fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    pub fn targets(t: &FlexTensor) -> Vec<u32> {
        let t = t.to_contiguous();
        match t.dtype() {
            DType::I64 => t.storage::<i64>().iter().map(|&v| v as u32).collect(),
            DType::I32 => t.storage::<i32>().iter().map(|&v| v as u32).collect(),
            DType::U32 => t.storage::<u32>().to_vec(),
            DType::U64 => t.storage::<u64>().iter().map(|&v| v as u32).collect(),
            _ => Vec::new(),
        }
    }

    /// A quantized matrix's Flex storage as the kernels' view; `None` when it is not the
    /// contiguous i32 / f32 storage `QuantMatrix` creates.
    pub fn quant_ref<'a>(
        codes: &'a FlexTensor,
        scale: &'a FlexTensor,
        bias: &'a FlexTensor,
        q: QuantShape,
    ) -> Option<kiln_kernels::quant::QuantRef<'a>> {
        let rows = codes.layout().shape()[0];
        let codes = codes.as_slice::<i32>()?;
        let scale = scale.as_slice::<f32>()?;
        let bias = match q.layout.has_bias {
            true => Some(bias.as_slice::<f32>()?),
            false => None,
        };
        let r = kiln_kernels::quant::QuantRef {
            layout: q.layout,
            rows,
            cols: q.cols,
            codes: bytemuck::cast_slice(codes),
            scale,
            bias,
        };
        r.is_consistent().then_some(r)
    }

    /// A quantized matrix's product with `input` `[n, widths.0]`, giving `[n, widths.1]` in
    /// the input's type, by a kernel of `kiln_kernels::quant`; `None` for another shape. Half
    /// precision goes through f32 (the kernels' type) and back: an activation-sized copy, where
    /// the composed path would widen the weight.
    pub fn quant_product(
        input: &FlexTensor,
        (width_in, width_out): (usize, usize),
        kernel: impl FnOnce(&[f32], usize, &mut [f32]),
    ) -> Option<FlexTensor> {
        let dims = input.layout().shape().clone();
        if dims.num_dims() != 2 || dims[1] != width_in {
            return None;
        }
        let dtype = input.dtype();
        let input = as_f32(input.clone());
        let mut out = vec![0f32; dims[0] * width_out];
        kernel(&values(&input), dims[0], &mut out);
        Some(back_to(
            tensor(out, Shape::new([dims[0], width_out])),
            dtype,
        ))
    }

    /// `t` in f32 (itself when it is).
    pub fn as_f32(t: FlexTensor) -> FlexTensor {
        match t.dtype() {
            DType::F32 => t,
            _ => <Flex as burn::backend::ops::FloatTensorOps<Flex>>::float_cast(
                t,
                burn::tensor::FloatDType::F32,
            ),
        }
    }

    /// An f32 result in `dtype`, the type its input had.
    pub fn back_to(t: FlexTensor, dtype: DType) -> FlexTensor {
        match dtype {
            DType::F32 => t,
            other => {
                <Flex as burn::backend::ops::FloatTensorOps<Flex>>::float_cast(t, other.into())
            }
        }
    }

    /// The kernel's shape for q `[b, s, h, hd]`, k `[b, t, kv, hd]` and `first`; `None` when they
    /// do not fit it (then the composed formula runs).
    pub fn attention_shape(
        q: &FlexTensor,
        k: &FlexTensor,
        first: &[u32],
        p: AttentionParams,
    ) -> Option<kiln_kernels::attention::AttentionShape> {
        let (qd, kd) = (q.layout().shape(), k.layout().shape());
        if qd.num_dims() != 4 || kd.num_dims() != 4 || qd[0] != kd[0] || qd[3] != kd[3] {
            return None;
        }
        let sh = kiln_kernels::attention::AttentionShape {
            batch: qd[0],
            heads: qd[2],
            kv_heads: kd[2],
            queries: qd[1],
            keys: kd[1],
            head_dim: qd[3],
            mask_rows: first.len().checked_div(qd[1]).unwrap_or(1),
            scale: p.scale as f32,
            softcap: p.softcap.map(|c| c as f32),
        };
        sh.accepts(first).then_some(sh)
    }

    pub fn is_f32(ts: &[&FlexTensor]) -> bool {
        ts.iter().all(|t| t.dtype() == DType::F32)
    }
}

impl FusedOps for Flex {
    fn kiln_rms_norm(x: FlexTensor, weight: FlexTensor, eps: f64) -> FlexTensor {
        if !cpu::is_f32(&[&x, &weight]) {
            return composed::rms_norm::<Self>(x, weight, eps);
        }
        let shape = x.layout().shape().clone();
        let d = shape[shape.num_dims() - 1];
        let mut out = vec![0f32; shape.num_elements()];
        kiln_kernels::rms_norm(
            &cpu::values(&x),
            &cpu::values(&weight),
            eps as f32,
            &mut out,
            d,
        );
        cpu::tensor(out, shape)
    }

    fn kiln_rms_norm_backward(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        eps: f64,
    ) -> (FlexTensor, FlexTensor) {
        if !cpu::is_f32(&[&x, &weight, &grad]) {
            return composed::rms_norm_backward::<Self>(x, weight, grad, eps);
        }
        let shape = x.layout().shape().clone();
        let w_shape = weight.layout().shape().clone();
        let d = shape[shape.num_dims() - 1];
        let mut dx = vec![0f32; shape.num_elements()];
        let dw = kiln_kernels::rms_norm_backward(
            &cpu::values(&x),
            &cpu::values(&weight),
            &cpu::values(&grad),
            eps as f32,
            &mut dx,
            d,
        );
        (cpu::tensor(dx, shape), cpu::tensor(dw, w_shape))
    }

    fn kiln_swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        if !cpu::is_f32(&[&gate, &up]) || gate.layout().shape() != up.layout().shape() {
            return composed::swiglu::<Self>(gate, up);
        }
        let shape = gate.layout().shape().clone();
        let mut out = vec![0f32; shape.num_elements()];
        kiln_kernels::swiglu(&cpu::values(&gate), &cpu::values(&up), &mut out);
        cpu::tensor(out, shape)
    }

    fn kiln_swiglu_backward(
        gate: FlexTensor,
        up: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let same = gate.layout().shape() == up.layout().shape()
            && gate.layout().shape() == grad.layout().shape();
        if !cpu::is_f32(&[&gate, &up, &grad]) || !same {
            return composed::swiglu_backward::<Self>(gate, up, grad);
        }
        let shape = gate.layout().shape().clone();
        let mut dgate = cpu::owned(grad);
        let mut dup = vec![0f32; shape.num_elements()];
        kiln_kernels::swiglu_backward(
            &cpu::values(&gate),
            &cpu::values(&up),
            dgate.storage_mut::<f32>(),
            &mut dup,
        );
        (dgate, cpu::tensor(dup, shape))
    }

    fn kiln_softmax_bias(scores: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let dims = scores.layout().shape().clone();
        let bdims = bias.layout().shape().clone();
        let fits = dims.num_dims() == 4
            && bdims.num_dims() == 4
            && (bdims[0] == 1 || bdims[0] == dims[0])
            && bdims[1] == 1
            && bdims[2] == dims[2]
            && bdims[3] == dims[3];
        if !cpu::is_f32(&[&scores, &bias]) || !fits {
            return composed::softmax_bias::<Self>(scores, bias);
        }
        let mut y = cpu::owned(scores);
        kiln_kernels::softmax_bias(
            y.storage_mut::<f32>(),
            &cpu::values(&bias),
            dims[1],
            dims[2],
            dims[3],
        );
        y
    }

    fn kiln_softmax_backward(probs: FlexTensor, grad: FlexTensor) -> FlexTensor {
        if !cpu::is_f32(&[&probs, &grad]) || probs.layout().shape() != grad.layout().shape() {
            return composed::softmax_backward::<Self>(probs, grad);
        }
        let shape = probs.layout().shape().clone();
        let len = shape[shape.num_dims() - 1];
        let mut g = cpu::owned(grad);
        kiln_kernels::softmax_backward(&cpu::values(&probs), g.storage_mut::<f32>(), len);
        g
    }

    fn kiln_rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, inverse: bool) -> FlexTensor {
        let dims = x.layout().shape().clone();
        let tdims = cos.layout().shape().clone();
        let fits = dims.num_dims() == 4
            && tdims.num_dims() == 3
            && sin.layout().shape() == &tdims
            && (tdims[0] == 1 || tdims[0] == dims[0])
            && tdims[1] == dims[1]
            && tdims[2] == dims[3]
            && dims[3].is_multiple_of(2);
        if !cpu::is_f32(&[&x, &cos, &sin]) || !fits {
            return composed::rope::<Self>(x, cos, sin, inverse);
        }
        let mut y = cpu::owned(x);
        kiln_kernels::rope(
            y.storage_mut::<f32>(),
            &cpu::values(&cos),
            &cpu::values(&sin),
            dims[1],
            dims[2],
            dims[3],
            inverse,
        );
        y
    }

    fn kiln_cross_entropy(
        logits: FlexTensor,
        targets: FlexTensor,
        weights: FlexTensor,
    ) -> FlexTensor {
        let dims = logits.layout().shape().clone();
        let n = dims[0];
        let t = cpu::targets(&targets);
        if !cpu::is_f32(&[&logits, &weights]) || dims.num_dims() != 2 || t.len() != n {
            return composed::cross_entropy::<Self>(logits, targets, weights);
        }
        let mut loss = vec![0f32; n];
        kiln_kernels::cross_entropy(
            &cpu::values(&logits),
            &t,
            &cpu::values(&weights),
            &mut loss,
            dims[1],
        );
        cpu::tensor(loss, Shape::new([n]))
    }

    fn kiln_cross_entropy_backward(
        logits: FlexTensor,
        targets: FlexTensor,
        weights: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        let dims = logits.layout().shape().clone();
        let n = dims[0];
        let t = cpu::targets(&targets);
        if !cpu::is_f32(&[&logits, &weights, &grad]) || dims.num_dims() != 2 || t.len() != n {
            return composed::cross_entropy_backward::<Self>(logits, targets, weights, grad);
        }
        // The logits are written over with their gradient when nothing else holds them (the
        // tape's copy is handed over here): no second [n, vocab] buffer.
        let mut g = cpu::owned(logits);
        kiln_kernels::cross_entropy_backward(
            g.storage_mut::<f32>(),
            &t,
            &cpu::values(&weights),
            &cpu::values(&grad),
            dims[1],
        );
        g
    }

    fn kiln_qmatmul(
        x: FlexTensor,
        codes: FlexTensor,
        scale: FlexTensor,
        bias: FlexTensor,
        shape: QuantShape,
    ) -> FlexTensor {
        let w = cpu::quant_ref(&codes, &scale, &bias, shape);
        match w.and_then(|w| {
            cpu::quant_product(&x, (w.cols, w.rows), |x, n, out| {
                kiln_kernels::quant::qmatmul(x, n, w, out)
            })
        }) {
            Some(y) => y,
            None => composed::qmatmul::<Self>(x, codes, scale, bias, shape),
        }
    }

    fn kiln_qmatmul_backward(
        grad: FlexTensor,
        codes: FlexTensor,
        scale: FlexTensor,
        bias: FlexTensor,
        shape: QuantShape,
    ) -> FlexTensor {
        let w = cpu::quant_ref(&codes, &scale, &bias, shape);
        match w.and_then(|w| {
            cpu::quant_product(&grad, (w.rows, w.cols), |g, n, out| {
                kiln_kernels::quant::qmatmul_backward(g, n, w, out)
            })
        }) {
            Some(dx) => dx,
            None => composed::qmatmul_backward::<Self>(grad, codes, scale, bias, shape),
        }
    }

    fn kiln_dequantize(
        codes: FlexTensor,
        scale: FlexTensor,
        bias: FlexTensor,
        shape: QuantShape,
    ) -> FlexTensor {
        match cpu::quant_ref(&codes, &scale, &bias, shape) {
            Some(w) => {
                let mut out = vec![0f32; w.rows * w.cols];
                if w.cols > 0 {
                    w.dequantize_rows(0, &mut out);
                }
                cpu::tensor(out, Shape::new([w.rows, w.cols]))
            }
            None => composed::dequantize::<Self>(codes, scale, bias, shape),
        }
    }

    fn kiln_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        first: FlexTensor,
        params: AttentionParams,
    ) -> (FlexTensor, FlexTensor) {
        let firsts = cpu::targets(&first);
        let Some(sh) = cpu::attention_shape(&q, &k, &firsts, params) else {
            return composed::attention::<Self>(q, k, v, first, params);
        };
        let dtype = q.dtype();
        let (q, k, v) = (cpu::as_f32(q), cpu::as_f32(k), cpu::as_f32(v));
        let mut out = vec![0f32; q.layout().num_elements()];
        let mut lse = vec![0f32; sh.batch * sh.heads * sh.queries];
        kiln_kernels::attention::attention(
            &sh,
            (&cpu::values(&q), &cpu::values(&k), &cpu::values(&v)),
            &firsts,
            &mut out,
            &mut lse,
        );
        (
            cpu::back_to(cpu::tensor(out, q.layout().shape().clone()), dtype),
            cpu::tensor(lse, Shape::new([sh.batch, sh.heads, sh.queries])),
        )
    }

    fn kiln_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        first: FlexTensor,
        out: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
        params: AttentionParams,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let firsts = cpu::targets(&first);
        let fits = cpu::attention_shape(&q, &k, &firsts, params).filter(|_| {
            v.layout().shape() == k.layout().shape()
                && out.layout().shape() == q.layout().shape()
                && grad.layout().shape() == q.layout().shape()
        });
        let Some(sh) = fits else {
            return composed::attention_backward::<Self>(q, k, v, first, (out, lse), grad, params);
        };
        let dtypes = (q.dtype(), k.dtype(), v.dtype());
        let [q, k, v, out, lse, grad] = [q, k, v, out, lse, grad].map(cpu::as_f32);
        let mut dq = vec![0f32; q.layout().num_elements()];
        let mut dk = vec![0f32; k.layout().num_elements()];
        let mut dv = vec![0f32; v.layout().num_elements()];
        kiln_kernels::attention::attention_backward(
            &sh,
            (&cpu::values(&q), &cpu::values(&k), &cpu::values(&v)),
            &firsts,
            (&cpu::values(&out), &cpu::values(&lse)),
            &cpu::values(&grad),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        (
            cpu::back_to(cpu::tensor(dq, q.layout().shape().clone()), dtypes.0),
            cpu::back_to(cpu::tensor(dk, k.layout().shape().clone()), dtypes.1),
            cpu::back_to(cpu::tensor(dv, v.layout().shape().clone()), dtypes.2),
        )
    }

    fn kiln_adamw(
        p: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        g: FlexTensor,
        clip: FlexTensor,
        apply: FlexTensor,
        _rates: FlexTensor,
        hyper: AdamWStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        // The rates are `hyper`'s own values; on the CPU the host ones serve.
        flex_adamw(p, m, v, g, clip, apply, hyper)
    }
}

/// [`FusedOps::kiln_adamw`] on Flex.
fn flex_adamw(
    p: FlexTensor,
    m: FlexTensor,
    v: FlexTensor,
    g: FlexTensor,
    clip: FlexTensor,
    apply: FlexTensor,
    hyper: AdamWStep,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let n = p.layout().num_elements();
    let fits = cpu::is_f32(&[&p, &m, &v, &g, &clip])
        && [&m, &v, &g].iter().all(|t| t.layout().num_elements() == n)
        && clip.layout().num_elements() == 1
        && apply.layout().num_elements() == 1
        && matches!(apply.dtype(), DType::Bool(_));
    if !fits {
        return composed::adamw::<Flex>(p, m, v, g, clip, apply, hyper);
    }
    // The flag and the clip factor are on the host already: reading them costs nothing.
    if apply.to_contiguous().bytes().first().copied().unwrap_or(0) == 0 {
        return (p, m, v);
    }
    let clip = cpu::values(&clip)[0];
    let (mut p, mut m, mut v) = (cpu::owned(p), cpu::owned(m), cpu::owned(v));
    kiln_kernels::adamw(
        p.storage_mut::<f32>(),
        m.storage_mut::<f32>(),
        v.storage_mut::<f32>(),
        &cpu::values(&g),
        clip,
        hyper,
    );
    (p, m, v)
}

/// Registers a gradient for a parent node when it is tracked.
macro_rules! register {
    ($grads:expr, $node:expr, $grad:expr) => {
        if let Some(node) = $node {
            $grads.register::<B>(node.id, $grad);
        }
    };
}

impl<B: Backend + FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn kiln_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNormBackward;
        impl<B: Backend + FusedOps> Backward<B, 2> for RmsNormBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, f64);
            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [nx, nw] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, w, eps) = ops.state;
                let (dx, dw) = B::kiln_rms_norm_backward(x, w, grad, eps);
                register!(grads, nx, dx);
                register!(grads, nw, dw);
            }
        }
        let nodes = [x.node(), weight.node()];
        let (x, w) = (x.into_primitive(), weight.into_primitive());
        match RmsNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::kiln_rms_norm(x.clone(), w.clone(), eps);
                prep.finish((x, w, eps), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_rms_norm(x, w, eps)),
        }
    }

    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwigluBackward;
        impl<B: Backend + FusedOps> Backward<B, 2> for SwigluBackward {
            type State = (FloatTensor<B>, FloatTensor<B>);
            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [ng, nu] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (gate, up) = ops.state;
                let (dg, du) = B::kiln_swiglu_backward(gate, up, grad);
                register!(grads, ng, dg);
                register!(grads, nu, du);
            }
        }
        let nodes = [gate.node(), up.node()];
        let (gate, up) = (gate.into_primitive(), up.into_primitive());
        match SwigluBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::kiln_swiglu(gate.clone(), up.clone());
                prep.finish((gate, up), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_swiglu(gate, up)),
        }
    }

    fn kiln_softmax_bias(scores: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SoftmaxBackward;
        impl<B: Backend + FusedOps> Backward<B, 1> for SoftmaxBackward {
            type State = FloatTensor<B>;
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                register!(grads, node, B::kiln_softmax_backward(ops.state, grad));
            }
        }
        let nodes = [scores.node()];
        let (scores, bias) = (scores.into_primitive(), bias.into_primitive());
        match SoftmaxBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::kiln_softmax_bias(scores, bias);
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_softmax_bias(scores, bias)),
        }
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RopeBackward;
        impl<B: Backend + FusedOps> Backward<B, 1> for RopeBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, bool);
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (cos, sin, inverse) = ops.state;
                register!(grads, node, B::kiln_rope(grad, cos, sin, !inverse));
            }
        }
        let nodes = [x.node()];
        let (x, cos, sin) = (
            x.into_primitive(),
            cos.into_primitive(),
            sin.into_primitive(),
        );
        match RopeBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::kiln_rope(x, cos.clone(), sin.clone(), inverse);
                prep.finish((cos, sin, inverse), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_rope(x, cos, sin, inverse)),
        }
    }

    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropyBackward;
        impl<B: Backend + FusedOps> Backward<B, 1> for CrossEntropyBackward {
            type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (logits, targets, weights) = ops.state;
                let g = B::kiln_cross_entropy_backward(logits, targets, weights, grad);
                register!(grads, node, g);
            }
        }
        let nodes = [logits.node()];
        let (logits, weights) = (logits.into_primitive(), weights.into_primitive());
        match CrossEntropyBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let loss = B::kiln_cross_entropy(logits.clone(), targets.clone(), weights.clone());
                prep.finish((logits, targets, weights), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::kiln_cross_entropy(logits, targets, weights))
            }
        }
    }

    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        first: IntTensor<Self>,
        params: AttentionParams,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // The tape keeps q, k, v, the output and the rows' lse: a few numbers per token, no
        // scores; the backward recomputes them tile by tile.
        #[derive(Debug)]
        struct AttentionBackward;
        type State<B> = ([FloatTensor<B>; 5], IntTensor<B>, AttentionParams);
        impl<B: Backend + FusedOps> Backward<B, 3> for AttentionBackward {
            type State = State<B>;
            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [nq, nk, nv] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let ([q, k, v, out, lse], first, params) = ops.state;
                let (dq, dk, dv) =
                    B::kiln_attention_backward(q, k, v, first, out, lse, grad, params);
                register!(grads, nq, dq);
                register!(grads, nk, dk);
                register!(grads, nv, dv);
            }
        }
        let nodes = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        match AttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) =
                    B::kiln_attention(q.clone(), k.clone(), v.clone(), first.clone(), params);
                let lse_out = <Self as AutodiffBackend>::from_inner(lse.clone());
                let state = ([q, k, v, out.clone(), lse], first, params);
                (prep.finish(state, out), lse_out)
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::kiln_attention(q, k, v, first, params);
                (prep.finish(out), <Self as AutodiffBackend>::from_inner(lse))
            }
        }
    }

    fn kiln_qmatmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scale: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        shape: QuantShape,
    ) -> FloatTensor<Self> {
        // The tape keeps the quantized weight (it is held anyway) and nothing else: no f32
        // copy of the weight and not the input, which the input gradient does not need.
        #[derive(Debug)]
        struct QmatmulBackward;
        impl<B: Backend + FusedOps> Backward<B, 1> for QmatmulBackward {
            type State = (IntTensor<B>, FloatTensor<B>, FloatTensor<B>, QuantShape);
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (codes, scale, bias, shape) = ops.state;
                let dx = B::kiln_qmatmul_backward(grad, codes, scale, bias, shape);
                register!(grads, node, dx);
            }
        }
        let nodes = [x.node()];
        let x = x.into_primitive();
        let (scale, bias) = (scale.into_primitive(), bias.into_primitive());
        match QmatmulBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::kiln_qmatmul(x, codes.clone(), scale.clone(), bias.clone(), shape);
                prep.finish((codes, scale, bias, shape), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::kiln_qmatmul(x, codes, scale, bias, shape)),
        }
    }
}

/// RMSNorm of the rows of `x` `[n, d]`: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: Tensor<2>, weight: Tensor<1>, eps: f64) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_rms_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        eps,
    ))
}

/// SwiGLU's gating: `silu(gate) · up`.
pub fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// Attention probabilities: softmax over the keys of `scores + bias`; scores `[b, h, s, t]`,
/// bias `[b or 1, 1, s, t]` (a constant mask).
pub fn softmax_bias(scores: Tensor<4>, bias: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_softmax_bias(
        scores.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// Attention of q `[b, s, heads, hd]` over k and v `[b, t, kv_heads, hd]`, computed in tiles
/// (see [`FusedOps::kiln_attention`]): query i sees keys `first[i] ..= i + t − s` (`first`
/// `[1 or b, s]` i32, a constant). Gives `[b, s, heads, hd]`; the tape keeps no scores.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    first: Tensor<2, Int>,
    params: AttentionParams,
) -> Tensor<4> {
    let first = if q.is_autodiff() {
        first.autodiff()
    } else {
        first
    };
    let (out, _lse) = <Dispatch as FusedOps>::kiln_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        first.into_dispatch(),
        params,
    );
    Tensor::from_dispatch(out)
}

/// Rotary position embedding (rotate-half) of `x` `[b, s, heads, d]` by tables `[b or 1, s, d]`.
pub fn rope(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        false,
    ))
}

/// Per-row weighted cross-entropy of `logits` `[n, v]` against `targets` `[n]`:
/// `weights · (logsumexp(row) − row[target])`, `[n]`. Rows of weight 0 cost nothing.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>, weights: Tensor<1>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
        weights.into_dispatch(),
    ))
}

/// The values of `hyper` that change from step to step, `[lr, decay, bc1, bc2]`, as the
/// device tensor [`adamw`] takes.
pub fn adamw_rates(hyper: &AdamWStep) -> TensorData {
    TensorData::new(vec![hyper.lr, hyper.decay, hyper.bc1, hyper.bc2], [4])
}

/// One AdamW update of the flat parameter `p` (see [`FusedOps::kiln_adamw`]): the new
/// `(p, m, v)`. Where `apply` is false they come back unchanged. `rates` holds
/// [`adamw_rates`]`(&hyper)` on the device. On the GPU backends the update is written into
/// `p`'s and the moments' own buffers when nothing else holds them.
pub fn adamw(
    p: Tensor<1>,
    (m, v): (Tensor<1>, Tensor<1>),
    g: Tensor<1>,
    clip: Tensor<1>,
    apply: Tensor<1, Bool>,
    rates: Tensor<1>,
    hyper: AdamWStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (p, m, v) = <Dispatch as FusedOps>::kiln_adamw(
        p.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        g.into_dispatch(),
        clip.into_dispatch(),
        apply.into_dispatch(),
        rates.into_dispatch(),
        hyper,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// `x · Wᵀ` for a frozen quantized `W` `[out, in]`: `x` `[n, in]` gives `[n, out]`. Its
/// backward de-quantises `W` again, tile by tile, and gives `W` no gradient.
pub fn qmatmul(x: Tensor<2>, w: &QuantMatrix) -> Tensor<2> {
    // The constants take the input's side of autodiff (an untracked wrap, no copy).
    let on_side = |t: Tensor<2>| {
        if x.is_autodiff() { t.autodiff() } else { t }
    };
    let codes = if x.is_autodiff() {
        w.codes.clone().autodiff()
    } else {
        w.codes.clone()
    };
    let (scale, bias) = (on_side(w.scale.clone()), on_side(w.bias_or_scale()));
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_qmatmul(
        x.into_dispatch(),
        codes.into_dispatch(),
        scale.into_dispatch(),
        bias.into_dispatch(),
        w.shape(),
    ))
}

/// The whole of `w` in f32 `[rows, cols]`, without autodiff.
pub fn dequantize(w: &QuantMatrix) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_dequantize(
        w.codes.clone().into_dispatch(),
        w.scale.clone().into_dispatch(),
        w.bias_or_scale().into_dispatch(),
        w.shape(),
    ))
}

/// Rows `ids` of `w` in f32 `[n, cols]` (an embedding lookup), without autodiff.
pub fn gather_rows(w: &QuantMatrix, ids: Tensor<1, Int>) -> Tensor<2> {
    let codes = w.codes.clone().select(0, ids.clone());
    let scale = w.scale.clone().select(0, ids.clone());
    let bias = w.bias_or_scale().select(0, ids);
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_dequantize(
        codes.into_dispatch(),
        scale.into_dispatch(),
        bias.into_dispatch(),
        w.shape(),
    ))
}

/// The same formulas with Burn's tensor API (its autodiff derives the backward), for tests.
pub mod reference {
    use burn::prelude::*;
    use burn::tensor::activation::{log_softmax, silu, softmax};

    pub fn rms_norm(x: Tensor<2>, weight: Tensor<1>, eps: f64) -> Tensor<2> {
        let rms = (x.clone().square().mean_dim(1) + eps).sqrt();
        (x / rms) * weight.unsqueeze_dim(0)
    }

    pub fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
        silu(gate) * up
    }

    pub fn softmax_bias(scores: Tensor<4>, bias: Tensor<4>) -> Tensor<4> {
        softmax(scores + bias, 3)
    }

    pub fn rope(x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>) -> Tensor<4> {
        let [_, _, _, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.unsqueeze_dim(2) + rotated * sin.unsqueeze_dim(2)
    }

    pub fn cross_entropy(
        logits: Tensor<2>,
        targets: Tensor<1, Int>,
        weights: Tensor<1>,
    ) -> Tensor<1> {
        let n = targets.dims()[0];
        log_softmax(logits, 1)
            .gather(1, targets.reshape([n, 1]))
            .reshape([n])
            .neg()
            * weights
    }
}

/// `data` (of `tensor`'s shape and type) written into `tensor`'s own device buffer on the GPU
/// backends, so that a captured step, which reads the buffers it was captured with, sees it;
/// elsewhere a new tensor of `data`. Only in place when nothing else holds `tensor`.
pub fn overwrite<const D: usize>(tensor: Tensor<D>, data: TensorData) -> Tensor<D> {
    debug_assert_eq!(tensor.shape().dims::<D>(), data.shape().dims::<D>());
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_overwrite(
        tensor.into_dispatch(),
        data,
    ))
}

/// [`overwrite`] for integer tensors.
pub fn overwrite_int<const D: usize>(tensor: Tensor<D, Int>, data: TensorData) -> Tensor<D, Int> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::kiln_overwrite_int(
        tensor.into_dispatch(),
        data,
    ))
}

/// The global L2 norm `[1]` of flat f32 gradients, `sqrt(Σ_g Σ g²)`; `None` without any. On
/// the GPU backends one kernel a gradient (`grad_norm_cube`); elsewhere the sums a gradient at
/// a time, added in order. Gradients are plain (untracked) tensors, so this routes by hand:
/// the backend extension takes no list of tensors.
pub fn global_norm(grads: Vec<Tensor<1>>) -> Option<Tensor<1>> {
    use burn::backend::{
        BackendTensor, DispatchAutodiffContext, DispatchTensor, DispatchTensorKind,
    };
    grads.first()?;
    let on_gpu = |t: &Tensor<1>| {
        !t.is_autodiff()
            && matches!(
                t.device().as_dispatch(),
                burn::backend::DispatchDevice::Cube(_)
            )
    };
    if grads.iter().all(on_gpu) {
        let cube: Vec<FloatTensor<Cube>> = grads
            .into_iter()
            .filter_map(|g| match g.into_dispatch().kind {
                DispatchTensorKind::Cube(BackendTensor::Float(t)) => Some(t),
                _ => None,
            })
            .collect();
        let norm = crate::grad_norm_cube::global_norm(cube);
        return Some(Tensor::from_dispatch(DispatchTensor {
            kind: DispatchTensorKind::Cube(BackendTensor::Float(norm)),
            autodiff: DispatchAutodiffContext::Disabled,
        }));
    }
    grads
        .into_iter()
        .map(|g| g.square().sum())
        .reduce(|a, b| a + b)
        .map(Tensor::sqrt)
}
