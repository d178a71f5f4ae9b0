//! f32 rows to GGML's block encodings, as llama.cpp's quantizer writes them without an
//! importance matrix: ports of `ggml-quants.c`'s reference routines (`quantize_row_*_ref`,
//! `make_qkx2_quants`, `make_qx_quants`, `nearest_int`), operation for operation in f32, so a
//! file kiln writes reconstructs its weights as well as `llama-quantize`'s does. The decoders
//! are `ggml_types`.

use crate::ggml_types::{
    BF16, F16, F32, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, block_layout,
};

const QK_K: usize = 256;
/// `GROUP_MAX_EPS`: below this a group is all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// The types kiln writes.
pub fn writable(ggml_type: u32) -> bool {
    matches!(
        ggml_type,
        F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q5_K | Q6_K
    )
}

/// Bytes that `elements` values take as `ggml_type` (`None` when they are not whole blocks).
pub fn encoded_len(ggml_type: u32, elements: usize) -> Option<usize> {
    let (block, bytes) = block_layout(ggml_type)?;
    elements
        .is_multiple_of(block)
        .then(|| elements / block * bytes)
}

/// Encodes `values` (whole rows, each a whole number of blocks) as `ggml_type`, appending to
/// `out`. Panics on a type [`writable`] refuses or a length that is not whole blocks: the
/// writer chooses types and checks shapes before it encodes.
pub fn quantize_into(ggml_type: u32, values: &[f32], out: &mut Vec<u8>) {
    let (block, _) = block_layout(ggml_type).expect("a writable type");
    assert!(values.len().is_multiple_of(block), "whole blocks");
    let blocks = values.chunks_exact(block);
    match ggml_type {
        F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        F16 => values.iter().for_each(|&v| put_f16(out, v)),
        BF16 => values
            .iter()
            .for_each(|&v| out.extend(half::bf16::from_f32(v).to_bits().to_le_bytes())),
        Q8_0 => blocks.for_each(|b| q8_0(b, out)),
        Q4_0 => blocks.for_each(|b| q4_0(b, out)),
        Q4_1 => blocks.for_each(|b| q4_1(b, out)),
        Q5_0 => blocks.for_each(|b| q5_0(b, out)),
        Q5_1 => blocks.for_each(|b| q5_1(b, out)),
        Q4_K => blocks.for_each(|b| q4_k(b, out)),
        Q5_K => blocks.for_each(|b| q5_k(b, out)),
        Q6_K => blocks.for_each(|b| q6_k(b, out)),
        other => panic!("type {other} is not one kiln writes"),
    }
}

/// How well an encoding reconstructs its input: squared error and squared norm, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reconstruction {
    pub sq_error: f64,
    pub sq_norm: f64,
}

impl Reconstruction {
    /// sqrt(error / norm): 0 for a lossless encoding.
    pub fn relative_rms(&self) -> f64 {
        if self.sq_norm > 0.0 {
            (self.sq_error / self.sq_norm).sqrt()
        } else {
            self.sq_error.sqrt()
        }
    }
}

