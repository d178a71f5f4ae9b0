//! The attention softmax with its additive mask, and the softmax's backward, on the GPU
//! backends (wgpu: Metal, Vulkan) as CubeCL kernels, in f32: a cube a row of scores
//! (`cube_rows`). Used where attention materialises its probabilities (dropout on them); Burn's
//! operations took an addition, reductions and element-wise kernels.

use crate::cube_op::{self, back_to, empty_f32, f32_of, grid};
use crate::cube_rows::{THREADS, cube_max, cube_sum, row_of_cube};
use burn::backend::fusion::custom::ScalarIr;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Cube, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::CubeDim;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;

/// softmax(scores + bias) a row: scores `[b, h, s, t]` as rows of `t`, bias `[bias_rows, 1,
/// s, t]` (bias_rows 1 or b).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    scores: &Tensor<f32>,
    bias: &Tensor<f32>,
    probs: &mut Tensor<f32>,
    rows: usize,
    keys: usize,
    heads_queries: usize,
    queries: usize,
    bias_rows: usize,
    #[comptime] threads: usize,
) {
    let (row, width) = row_of_cube(rows, keys);
    let at = row * keys;
    // row = (b · heads + h) · queries + i
    let b = row / heads_queries;
    let i = row % queries;
    let mut bb = 0;
    if bias_rows > 1 {
        bb = b;
    }
    let bias_at = (bb * queries + i) * keys;
    // The lowest finite f32 (WGSL has no infinities).
    let mut m = f32::new(-3.4028235e38);
    let mut j = UNIT_POS_X as usize;
    while j < width {
        m = f32::max(m, scores[at + j] + bias[bias_at + j]);
        j += CUBE_DIM_X as usize;
    }
    let max = cube_max(m, threads);
    let mut acc = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < width {
        acc += f32::exp(scores[at + j] + bias[bias_at + j] - max);
        j += CUBE_DIM_X as usize;
    }
    let sum = cube_sum(acc, threads);
    let mut j = UNIT_POS_X as usize;
    while j < width {
        probs[at + j] = f32::exp(scores[at + j] + bias[bias_at + j] - max) / sum;
        j += CUBE_DIM_X as usize;
    }
}

/// `y · (g − Σ g·y)` a row.
#[cube(launch_unchecked)]
fn backward_kernel(
    probs: &Tensor<f32>,
    grad: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    rows: usize,
    keys: usize,
    #[comptime] threads: usize,
) {
    let (row, width) = row_of_cube(rows, keys);
    let at = row * keys;
    let mut acc = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < width {
        acc += grad[at + j] * probs[at + j];
        j += CUBE_DIM_X as usize;
    }
    let dot = cube_sum(acc, threads);
    let mut j = UNIT_POS_X as usize;
    while j < width {
        dx[at + j] = probs[at + j] * (grad[at + j] - dot);
        j += CUBE_DIM_X as usize;
    }
}

fn forward_launch(inputs: Vec<CubeTensor>, _: &[ScalarIr]) -> Vec<CubeTensor> {
    let [scores, bias]: [CubeTensor; 2] = inputs.try_into().expect("scores, bias");
    let [b, h, s, t] = scores.shape().dims::<4>();
    let bias_rows = bias.shape()[0];
    let rows = b * h * s;
    let probs = empty_f32(&scores, scores.shape());
    if rows > 0 {
        // SAFETY: a cube a row < rows reads and writes its `t` values; its bias row (0, or
        // its batch row) and query are inside bias; cubes past the rows touch nothing.
        unsafe {
            forward_kernel::launch_unchecked(
                &scores.client,
                grid(rows),
                CubeDim::new_1d(THREADS as u32),
                scores.clone().into_tensor_arg(),
                bias.into_tensor_arg(),
                probs.clone().into_tensor_arg(),
                rows,
                t,
                h * s,
                s,
                bias_rows,
                THREADS,
            );
        }
    }
    vec![probs]
}

fn backward_launch(inputs: Vec<CubeTensor>, _: &[ScalarIr]) -> Vec<CubeTensor> {
    let [probs, grad]: [CubeTensor; 2] = inputs.try_into().expect("probs, grad");
    let shape = probs.shape();
    let keys = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / keys.max(1);
    let dx = empty_f32(&probs, shape);
    if rows > 0 {
        // SAFETY: a cube a row < rows reads and writes its `keys` values.
        unsafe {
            backward_kernel::launch_unchecked(
                &probs.client,
                grid(rows),
                CubeDim::new_1d(THREADS as u32),
                probs.clone().into_tensor_arg(),
                grad.into_tensor_arg(),
                dx.clone().into_tensor_arg(),
                rows,
                keys,
                THREADS,
            );
        }
    }
    vec![dx]
}

/// Whether the forward kernel takes this call: scores `[b, h, s, t]`, bias `[1 or b, 1, s, t]`.
pub fn takes(scores: &FloatTensor<Cube>, bias: &FloatTensor<Cube>) -> bool {
    let (x, m) = (scores.shape(), bias.shape());
    x.num_dims() == 4
        && m.num_dims() == 4
        && (m[0] == 1 || m[0] == x[0])
        && m[1] == 1
        && m[2] == x[2]
        && m[3] == x[3]
}

/// `FusedOps::kiln_softmax_bias` on the GPU backends, for calls the kernel [`takes`].
pub fn softmax_bias(scores: FloatTensor<Cube>, bias: FloatTensor<Cube>) -> FloatTensor<Cube> {
    let dtype = scores.dtype();
    let shape = scores.shape();
    let mut out = cube_op::register(
        "kiln::softmax_bias",
        vec![f32_of(scores), f32_of(bias)],
        &[shape],
        Vec::new(),
        forward_launch,
    );
    back_to(out.remove(0), dtype)
}

/// `FusedOps::kiln_softmax_backward` on the GPU backends.
pub fn softmax_backward(probs: FloatTensor<Cube>, grad: FloatTensor<Cube>) -> FloatTensor<Cube> {
    let dtype = probs.dtype();
    let shape = probs.shape();
    let mut out = cube_op::register(
        "kiln::softmax_backward",
        vec![f32_of(probs), f32_of(grad)],
        &[shape],
        Vec::new(),
        backward_launch,
    );
    back_to(out.remove(0), dtype)
}
