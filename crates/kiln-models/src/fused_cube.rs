//! Quantized matrices de-quantised on the GPU backends (wgpu: Metal, Vulkan) by a CubeCL kernel:
//! one thread an element reads its code word, its group's scale and bias, and writes the f32
//! value, `kiln_kernels::quant`'s formula. The composed products of `fused` call it for each
//! tile, then multiply with Burn's matmul.
//!
//! Burn's GPU backend is lazy (`Fusion`): the kernel is registered as a custom operation whose
//! execution launches it on the inner `CubeBackend` tensors.

use crate::quant::QuantShape;
use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, OperationOutput, ScalarIr, StreamId,
    TensorIr,
};
use burn::backend::fusion::{ExecutionError, FusionRuntime};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Cube, DType, Shape, TensorMetadata};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;

const DEQUANTIZE: &str = "kiln::dequantize";

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn dequantize_kernel(
    codes: &Tensor<i32>,
    scale: &Tensor<f32>,
    bias: &Tensor<f32>,
    output: &mut Tensor<f32>,
    cols: usize,
    #[comptime] bits: u32,
    #[comptime] per_word: usize,
    #[comptime] group: usize,
    #[comptime] zero: i32,
    #[comptime] has_bias: bool,
) {
    if ABSOLUTE_POS >= output.len() {
        terminate!();
    }
    let row = ABSOLUTE_POS / cols;
    let col = ABSOLUTE_POS % cols;
    let word = u32::cast_from(codes[row * (cols / per_word) + col / per_word]);
    let shift = u32::cast_from(col % per_word) * bits;
    let mask = (1u32 << bits) - 1;
    let code = (word >> shift) & mask;
    let at = row * (cols / group) + col / group;
    let mut value = f32::cast_from(i32::cast_from(code) - zero) * scale[at];
    if has_bias {
        value += bias[at];
    }
    output[ABSOLUTE_POS] = value;
}

/// The kernel on the inner backend's tensors: `[rows, cols]` f32.
fn dequantize_inner(
    codes: CubeTensor,
    scale: CubeTensor,
    bias: CubeTensor,
    q: QuantShape,
) -> CubeTensor {
    let codes = burn_cubecl::kernel::into_contiguous(codes);
    let scale = burn_cubecl::kernel::into_contiguous(scale);
    let bias = burn_cubecl::kernel::into_contiguous(bias);
    let rows = codes.shape()[0];
    let n = rows * q.cols;
    let output = burn_cubecl::ops::numeric::empty_device_dtype(
        codes.client.clone(),
        codes.device.clone(),
        Shape::new([rows, q.cols]),
        DType::F32,
    );
    if n == 0 {
        return output;
    }
    let l = q.layout;
    let cube_dim = CubeDim::new(&codes.client, n);
    let cube_count = calculate_cube_count_elemwise(&codes.client, n, cube_dim);
    // SAFETY: every index the kernel forms is inside its tensor: the codes, scales and biases
    // have `rows` rows of `cols / per_word` and `cols / group` (checked by `QuantRef` when they
    // were made), the output `rows × cols`, and threads past it return.
    unsafe {
        dequantize_kernel::launch_unchecked(
            &output.client,
            cube_count,
            cube_dim,
            codes.into_tensor_arg(),
            scale.into_tensor_arg(),
            bias.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            q.cols,
            l.bits,
            l.codes_per_word(),
            l.group,
            l.zero,
            l.has_bias,
        );
    }
    output
}

fn scalars(q: QuantShape) -> Vec<ScalarIr> {
    let l = q.layout;
    vec![
        ScalarIr::UInt(q.cols as u64),
        ScalarIr::UInt(l.bits as u64),
        ScalarIr::UInt(l.group as u64),
        ScalarIr::Int(l.zero as i64),
        ScalarIr::Bool(l.has_bias),
    ]
}

fn shape_of(scalars: &[ScalarIr]) -> QuantShape {
    let [
        ScalarIr::UInt(cols),
        ScalarIr::UInt(bits),
        ScalarIr::UInt(group),
        ScalarIr::Int(zero),
        ScalarIr::Bool(has_bias),
    ] = scalars
    else {
        unreachable!("kiln::dequantize is registered with these scalars")
    };
    QuantShape {
        layout: crate::quant::QuantLayout {
            bits: *bits as u32,
            group: *group as usize,
            zero: *zero as i32,
            has_bias: *has_bias,
        },
        cols: *cols as usize,
    }
}

#[derive(Debug)]
struct Dequantize {
    desc: CustomOpIr,
}

type Runtime = <CubeBackend as burn::backend::fusion::FusionBackend>::FusionRuntime;

impl Operation<Runtime> for Dequantize {
    fn execute(
        &self,
        handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>,
    ) -> Result<(), ExecutionError> {
        let ([codes, scale, bias], [output]) = self.desc.as_fixed();
        let codes = handles.get_int_tensor::<CubeBackend>(codes);
        let scale = handles.get_float_tensor::<CubeBackend>(scale);
        let bias = handles.get_float_tensor::<CubeBackend>(bias);
        let values = dequantize_inner(codes, scale, bias, shape_of(&self.desc.scalars));
        handles.register_float_tensor::<CubeBackend>(&output.id, values);
        Ok(())
    }
}

/// `FusedOps::kiln_dequantize` on the GPU backends.
pub fn dequantize(
    codes: IntTensor<Cube>,
    scale: FloatTensor<Cube>,
    bias: FloatTensor<Cube>,
    q: QuantShape,
) -> FloatTensor<Cube> {
    let client = codes.client.clone();
    let rows = codes.shape()[0];
    let output = TensorIr::uninit(
        client.create_empty_handle(),
        Shape::new([rows, q.cols]),
        DType::F32,
    );
    let desc = CustomOpIr::with_scalars(
        DEQUANTIZE,
        &[codes.into_ir(), scale.into_ir(), bias.into_ir()],
        &[output],
        scalars(q),
    );
    client
        .register(
            StreamId::current(),
            OperationIr::Custom(desc.clone()),
            Dequantize { desc },
        )
        .output()
}
