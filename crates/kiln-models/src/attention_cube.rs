//! Attention without materialised scores on the GPU backends (wgpu: Metal, Vulkan): CubeCL
//! kernels of `FusedOps::kiln_attention` and its backward, in f32.
//!
//! - Forward: one thread a query row walks its run of keys once with the online softmax
//!   (running max and sum, the output rescaled as the max grows), and writes the output row and
//!   its log-sum-exp.
//! - Backward: one thread a query row sums its dQ over its keys; one thread a key sums its dK
//!   and dV over every query head of its K/V head and every query that sees it (runs start in
//!   order, so it stops at the first that starts past it). Each output is written by one thread,
//!   in one order: deterministic, no atomics. `D = rowsum(dO ∘ O)` is a query row's own sum, in
//!   the first kernel, which leaves it for the second.
//!
//! Rows are the parallel units and a row's head dimension is a loop: simple and memory-light
//! (nothing per score is stored), not yet the shared-memory tiling a fast GPU kernel has.
//! Burn's GPU backend is lazy (`Fusion`): each kernel is a custom operation, like
//! `fused_cube`'s de-quantisation.

use crate::fused::AttentionParams;
use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, ScalarIr, StreamId, TensorIr,
};
use burn::backend::fusion::{ExecutionError, FusionRuntime};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Cube, DType, Shape, TensorMetadata};
use burn::tensor::FloatDType;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, CubeLaunch, calculate_cube_count_elemwise};
use burn_cubecl::tensor::CubeTensor;

const FORWARD: &str = "kiln::attention";
const BACKWARD: &str = "kiln::attention_backward";

/// The sizes every kernel reads (runtime values, so one compiled kernel serves every length).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    mask_rows: usize,
}

/// Query `i`'s score against key `j` of batch row `b` (`q_at`, `k_at`: the rows' first
/// elements), scaled and soft-capped; and the cap's slope `1 − tanh²` (1 without a cap).
#[cube]
fn score(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    q_at: usize,
    k_at: usize,
    scale: f32,
    cap: f32,
    #[comptime] hd: usize,
    #[comptime] softcap: bool,
) -> (f32, f32) {
    let mut s = 0.0f32;
    for d in 0..hd {
        s += q[q_at + d] * k[k_at + d];
    }
    s *= scale;
    let mut slope = 1.0f32;
    if softcap {
        let t = (s / cap).tanh();
        s = cap * t;
        slope = 1.0f32 - t * t;
    }
    (s, slope)
}

#[cube]
fn first_key(first: &Tensor<i32>, dims: &Dims, b: usize, i: usize) -> usize {
    let row = if dims.mask_rows == 1 { 0usize } else { b };
    usize::cast_from(first[row * dims.queries + i])
}

