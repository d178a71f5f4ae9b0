//! The fused host kernels of kiln's training step, on row-major `f32` slices: RMSNorm, rotary
//! position embedding, the attention softmax (with its additive mask), SwiGLU and the
//! cross-entropy over a vocabulary, each forward and backward in one pass (or two) over memory.
//!
//! Burn's CPU backend runs every element-wise operation as its own pass, allocating its output,
//! with a scalar `exp`; a SwiGLU block or a softmax is several such passes and their backward as
//! many again. These kernels do each in one, split over rows across rayon's pool, with an `exp`
//! the compiler vectorises (loops are written lane-wise so that they vectorise without fast-math,
//! and on x86-64 they are compiled a second time for AVX2 + FMA, chosen at run time).
//!
//! Results are deterministic: how rows are split into tasks depends on the shapes only, never on
//! the number of threads, and partial sums are added in a fixed order.
//!
//! `kiln_models::fused` plugs these into Burn as backend-extension operations on Flex.

use rayon::prelude::*;

/// Lanes of the partial reductions: wide enough for AVX-512, a multiple of every narrower width.
const LANES: usize = 16;

/// Elements of work one task gets at least (below it, rayon's scheduling costs more than it saves).
const TASK_ELEMENTS: usize = 16 * 1024;

/// Runs `f` compiled for the widest vector unit this processor has (AVX2 + FMA on x86-64 when
/// present; the baseline elsewhere, which is NEON on Apple silicon).
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the processor has both features (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `e^x` in single precision, branch-free so that loops over it vectorise (Cephes' `expf`
/// polynomial: within 2 ulp of the exact value on [-87.3, 88]). Below -87.3 it gives about
/// 1e-38 rather than 0 and above 88 it saturates at e^88 (the callers take it of `x - max`,
/// which is at most 0); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.0;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 × 2^23: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let x = if x < LO { LO } else { x };
    let x = if x > HI { HI } else { x };
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from n's bits: t's low mantissa bits hold n + 0x40_0000.
    let e = (t.to_bits() as i32).wrapping_sub(0x4B40_0000 - 127) << 23;
    y * f32::from_bits(e as u32)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rest) {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
fn reduce_lanes(acc: [f32; LANES]) -> f32 {
    // Pairwise, in a fixed order.
    let mut w = LANES;
    let mut acc = acc;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = reduce_lanes(acc);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `x[i] = exp(x[i] - m)` in place, returning the sum.
#[inline(always)]
fn exp_in_place(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let split = x.len() - x.len() % LANES;
    let (head, tail) = x.split_at_mut(split);
    for c in head.chunks_exact_mut(LANES) {
        for i in 0..LANES {
            let e = exp(c[i] - m);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut s = reduce_lanes(acc);
    for v in tail.iter_mut() {
        *v = exp(*v - m);
        s += *v;
    }
    s
}

/// Sum of `exp(x[i] - m)`.
#[inline(always)]
fn sum_exp(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp(c[i] - m);
        }
    }
    let mut s = reduce_lanes(acc);
    for &v in rest {
        s += exp(v - m);
    }
    s
}

/// Rows per task for rows of `len` elements.
fn rows_per_task(len: usize) -> usize {
    (TASK_ELEMENTS / len.max(1)).max(1)
}

/// Runs `f(first_row, rows)` over `data` split into whole rows of `len`, in parallel when there is
/// enough work.
fn for_rows(data: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if len == 0 || data.is_empty() {
        return;
    }
    let per = rows_per_task(len);
    if data.len() <= TASK_ELEMENTS {
        simd(
            #[inline(always)]
            || f(0, data),
        );
        return;
    }
    data.par_chunks_mut(per * len)
        .enumerate()
        .for_each(|(i, chunk)| {
            simd(
                #[inline(always)]
                || f(i * per, chunk),
            )
        });
}

/// Softmax over each row of `len` of `x + bias`, in place.
///
/// `x` is `[batch, heads, seq, len]`; `bias` is `[bias_batch, 1, seq, len]` with `bias_batch` 1
/// (one mask for every sequence) or `batch` (one per sequence, as packed rows have), broadcast over
/// the heads.
pub fn softmax_bias(x: &mut [f32], bias: &[f32], heads: usize, seq: usize, len: usize) {
    let bias_batch = bias.len() / (seq * len).max(1);
    for_rows(
        x,
        len,
        #[inline(always)]
        |first, rows| {
            for (k, row) in rows.chunks_exact_mut(len).enumerate() {
                let r = first + k;
                let b = if bias_batch == 1 {
                    0
                } else {
                    r / (heads * seq)
                };
                let s = r % seq;
                let mrow = &bias[(b * seq + s) * len..][..len];
                for (v, m) in row.iter_mut().zip(mrow) {
                    *v += m;
                }
                let m = max(row);
                let sum = exp_in_place(row, m);
                let inv = 1.0 / sum;
                for v in row.iter_mut() {
                    *v *= inv;
                }
            }
        },
    );
}

/// The gradient of a softmax over rows of `len` from its output `y` and the gradient `g` of its
/// output, written over `g`: `y · (g − Σ g·y)`.
pub fn softmax_backward(y: &[f32], g: &mut [f32], len: usize) {
    for_rows(
        g,
        len,
        #[inline(always)]
        |first, rows| {
            let y = &y[first * len..][..rows.len()];
            for (grow, yrow) in rows.chunks_exact_mut(len).zip(y.chunks_exact(len)) {
                let d = dot(grow, yrow);
                for (gv, yv) in grow.iter_mut().zip(yrow) {
                    *gv = yv * (*gv - d);
                }
            }
        },
    );
}

/// RMSNorm over rows of `len`: `out = x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], len: usize) {
    for_rows(
        out,
        len,
        #[inline(always)]
        |first, rows| {
            let x = &x[first * len..][..rows.len()];
            for (orow, xrow) in rows.chunks_exact_mut(len).zip(x.chunks_exact(len)) {
                let inv = 1.0 / (dot(xrow, xrow) / len as f32 + eps).sqrt();
                for ((o, xv), wv) in orow.iter_mut().zip(xrow).zip(w) {
                    *o = xv * inv * wv;
                }
            }
        },
    );
}

/// The gradients of [`rms_norm`] with respect to `x` (written to `dx`) and `w` (returned), from
/// the gradient `g` of its output.
pub fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    len: usize,
) -> Vec<f32> {
    #[inline(always)]
    fn rows_backward(
        (x, w, g, eps, len): (&[f32], &[f32], &[f32], f32, usize),
        first: usize,
        rows: &mut [f32],
    ) -> Vec<f32> {
        let mut dw = vec![0f32; len];
        let x = &x[first * len..][..rows.len()];
        let g = &g[first * len..][..rows.len()];
        for ((drow, xrow), grow) in rows
            .chunks_exact_mut(len)
            .zip(x.chunks_exact(len))
            .zip(g.chunks_exact(len))
        {
            let inv = 1.0 / (dot(xrow, xrow) / len as f32 + eps).sqrt();
            // c = mean(g·w·n) with n = x·inv.
            let mut acc = [0f32; LANES];
            let split = len - len % LANES;
            for ((xc, gc), wc) in xrow[..split]
                .chunks_exact(LANES)
                .zip(grow[..split].chunks_exact(LANES))
                .zip(w[..split].chunks_exact(LANES))
            {
                for i in 0..LANES {
                    acc[i] += gc[i] * wc[i] * xc[i];
                }
            }
            let mut c = reduce_lanes(acc);
            for j in split..len {
                c += grow[j] * w[j] * xrow[j];
            }
            let c = c * inv / len as f32;
            for j in 0..len {
                let n = xrow[j] * inv;
                drow[j] = inv * (grow[j] * w[j] - n * c);
                dw[j] += grow[j] * n;
            }
        }
        dw
    }
    let args = (x, w, g, eps, len);
    if len == 0 || dx.is_empty() {
        return vec![0f32; len];
    }
    let per = rows_per_task(len);
    let partials: Vec<Vec<f32>> = if dx.len() <= TASK_ELEMENTS {
        vec![simd(
            #[inline(always)]
            || rows_backward(args, 0, dx),
        )]
    } else {
        dx.par_chunks_mut(per * len)
            .enumerate()
            .map(|(i, chunk)| {
                simd(
                    #[inline(always)]
                    || rows_backward(args, i * per, chunk),
                )
            })
            .collect()
    };
    let mut dw = vec![0f32; len];
    for p in &partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw
}

/// Runs `f(offset, out_chunk)` over `out` in chunks, in parallel when there is enough work.
fn for_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() <= TASK_ELEMENTS {
        simd(
            #[inline(always)]
            || f(0, out),
        );
        return;
    }
    out.par_chunks_mut(TASK_ELEMENTS)
        .enumerate()
        .for_each(|(i, chunk)| {
            simd(
                #[inline(always)]
                || f(i * TASK_ELEMENTS, chunk),
            )
        });
}

