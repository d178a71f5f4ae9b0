//! One micro-batch's forward and backward, in one of three shapes:
//! - plain: one tape over the whole model, one backward (small vocabularies, no recompute);
//! - chunked loss: the body is taped up to the last hidden state, then the output projection and
//!   cross-entropy run chunk by chunk, each chunk backpropagated before the next is formed, so
//!   batch × sequence × vocabulary logits are never held whole; the body then backpropagates the
//!   gathered gradient of the hidden state;
//! - block recompute (`memory.checkpointing: {every: k}`): the blocks run tape-free keeping only
//!   the input of every k-th block (and the dropout stream's state there); backward re-runs each
//!   span of k blocks with a tape, in reverse, and backpropagates `sum(out · grad_out)`, which
//!   gives the span's parameter gradients and the gradient of its input. Dropout replays the same
//!   masks because they come from the saved stream state. The last span is taped in the forward
//!   itself: its backward comes first, so recomputing it would buy nothing.
//!
//! All three give the same gradients up to float rounding (tested on CPU and on wgpu).

use crate::inference::inference_view;
use crate::optim::GradAccumulator;
use burn::prelude::*;
use burn::tensor::FloatDType;
use kiln_data::Batch;
use kiln_models::Dropout;
use kiln_models::dtype::to_dtype;
use kiln_models::fused;
use kiln_models::layers::ForwardConsts;
use kiln_models::{Model, ParamKind, ParamMapper};

/// How one micro-batch is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Recompute spans of this many blocks; `None`: keep every activation.
    pub recompute_every: Option<usize>,
    /// Positions per chunk of the output projection and loss.
    pub loss_chunk: usize,
    /// The float type of the forward and backward (`train.dtype`); parameters stay as they are.
    pub dtype: FloatDType,
}

impl StepShape {
    /// `memory.loss_chunk` (0: the planner's automatic size) for a vocabulary of `vocab`.
    pub fn new(recompute_every: Option<usize>, loss_chunk: usize, vocab: usize) -> Self {
        Self {
            recompute_every,
            loss_chunk: crate::plan::loss_chunk(loss_chunk, vocab),
            dtype: FloatDType::F32,
        }
    }
}

/// The loss the head computes from the last hidden state: `Σ_t weights_t · nll_t / divisor`
/// over the batch's positions `t`, `nll_t` the cross-entropy of position `t`'s target. The
/// next-token loss weighs each trained position 1 and divides by their count; preference
/// objectives give each position the derivative of their loss with respect to its `nll_t`.
pub struct HeadLoss {
    /// `[batch × seq]`, on the plain (non-autodiff) device: constants of the backward.
    pub weights: Tensor<1>,
    /// `[1]`, on the plain device: a tensor, not a scalar, so that a captured step divides by
    /// each batch's own count.
    pub divisor: Tensor<1>,
}

/// A micro-batch's tensors on the (plain) device, uploaded before its forward: the next-token
/// step reads nothing else from the host, so a captured step (`crate::replay`) can find the
/// next micro-batch in the same buffers, written there by [`StepBatch::refill`].
pub struct StepBatch {
    /// `[batch × seq]` token ids.
    pub ids: Tensor<1, Int>,
    /// `[batch × seq]` next tokens.
    pub targets: Tensor<1, Int>,
    /// `[batch × seq]`: 1 where the target counts toward the loss.
    pub weights: Tensor<1>,
    /// `[1]`: how many targets count (at least 1).
    pub count: Tensor<1>,
    /// Rotary tables and masks for the batch's shape (and its segments when packed).
    pub consts: ForwardConsts,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Whether the rows are packed (the masks then depend on the batch, not only its shape).
    pub packed: bool,
}

impl StepBatch {
    /// `batch`'s tensors for `model`'s device, its tables for a forward in `dtype` (the step's
    /// compute type).
    pub fn upload(model: &Model, batch: &Batch, dtype: FloatDType) -> Self {
        let device = model.device().without_autodiff();
        let [ids, targets, weights, count] = Self::host_data(batch);
        Self {
            ids: Tensor::from_data(ids, &device),
            targets: Tensor::from_data(targets, &device),
            weights: Tensor::from_data(weights, &device),
            count: Tensor::from_data(count, &device),
            consts: model.consts_in(batch, dtype),
            batch_size: batch.batch_size,
            seq_len: batch.seq_len,
            packed: batch.segments.is_some(),
        }
    }

