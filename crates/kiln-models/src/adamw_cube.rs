//! One AdamW update of a parameter on the GPU backends (wgpu: Metal, Vulkan) as one CubeCL
//! kernel: a thread an element reads the parameter, its moments and its gradient, and writes
//! the three new values, or the old ones where the step is skipped. Burn's operations took a
//! comparison, fused element-wise kernels and selects for each parameter, every step
//! (docs/PERFORMANCE.md: 659 launches a step of the default model on lavapipe before, 504 after).
//!
//! The arithmetic is `fused::composed::adamw`'s, operation for operation (`kiln_kernels::adamw`'s
//! formula), in f32. Like `fused_cube`'s de-quantisation it is a Fusion custom operation.
//!
//! The learning rate, the decay factor and the bias corrections come from a device tensor
//! (`rates`), not from the kernel's scalars, and the update is written in place when nothing
//! else holds the parameter and its moments: both so that a captured training step
//! (`kiln_train::replay`) replays correctly, since a capture freezes host scalars and records
//! the buffers it wrote. [`out_of_place`] counts the updates that could not be in place.

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
use std::sync::atomic::{AtomicU64, Ordering};

const ADAMW: &str = "kiln::adamw";

/// The run's constants, as the composed formula uses them (the `1 − β` computed in f32); what
/// changes from step to step is in `rates`.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct Hyper {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
}

/// Updates that wrote new buffers because the parameter or a moment was shared.
static OUT_OF_PLACE: AtomicU64 = AtomicU64::new(0);

/// How many updates so far could not write in place (a captured step needs none).
pub fn out_of_place() -> u64 {
    OUT_OF_PLACE.load(Ordering::Relaxed)
}

/// Counts an update that took another path than this kernel (the composed formula).
pub fn note_not_in_place() {
    OUT_OF_PLACE.fetch_add(1, Ordering::Relaxed);
}

/// The update of element `i`: the new `(p, m, v)`. `rates` is `[lr, decay, bc1, bc2]`.
#[cube]
fn update(
    p: f32,
    m: f32,
    v: f32,
    g: f32,
    clip: f32,
    rates: &Tensor<f32>,
    h: Hyper,
) -> (f32, f32, f32) {
    let gi = g * clip;
    let m1 = m * h.beta1 + gi * h.one_minus_beta1;
    let v1 = v * h.beta2 + gi * gi * h.one_minus_beta2;
    let denom = (v1 / rates[3]).sqrt() + h.eps;
    let step = m1 / rates[2] / denom * rates[0];
    (p * rates[1] - step, m1, v1)
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
    rates: &Tensor<f32>,
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
        let (p1, m1, v1) = update(p[i], m[i], v[i], g[i], clip[0], rates, h);
        p_out[i] = p1;
        m_out[i] = m1;
        v_out[i] = v1;
    } else {
        p_out[i] = p[i];
        m_out[i] = m[i];
        v_out[i] = v[i];
    }
}

/// [`adamw_kernel`] writing into the parameter's and moments' own buffers (a buffer can't be
/// bound twice, read and written, in one dispatch).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn adamw_in_place_kernel<B: Int>(
    p: &mut Tensor<f32>,
    m: &mut Tensor<f32>,
    v: &mut Tensor<f32>,
    g: &Tensor<f32>,
    clip: &Tensor<f32>,
    apply: &Tensor<B>,
    rates: &Tensor<f32>,
    h: Hyper,
    #[define(B)] _bool: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= p.len() {
        terminate!();
    }
    if apply[0] != B::from_int(0) {
        let (p1, m1, v1) = update(p[i], m[i], v[i], g[i], clip[0], rates, h);
        p[i] = p1;
        m[i] = m1;
        v[i] = v1;
    }
}

/// Whether the update may overwrite these buffers: each held by this operation alone (so the
/// three are distinct too) and laid out flat.
fn writable(tensors: [&CubeTensor; 3]) -> bool {
    tensors.iter().all(|t| t.can_mut() && t.is_contiguous())
}

