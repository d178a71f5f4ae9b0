//! SwiGLU, `silu(gate) · up`, and its backward on the GPU backends (wgpu: Metal, Vulkan) as
//! CubeCL kernels, in f32, a thread an element: the backward gives both gradients in one
//! launch. Burn's fusion merged the forward's operations already, not the backward's.

use crate::cube_op::{self, back_to, empty_f32, f32_of};
use burn::backend::fusion::custom::ScalarIr;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Cube, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;

#[cube(launch_unchecked)]
fn forward_kernel(gate: &Tensor<f32>, up: &Tensor<f32>, y: &mut Tensor<f32>) {
    let i = ABSOLUTE_POS;
    if i >= y.len() {
        terminate!();
    }
    let a = gate[i];
    let s = 1.0f32 / (1.0f32 + f32::exp(-a));
    y[i] = a * s * up[i];
}

#[cube(launch_unchecked)]
fn backward_kernel(
    gate: &Tensor<f32>,
    up: &Tensor<f32>,
    g: &Tensor<f32>,
    dgate: &mut Tensor<f32>,
    dup: &mut Tensor<f32>,
) {
    let i = ABSOLUTE_POS;
    if i >= dgate.len() {
        terminate!();
    }
    let a = gate[i];
    let s = 1.0f32 / (1.0f32 + f32::exp(-a));
    let gs = g[i] * s;
    dup[i] = gs * a;
    // d silu(a) / da = s · (1 + a · (1 − s))
    dgate[i] = gs * up[i] * (a * (1.0f32 - s) + 1.0f32);
}

fn elementwise(like: &CubeTensor) -> (CubeCount, CubeDim, usize) {
    let n = like.shape().num_elements();
    let cube_dim = CubeDim::new(&like.client, n.max(1));
    let count = calculate_cube_count_elemwise(&like.client, n.max(1), cube_dim);
    (count, cube_dim, n)
}

fn forward_launch(inputs: Vec<CubeTensor>, _: &[ScalarIr]) -> Vec<CubeTensor> {
    let [gate, up]: [CubeTensor; 2] = inputs.try_into().expect("gate, up");
    let y = empty_f32(&gate, gate.shape());
    let (count, cube_dim, n) = elementwise(&gate);
    if n > 0 {
        // SAFETY: gate, up and y hold `n` values each; threads past `n` return.
        unsafe {
            forward_kernel::launch_unchecked(
                &gate.client,
                count,
                cube_dim,
                gate.clone().into_tensor_arg(),
                up.into_tensor_arg(),
                y.clone().into_tensor_arg(),
            );
        }
    }
    vec![y]
}

fn backward_launch(inputs: Vec<CubeTensor>, _: &[ScalarIr]) -> Vec<CubeTensor> {
    let [gate, up, g]: [CubeTensor; 3] = inputs.try_into().expect("gate, up, g");
    let dgate = empty_f32(&gate, gate.shape());
    let dup = empty_f32(&gate, gate.shape());
    let (count, cube_dim, n) = elementwise(&gate);
    if n > 0 {
        // SAFETY: every tensor holds `n` values; threads past `n` return.
        unsafe {
            backward_kernel::launch_unchecked(
                &gate.client,
                count,
                cube_dim,
                gate.clone().into_tensor_arg(),
                up.into_tensor_arg(),
                g.into_tensor_arg(),
                dgate.clone().into_tensor_arg(),
                dup.clone().into_tensor_arg(),
            );
        }
    }
    vec![dgate, dup]
}

/// Whether the kernels take these: two tensors of one shape.
pub fn takes(gate: &FloatTensor<Cube>, up: &FloatTensor<Cube>) -> bool {
    gate.shape() == up.shape()
}

/// `FusedOps::kiln_swiglu` on the GPU backends, for tensors the kernels [`takes`].
pub fn swiglu(gate: FloatTensor<Cube>, up: FloatTensor<Cube>) -> FloatTensor<Cube> {
    let dtype = gate.dtype();
    let shape = gate.shape();
    let mut out = cube_op::register(
        "kiln::swiglu",
        vec![f32_of(gate), f32_of(up)],
        &[shape],
        Vec::new(),
        forward_launch,
    );
    back_to(out.remove(0), dtype)
}

/// `FusedOps::kiln_swiglu_backward` on the GPU backends.
pub fn swiglu_backward(
    gate: FloatTensor<Cube>,
    up: FloatTensor<Cube>,
    g: FloatTensor<Cube>,
) -> (FloatTensor<Cube>, FloatTensor<Cube>) {
    let (gate_type, up_type) = (gate.dtype(), up.dtype());
    let shape = gate.shape();
    let mut out = cube_op::register(
        "kiln::swiglu_backward",
        vec![f32_of(gate), f32_of(up), f32_of(g)],
        &[shape.clone(), shape],
        Vec::new(),
        backward_launch,
    );
    let dup = out.remove(1);
    (back_to(out.remove(0), gate_type), back_to(dup, up_type))
}
