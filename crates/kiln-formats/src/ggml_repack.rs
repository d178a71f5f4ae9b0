//! GGML blocks laid out as `kiln_kernels::quant`'s codes and per-group scales, without loss: a
//! QLoRA run trains on a GGUF file's own quantized values, not on a second rounding of them.
//!
//! Each type's de-quantisation is `scale · (code − zero) + bias` per group, with the scale (and
//! bias) the same f32 products `ggml_types`' decoders form (`d · sc`, `−dmin · m`), so decoding
//! the layout gives the decoders' values bit for bit (`repacked_blocks_decode_as_ggml_does`).
//! IQ4_NL and IQ4_XS map codes through a table of levels, which is not this form: they are not
//! held (a run asks for them to be de-quantised, or is refused by name).

use crate::ggml_types::{
    Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, block_layout, f16, five_bit,
    k_nibble, k_scale_min, six_bit, two_bit,
};
use kiln_kernels::quant::{QuantLayout, QuantRef};

/// The layout a GGML type is held in, `None` for a type that is not held quantized.
pub fn layout(ggml_type: u32) -> Option<QuantLayout> {
    let (bits, group, zero, has_bias) = match ggml_type {
        Q4_0 => (4, 32, 8, false),
        Q4_1 => (4, 32, 0, true),
        Q5_0 => (8, 32, 16, false),
        Q5_1 => (8, 32, 0, true),
        Q8_0 => (8, 32, 128, false),
        Q2_K => (4, 16, 0, true),
        Q3_K => (4, 16, 4, false),
        Q4_K => (4, 32, 0, true),
        Q5_K => (8, 32, 0, true),
        Q6_K => (8, 16, 32, false),
        _ => return None,
    };
    Some(QuantLayout {
        bits,
        group,
        zero,
        has_bias,
    })
}

/// A matrix held quantized on the host, rows of `cols` elements.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    /// The GGML type its values came from (what a GGUF written back would use).
    pub ggml_type: u32,
    pub layout: QuantLayout,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u32>,
    pub scale: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl PackedMatrix {
    pub fn as_ref(&self) -> QuantRef<'_> {
        QuantRef {
            layout: self.layout,
            rows: self.rows,
            cols: self.cols,
            codes: &self.codes,
            scale: &self.scale,
            bias: self.bias.as_deref(),
        }
    }

    /// Every element in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            self.as_ref().dequantize_rows(0, &mut out);
        }
        out
    }

    /// Bytes held (codes, scales and biases).
    pub fn bytes(&self) -> usize {
        4 * (self.codes.len() + self.scale.len() + self.bias.as_ref().map_or(0, Vec::len))
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `order[i]`.
    pub fn reorder_rows(&self, order: &[usize]) -> Self {
        let (words, groups) = (
            self.layout.words_per_row(self.cols),
            self.layout.groups_per_row(self.cols),
        );
        let pick = |v: &[f32]| -> Vec<f32> {
            order
                .iter()
                .flat_map(|&r| &v[r * groups..(r + 1) * groups])
                .copied()
                .collect()
        };
        Self {
            codes: order
                .iter()
                .flat_map(|&r| &self.codes[r * words..(r + 1) * words])
                .copied()
                .collect(),
            scale: pick(&self.scale),
            bias: self.bias.as_deref().map(pick),
            ..self.clone()
        }
    }
}

/// Why blocks cannot be held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepackError {
    #[error("type {0} is not held quantized")]
    Type(String),
    #[error("{bytes} bytes are not {rows} rows of {cols} {ty} elements")]
    Size {
        ty: String,
        bytes: usize,
        rows: usize,
        cols: usize,
    },
}

/// One block's codes (`code − zero` is the level), and its groups' scales and biases.
struct Unpacked<'a> {
    codes: &'a mut [u8],
    scale: &'a mut [f32],
    bias: &'a mut [f32],
}