/// SwiGLU's gate: `out = silu(gate) · up`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for_chunks(
        out,
        #[inline(always)]
        |at, o| {
            let n = o.len();
            for ((ov, gv), uv) in o.iter_mut().zip(&gate[at..at + n]).zip(&up[at..at + n]) {
                *ov = gv * sigmoid(*gv) * uv;
            }
        },
    );
}

/// The gradients of [`swiglu`]: `g` (the gradient of its output) is overwritten with the gradient
/// of `gate`, and the gradient of `up` is written to `dup`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], g: &mut [f32], dup: &mut [f32]) {
    for_chunks_pair(
        g,
        dup,
        #[inline(always)]
        |at, gc, dc| {
            let n = gc.len();
            let gate = &gate[at..at + n];
            let up = &up[at..at + n];
            for i in 0..n {
                let s = sigmoid(gate[i]);
                let gi = gc[i];
                dc[i] = gi * gate[i] * s;
                gc[i] = gi * up[i] * s * (1.0 + gate[i] * (1.0 - s));
            }
        },
    );
}

/// Like [`for_chunks`], over two equally long outputs split the same way.
fn for_chunks_pair(
    a: &mut [f32],
    b: &mut [f32],
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
) {
    let n = a.len().min(b.len());
    let (a, b) = (&mut a[..n], &mut b[..n]);
    if n <= TASK_ELEMENTS {
        simd(
            #[inline(always)]
            || f(0, a, b),
        );
        return;
    }
    a.par_chunks_mut(TASK_ELEMENTS)
        .zip(b.par_chunks_mut(TASK_ELEMENTS))
        .enumerate()
        .for_each(|(i, (ac, bc))| {
            simd(
                #[inline(always)]
                || f(i * TASK_ELEMENTS, ac, bc),
            )
        });
}

