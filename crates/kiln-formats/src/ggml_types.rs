//! The tensor types of GGML (llama.cpp's tensor library) that GGUF files hold: their ids, names,
//! block layouts, and de-quantisation of one block to f32, in GGUF element order.
//!
//! Each block decoder follows gguf-py's reference (`gguf.quants`, itself checked against
//! llama.cpp's `ggml-quants.c`) operation for operation, in f32, so the values are equal to the
//! reference's, not merely close: `ggml_types_match_gguf_py_exactly` checks every type on random
//! blocks and on blocks llama.cpp's quantizer wrote. Q8_K is missing on purpose: llama.cpp uses
//! it only inside dot products and never stores it.

/// Elements per super-block of the K-quants and IQ4_XS.
const QK_K: usize = 256;

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q5_0: u32 = 6;
pub const Q5_1: u32 = 7;
pub const Q8_0: u32 = 8;
pub const Q2_K: u32 = 10;
pub const Q3_K: u32 = 11;
pub const Q4_K: u32 = 12;
pub const Q5_K: u32 = 13;
pub const Q6_K: u32 = 14;
pub const IQ4_NL: u32 = 20;
pub const IQ4_XS: u32 = 23;
pub const BF16: u32 = 30;

/// IQ4's non-linear 4-bit levels (`kvalues_iq4nl`).
const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// (elements per block, bytes per block) of a type kiln reads.
pub fn block_layout(ggml_type: u32) -> Option<(usize, usize)> {
    Some(match ggml_type {
        F32 => (1, 4),
        F16 | BF16 => (1, 2),
        Q4_0 => (32, 18),
        Q4_1 => (32, 20),
        Q5_0 => (32, 22),
        Q5_1 => (32, 24),
        Q8_0 => (32, 34),
        Q2_K => (QK_K, 84),
        Q3_K => (QK_K, 110),
        Q4_K => (QK_K, 144),
        Q5_K => (QK_K, 176),
        Q6_K => (QK_K, 210),
        IQ4_NL => (32, 18),
        IQ4_XS => (QK_K, 136),
        _ => return None,
    })
}

/// GGML's name of a type (the names of types kiln does not read too, for error messages).
pub fn type_name(ggml_type: u32) -> String {
    let name = match ggml_type {
        F32 => "F32",
        F16 => "F16",
        Q4_0 => "Q4_0",
        Q4_1 => "Q4_1",
        Q5_0 => "Q5_0",
        Q5_1 => "Q5_1",
        Q8_0 => "Q8_0",
        Q2_K => "Q2_K",
        Q3_K => "Q3_K",
        Q4_K => "Q4_K",
        Q5_K => "Q5_K",
        Q6_K => "Q6_K",
        IQ4_NL => "IQ4_NL",
        IQ4_XS => "IQ4_XS",
        BF16 => "BF16",
        4 | 5 => "Q4_2/Q4_3 (removed from GGML)",
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        other => return format!("type {other}"),
    };
    name.to_string()
}

/// The names of every type kiln reads, for error messages.
pub fn readable_types() -> String {
    [
        F32, F16, BF16, Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, IQ4_XS, IQ4_NL, Q3_K, Q2_K,
    ]
    .map(type_name)
    .join(", ")
}