/// Encodes whole rows of `row_len` values as `ggml_type` across the thread pool (quantizing a
/// large model one core at a time takes minutes), with the reconstruction error of what was
/// written, measured by decoding it again.
pub fn quantize_rows(ggml_type: u32, row_len: usize, values: &[f32]) -> (Vec<u8>, Reconstruction) {
    use rayon::prelude::*;
    // About 64 Ki values a task: enough work per task, and little memory per task.
    let rows_per_task = (65_536 / row_len.max(1)).max(1);
    let parts: Vec<(Vec<u8>, Reconstruction)> = values
        .par_chunks(row_len * rows_per_task)
        .map(|chunk| {
            let mut bytes = Vec::new();
            quantize_into(ggml_type, chunk, &mut bytes);
            let back = crate::ggml_types::dequantize(ggml_type, &bytes).unwrap_or_default();
            let mut r = Reconstruction::default();
            for (a, b) in chunk.iter().zip(&back) {
                r.sq_error += ((a - b) as f64).powi(2);
                r.sq_norm += (*a as f64).powi(2);
            }
            (bytes, r)
        })
        .collect();
    let mut out = Vec::with_capacity(parts.iter().map(|(b, _)| b.len()).sum());
    let mut total = Reconstruction::default();
    for (bytes, r) in parts {
        out.extend(bytes);
        total.sq_error += r.sq_error;
        total.sq_norm += r.sq_norm;
    }
    (out, total)
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend(half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// `GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))`: the value a block's f16 scale holds.
fn through_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// ggml's `nearest_int`: round half to even by the float trick, for |v| < 2^22.
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// The value of largest magnitude, its sign kept (the first of equals, as ggml's loop finds it).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// The smallest and largest values, compared as ggml's loops compare them.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    (min, max)
}

/// `quantize_row_q4_0_ref`: the scale is the value of largest magnitude over −8 (its sign
/// kept), so that value lands exactly on level 0.
fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let max = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    // C's `(int8_t)(x + 8.5f)` truncates toward zero.
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| q(x[j]) | q(x[j + 16]) << 4));
}

/// `quantize_row_q4_1_ref`: 16 levels from the block's minimum to its maximum.
fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    put_f16(out, min);
    let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    out.extend((0..16).map(|j| q(x[j]) | q(x[j + 16]) << 4));
}

/// The 4 low bits of 32 five-bit values packed in pairs, and their fifth bits in a u32.
fn pack_five_bit(q: &[u8; 32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= u32::from((v & 0x10) >> 4) << j;
    }
    out.extend(qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}

fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    let max = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    // C's `(int8_t)(x + 16.5f)` truncates toward zero.
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id + 16.5) as i8).min(31) as u8);
    pack_five_bit(&q, out);
}

fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    put_f16(out, min);
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] - min) * id + 0.5) as u8);
    pack_five_bit(&q, out);
}

/// `make_qkx2_quants`: the scale and (negated) min of a group of `x.len()` values on levels
/// `0..=nmax`, searched over `nstep + 1` candidate scales for the least weighted error.
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K and Q5_K: eight groups of 32, each a 6-bit scale and 6-bit min under the super-block's
/// f16 `d` and `dmin`; `nmax` is 15 or 31. Returns the levels and writes d, dmin, scales.
fn k_scales_and_levels(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    out: &mut Vec<u8>,
) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let group = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in group {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + group[l].abs());
        let (scale, min) = make_qkx2_quants(
            nmax,
            group,
            &weights,
            &mut levels[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    let mut six_bit = [(0u8, 0u8); 8];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        six_bit[j] = (ls, lm);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = through_f16(max_scale / 63.0);
    let dmin = through_f16(max_min / 63.0);
    put_f16(out, max_scale / 63.0);
    put_f16(out, max_min / 63.0);
    out.extend(packed);
    for (j, &(sc, m)) in six_bit.iter().enumerate() {
        let d = d * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            let l = nearest_int((x[32 * j + i] + dm) / d).clamp(0, nmax);
            levels[32 * j + i] = l as u8;
        }
    }
    levels
}

fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    let levels = k_scales_and_levels(x, 15, -1.0, 20, out);
    for j in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|l| levels[j + l] | (levels[j + l + 32] << 4)));
    }
}