/// Rotary position embedding, rotate-half layout (as Hugging Face's Llama), in place, of `x` laid
/// out `[batch, seq, heads, dim]`, with `cos`/`sin` tables `[table_batch, seq, dim]`
/// (`table_batch` 1, or `batch` for packed rows whose positions restart). `inverse` rotates the
/// other way (by `-sin`), which is the backward of the forward rotation.
pub fn rope(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    seq: usize,
    heads: usize,
    dim: usize,
    inverse: bool,
) {
    let row = heads * dim;
    let table_batch = cos.len() / (seq * dim).max(1);
    let half = dim / 2;
    let sign = if inverse { -1.0f32 } else { 1.0 };
    for_rows(
        x,
        row,
        #[inline(always)]
        |first, rows| {
            for (k, xrow) in rows.chunks_exact_mut(row).enumerate() {
                let r = first + k;
                let (b, s) = (r / seq, r % seq);
                let t = (if table_batch == 1 { 0 } else { b } * seq + s) * dim;
                let (c, sn) = (&cos[t..t + dim], &sin[t..t + dim]);
                for xh in xrow.chunks_exact_mut(dim) {
                    let (x1, x2) = xh.split_at_mut(half);
                    for j in 0..half {
                        let (a, b) = (x1[j], x2[j]);
                        x1[j] = a * c[j] - sign * b * sn[j];
                        x2[j] = b * c[half + j] + sign * a * sn[half + j];
                    }
                }
            }
        },
    );
}