pub(crate) fn f16(b: &[u8]) -> f32 {
    crate::safetensors_io::f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// De-quantises `raw` (whole blocks of `ggml_type`) to f32; `None` for a type kiln does not read.
pub fn dequantize(ggml_type: u32, raw: &[u8]) -> Option<Vec<f32>> {
    // The unquantised types element by element (a call per element would cost seconds on a
    // large f16 file).
    match ggml_type {
        F32 => {
            return Some(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        F16 => return Some(raw.chunks_exact(2).map(f16).collect()),
        BF16 => {
            return Some(
                raw.chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
            );
        }
        _ => {}
    }
    let (block, bytes) = block_layout(ggml_type)?;
    let decode: fn(&[u8], &mut [f32]) = match ggml_type {
        Q4_0 => q4_0,
        Q4_1 => q4_1,
        Q5_0 => q5_0,
        Q5_1 => q5_1,
        Q8_0 => q8_0,
        Q2_K => q2_k,
        Q3_K => q3_k,
        Q4_K => q4_k,
        Q5_K => q5_k,
        Q6_K => q6_k,
        IQ4_NL => iq4_nl,
        IQ4_XS => iq4_xs,
        _ => return None,
    };
    let mut out = vec![0f32; raw.len() / bytes * block];
    for (b, o) in raw.chunks_exact(bytes).zip(out.chunks_exact_mut(block)) {
        decode(b, o);
    }
    Some(out)
}

/// `d · (q − 8)`, q the 4-bit values: low nibbles are elements 0..16, high nibbles 16..32.
fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16(&b[0..2]);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = d * ((q & 0x0f) as f32 - 8.0);
        out[j + 16] = d * ((q >> 4) as f32 - 8.0);
    }
}

/// `d · q + m`.
fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = d * (q & 0x0f) as f32 + m;
        out[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// The 5-bit values of Q5_0/Q5_1: nibbles as Q4's, the fifth bit of element i is bit i of `qh`.
pub(crate) fn five_bit(qh: &[u8], qs: &[u8], i: usize) -> u8 {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]) >> i & 1;
    let low = if i < 16 {
        qs[i] & 0x0f
    } else {
        qs[i - 16] >> 4
    };
    low | (high as u8) << 4
}

/// `d · (q − 16)`.
fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16(&b[0..2]);
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * (five_bit(&b[2..6], &b[6..22], i) as i8 - 16) as f32;
    }
}

/// `d · q + m`.
fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * five_bit(&b[4..8], &b[8..24], i) as f32 + m;
    }
}

/// `d · q`, q signed bytes.
fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16(&b[0..2]);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = d * (q as i8) as f32;
    }
}

/// The 2-bit quants of Q2_K and Q3_K: element `h·128 + s·32 + l` is bits `2s..2s+2` of byte
/// `h·32 + l`.
pub(crate) fn two_bit(qs: &[u8], e: usize) -> u8 {
    let (h, s, l) = (e / 128, e % 128 / 32, e % 32);
    qs[h * 32 + l] >> (2 * s) & 3
}

/// 16 groups of 16: `d · scale − dmin · min`, the group's 4-bit scale and min in one byte.
fn q2_k(b: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16(&b[80..82]), f16(&b[82..84]));
    for (e, o) in out.iter_mut().enumerate() {
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0f) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *o = dl * two_bit(qs, e) as f32 - ml;
    }
}

/// 16 groups of 16 with signed 6-bit scales: `d · (scale − 32) · (q − 4·!hbit)`.
fn q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16(&b[108..110]);
    // Scale k: its low 4 bits are nibble k / 8 of byte k % 8, its high 2 bits are bits
    // 2·(k / 4) of byte 8 + k % 4.
    let scale = |k: usize| {
        let low = packed[k % 8] >> (4 * (k / 8)) & 0x0f;
        let high = packed[8 + k % 4] >> (2 * (k / 4)) & 3;
        ((low | high << 4) as i8 - 32) as f32
    };
    for (e, o) in out.iter_mut().enumerate() {
        let dl = d * scale(e / 16);
        let hbit = hmask[e % 32] >> (e / 32) & 1;
        let q = two_bit(qs, e) as i8 - (((hbit ^ 1) << 2) as i8);
        *o = dl * q as f32;
    }
}

/// The 6-bit scales and mins of Q4_K/Q5_K's 8 groups of 32, packed in 12 bytes.
pub(crate) fn k_scale_min(packed: &[u8], g: usize) -> (u8, u8) {
    if g < 4 {
        (packed[g] & 63, packed[g + 4] & 63)
    } else {
        (
            (packed[g + 4] & 0x0f) | (packed[g - 4] >> 2 & 0x30),
            (packed[g + 4] >> 4) | (packed[g] >> 2 & 0x30),
        )
    }
}

/// The 4-bit quants of Q4_K/Q5_K: element `c·64 + n·32 + l` is nibble n of byte `c·32 + l`.
pub(crate) fn k_nibble(qs: &[u8], e: usize) -> u8 {
    let (c, n, l) = (e / 64, e % 64 / 32, e % 32);
    qs[c * 32 + l] >> (4 * n) & 0x0f
}

/// 8 groups of 32: `d · scale · q − dmin · min`.
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
    let (packed, qs) = (&b[4..16], &b[16..144]);
    for (e, o) in out.iter_mut().enumerate() {
        let (sc, m) = k_scale_min(packed, e / 32);
        *o = d * sc as f32 * k_nibble(qs, e) as f32 - dmin * m as f32;
    }
}