/// Query row `row` of lse's `[b, heads, queries]`: its batch row, query, K/V head, and where
/// its head's `hd` elements start in q (and out, d_out, dq).
#[cube]
fn query_row(dims: &Dims, row: usize, #[comptime] hd: usize) -> (usize, usize, usize, usize) {
    let i = row % dims.queries;
    let h = (row / dims.queries) % dims.heads;
    let b = row / (dims.queries * dims.heads);
    let kvh = h / (dims.heads / dims.kv_heads);
    (b, i, kvh, ((b * dims.queries + i) * dims.heads + h) * hd)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    first: &Tensor<i32>,
    out: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    dims: Dims,
    scale: f32,
    cap: f32,
    #[comptime] hd: usize,
    #[comptime] softcap: bool,
) {
    if ABSOLUTE_POS >= lse.len() {
        terminate!();
    }
    let (b, i, kvh, q_at) = query_row(&dims, ABSOLUTE_POS, hd);
    let mut acc = Array::<f32>::new(hd);
    for d in 0..hd {
        acc[d] = 0.0f32;
    }
    // Finite: WGSL has no infinities. Every row sees at least its own key.
    let mut m = f32::new(-3.0e38);
    let mut l = 0.0f32;
    for j in first_key(first, &dims, b, i)..i + dims.keys - dims.queries + 1 {
        let k_at = ((b * dims.keys + j) * dims.kv_heads + kvh) * hd;
        let (s, _slope) = score(q, k, q_at, k_at, scale, cap, hd, softcap);
        let m_new = if s > m { s } else { m };
        let rescale = (m - m_new).exp();
        let p = (s - m_new).exp();
        l = l * rescale + p;
        for d in 0..hd {
            acc[d] = acc[d] * rescale + p * v[k_at + d];
        }
        m = m_new;
    }
    for d in 0..hd {
        out[q_at + d] = acc[d] / l;
    }
    lse[ABSOLUTE_POS] = m + l.ln();
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn query_gradient_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    first: &Tensor<i32>,
    lse: &Tensor<f32>,
    out: &Tensor<f32>,
    d_out: &Tensor<f32>,
    dq: &mut Tensor<f32>,
    delta: &mut Tensor<f32>,
    dims: Dims,
    scale: f32,
    cap: f32,
    #[comptime] hd: usize,
    #[comptime] softcap: bool,
) {
    if ABSOLUTE_POS >= lse.len() {
        terminate!();
    }
    let (b, i, kvh, q_at) = query_row(&dims, ABSOLUTE_POS, hd);
    // D = rowsum(dO ∘ O), kept for the key gradients' kernel, which runs next.
    let mut row_delta = 0.0f32;
    for d in 0..hd {
        row_delta += d_out[q_at + d] * out[q_at + d];
    }
    delta[ABSOLUTE_POS] = row_delta;
    let row_lse = lse[ABSOLUTE_POS];
    let mut acc = Array::<f32>::new(hd);
    for d in 0..hd {
        acc[d] = 0.0f32;
    }
    for j in first_key(first, &dims, b, i)..i + dims.keys - dims.queries + 1 {
        let k_at = ((b * dims.keys + j) * dims.kv_heads + kvh) * hd;
        let (s, slope) = score(q, k, q_at, k_at, scale, cap, hd, softcap);
        let p = (s - row_lse).exp();
        let mut dp = 0.0f32;
        for d in 0..hd {
            dp += d_out[q_at + d] * v[k_at + d];
        }
        let ds = p * (dp - row_delta) * slope;
        for d in 0..hd {
            acc[d] += ds * k[k_at + d];
        }
    }
    for d in 0..hd {
        dq[q_at + d] = acc[d] * scale;
    }
}

#[cube(launch_unchecked)]
// `saturating_sub` is not a CubeCL operation.
#[allow(clippy::too_many_arguments, clippy::implicit_saturating_sub)]
fn key_gradient_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    first: &Tensor<i32>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    d_out: &Tensor<f32>,
    dk: &mut Tensor<f32>,
    dv: &mut Tensor<f32>,
    dims: Dims,
    scale: f32,
    cap: f32,
    #[comptime] hd: usize,
    #[comptime] softcap: bool,
) {
    // dk and dv are [b, keys, kv_heads, hd]: the thread's key row.
    let rows = dk.len() / hd;
    if ABSOLUTE_POS >= rows {
        terminate!();
    }
    let kvh = ABSOLUTE_POS % dims.kv_heads;
    let j = (ABSOLUTE_POS / dims.kv_heads) % dims.keys;
    let b = ABSOLUTE_POS / (dims.kv_heads * dims.keys);
    let k_at = ABSOLUTE_POS * hd;
    let rep = dims.heads / dims.kv_heads;
    let offset = dims.keys - dims.queries;
    let mut acc_k = Array::<f32>::new(hd);
    let mut acc_v = Array::<f32>::new(hd);
    for d in 0..hd {
        acc_k[d] = 0.0f32;
        acc_v[d] = 0.0f32;
    }
    // The first query whose own position reaches this key.
    let from = if j > offset { j - offset } else { 0usize };
    for r in 0..rep {
        let h = kvh * rep + r;
        for i in from..dims.queries {
            if first_key(first, &dims, b, i) > j {
                break;
            }
            let q_at = ((b * dims.queries + i) * dims.heads + h) * hd;
            let row = (b * dims.heads + h) * dims.queries + i;
            let (s, slope) = score(q, k, q_at, k_at, scale, cap, hd, softcap);
            let p = (s - lse[row]).exp();
            let mut dp = 0.0f32;
            for d in 0..hd {
                dp += d_out[q_at + d] * v[k_at + d];
            }
            let ds = p * (dp - delta[row]) * slope;
            for d in 0..hd {
                acc_v[d] += p * d_out[q_at + d];
                acc_k[d] += ds * q[q_at + d];
            }
        }
    }
    for d in 0..hd {
        dk[k_at + d] = acc_k[d] * scale;
        dv[k_at + d] = acc_v[d];
    }
}

