//! The weighted per-row cross-entropy and its backward on the GPU backends (wgpu: Metal,
//! Vulkan) as CubeCL kernels, in f32: `kiln_kernels::cross_entropy`'s formula,
//! `weight · (logsumexp(row) − row[target])`, rows of weight 0 giving 0. A cube a row
//! (`cube_rows`) forward and backward; Burn's operations took a log-softmax (reductions and
//! element-wise kernels), a gather and a product forward, a softmax and a scatter backward.

use crate::cube_op::{self, back_to, empty_f32, f32_of, grid};
use crate::cube_rows::{THREADS, max_and_exp_sum, row_of_cube};
use burn::backend::fusion::custom::ScalarIr;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Cube, DType, Shape, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::CubeDim;
use burn_cubecl::cubecl::ir::{ElemType, IntKind, UIntKind};
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;

/// Row `row`'s target as an index, and whether it lies inside the row.
#[cube]
fn target_of<I: Int>(targets: &Tensor<I>, row: usize, width: usize) -> (usize, bool) {
    let mut t = 0usize;
    let mut inside = false;
    if width > 0 {
        let raw = i64::cast_from(targets[row]);
        inside = raw >= 0 && raw < width as i64;
        if inside {
            t = raw as usize;
        }
    }
    (t, inside)
}

#[cube(launch_unchecked)]
fn forward_kernel<I: Int>(
    logits: &Tensor<f32>,
    targets: &Tensor<I>,
    weights: &Tensor<f32>,
    out: &mut Tensor<f32>,
    rows: usize,
    vocab: usize,
    #[comptime] threads: usize,
    #[define(I)] _int: ElemType,
) {
    let (row, width) = row_of_cube(rows, vocab);
    let at = row * vocab;
    let (max, sum) = max_and_exp_sum(logits, at, width, threads);
    if UNIT_POS_X == 0 && width > 0 {
        let w = weights[row];
        let (t, inside) = target_of(targets, row, width);
        let mut loss = 0.0f32;
        if w != 0.0 {
            if inside {
                loss = w * (max + f32::ln(sum) - logits[at + t]);
            } else {
                // A target outside the row: NaN, as on the CPU, made from a run-time value
                // (WGSL has no NaN literal, and a constant 0 / 0 would be folded into one).
                loss = f32::sqrt(-(f32::abs(w) + 1.0f32));
            }
        }
        out[row] = loss;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel<I: Int>(
    logits: &Tensor<f32>,
    targets: &Tensor<I>,
    weights: &Tensor<f32>,
    grad: &Tensor<f32>,
    dlogits: &mut Tensor<f32>,
    rows: usize,
    vocab: usize,
    #[comptime] threads: usize,
    #[define(I)] _int: ElemType,
) {
    let (row, width) = row_of_cube(rows, vocab);
    let at = row * vocab;
    let (max, sum) = max_and_exp_sum(logits, at, width, threads);
    let mut gw = 0.0f32;
    if width > 0 {
        gw = grad[row] * weights[row];
    }
    let (t, inside) = target_of(targets, row, width);
    let lse = max + f32::ln(sum);
    let mut j = UNIT_POS_X as usize;
    while j < width {
        let mut d = f32::exp(logits[at + j] - lse) * gw;
        if inside && j == t {
            d -= gw;
        }
        dlogits[at + j] = d;
        j += CUBE_DIM_X as usize;
    }
}

fn int_type(t: &CubeTensor) -> ElemType {
    match t.dtype {
        DType::I64 => ElemType::Int(IntKind::I64),
        DType::I16 => ElemType::Int(IntKind::I16),
        DType::I8 => ElemType::Int(IntKind::I8),
        DType::U64 => ElemType::UInt(UIntKind::U64),
        DType::U32 => ElemType::UInt(UIntKind::U32),
        DType::U16 => ElemType::UInt(UIntKind::U16),
        DType::U8 => ElemType::UInt(UIntKind::U8),
        _ => ElemType::Int(IntKind::I32),
    }
}

fn forward_launch(inputs: Vec<CubeTensor>, _: &[ScalarIr]) -> Vec<CubeTensor> {
    let [logits, targets, weights]: [CubeTensor; 3] = inputs.try_into().expect("three inputs");
    let [rows, vocab] = logits.shape().dims::<2>();
    let out = empty_f32(&logits, Shape::new([rows]));
    if rows > 0 {
        let int = int_type(&targets);
        // SAFETY: a cube a row < rows reads its `vocab` logits, its target (used as an index
        // only inside the row) and weight; cubes past the rows read and write nothing.
        unsafe {
            forward_kernel::launch_unchecked(
                &logits.client,
                grid(rows),
                CubeDim::new_1d(THREADS as u32),
                logits.clone().into_tensor_arg(),
                targets.into_tensor_arg(),
                weights.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                rows,
                vocab,
                THREADS,
                int,
            );
        }
    }
    vec![out]
}

fn backward_launch(inputs: Vec<CubeTensor>, _: &[ScalarIr]) -> Vec<CubeTensor> {
    let [logits, targets, weights, grad]: [CubeTensor; 4] = inputs.try_into().expect("four inputs");
    let [rows, vocab] = logits.shape().dims::<2>();
    let dlogits = empty_f32(&logits, logits.shape());
    if rows > 0 {
        let int = int_type(&targets);
        // SAFETY: as forward, with grad one a row and dlogits like logits.
        unsafe {
            backward_kernel::launch_unchecked(
                &logits.client,
                grid(rows),
                CubeDim::new_1d(THREADS as u32),
                logits.clone().into_tensor_arg(),
                targets.into_tensor_arg(),
                weights.into_tensor_arg(),
                grad.into_tensor_arg(),
                dlogits.clone().into_tensor_arg(),
                rows,
                vocab,
                THREADS,
                int,
            );
        }
    }
    vec![dlogits]
}

/// Whether the kernels take this call: `[n, v]` logits, `[n]` targets and weights.
pub fn takes(logits: &FloatTensor<Cube>, targets: &IntTensor<Cube>) -> bool {
    let (l, t) = (logits.shape(), targets.shape());
    l.num_dims() == 2 && t.num_dims() == 1 && t[0] == l[0]
}

/// `FusedOps::kiln_cross_entropy` on the GPU backends, for calls the kernels [`takes`].
pub fn cross_entropy(
    logits: FloatTensor<Cube>,
    targets: IntTensor<Cube>,
    weights: FloatTensor<Cube>,
) -> FloatTensor<Cube> {
    let dtype = logits.dtype();
    let rows = logits.shape()[0];
    let mut out = cube_op::register(
        "kiln::cross_entropy",
        vec![f32_of(logits), targets, f32_of(weights)],
        &[Shape::new([rows])],
        Vec::new(),
        forward_launch,
    );
    back_to(out.remove(0), dtype)
}

/// `FusedOps::kiln_cross_entropy_backward` on the GPU backends.
pub fn cross_entropy_backward(
    logits: FloatTensor<Cube>,
    targets: IntTensor<Cube>,
    weights: FloatTensor<Cube>,
    grad: FloatTensor<Cube>,
) -> FloatTensor<Cube> {
    let dtype = logits.dtype();
    let shape = logits.shape();
    let mut out = cube_op::register(
        "kiln::cross_entropy_backward",
        vec![f32_of(logits), targets, f32_of(weights), f32_of(grad)],
        &[shape],
        Vec::new(),
        backward_launch,
    );
    back_to(out.remove(0), dtype)
}