/// Q4_K with a fifth bit: element `b·32 + l`'s is bit b of `qh[l]`.
fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
    let (packed, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (e, o) in out.iter_mut().enumerate() {
        let (sc, m) = k_scale_min(packed, e / 32);
        let q = k_nibble(qs, e) | (qh[e % 32] >> (e / 32) & 1) << 4;
        *o = d * sc as f32 * q as f32 - dmin * m as f32;
    }
}

/// 16 groups of 16 with signed 8-bit scales: `d · scale · (q − 32)`, q's low 4 bits from `ql`,
/// its high 2 from `qh`.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16(&b[208..210]);
    for (e, o) in out.iter_mut().enumerate() {
        let q = six_bit(ql, qh, e) as i8 - 32;
        *o = d * (scales[e / 16] as i8) as f32 * q as f32;
    }
}

/// Q6_K's 6-bit quant of element `e`: its low 4 bits from `ql`, its high 2 from `qh`.
pub(crate) fn six_bit(ql: &[u8], qh: &[u8], e: usize) -> u8 {
    let (h, r) = (e / 128, e % 128);
    let low = ql[h * 64 + r % 64] >> (4 * (r / 64)) & 0x0f;
    let high = qh[h * 32 + r % 32] >> (2 * (r / 32)) & 3;
    low | high << 4
}

/// `d · level[q]`, nibbles as Q4_0's.
fn iq4_nl(b: &[u8], out: &mut [f32]) {
    let d = f16(&b[0..2]);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = d * IQ4_LEVELS[(q & 0x0f) as usize] as f32;
        out[j + 16] = d * IQ4_LEVELS[(q >> 4) as usize] as f32;
    }
}

/// 8 groups of 32 with signed 6-bit scales: `d · (scale − 32) · level[q]`.
fn iq4_xs(b: &[u8], out: &mut [f32]) {
    let d = f16(&b[0..2]);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for (e, o) in out.iter_mut().enumerate() {
        let (c, n, j) = (e / 32, e % 32 / 16, e % 16);
        let low = scales_l[c / 2] >> (4 * (c % 2)) & 0x0f;
        let high = (scales_h >> (2 * c) & 3) as u8;
        let dl = d * ((low | high << 4) as i8 - 32) as f32;
        let q = qs[c * 16 + j] >> (4 * n) & 0x0f;
        *o = dl * IQ4_LEVELS[q as usize] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap())
            .join("../../tests/fixtures/quants")
            .join(name)
    }

    /// Every type kiln reads, de-quantised, equals gguf-py's values bit for bit
    /// (tests/fixtures/make_quants.py: random blocks with finite scales).
    #[test]
    fn ggml_types_match_gguf_py_exactly() {
        let file = GgufFile::read(&fixture("random.gguf")).unwrap();
        let mut seen = Vec::new();
        for info in file
            .tensors
            .iter()
            .filter(|t| !t.name.ends_with(".expected"))
        {
            let expected = file
                .tensors
                .iter()
                .find(|t| t.name == format!("{}.expected", info.name))
                .unwrap();
            let got = file.dequantize(info);
            let want = file.dequantize(expected);
            assert_eq!(got.len(), want.len(), "{}", info.name);
            let differ = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(differ, None, "{}: first differing element", info.name);
            assert_eq!(type_name(info.ggml_type), info.name);
            seen.push(info.ggml_type);
        }
        // Every readable type is in the fixture.
        for t in 0..64 {
            if block_layout(t).is_some() {
                assert!(seen.contains(&t), "{} has no fixture", type_name(t));
            }
        }
    }

    #[test]
    fn an_unread_type_is_refused_with_the_tensor_and_type_named() {
        let e = GgufFile::read(&fixture("unsupported.gguf"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("IQ2_XXS"),
            "{e}"
        );
        assert!(e.contains("Q4_K") && e.contains("Q6_K"), "{e}");
        // A K-quant file cut short names the tensor whose blocks are missing.
        let mut bytes = std::fs::read(fixture("random.gguf")).unwrap();
        bytes.truncate(bytes.len() - 100);
        let e = GgufFile::parse(bytes, &fixture("cut.gguf"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tensor `BF16.expected`"), "{e}");
    }
}