fn contiguous(t: CubeTensor) -> CubeTensor {
    burn_cubecl::kernel::into_contiguous(t)
}

fn empty_like_f32(like: &CubeTensor, shape: Shape) -> CubeTensor {
    burn_cubecl::ops::numeric::empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        shape,
        DType::F32,
    )
}

/// The sizes and constants of a call, from q `[b, s, h, hd]`, k `[b, t, kv, hd]` and `first`.
fn dims_of(q: &CubeTensor, k: &CubeTensor, first: &CubeTensor) -> ([usize; 4], DimsLaunch) {
    let [b, s, h, hd] = q.shape().dims::<4>();
    let [_, t, kv, _] = k.shape().dims::<4>();
    let mask_rows = first.shape()[0];
    let dims = DimsLaunch::new(h, kv, s, t, mask_rows);
    ([b, s, h, hd], dims)
}

fn cap_of(p: AttentionParams) -> f32 {
    p.softcap.unwrap_or(1.0) as f32
}

fn forward_inner(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    first: CubeTensor,
    p: AttentionParams,
) -> (CubeTensor, CubeTensor) {
    let [q, k, v, first] = [q, k, v, first].map(contiguous);
    let ([b, s, h, hd], dims) = dims_of(&q, &k, &first);
    let out = empty_like_f32(&q, q.shape());
    let lse = empty_like_f32(&q, Shape::new([b, h, s]));
    let rows = b * h * s;
    if rows == 0 {
        return (out, lse);
    }
    let cube_dim = CubeDim::new(&q.client, rows);
    let cube_count = calculate_cube_count_elemwise(&q.client, rows, cube_dim);
    // SAFETY: every index is inside its tensor: threads past the rows return; a row's keys are
    // `first[i] ..= i + t − s` with `first[i] ≤ i + t − s` (the callers' key runs), all inside k
    // and v, and the row's head `hd` elements inside q and out.
    unsafe {
        forward_kernel::launch_unchecked(
            &q.client,
            cube_count,
            cube_dim,
            q.clone().into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            first.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dims,
            p.scale as f32,
            cap_of(p),
            hd,
            p.softcap.is_some(),
        );
    }
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
fn backward_inner(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    first: CubeTensor,
    lse: CubeTensor,
    out: CubeTensor,
    d_out: CubeTensor,
    p: AttentionParams,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let [q, k, v, first, lse, out, d_out] = [q, k, v, first, lse, out, d_out].map(contiguous);
    let ([b, s, h, hd], _) = dims_of(&q, &k, &first);
    let dims = || dims_of(&q, &k, &first).1;
    let dq = empty_like_f32(&q, q.shape());
    let dk = empty_like_f32(&k, k.shape());
    let dv = empty_like_f32(&k, k.shape());
    let delta = empty_like_f32(&q, lse.shape());
    let (rows, key_rows) = (b * h * s, k.shape().num_elements() / hd.max(1));
    if rows == 0 || hd == 0 {
        return (dq, dk, dv);
    }
    let client = q.client.clone();
    let (scale, cap, softcap) = (p.scale as f32, cap_of(p), p.softcap.is_some());
    let cube_dim = CubeDim::new(&client, rows);
    let cube_count = calculate_cube_count_elemwise(&client, rows, cube_dim);
    // SAFETY: as in `forward_inner`; lse and delta are [b, h, s], out, d_out and dq like q.
    unsafe {
        query_gradient_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            first.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            out.into_tensor_arg(),
            d_out.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            dims(),
            scale,
            cap,
            hd,
            softcap,
        );
    }
    let cube_dim = CubeDim::new(&client, key_rows);
    let cube_count = calculate_cube_count_elemwise(&client, key_rows, cube_dim);
    // SAFETY: threads past the key rows return; a key's queries are those whose runs hold it
    // (from its causal first, stopping at the first run that starts after it), all inside q,
    // d_out, lse and delta; the key row's `hd` elements inside k, v, dk and dv.
    unsafe {
        key_gradient_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            first.clone().into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            d_out.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            dims(),
            scale,
            cap,
            hd,
            softcap,
        );
    }
    (dq, dk, dv)
}