    /// Whether `batch` can be written into these buffers: the same shape, both packed or
    /// neither.
    pub fn fits(&self, batch: &Batch) -> bool {
        self.packed == batch.segments.is_some()
            && batch.batch_size == self.batch_size
            && batch.seq_len == self.seq_len
    }

    /// `batch` (which [`StepBatch::fits`]) written into these tensors' own buffers (in place
    /// on the GPU backends); a packed batch's rotary tables and key runs too.
    pub fn refill(self, model: &Model, batch: &Batch) -> Self {
        debug_assert!(self.fits(batch));
        let [ids, targets, weights, count] = Self::host_data(batch);
        let consts = if self.packed {
            model.refill_consts(self.consts, batch)
        } else {
            // Plain rows: the constants depend on the shape alone.
            self.consts
        };
        Self {
            ids: fused::overwrite_int(self.ids, ids),
            targets: fused::overwrite_int(self.targets, targets),
            weights: fused::overwrite(self.weights, weights),
            count: fused::overwrite(self.count, count),
            consts,
            ..self
        }
    }

    fn host_data(batch: &Batch) -> [TensorData; 4] {
        let rows = batch.batch_size * batch.seq_len;
        let (weights, count) = match batch.loss_mask.as_deref() {
            Some(m) => (m.to_vec(), m.iter().sum::<f32>()),
            None => (vec![1.0; rows], rows as f32),
        };
        [
            Model::ids_data(&batch.inputs),
            Model::ids_data(&batch.targets),
            TensorData::new(weights, [rows]),
            TensorData::new(vec![count.max(1.0)], [1]),
        ]
    }

    /// The next-token loss of these positions.
    pub fn head_loss(&self) -> HeadLoss {
        HeadLoss {
            weights: self.weights.clone(),
            divisor: self.count.clone(),
        }
    }
}

/// Forward and backward of `batch`: adds `scale ×` the gradients into `grads` and returns the
/// batch's mean loss (detached, off the tape).
pub fn forward_backward(
    master: &Model,
    batch: &Batch,
    dropout: &mut Option<Dropout>,
    shape: StepShape,
    grads: &mut GradAccumulator,
    scale: f64,
) -> Tensor<1> {
    let inputs = StepBatch::upload(master, batch, shape.dtype);
    forward_backward_on(master, &inputs, dropout, shape, grads, scale)
}

/// [`forward_backward`] of a micro-batch already on the device: uploads nothing and reads
/// nothing back, so it can run inside a captured step.
pub fn forward_backward_on(
    master: &Model,
    batch: &StepBatch,
    dropout: &mut Option<Dropout>,
    shape: StepShape,
    grads: &mut GradAccumulator,
    scale: f64,
) -> Tensor<1> {
    let rows = batch.batch_size * batch.seq_len;
    if shape.recompute_every.is_none() && rows <= shape.loss_chunk {
        // One tape over the whole model.
        let compute = compute_view(master, shape.dtype);
        let loss_scale = loss_scale(shape.dtype);
        let mut h = compute.embed_ids(batch.ids.clone());
        for i in 0..compute.num_layers() {
            h = compute.block(i, h, &batch.consts, dropout, None);
        }
        let logits = compute.head(h);
        let loss = weighted_nll(logits, batch.targets.clone(), batch.weights.clone())
            .sum()
            .div(batch.count.clone());
        let g = scaled(loss.clone(), loss_scale).backward();
        grads.add(master, &g, scale / loss_scale);
        return loss.detach().without_autodiff();
    }
    forward_backward_with(master, batch, dropout, shape, grads, scale, &mut |_, _| {
        batch.head_loss()
    })
}

