//! Device-side pieces of kiln's "a cube a row" CubeCL kernels (RMSNorm, softmax,
//! cross-entropy): a cube's threads stride over one row and combine their partial results in
//! shared memory.
//!
//! WGSL wants every barrier in uniform control flow, and the row count a kernel reads is not
//! known uniform: so a cube past the last row does not return early, it takes a row width of 0
//! and reaches every barrier reading and writing nothing.

use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;

/// Threads a row (a power of two).
pub const THREADS: usize = 128;

/// This cube's row, `CUBE_POS_Y · CUBE_COUNT_X + CUBE_POS_X` (see `cube_op::grid`), and the
/// row's width: `d`, or 0 for a cube past the last of `rows`.
#[cube]
pub fn row_of_cube(rows: usize, d: usize) -> (usize, usize) {
    let row = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    let mut width = d;
    if row >= rows {
        width = 0;
    }
    (row, width)
}

/// The sum (or with `max`, the largest) over the cube's threads of `v`, in every thread: a
/// tree in shared memory.
#[cube]
fn cube_reduce(v: f32, #[comptime] threads: usize, #[comptime] max: bool) -> f32 {
    let mut shared = Shared::<[f32]>::new_slice(threads);
    let tid = UNIT_POS_X as usize;
    shared[tid] = v;
    sync_cube();
    // The cube's width as a runtime value (the loop variable must be one).
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            let (a, b) = (shared[tid], shared[tid + stride]);
            let mut r = a + b;
            if max {
                r = f32::max(a, b);
            }
            shared[tid] = r;
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// The sum over the cube's threads of `v`, in every thread.
#[cube]
pub fn cube_sum(v: f32, #[comptime] threads: usize) -> f32 {
    cube_reduce(v, threads, false)
}

/// The largest `v` over the cube's threads, in every thread.
#[cube]
pub fn cube_max(v: f32, #[comptime] threads: usize) -> f32 {
    cube_reduce(v, threads, true)
}

/// The largest of row `row`'s first `width` values (`at` its first element), and the sum of
/// `exp(value − max)` over them: a softmax's two passes.
#[cube]
pub fn max_and_exp_sum(
    x: &Tensor<f32>,
    at: usize,
    width: usize,
    #[comptime] threads: usize,
) -> (f32, f32) {
    // The lowest finite f32 (WGSL has no infinities).
    let mut m = f32::new(-3.4028235e38);
    let mut j = UNIT_POS_X as usize;
    while j < width {
        m = f32::max(m, x[at + j]);
        j += CUBE_DIM_X as usize;
    }
    let max = cube_max(m, threads);
    let mut acc = 0.0f32;
    let mut j = UNIT_POS_X as usize;
    while j < width {
        acc += f32::exp(x[at + j] - max);
        j += CUBE_DIM_X as usize;
    }
    (max, cube_sum(acc, threads))
}