/// Lays out `raw`, `rows` rows of `cols` elements of `ggml_type` (GGUF element order: a row is
/// consecutive blocks).
pub fn repack(
    ggml_type: u32,
    raw: &[u8],
    rows: usize,
    cols: usize,
) -> Result<PackedMatrix, RepackError> {
    let name = crate::ggml_types::type_name(ggml_type);
    let (Some(layout), Some((block, block_bytes))) = (layout(ggml_type), block_layout(ggml_type))
    else {
        return Err(RepackError::Type(name));
    };
    let whole = cols.is_multiple_of(block) && layout.fits(cols);
    if !whole || raw.len() != rows * cols / block * block_bytes {
        return Err(RepackError::Size {
            ty: name,
            bytes: raw.len(),
            rows,
            cols,
        });
    }
    let unpack: fn(&[u8], Unpacked<'_>) = match ggml_type {
        Q4_0 => q4_0,
        Q4_1 => q4_1,
        Q5_0 => q5_0,
        Q5_1 => q5_1,
        Q8_0 => q8_0,
        Q2_K => q2_k,
        Q3_K => q3_k,
        Q4_K => q4_k,
        Q5_K => q5_k,
        _ => q6_k,
    };
    let groups_per_block = block / layout.group;
    let n_groups = rows * cols / layout.group;
    let mut scale = vec![0f32; n_groups];
    let mut bias = vec![0f32; n_groups];
    let mut codes = vec![0u8; rows * cols];
    for (((b, c), s), m) in raw
        .chunks_exact(block_bytes)
        .zip(codes.chunks_exact_mut(block))
        .zip(scale.chunks_exact_mut(groups_per_block))
        .zip(bias.chunks_exact_mut(groups_per_block))
    {
        unpack(
            b,
            Unpacked {
                codes: c,
                scale: s,
                bias: m,
            },
        );
    }
    let per_word = layout.codes_per_word();
    let words = codes
        .chunks_exact(per_word)
        .map(|c| {
            c.iter().enumerate().fold(0u32, |w, (k, &v)| {
                w | (v as u32) << (layout.bits as usize * k)
            })
        })
        .collect();
    Ok(PackedMatrix {
        ggml_type,
        layout,
        rows,
        cols,
        codes: words,
        scale,
        bias: layout.has_bias.then_some(bias),
    })
}

fn q4_0(b: &[u8], u: Unpacked<'_>) {
    u.scale[0] = f16(&b[0..2]);
    for (j, &q) in b[2..18].iter().enumerate() {
        u.codes[j] = q & 0x0f;
        u.codes[j + 16] = q >> 4;
    }
}

fn q4_1(b: &[u8], u: Unpacked<'_>) {
    u.scale[0] = f16(&b[0..2]);
    u.bias[0] = f16(&b[2..4]);
    for (j, &q) in b[4..20].iter().enumerate() {
        u.codes[j] = q & 0x0f;
        u.codes[j + 16] = q >> 4;
    }
}

fn q5_0(b: &[u8], u: Unpacked<'_>) {
    u.scale[0] = f16(&b[0..2]);
    for (i, c) in u.codes.iter_mut().enumerate() {
        *c = five_bit(&b[2..6], &b[6..22], i);
    }
}

fn q5_1(b: &[u8], u: Unpacked<'_>) {
    u.scale[0] = f16(&b[0..2]);
    u.bias[0] = f16(&b[2..4]);
    for (i, c) in u.codes.iter_mut().enumerate() {
        *c = five_bit(&b[4..8], &b[8..24], i);
    }
}

/// Signed bytes, offset by 128 (the layout's zero).
fn q8_0(b: &[u8], u: Unpacked<'_>) {
    u.scale[0] = f16(&b[0..2]);
    for (c, &q) in u.codes.iter_mut().zip(&b[2..34]) {
        *c = (q as i8 as i16 + 128) as u8;
    }
}

