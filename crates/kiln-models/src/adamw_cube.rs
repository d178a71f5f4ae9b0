//! One AdamW update of a parameter on the GPU backends (wgpu: Metal, Vulkan) as one CubeCL
//! kernel: a thread an element reads the parameter, its moments and its gradient, and writes
//! the three new values, or the old ones where the step is skipped. Burn's operations took a
//! comparison, fused element-wise kernels and selects for each parameter, every step
//! (docs/PERFORMANCE.md: 659 launches a step of the default model on lavapipe before, 504 after).
//!
//! The arithmetic is `fused::composed::adamw`'s, operation for operation (`kiln_kernels::adamw`'s
//! formula), in f32. Like `fused_cube`'s de-quantisation it is a Fusion custom operation.

use crate::fused::AdamWStep;
use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, ScalarIr, StreamId, TensorIr,
};
use burn::backend::fusion::{ExecutionError, FusionRuntime};
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Cube, DType, TensorMetadata};
use burn::tensor::BoolStore;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::ir::{ElemType, UIntKind};
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;

const ADAMW: &str = "kiln::adamw";

/// The step's constants, as the composed formula uses them (the `1 − β` computed in f32).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct Hyper {
    lr: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
}

/// `apply` is Burn's bool storage (u8 or u32 by device, any non-zero value true), read as is:
/// no cast kernel a parameter.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<B: Int>(
    p: &Tensor<f32>,
    m: &Tensor<f32>,
    v: &Tensor<f32>,
    g: &Tensor<f32>,
    clip: &Tensor<f32>,
    apply: &Tensor<B>,
    p_out: &mut Tensor<f32>,
    m_out: &mut Tensor<f32>,
    v_out: &mut Tensor<f32>,
    h: Hyper,
    #[define(B)] _bool: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= p_out.len() {
        terminate!();
    }
    if apply[0] != B::from_int(0) {
        let gi = g[i] * clip[0];
        let m1 = m[i] * h.beta1 + gi * h.one_minus_beta1;
        let v1 = v[i] * h.beta2 + gi * gi * h.one_minus_beta2;
        let denom = (v1 / h.bc2).sqrt() + h.eps;
        let step = m1 / h.bc1 / denom * h.lr;
        p_out[i] = p[i] * h.decay - step;
        m_out[i] = m1;
        v_out[i] = v1;
    } else {
        p_out[i] = p[i];
        m_out[i] = m[i];
        v_out[i] = v[i];
    }
}

#[allow(clippy::too_many_arguments)]
fn adamw_inner(
    p: CubeTensor,
    m: CubeTensor,
    v: CubeTensor,
    g: CubeTensor,
    clip: CubeTensor,
    apply: CubeTensor,
    h: AdamWStep,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let [p, m, v, g, clip, apply] =
        [p, m, v, g, clip, apply].map(burn_cubecl::kernel::into_contiguous);
    let bool_type = match apply.dtype {
        DType::Bool(BoolStore::U8) => ElemType::UInt(UIntKind::U8),
        _ => ElemType::UInt(UIntKind::U32),
    };
    let empty = || {
        burn_cubecl::ops::numeric::empty_device_dtype(
            p.client.clone(),
            p.device.clone(),
            p.shape(),
            DType::F32,
        )
    };
    let (p_out, m_out, v_out) = (empty(), empty(), empty());
    let n = p.shape().num_elements();
    if n == 0 {
        return (p_out, m_out, v_out);
    }
    let cube_dim = CubeDim::new(&p.client, n);
    let cube_count = calculate_cube_count_elemwise(&p.client, n, cube_dim);
    let client = p.client.clone();
    // SAFETY: p, m, v, g and the outputs hold `n` elements each (the optimizer passes one
    // parameter's flat tensors), clip and apply one; threads past `n` return.
    unsafe {
        adamw_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            p.into_tensor_arg(),
            m.into_tensor_arg(),
            v.into_tensor_arg(),
            g.into_tensor_arg(),
            clip.into_tensor_arg(),
            apply.into_tensor_arg(),
            p_out.clone().into_tensor_arg(),
            m_out.clone().into_tensor_arg(),
            v_out.clone().into_tensor_arg(),
            HyperLaunch::new(
                h.lr,
                h.beta1,
                1.0 - h.beta1,
                h.beta2,
                1.0 - h.beta2,
                h.eps,
                h.decay,
                h.bc1,
                h.bc2,
            ),
            bool_type,
        );
    }
    (p_out, m_out, v_out)
}

