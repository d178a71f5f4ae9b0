//! The global L2 norm of a step's gradients on the GPU backends (wgpu: Metal, Vulkan): a
//! CubeCL kernel a gradient adds the squares of its chunks into its own slots of one buffer
//! of partial sums, then one cube adds the partial sums, in order, and takes the root. Burn's
//! operations took a square, a reduction and an addition a gradient (the clipping needs the
//! norm every step).

use crate::cube_op::{self, empty_f32, f32_of};
use crate::cube_rows::{THREADS, cube_sum};
use burn::backend::fusion::custom::ScalarIr;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Cube, Shape, TensorData, TensorMetadata};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::CubeDim;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;

/// Values a thread adds before the cube's tree (a chunk is `THREADS × PER_THREAD`).
const PER_THREAD: usize = 16;
const CHUNK: usize = THREADS * PER_THREAD;

/// Partial sum `first + c` of `partials` = the squares of chunk `c` of `g`.
#[cube(launch_unchecked)]
fn partial_squares_kernel(
    g: &Tensor<f32>,
    partials: &mut Tensor<f32>,
    first: usize,
    chunks: usize,
    #[comptime] threads: usize,
) {
    // Cubes past the last chunk (a two-dimensional grid) read nothing and write nothing.
    let chunk = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    let start = chunk * threads * PER_THREAD;
    let n = g.len();
    let mut acc = 0.0f32;
    for k in 0..PER_THREAD {
        let i = start + k * threads + UNIT_POS_X as usize;
        if i < n {
            acc += g[i] * g[i];
        }
    }
    let total = cube_sum(acc, threads);
    if UNIT_POS_X == 0 && chunk < chunks {
        partials[first + chunk] = total;
    }
}

/// `sqrt(Σ partials)`, summed by one cube.
#[cube(launch_unchecked)]
fn root_of_sum_kernel(partials: &Tensor<f32>, norm: &mut Tensor<f32>, #[comptime] threads: usize) {
    let mut acc = 0.0f32;
    let mut i = UNIT_POS_X as usize;
    while i < partials.len() {
        acc += partials[i];
        i += CUBE_DIM_X as usize;
    }
    let total = cube_sum(acc, threads);
    if UNIT_POS_X == 0 {
        norm[0] = f32::sqrt(total);
    }
}

fn launch(grads: Vec<CubeTensor>, _: &[ScalarIr]) -> Vec<CubeTensor> {
    let chunks: Vec<usize> = grads
        .iter()
        .map(|g| g.shape().num_elements().div_ceil(CHUNK))
        .collect();
    let total: usize = chunks.iter().sum();
    let like = &grads[0];
    let client = like.client.clone();
    let partials = if total == 0 {
        // Nothing to add: one partial sum of 0.
        <CubeBackend as FloatTensorOps<CubeBackend>>::float_from_data(
            TensorData::new(vec![0f32], [1]),
            &like.device,
        )
    } else {
        empty_f32(like, Shape::new([total]))
    };
    let norm = empty_f32(like, Shape::new([1]));
    let mut first = 0;
    for (g, &c) in grads.iter().zip(&chunks) {
        if c == 0 {
            continue;
        }
        // SAFETY: chunk c < chunks of g reads g's elements below its length and writes slot
        // `first + c`, inside this gradient's `chunks` slots of `partials`.
        unsafe {
            partial_squares_kernel::launch_unchecked(
                &client,
                cube_op::grid(c),
                CubeDim::new_1d(THREADS as u32),
                g.clone().into_tensor_arg(),
                partials.clone().into_tensor_arg(),
                first,
                c,
                THREADS,
            );
        }
        first += c;
    }
    // SAFETY: one cube reads `partials` below its length and writes norm[0].
    unsafe {
        root_of_sum_kernel::launch_unchecked(
            &client,
            cube_op::grid(1),
            CubeDim::new_1d(THREADS as u32),
            partials.into_tensor_arg(),
            norm.clone().into_tensor_arg(),
            THREADS,
        );
    }
    vec![norm]
}

/// `FusedOps::kiln_global_norm` on the GPU backends: `[1]`, f32.
pub fn global_norm(grads: Vec<FloatTensor<Cube>>) -> FloatTensor<Cube> {
    let grads = grads.into_iter().map(f32_of).collect();
    let mut out = cube_op::register(
        "kiln::global_norm",
        grads,
        &[Shape::new([1])],
        Vec::new(),
        launch,
    );
    out.remove(0)
}