/// Forward and backward of `batch` under the loss `head_loss` makes from the model (in the
/// compute type) and the last hidden state (off the tape): the body runs in `shape` (taped, or in
/// recomputed spans), the head in chunks. Returns the head's loss (detached).
pub fn forward_backward_with(
    master: &Model,
    batch: &StepBatch,
    dropout: &mut Option<Dropout>,
    shape: StepShape,
    grads: &mut GradAccumulator,
    scale: f64,
    head_loss: &mut dyn FnMut(&Model, &Tensor<2>) -> HeadLoss,
) -> Tensor<1> {
    // In half precision the step runs on a cast of the (f32) parameters; the casts are on the
    // tape, so gradients arrive at the f32 leaves. f16 scales the loss before backward so that
    // small gradients don't flush to zero, and the accumulator unscales them in f32.
    let compute = compute_view(master, shape.dtype);
    let model = &compute;
    let loss_scale = loss_scale(shape.dtype);
    let head = HeadScale {
        loss: loss_scale,
        grads: scale / loss_scale,
    };
    let scale = head.grads;
    let mut head_backward = |model: &Model, h: &Tensor<2>, grads: &mut GradAccumulator| {
        let loss = head_loss(model, &h.clone().detach().without_autodiff());
        head_backward(
            model,
            master,
            h,
            batch,
            &loss,
            shape.loss_chunk,
            grads,
            head,
        )
    };
    let consts = &batch.consts;
    let x0 = model.embed_ids(batch.ids.clone());
    match shape.recompute_every {
        None => {
            let mut h = x0;
            for i in 0..model.num_layers() {
                h = model.block(i, h, consts, dropout, None);
            }
            let (loss, grad_h) = head_backward(model, &h, grads);
            backprop_into(h, grad_h, master, grads, scale);
            loss
        }
        Some(k) => {
            let view = inference_view(model);
            let n = model.num_layers();
            let spans: Vec<(usize, usize)> = (0..n)
                .step_by(k.max(1))
                .map(|a| (a, (a + k).min(n)))
                .collect();
            // Every span but the last runs tape-free, keeping its input; the last runs taped
            // straight away, since its backward comes first (no point recomputing it).
            let (last, rest) = spans.split_last().expect("at least one block");
            let mut saved = Vec::with_capacity(rest.len());
            let mut h = x0.clone().without_autodiff();
            for &(a, b) in rest {
                saved.push((h.clone(), dropout.clone()));
                for i in a..b {
                    h = view.block(i, h, consts, dropout, None);
                }
            }
            let last_input = h.autodiff().require_grad();
            let mut out = last_input.clone();
            for i in last.0..last.1 {
                out = model.block(i, out, consts, dropout, None);
            }
            let (loss, grad_out) = head_backward(model, &out, grads);
            let mut grad_h = span_backward(out, grad_out, &last_input, master, grads, scale);
            for &(a, b) in rest.iter().rev() {
                let (input, mut replay) = saved.pop().expect("one saved input per span");
                let input = input.autodiff().require_grad();
                let mut out = input.clone();
                for i in a..b {
                    out = model.block(i, out, consts, &mut replay, None);
                }
                grad_h = span_backward(out, grad_h, &input, master, grads, scale);
            }
            backprop_into(x0, grad_h, master, grads, scale);
            loss
        }
    }
}

/// The factor on the loss before backward, and the one on the gradients it gives.
#[derive(Debug, Clone, Copy)]
struct HeadScale {
    loss: f64,
    grads: f64,
}

/// `x · factor`, or `x` itself for a factor of 1 (the same bits, one kernel less on a GPU).
pub fn scaled<const D: usize>(x: Tensor<D>, factor: f64) -> Tensor<D> {
    if factor == 1.0 { x } else { x * factor }
}

/// The factor on the loss before backward in `dtype`: 1024 for f16 (whose smallest normal is
/// 6e-5, under many gradients), 1 otherwise (bf16 has f32's exponent range).
pub fn loss_scale(dtype: FloatDType) -> f64 {
    if dtype == FloatDType::F16 {
        1024.0
    } else {
        1.0
    }
}

/// `model`'s parameters cast to `dtype` (on the tape, for tracked ones), or `model` itself in
/// its own type.
pub fn compute_view(model: &Model, dtype: FloatDType) -> Model {
    struct Cast(FloatDType);
    impl ParamMapper for Cast {
        fn map<const D: usize>(&mut self, _: &str, _: ParamKind, p: Tensor<D>) -> Tensor<D> {
            to_dtype(p, self.0)
        }
    }
    if dtype == FloatDType::F32 {
        model.clone()
    } else {
        model.clone().map_params(&mut Cast(dtype))
    }
}