#[allow(clippy::too_many_arguments)]
fn adamw_inner(
    p: CubeTensor,
    m: CubeTensor,
    v: CubeTensor,
    g: CubeTensor,
    clip: CubeTensor,
    apply: CubeTensor,
    rates: CubeTensor,
    h: AdamWStep,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let [g, clip, apply, rates] = [g, clip, apply, rates].map(burn_cubecl::kernel::into_contiguous);
    let bool_type = match apply.dtype {
        DType::Bool(BoolStore::U8) => ElemType::UInt(UIntKind::U8),
        _ => ElemType::UInt(UIntKind::U32),
    };
    let hyper = HyperLaunch::new(h.beta1, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2, h.eps);
    let n = p.shape().num_elements();
    let client = p.client.clone();
    let cube_dim = CubeDim::new(&client, n.max(1));
    let cube_count = calculate_cube_count_elemwise(&client, n.max(1), cube_dim);
    if writable([&p, &m, &v]) {
        if n > 0 {
            // SAFETY: p, m, v and g hold `n` elements each (the optimizer passes one
            // parameter's flat tensors), clip, apply one, rates four; threads past `n` return.
            unsafe {
                adamw_in_place_kernel::launch_unchecked(
                    &client,
                    cube_count,
                    cube_dim,
                    p.clone().into_tensor_arg(),
                    m.clone().into_tensor_arg(),
                    v.clone().into_tensor_arg(),
                    g.into_tensor_arg(),
                    clip.into_tensor_arg(),
                    apply.into_tensor_arg(),
                    rates.into_tensor_arg(),
                    hyper,
                    bool_type,
                );
            }
        }
        return (p, m, v);
    }
    OUT_OF_PLACE.fetch_add(1, Ordering::Relaxed);
    let [p, m, v] = [p, m, v].map(burn_cubecl::kernel::into_contiguous);
    let empty = || {
        burn_cubecl::ops::numeric::empty_device_dtype(
            p.client.clone(),
            p.device.clone(),
            p.shape(),
            DType::F32,
        )
    };
    let (p_out, m_out, v_out) = (empty(), empty(), empty());
    if n == 0 {
        return (p_out, m_out, v_out);
    }
    // SAFETY: as above, with the outputs `n` elements each.
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
            rates.into_tensor_arg(),
            p_out.clone().into_tensor_arg(),
            m_out.clone().into_tensor_arg(),
            v_out.clone().into_tensor_arg(),
            hyper,
            bool_type,
        );
    }
    (p_out, m_out, v_out)
}

/// The operation's scalars: the run's constants only (what changes is in `rates`), so that a
/// captured step's recorded operation matches every step's.
fn scalars(h: AdamWStep) -> Vec<ScalarIr> {
    [h.beta1, h.beta2, h.eps]
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
    let [beta1, beta2, eps] = values[..] else {
        unreachable!("kiln::adamw is registered with three scalars")
    };
    // The step's own values are read from `rates` on the device.
    AdamWStep {
        lr: 0.0,
        beta1,
        beta2,
        eps,
        decay: 1.0,
        bc1: 1.0,
        bc2: 1.0,
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
        let ([p, m, v, g, clip, apply, rates], [p_out, m_out, v_out]) = self.desc.as_fixed();
        let mut float = |t| handles.get_float_tensor::<CubeBackend>(t);
        let (p, m, v, g, clip, rates) = (
            float(p),
            float(m),
            float(v),
            float(g),
            float(clip),
            float(rates),
        );
        let apply = handles.get_bool_tensor::<CubeBackend>(apply);
        let step = step_of(&self.desc.scalars);
        let (p1, m1, v1) = adamw_inner(p, m, v, g, clip, apply, rates, step);
        handles.register_float_tensor::<CubeBackend>(&p_out.id, p1);
        handles.register_float_tensor::<CubeBackend>(&m_out.id, m1);
        handles.register_float_tensor::<CubeBackend>(&v_out.id, v1);
        Ok(())
    }
}

/// Whether the kernel takes these tensors: f32 parameters, moments and gradients (what the
/// optimizer holds); others take the composed formula.
pub fn takes(tensors: [&FloatTensor<Cube>; 6]) -> bool {
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
    rates: FloatTensor<Cube>,
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
            rates.into_ir(),
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