fn q5_k(x: &[f32], out: &mut Vec<u8>) {
    let levels = k_scales_and_levels(x, 31, -0.5, 15, out);
    let mut qh = [0u8; 32];
    let mut ql = [0u8; 128];
    let (mut m1, mut m2) = (1u8, 2u8);
    for (chunk, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = levels[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = levels[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * chunk + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
    out.extend(qh);
    out.extend(ql);
}

/// `make_qx_quants` with `rmse_type` 1 (weights x²) and no importance: the scale of a group
/// on the signed levels `-nmax..nmax-1`, searched over 18 candidates around `nmax / max`.
fn make_qx_quants(nmax: i32, x: &[f32]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let (sumlx, suml2) = sums(-(nmax as f32) / max);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let (sumlx, suml2) = sums(-(nmax as f32 + 0.1 * is as f32) / max);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for (ib, s) in scales.iter_mut().enumerate() {
        *s = make_qx_quants(32, &x[16 * ib..16 * ib + 16]);
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = *s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend([0u8; 210]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = through_f16(1.0 / iscale);
    let block_scales: [i8; 16] =
        std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    let mut levels = [0u8; QK_K];
    for (j, &sc) in block_scales.iter().enumerate() {
        let d = d * sc as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            let l = nearest_int(x[16 * j + i] / d).clamp(-32, 31);
            levels[16 * j + i] = (l + 32) as u8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * half..], &mut qh[32 * half..]);
        for l in 0..32 {
            let q = |k: usize| levels[j + l + 32 * k];
            ql[l] = (q(0) & 0xf) | ((q(2) & 0xf) << 4);
            ql[l + 32] = (q(1) & 0xf) | ((q(3) & 0xf) << 4);
            qh[l] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(block_scales.map(|s| s as u8));
    put_f16(out, 1.0 / iscale);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml_types::dequantize;

    /// A deterministic spread of values with a few outliers, as trained weights have.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i % 97 == 0 { u * 0.4 } else { u * 0.05 }
            })
            .collect()
    }

    fn rms_error(ty: u32, x: &[f32]) -> f64 {
        let mut bytes = Vec::new();
        quantize_into(ty, x, &mut bytes);
        assert_eq!(Some(bytes.len()), encoded_len(ty, x.len()));
        let y = dequantize(ty, &bytes).unwrap();
        let se: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        (se / x.len() as f64).sqrt()
    }

    #[test]
    fn every_written_type_decodes_to_its_input_within_its_precision() {
        let x = weights(4 * QK_K, 7);
        let rms: f64 = (x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len() as f64).sqrt();
        // Relative RMS error bounds well above what each type reaches, far below noise.
        for (ty, bound) in [
            (F32, 0.0),
            (F16, 1e-3),
            (BF16, 5e-3),
            (Q8_0, 0.01),
            (Q6_K, 0.03),
            (Q5_K, 0.06),
            (Q5_1, 0.08),
            (Q5_0, 0.08),
            (Q4_K, 0.12),
        ] {
            let e = rms_error(ty, &x) / rms;
            assert!(e <= bound, "type {ty}: relative error {e}");
        }
        // More bits, less error.
        assert!(rms_error(Q6_K, &x) < rms_error(Q5_K, &x));
        assert!(rms_error(Q5_K, &x) < rms_error(Q4_K, &x));
    }

    /// The types gguf-py quantizes too, byte for byte what it makes of the same rows
    /// (tests/fixtures/make_quantized_rows.py: normal rows, tiny, large, zero, constant and
    /// positive ones).
    #[test]
    fn ggml_quantize_matches_gguf_py_bytes() {
        let path = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap())
            .join("../../tests/fixtures/quants/quantized.gguf");
        let file = crate::gguf::GgufFile::read(&path).unwrap();
        let find = |name: &str| file.tensors.iter().find(|t| t.name == name).unwrap();
        let input = file.dequantize(find("input"));
        for ty in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0] {
            let want = file.tensor_bytes(find(&crate::ggml_types::type_name(ty)));
            let mut got = Vec::new();
            quantize_into(ty, &input, &mut got);
            let differ = got.iter().zip(want).position(|(a, b)| a != b);
            assert_eq!((got.len(), differ), (want.len(), None), "type {ty}");
        }
    }

    #[test]
    fn zero_and_constant_blocks_stay_exact() {
        for ty in [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K] {
            let zeros = vec![0.0f32; QK_K];
            assert_eq!(rms_error(ty, &zeros), 0.0, "type {ty}");
        }
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-1.5), -2);
    }
}
