//! RMSNorm and its backward on the GPU backends (wgpu: Metal, Vulkan) as CubeCL kernels, in
//! f32: `kiln_kernels::rms_norm`'s formulas. Burn's operations took a reduction and fused
//! element-wise kernels forward and five or so backward, a norm; these take one forward and two
//! backward (the rows' gradients, then the weight's, a column per thread: deterministic, no
//! atomics).
//!
//! A cube a row (`cube_rows`): its threads stride over the row and add their squares in shared
//! memory.

use crate::cube_op::{self, back_to, empty_f32, f32_of, float_scalar, grid};
use crate::cube_rows::{THREADS, cube_sum, row_of_cube};
use burn::backend::fusion::custom::ScalarIr;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Cube, Shape, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;

/// `1 / sqrt(mean(x²) + eps)` of row `row` (`d` wide; its first `width` values read), in
/// every thread of the cube.
#[cube]
fn inv_rms(
    x: &Tensor<f32>,
    row: usize,
    d: usize,
    width: usize,
    eps: f32,
    #[comptime] threads: usize,
) -> f32 {
    let mut acc = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < width {
        let v = x[row * d + j];
        acc += v * v;
        j += CUBE_DIM_X as usize;
    }
    let ss = cube_sum(acc, threads);
    1.0f32 / f32::sqrt(ss / d as f32 + eps)
}

#[cube(launch_unchecked)]
fn forward_kernel(
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    y: &mut Tensor<f32>,
    rows: usize,
    eps: f32,
    #[comptime] threads: usize,
) {
    let d = w.len();
    let (row, width) = row_of_cube(rows, d);
    let inv = inv_rms(x, row, d, width, eps, threads);
    let mut j = UNIT_POS_X as usize;
    while j < width {
        y[row * d + j] = x[row * d + j] * inv * w[j];
        j += CUBE_DIM_X as usize;
    }
}

/// `dx` of each row, and each row's `1/rms` for the weight's gradient.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rows_backward_kernel(
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    g: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    invs: &mut Tensor<f32>,
    rows: usize,
    eps: f32,
    #[comptime] threads: usize,
) {
    let d = w.len();
    let (row, width) = row_of_cube(rows, d);
    let inv = inv_rms(x, row, d, width, eps, threads);
    // c = mean(g·w·n) with n = x·inv.
    let mut acc = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < width {
        acc += g[row * d + j] * w[j] * x[row * d + j];
        j += CUBE_DIM_X as usize;
    }
    let c = cube_sum(acc, threads) * inv / d as f32;
    let mut j = UNIT_POS_X as usize;
    while j < width {
        let n = x[row * d + j] * inv;
        dx[row * d + j] = inv * (g[row * d + j] * w[j] - n * c);
        j += CUBE_DIM_X as usize;
    }
    if UNIT_POS_X == 0 && width > 0 {
        invs[row] = inv;
    }
}

/// `dw[j] = Σ_rows g · x · inv`, a thread a column.
#[cube(launch_unchecked)]
fn weight_backward_kernel(
    x: &Tensor<f32>,
    g: &Tensor<f32>,
    invs: &Tensor<f32>,
    dw: &mut Tensor<f32>,
) {
    let j = ABSOLUTE_POS;
    let d = dw.len();
    if j >= d {
        terminate!();
    }
    let rows = invs.len();
    let mut acc = 0.0f32;
    for r in 0..rows {
        acc += g[r * d + j] * (x[r * d + j] * invs[r]);
    }
    dw[j] = acc;
}

fn rows_and_width(x: &CubeTensor) -> (usize, usize) {
    let shape = x.shape();
    let d = shape[shape.num_dims() - 1];
    (shape.num_elements() / d.max(1), d)
}

fn forward_launch(inputs: Vec<CubeTensor>, scalars: &[ScalarIr]) -> Vec<CubeTensor> {
    let [x, w]: [CubeTensor; 2] = inputs.try_into().expect("x, w");
    let (rows, _) = rows_and_width(&x);
    let y = empty_f32(&x, x.shape());
    if rows > 0 {
        // SAFETY: x and y hold `rows × d` values (d = w's length), threads stay inside their
        // row (j < d) and cubes past `rows` return.
        unsafe {
            forward_kernel::launch_unchecked(
                &x.client,
                grid(rows),
                CubeDim::new_1d(THREADS as u32),
                x.clone().into_tensor_arg(),
                w.into_tensor_arg(),
                y.clone().into_tensor_arg(),
                rows,
                float_scalar(scalars, 0) as f32,
                THREADS,
            );
        }
    }
    vec![y]
}

fn backward_launch(inputs: Vec<CubeTensor>, scalars: &[ScalarIr]) -> Vec<CubeTensor> {
    let [x, w, g]: [CubeTensor; 3] = inputs.try_into().expect("x, w, g");
    let (rows, d) = rows_and_width(&x);
    let dx = empty_f32(&x, x.shape());
    let dw = empty_f32(&x, w.shape());
    let invs = empty_f32(&x, Shape::new([rows]));
    if rows > 0 {
        let client = x.client.clone();
        // SAFETY: as forward, with g, dx `rows × d` and invs `rows`.
        unsafe {
            rows_backward_kernel::launch_unchecked(
                &client,
                grid(rows),
                CubeDim::new_1d(THREADS as u32),
                x.clone().into_tensor_arg(),
                w.into_tensor_arg(),
                g.clone().into_tensor_arg(),
                dx.clone().into_tensor_arg(),
                invs.clone().into_tensor_arg(),
                rows,
                float_scalar(scalars, 0) as f32,
                THREADS,
            );
        }
        let cube_dim = CubeDim::new(&client, d);
        let count = calculate_cube_count_elemwise(&client, d, cube_dim);
        // SAFETY: a thread a column j < d reads `rows` values of x and g, one of invs each.
        unsafe {
            weight_backward_kernel::launch_unchecked(
                &client,
                count,
                cube_dim,
                x.into_tensor_arg(),
                g.into_tensor_arg(),
                invs.into_tensor_arg(),
                dw.clone().into_tensor_arg(),
            );
        }
    }
    vec![dx, dw]
}

/// `FusedOps::kiln_rms_norm` on the GPU backends.
pub fn rms_norm(x: FloatTensor<Cube>, w: FloatTensor<Cube>, eps: f64) -> FloatTensor<Cube> {
    let dtype = x.dtype();
    let shape = x.shape();
    let mut out = cube_op::register(
        "kiln::rms_norm",
        vec![f32_of(x), f32_of(w)],
        &[shape],
        vec![ScalarIr::Float(eps)],
        forward_launch,
    );
    back_to(out.remove(0), dtype)
}

/// `FusedOps::kiln_rms_norm_backward` on the GPU backends.
pub fn rms_norm_backward(
    x: FloatTensor<Cube>,
    w: FloatTensor<Cube>,
    g: FloatTensor<Cube>,
    eps: f64,
) -> (FloatTensor<Cube>, FloatTensor<Cube>) {
    let (x_type, w_type) = (x.dtype(), w.dtype());
    let shapes = [x.shape(), w.shape()];
    let mut out = cube_op::register(
        "kiln::rms_norm_backward",
        vec![f32_of(x), f32_of(w), f32_of(g)],
        &shapes,
        vec![ScalarIr::Float(eps)],
        backward_launch,
    );
    let dw = out.remove(1);
    (back_to(out.remove(0), x_type), back_to(dw, w_type))
}