/// Cross-entropy of each row of `logits` (`len` wide) against its target, weighted:
/// `loss[r] = weights[r] · (logsumexp(row) − row[target])`. Rows of weight 0 are skipped (0).
/// A target outside the row gives NaN.
pub fn cross_entropy(
    logits: &[f32],
    targets: &[u32],
    weights: &[f32],
    loss: &mut [f32],
    len: usize,
) {
    let rows = loss.len();
    let per = rows_per_task(len);
    #[inline(always)]
    fn ce_rows(
        (logits, targets, weights, len): (&[f32], &[u32], &[f32], usize),
        first: usize,
        out: &mut [f32],
    ) {
        for (k, o) in out.iter_mut().enumerate() {
            let r = first + k;
            let w = weights[r];
            if w == 0.0 {
                *o = 0.0;
                continue;
            }
            let row = &logits[r * len..][..len];
            let m = max(row);
            let lse = m + sum_exp(row, m).ln();
            let picked = row.get(targets[r] as usize).copied().unwrap_or(f32::NAN);
            *o = w * (lse - picked);
        }
    }
    let args = (logits, targets, weights, len);
    if rows * len <= TASK_ELEMENTS {
        simd(
            #[inline(always)]
            || ce_rows(args, 0, loss),
        );
        return;
    }
    loss.par_chunks_mut(per).enumerate().for_each(|(i, chunk)| {
        simd(
            #[inline(always)]
            || ce_rows(args, i * per, chunk),
        )
    });
}

/// The gradient of [`cross_entropy`] with respect to the logits, written over them (in place):
/// `grad[r] · weights[r] · (softmax(row) − onehot(target))`.
pub fn cross_entropy_backward(
    logits: &mut [f32],
    targets: &[u32],
    weights: &[f32],
    grad: &[f32],
    len: usize,
) {
    for_rows(
        logits,
        len,
        #[inline(always)]
        |first, rows| {
            for (k, row) in rows.chunks_exact_mut(len).enumerate() {
                let r = first + k;
                let gw = grad[r] * weights[r];
                if gw == 0.0 {
                    row.fill(0.0);
                    continue;
                }
                let m = max(row);
                let sum = exp_in_place(row, m);
                let scale = gw / sum;
                for v in row.iter_mut() {
                    *v *= scale;
                }
                match row.get_mut(targets[r] as usize) {
                    Some(v) => *v -= gw,
                    None => row.fill(f32::NAN),
                }
            }
        },
    );
}

/// One AdamW step's constants (PyTorch's `AdamW` formula, decoupled weight decay).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 − lr × weight_decay` (1 for parameters that don't decay).
    pub decay: f32,
    /// Bias corrections `1 − β^t`.
    pub bc1: f32,
    pub bc2: f32,
}

/// AdamW on one parameter, in place: with `g` scaled by `clip`,
/// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← decay·p − lr · (m / bc1) / (sqrt(v / bc2) + eps)`.
pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], clip: f32, h: AdamW) {
    let n = p.len().min(m.len()).min(v.len()).min(g.len());
    let (p, m, v, g) = (&mut p[..n], &mut m[..n], &mut v[..n], &g[..n]);
    #[inline(always)]
    fn step(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], clip: f32, h: AdamW) {
        for i in 0..p.len() {
            let gi = g[i] * clip;
            let mi = m[i] * h.beta1 + gi * (1.0 - h.beta1);
            let vi = v[i] * h.beta2 + gi * gi * (1.0 - h.beta2);
            let denom = (vi / h.bc2).sqrt() + h.eps;
            p[i] = p[i] * h.decay - (mi / h.bc1) / denom * h.lr;
            m[i] = mi;
            v[i] = vi;
        }
    }
    if n <= TASK_ELEMENTS {
        simd(
            #[inline(always)]
            || step(p, m, v, g, clip, h),
        );
        return;
    }
    p.par_chunks_mut(TASK_ELEMENTS)
        .zip(m.par_chunks_mut(TASK_ELEMENTS))
        .zip(v.par_chunks_mut(TASK_ELEMENTS))
        .zip(g.par_chunks(TASK_ELEMENTS))
        .for_each(|(((p, m), v), g)| {
            simd(
                #[inline(always)]
                || step(p, m, v, g, clip, h),
            )
        });
}

pub mod attention;
pub mod quant;

#[cfg(test)]
mod tests;