/// `model` with its frozen parameters (all but LoRA's adapters) held in `dtype`: a LoRA run in
/// half precision keeps its base model in the half type, as mlx-lm does, instead of an f32 copy
/// cast at every step. A no-op in f32.
pub fn frozen_to(model: Model, dtype: FloatDType) -> Model {
    struct Frozen(FloatDType);
    impl ParamMapper for Frozen {
        fn map<const D: usize>(&mut self, _: &str, kind: ParamKind, p: Tensor<D>) -> Tensor<D> {
            match kind {
                k if k.is_lora() => p,
                _ => to_dtype(p, self.0),
            }
        }
    }
    if dtype == FloatDType::F32 {
        model
    } else {
        model.map_params(&mut Frozen(dtype))
    }
}

/// Backpropagates `grad_out` through a taped span from `input` to `out`: adds the span's parameter
/// gradients and returns the gradient with respect to `input`.
fn span_backward(
    out: Tensor<2>,
    grad_out: Tensor<2>,
    input: &Tensor<2>,
    model: &Model,
    grads: &mut GradAccumulator,
    scale: f64,
) -> Tensor<2> {
    let g = (out * grad_out).sum().backward();
    grads.add(model, &g, scale);
    input
        .grad(&g)
        .unwrap_or_else(|| input.clone().without_autodiff().zeros_like())
}

/// Backpropagates `grad` (of the loss with respect to `y`) through `y`'s tape, if it has one.
fn backprop_into(
    y: Tensor<2>,
    grad: Tensor<2>,
    model: &Model,
    grads: &mut GradAccumulator,
    scale: f64,
) {
    if y.is_tracked() {
        let g = (y * grad).sum().backward();
        grads.add(model, &g, scale);
    }
}

/// Final norm, output projection and cross-entropy over chunks of `chunk` positions of the last
/// hidden state `h`, each chunk taped and backpropagated on its own, under `loss`'s weights.
/// Returns the loss and the gradient of the loss with respect to `h` (both off the tape).
#[allow(clippy::too_many_arguments)]
fn head_backward(
    model: &Model,
    master: &Model,
    h: &Tensor<2>,
    batch: &StepBatch,
    head_loss: &HeadLoss,
    chunk: usize,
    grads: &mut GradAccumulator,
    scale: HeadScale,
) -> (Tensor<1>, Tensor<2>) {
    let h = h.clone().without_autodiff();
    let [rows, _] = h.dims();
    let mut loss: Option<Tensor<1>> = None;
    let mut grad_parts = Vec::new();
    let chunk = chunk.clamp(1, rows.max(1));
    for start in (0..rows).step_by(chunk) {
        let end = (start + chunk).min(rows);
        let whole = start == 0 && end == rows;
        let part = if whole {
            h.clone()
        } else {
            h.clone().slice(start..end)
        };
        let weights = if whole {
            head_loss.weights.clone()
        } else {
            head_loss.weights.clone().slice(start..end)
        };
        let part = part.autodiff().require_grad();
        let logits = model.head(part.clone());
        let targets = if whole {
            batch.targets.clone()
        } else {
            batch.targets.clone().slice(start..end)
        };
        let l = weighted_nll(logits, targets, weights)
            .sum()
            .div(head_loss.divisor.clone());
        let g = scaled(l.clone(), scale.loss).backward();
        grads.add(master, &g, scale.grads);
        grad_parts.push(
            part.grad(&g)
                .unwrap_or_else(|| part.clone().without_autodiff().zeros_like()),
        );
        let l = l.detach().without_autodiff();
        loss = Some(match loss {
            Some(acc) => acc + l,
            None => l,
        });
    }
    let loss = loss.expect("at least one position");
    let grad = if grad_parts.len() == 1 {
        grad_parts.pop().expect("one part")
    } else {
        Tensor::cat(grad_parts, 0)
    };
    (loss, grad)
}

/// `weights_t · nll_t` for each row of `logits` (in f32 whatever the compute type).
pub fn weighted_nll(logits: Tensor<2>, targets: Tensor<1, Int>, weights: Tensor<1>) -> Tensor<1> {
    kiln_models::fused::cross_entropy(to_dtype(logits, FloatDType::F32), targets, weights)
}

/// [`weighted_nll`] against targets on the host.
pub fn weighted_nll_of(logits: Tensor<2>, targets: &[u32], weights: Tensor<1>) -> Tensor<1> {
    let device = logits.device().without_autodiff();
    let targets = Tensor::from_data(Model::ids_data(targets), &device);
    weighted_nll(logits, targets, weights)
}