fn scalars(h: AdamWStep) -> Vec<ScalarIr> {
    [h.lr, h.beta1, h.beta2, h.eps, h.decay, h.bc1, h.bc2]
        .map(|x| ScalarIr::Float(x as f64))
        .to_vec()
}

fn step_of(scalars: &[ScalarIr]) -> AdamWStep {
    let values: Vec<f32> = scalars
        .iter()
        .map(|s| match s {
            ScalarIr::Float(x) => *x as f32,
            _ => unreachable!("kiln::adamw is registered with float scalars"),
        })
        .collect();
    let [lr, beta1, beta2, eps, decay, bc1, bc2] = values[..] else {
        unreachable!("kiln::adamw is registered with seven scalars")
    };
    AdamWStep {
        lr,
        beta1,
        beta2,
        eps,
        decay,
        bc1,
        bc2,
    }
}

type Runtime = <CubeBackend as burn::backend::fusion::FusionBackend>::FusionRuntime;

#[derive(Debug)]
struct Adamw {
    desc: CustomOpIr,
}

impl Operation<Runtime> for Adamw {
    fn execute(
        &self,
        handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>,
    ) -> Result<(), ExecutionError> {
        let ([p, m, v, g, clip, apply], [p_out, m_out, v_out]) = self.desc.as_fixed();
        let mut float = |t| handles.get_float_tensor::<CubeBackend>(t);
        let (p, m, v, g, clip) = (float(p), float(m), float(v), float(g), float(clip));
        let apply = handles.get_bool_tensor::<CubeBackend>(apply);
        let (p1, m1, v1) = adamw_inner(p, m, v, g, clip, apply, step_of(&self.desc.scalars));
        handles.register_float_tensor::<CubeBackend>(&p_out.id, p1);
        handles.register_float_tensor::<CubeBackend>(&m_out.id, m1);
        handles.register_float_tensor::<CubeBackend>(&v_out.id, v1);
        Ok(())
    }
}

/// Whether the kernel takes these tensors: f32 parameters, moments and gradients (what the
/// optimizer holds); others take the composed formula.
pub fn takes(tensors: [&FloatTensor<Cube>; 5]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

/// The updated parameter and moments.
pub type Updated = (FloatTensor<Cube>, FloatTensor<Cube>, FloatTensor<Cube>);

/// `FusedOps::kiln_adamw` on the GPU backends, for tensors the kernel [`takes`].
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: FloatTensor<Cube>,
    m: FloatTensor<Cube>,
    v: FloatTensor<Cube>,
    g: FloatTensor<Cube>,
    clip: FloatTensor<Cube>,
    apply: BoolTensor<Cube>,
    h: AdamWStep,
) -> Updated {
    let client = p.client.clone();
    let out = || TensorIr::uninit(client.create_empty_handle(), p.shape(), DType::F32);
    let outputs = [out(), out(), out()];
    let desc = CustomOpIr::with_scalars(
        ADAMW,
        &[
            p.into_ir(),
            m.into_ir(),
            v.into_ir(),
            g.into_ir(),
            clip.into_ir(),
            apply.into_ir(),
        ],
        &outputs,
        scalars(h),
    );
    let mut results = client
        .register(
            StreamId::current(),
            OperationIr::Custom(desc.clone()),
            Adamw { desc },
        )
        .into_iter();
    match (results.next(), results.next(), results.next()) {
        (Some(p), Some(m), Some(v)) => (p, m, v),
        _ => unreachable!("kiln::adamw is registered with three outputs"),
    }
}