fn q2_k(b: &[u8], u: Unpacked<'_>) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16(&b[80..82]), f16(&b[82..84]));
    for ((s, m), &packed) in u.scale.iter_mut().zip(u.bias.iter_mut()).zip(scales) {
        *s = d * (packed & 0x0f) as f32;
        *m = -(dmin * (packed >> 4) as f32);
    }
    for (e, c) in u.codes.iter_mut().enumerate() {
        *c = two_bit(qs, e);
    }
}

/// Levels −4..=3, offset by 4 (the layout's zero).
fn q3_k(b: &[u8], u: Unpacked<'_>) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16(&b[108..110]);
    for (k, s) in u.scale.iter_mut().enumerate() {
        let low = packed[k % 8] >> (4 * (k / 8)) & 0x0f;
        let high = packed[8 + k % 4] >> (2 * (k / 4)) & 3;
        *s = d * ((low | high << 4) as i8 - 32) as f32;
    }
    for (e, c) in u.codes.iter_mut().enumerate() {
        let hbit = hmask[e % 32] >> (e / 32) & 1;
        *c = two_bit(qs, e) + (hbit << 2);
    }
}

fn k_scales(b: &[u8], u: &mut Unpacked<'_>) {
    let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
    for g in 0..8 {
        let (sc, m) = k_scale_min(&b[4..16], g);
        u.scale[g] = d * sc as f32;
        u.bias[g] = -(dmin * m as f32);
    }
}

fn q4_k(b: &[u8], mut u: Unpacked<'_>) {
    k_scales(b, &mut u);
    for (e, c) in u.codes.iter_mut().enumerate() {
        *c = k_nibble(&b[16..144], e);
    }
}

fn q5_k(b: &[u8], mut u: Unpacked<'_>) {
    k_scales(b, &mut u);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (e, c) in u.codes.iter_mut().enumerate() {
        *c = k_nibble(qs, e) | (qh[e % 32] >> (e / 32) & 1) << 4;
    }
}

/// Levels −32..=31, offset by 32 (the layout's zero).
fn q6_k(b: &[u8], u: Unpacked<'_>) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16(&b[208..210]);
    for (g, s) in u.scale.iter_mut().enumerate() {
        *s = d * (scales[g] as i8) as f32;
    }
    for (e, c) in u.codes.iter_mut().enumerate() {
        *c = six_bit(ql, qh, e);
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

    /// Every held type, laid out and decoded again, gives ggml_types' values (which equal
    /// gguf-py's) bit for bit, on random blocks; the rows are then reordered as whole rows.
    #[test]
    fn repacked_blocks_decode_as_ggml_does() {
        let file = GgufFile::read(&fixture("random.gguf")).unwrap();
        let mut held = Vec::new();
        for info in &file.tensors {
            let Some(l) = layout(info.ggml_type) else {
                continue;
            };
            let want = file.dequantize(info);
            let (block, _) = block_layout(info.ggml_type).unwrap();
            // The fixture's tensors are flat: view them as rows of one block.
            let rows = want.len() / block;
            let raw = file.tensor_bytes(info);
            let packed = repack(info.ggml_type, raw, rows, block).unwrap();
            assert_eq!(packed.layout, l);
            let got = packed.dequantize();
            let differ = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(differ, None, "{}: first differing element", info.name);
            assert!(packed.bytes() < want.len() * 4 / 2, "{}", info.name);
            let order: Vec<usize> = (0..rows).rev().collect();
            let reordered = packed.reorder_rows(&order).dequantize();
            assert_eq!(&reordered[..block], &want[(rows - 1) * block..]);
            held.push(info.ggml_type);
        }
        for t in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
            assert!(held.contains(&t), "{t} has no fixture");
        }
    }

    #[test]
    fn blocks_that_cannot_be_held_are_refused_by_name() {
        let e = repack(crate::ggml_types::IQ4_NL, &[0; 18], 1, 32).unwrap_err();
        assert_eq!(e.to_string(), "type IQ4_NL is not held quantized");
        let e = repack(Q8_0, &[0; 33], 1, 32).unwrap_err();
        assert!(e.to_string().contains("33 bytes"), "{e}");
    }
}