fn scalars(p: AttentionParams) -> Vec<ScalarIr> {
    vec![
        ScalarIr::Float(p.scale),
        ScalarIr::Bool(p.softcap.is_some()),
        ScalarIr::Float(p.softcap.unwrap_or(0.0)),
    ]
}

fn params_of(scalars: &[ScalarIr]) -> AttentionParams {
    let [
        ScalarIr::Float(scale),
        ScalarIr::Bool(capped),
        ScalarIr::Float(cap),
    ] = scalars
    else {
        unreachable!("kiln's attention operations are registered with these scalars")
    };
    AttentionParams {
        scale: *scale,
        softcap: capped.then_some(*cap),
    }
}

type Runtime = <CubeBackend as burn::backend::fusion::FusionBackend>::FusionRuntime;
type Handles = HandleContainer<<Runtime as FusionRuntime>::FusionHandle>;

#[derive(Debug)]
struct Forward {
    desc: CustomOpIr,
}

impl Operation<Runtime> for Forward {
    fn execute(&self, handles: &mut Handles) -> Result<(), ExecutionError> {
        let ([q, k, v, first], [out, lse]) = self.desc.as_fixed();
        let float = |h: &mut Handles, t| h.get_float_tensor::<CubeBackend>(t);
        let (q, k, v) = (float(handles, q), float(handles, k), float(handles, v));
        let first = handles.get_int_tensor::<CubeBackend>(first);
        let (o, l) = forward_inner(q, k, v, first, params_of(&self.desc.scalars));
        handles.register_float_tensor::<CubeBackend>(&out.id, o);
        handles.register_float_tensor::<CubeBackend>(&lse.id, l);
        Ok(())
    }
}

#[derive(Debug)]
struct Backward {
    desc: CustomOpIr,
}

impl Operation<Runtime> for Backward {
    fn execute(&self, handles: &mut Handles) -> Result<(), ExecutionError> {
        let ([q, k, v, first, lse, out, d_out], [dq, dk, dv]) = self.desc.as_fixed();
        let float = |h: &mut Handles, t| h.get_float_tensor::<CubeBackend>(t);
        let (q, k, v) = (float(handles, q), float(handles, k), float(handles, v));
        let (lse, out, d_out) = (
            float(handles, lse),
            float(handles, out),
            float(handles, d_out),
        );
        let first = handles.get_int_tensor::<CubeBackend>(first);
        let params = params_of(&self.desc.scalars);
        let (gq, gk, gv) = backward_inner(q, k, v, first, lse, out, d_out, params);
        handles.register_float_tensor::<CubeBackend>(&dq.id, gq);
        handles.register_float_tensor::<CubeBackend>(&dk.id, gk);
        handles.register_float_tensor::<CubeBackend>(&dv.id, gv);
        Ok(())
    }
}

