//! The plumbing every kiln CubeCL kernel shares on Burn's lazy GPU backend (`Fusion`): a
//! kernel runs as a custom operation whose inputs arrive as CubeCL tensors when the stream
//! reaches it, and whose outputs are f32 tensors it allocates. Each kernel file keeps only its
//! kernels and the function that launches them (`Launch`).

use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, ScalarIr, StreamId, TensorIr,
};
use burn::backend::fusion::{ExecutionError, FusionRuntime};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Cube, DType, Shape, TensorMetadata};
use burn::tensor::FloatDType;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::CubeCount;
use burn_cubecl::tensor::CubeTensor;

pub(crate) type Runtime = <CubeBackend as burn::backend::fusion::FusionBackend>::FusionRuntime;
type Handles = HandleContainer<<Runtime as FusionRuntime>::FusionHandle>;

/// Runs a kernel on the inputs (contiguous, in the order given) with the operation's
/// scalars, returning its outputs in order.
pub(crate) type Launch = fn(Vec<CubeTensor>, &[ScalarIr]) -> Vec<CubeTensor>;

#[derive(Debug)]
struct KernelOp {
    desc: CustomOpIr,
    launch: Launch,
}

impl Operation<Runtime> for KernelOp {
    fn execute(&self, handles: &mut Handles) -> Result<(), ExecutionError> {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|t| {
                burn_cubecl::kernel::into_contiguous(handles.get_float_tensor::<CubeBackend>(t))
            })
            .collect();
        let outputs = (self.launch)(inputs, &self.desc.scalars);
        for (ir, t) in self.desc.outputs.iter().zip(outputs) {
            handles.register_float_tensor::<CubeBackend>(&ir.id, t);
        }
        Ok(())
    }
}

/// Registers `name` with `inputs` (any type; a kernel reads f32 unless it says otherwise) and
/// f32 outputs of `outputs` shapes, computed by `launch`.
pub(crate) fn register(
    name: &'static str,
    inputs: Vec<FloatTensor<Cube>>,
    outputs: &[Shape],
    scalars: Vec<ScalarIr>,
    launch: Launch,
) -> Vec<FloatTensor<Cube>> {
    let client = inputs[0].client.clone();
    let outputs: Vec<TensorIr> = outputs
        .iter()
        .map(|s| TensorIr::uninit(client.create_empty_handle(), s.clone(), DType::F32))
        .collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::with_scalars(name, &inputs, &outputs, scalars);
    client.register(
        StreamId::current(),
        OperationIr::Custom(desc.clone()),
        KernelOp { desc, launch },
    )
}

/// `t` in f32 (a cast where it is another float type).
pub(crate) fn f32_of(t: FloatTensor<Cube>) -> FloatTensor<Cube> {
    match t.dtype() {
        DType::F32 => t,
        _ => Cube::float_cast(t, FloatDType::F32),
    }
}

/// `t` (f32) back in `dtype`.
pub(crate) fn back_to(t: FloatTensor<Cube>, dtype: DType) -> FloatTensor<Cube> {
    match dtype {
        DType::F32 => t,
        other => Cube::float_cast(t, other.into()),
    }
}

/// An f32 output of `shape` on `like`'s device.
pub(crate) fn empty_f32(like: &CubeTensor, shape: Shape) -> CubeTensor {
    burn_cubecl::ops::numeric::empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        shape,
        DType::F32,
    )
}

/// The float scalar `i` of a registered operation.
pub(crate) fn float_scalar(scalars: &[ScalarIr], i: usize) -> f64 {
    match scalars.get(i) {
        Some(ScalarIr::Float(x)) => *x,
        _ => unreachable!("kiln's kernels register their float scalars in order"),
    }
}

/// The most cubes one grid dimension takes (WebGPU's limit).
const GRID_MAX: u32 = 65_535;

/// A grid of `cubes` cubes (in two dimensions past [`GRID_MAX`]); a kernel finds its cube
/// with [`crate::cube_op`]'s `cube_index` convention: `CUBE_POS_Y · CUBE_COUNT_X + CUBE_POS_X`,
/// returning past `cubes`.
pub(crate) fn grid(cubes: usize) -> CubeCount {
    let cubes = cubes.max(1) as u32;
    if cubes <= GRID_MAX {
        CubeCount::Static(cubes, 1, 1)
    } else {
        CubeCount::Static(GRID_MAX, cubes.div_ceil(GRID_MAX), 1)
    }
}
