//! Rotary position embedding on the GPU backends (wgpu: Metal, Vulkan) as one CubeCL kernel,
//! in f32: `kiln_kernels::rope`'s formula, a thread per rotated pair. Its backward is the
//! inverse rotation, the same kernel. Burn's operations took slices, a negation, a concat
//! (two slice assignments) and the products: several launches a call, four calls a block.

use crate::cube_op::{self, back_to, f32_of};
use burn::backend::fusion::custom::ScalarIr;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Cube, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;

/// The sizes of a call: x `[b, seq, heads, dim]`, tables `[table_rows, seq, dim]`.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct Dims {
    seq: usize,
    heads: usize,
    dim: usize,
    table_rows: usize,
}

#[cube(launch_unchecked)]
fn rope_kernel(
    x: &Tensor<f32>,
    cos: &Tensor<f32>,
    sin: &Tensor<f32>,
    y: &mut Tensor<f32>,
    dims: Dims,
    sign: f32,
) {
    let half = dims.dim / 2;
    let pair = ABSOLUTE_POS;
    if pair >= x.len() / 2 {
        terminate!();
    }
    // pair = ((b · seq + s) · heads + h) · half + j
    let j = pair % half;
    let head_row = pair / half;
    let row = head_row / dims.heads;
    let (b, s) = (row / dims.seq, row % dims.seq);
    let at = head_row * dims.dim;
    let mut tb = 0;
    if dims.table_rows > 1 {
        tb = b;
    }
    let t = (tb * dims.seq + s) * dims.dim;
    let (a, c) = (x[at + j], x[at + half + j]);
    y[at + j] = a * cos[t + j] - sign * c * sin[t + j];
    y[at + half + j] = c * cos[t + half + j] + sign * a * sin[t + half + j];
}

fn launch(inputs: Vec<CubeTensor>, scalars: &[ScalarIr]) -> Vec<CubeTensor> {
    let [x, cos, sin]: [CubeTensor; 3] = inputs.try_into().expect("x, cos, sin");
    let [_, seq, heads, dim] = x.shape().dims::<4>();
    let table_rows = cos.shape()[0];
    let y = cube_op::empty_f32(&x, x.shape());
    let pairs = x.shape().num_elements() / 2;
    if pairs > 0 {
        let client = x.client.clone();
        let cube_dim = CubeDim::new(&client, pairs);
        let count = calculate_cube_count_elemwise(&client, pairs, cube_dim);
        // SAFETY: a thread a pair < pairs: both elements inside x and y; the table row
        // (0, or the batch row when the tables have one a row) and position inside cos, sin.
        unsafe {
            rope_kernel::launch_unchecked(
                &client,
                count,
                cube_dim,
                x.into_tensor_arg(),
                cos.into_tensor_arg(),
                sin.into_tensor_arg(),
                y.clone().into_tensor_arg(),
                DimsLaunch::new(seq, heads, dim, table_rows),
                cube_op::float_scalar(scalars, 0) as f32,
            );
        }
    }
    vec![y]
}

/// Whether the kernel takes this call: x `[b, s, h, d]` with d even, tables `[1 or b, s, d]`.
pub fn takes(x: &FloatTensor<Cube>, cos: &FloatTensor<Cube>, sin: &FloatTensor<Cube>) -> bool {
    let (xs, ts) = (x.shape(), cos.shape());
    xs.num_dims() == 4
        && ts.num_dims() == 3
        && sin.shape() == ts
        && (ts[0] == 1 || ts[0] == xs[0])
        && ts[1] == xs[1]
        && ts[2] == xs[3]
        && xs[3].is_multiple_of(2)
}

/// `FusedOps::kiln_rope` on the GPU backends, for calls the kernel [`takes`].
pub fn rope(
    x: FloatTensor<Cube>,
    cos: FloatTensor<Cube>,
    sin: FloatTensor<Cube>,
    inverse: bool,
) -> FloatTensor<Cube> {
    let dtype = x.dtype();
    let shape = x.shape();
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut out = cube_op::register(
        "kiln::rope",
        vec![f32_of(x), f32_of(cos), f32_of(sin)],
        &[shape],
        vec![ScalarIr::Float(sign)],
        launch,
    );
    back_to(out.remove(0), dtype)
}