fn f32_of(t: FloatTensor<Cube>) -> FloatTensor<Cube> {
    match t.dtype() {
        DType::F32 => t,
        _ => Cube::float_cast(t, FloatDType::F32),
    }
}

fn back_to(t: FloatTensor<Cube>, dtype: DType) -> FloatTensor<Cube> {
    match dtype {
        DType::F32 => t,
        other => Cube::float_cast(t, other.into()),
    }
}

type Client = burn::backend::fusion::client::GlobalFusionClient<Runtime>;

fn uninit_f32(client: &Client, shape: Shape) -> TensorIr {
    TensorIr::uninit(client.create_empty_handle(), shape, DType::F32)
}

/// `FusedOps::kiln_attention` on the GPU backends.
pub fn attention(
    q: FloatTensor<Cube>,
    k: FloatTensor<Cube>,
    v: FloatTensor<Cube>,
    first: IntTensor<Cube>,
    params: AttentionParams,
) -> (FloatTensor<Cube>, FloatTensor<Cube>) {
    let dtype = q.dtype();
    let [b, s, h, _] = q.shape().dims::<4>();
    let (q, k, v) = (f32_of(q), f32_of(k), f32_of(v));
    let client = q.client.clone();
    let out = uninit_f32(&client, q.shape());
    let lse = uninit_f32(&client, Shape::new([b, h, s]));
    let desc = CustomOpIr::with_scalars(
        FORWARD,
        &[q.into_ir(), k.into_ir(), v.into_ir(), first.into_ir()],
        &[out, lse],
        scalars(params),
    );
    let mut outputs = client
        .register(
            StreamId::current(),
            OperationIr::Custom(desc.clone()),
            Forward { desc },
        )
        .into_iter();
    let (out, lse) = (outputs.next(), outputs.next());
    let (Some(out), Some(lse)) = (out, lse) else {
        unreachable!("kiln::attention is registered with two outputs")
    };
    (back_to(out, dtype), lse)
}

/// `FusedOps::kiln_attention_backward` on the GPU backends.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: FloatTensor<Cube>,
    k: FloatTensor<Cube>,
    v: FloatTensor<Cube>,
    first: IntTensor<Cube>,
    out: FloatTensor<Cube>,
    lse: FloatTensor<Cube>,
    grad: FloatTensor<Cube>,
    params: AttentionParams,
) -> (FloatTensor<Cube>, FloatTensor<Cube>, FloatTensor<Cube>) {
    let dtypes = (q.dtype(), k.dtype(), v.dtype());
    let [q, k, v, out, lse, grad] = [q, k, v, out, lse, grad].map(f32_of);
    let client = q.client.clone();
    let (dq, dk, dv) = (
        uninit_f32(&client, q.shape()),
        uninit_f32(&client, k.shape()),
        uninit_f32(&client, v.shape()),
    );
    let desc = CustomOpIr::with_scalars(
        BACKWARD,
        &[
            q.into_ir(),
            k.into_ir(),
            v.into_ir(),
            first.into_ir(),
            lse.into_ir(),
            out.into_ir(),
            grad.into_ir(),
        ],
        &[dq, dk, dv],
        scalars(params),
    );
    let outputs: Vec<FloatTensor<Cube>> = client.register(
        StreamId::current(),
        OperationIr::Custom(desc.clone()),
        Backward { desc },
    );
    let [dq, dk, dv]: [FloatTensor<Cube>; 3] = outputs
        .try_into()
        .unwrap_or_else(|_| unreachable!("kiln::attention_backward has three outputs"));
    (
        back_to(dq, dtypes.0),
        back_to(dk, dtypes.1),
        back_to(dv, dtypes.2),
    )
}
