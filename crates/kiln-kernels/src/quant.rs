//! Frozen weights held quantized (QLoRA): a matrix `[rows, cols]` (HF's `[out, in]`) as small
//! integer codes with one scale, and optionally one bias, per group of elements of a row:
//! `w = scale · (code − zero) + bias`.
//!
//! Every GGML block type kiln trains on is this form without loss: Q4_0 is `d · (q − 8)`, Q4_K is
//! `(d · sc) · q − dmin · m`, Q6_K is `(d · sc) · (q − 32)`, ... with the per-group products
//! taken once, in f32, exactly as ggml de-quantises them, so the values this module computes are
//! the GGUF file's own values, bit for bit (`kiln_formats::ggml_repack` lays the blocks out).
//! Codes are 4 bits (4-bit and narrower types) or 8 bits (5-, 6- and 8-bit types), packed
//! little end first into 32-bit words, each row starting a new word.
//!
//! The products never hold the whole matrix in f32: [`qmatmul`] and [`qmatmul_backward`]
//! de-quantise a tile of rows into a scratch buffer of at most [`SCRATCH_ELEMENTS`] and hand it
//! to `gemm`, tile after tile, in a fixed order (deterministic whatever the thread count).

/// Elements of f32 scratch one product de-quantises at a time (16 MiB).
pub const SCRATCH_ELEMENTS: usize = 4 << 20;

/// How a quantized matrix's codes, scales and biases are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantLayout {
    /// Bits per code: 4 or 8.
    pub bits: u32,
    /// Consecutive elements of a row that share a scale (and a bias).
    pub group: usize,
    /// Subtracted from each code before it is scaled.
    pub zero: i32,
    /// Whether a bias is added after the scale (the affine types: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K).
    pub has_bias: bool,
}

impl QuantLayout {
    pub fn codes_per_word(&self) -> usize {
        32 / self.bits as usize
    }

    /// Whether a row of `cols` elements fits the layout (whole groups and whole words).
    pub fn fits(&self, cols: usize) -> bool {
        matches!(self.bits, 4 | 8)
            && self.group > 0
            && cols.is_multiple_of(self.group)
            && cols.is_multiple_of(self.codes_per_word())
    }

    pub fn words_per_row(&self, cols: usize) -> usize {
        cols / self.codes_per_word()
    }

    pub fn groups_per_row(&self, cols: usize) -> usize {
        cols / self.group
    }

    /// Bytes one element costs held this way (codes, scales, biases).
    pub fn bytes_per_element(&self) -> f64 {
        let per_group = if self.has_bias { 8.0 } else { 4.0 };
        self.bits as f64 / 8.0 + per_group / self.group as f64
    }
}

/// `code − zero` of each element, codes of `BITS` bits packed little end first (a constant width
/// lets the loop vectorise).
#[inline(always)]
fn unpack<const BITS: usize>(words: &[u32], zero: i32, out: &mut [f32]) {
    let per_word = 32 / BITS;
    let mask = (1u32 << BITS) - 1;
    for (w, chunk) in words.iter().zip(out.chunks_exact_mut(per_word)) {
        for (k, o) in chunk.iter_mut().enumerate() {
            *o = ((w >> (BITS * k) & mask) as i32 - zero) as f32;
        }
    }
}

/// A quantized matrix borrowed from its storage.
#[derive(Debug, Clone, Copy)]
pub struct QuantRef<'a> {
    pub layout: QuantLayout,
    pub rows: usize,
    pub cols: usize,
    /// `[rows, words_per_row]`.
    pub codes: &'a [u32],
    /// `[rows, groups_per_row]`.
    pub scale: &'a [f32],
    /// `[rows, groups_per_row]` when the layout has a bias.
    pub bias: Option<&'a [f32]>,
}

impl QuantRef<'_> {
    /// Whether the storage has the sizes the shape and layout call for.
    pub fn is_consistent(&self) -> bool {
        let l = self.layout;
        let groups = self.rows * l.groups_per_row(self.cols);
        l.fits(self.cols)
            && self.codes.len() == self.rows * l.words_per_row(self.cols)
            && self.scale.len() == groups
            && l.has_bias == self.bias.is_some()
            && self.bias.is_none_or(|b| b.len() == groups)
    }

    /// Row `r` in f32 into `out` (`cols` long), one group at a time (its codes unpacked, then
    /// scaled and shifted while they are in cache).
    #[inline(always)]
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self.layout.bits {
            4 => self.dequantize_row_of::<4>(r, out),
            _ => self.dequantize_row_of::<8>(r, out),
        }
    }

    #[inline(always)]
    fn dequantize_row_of<const BITS: usize>(&self, r: usize, out: &mut [f32]) {
        let l = self.layout;
        let (words, groups) = (l.words_per_row(self.cols), l.groups_per_row(self.cols));
        let codes = &self.codes[r * words..(r + 1) * words];
        let scale = &self.scale[r * groups..(r + 1) * groups];
        let bias = self.bias.map(|b| &b[r * groups..(r + 1) * groups]);
        let words_per_group = l.group * BITS / 32;
        let chunks = out[..self.cols].chunks_exact_mut(l.group);
        for (g, (chunk, words)) in chunks.zip(codes.chunks_exact(words_per_group)).enumerate() {
            unpack::<BITS>(words, l.zero, chunk);
            let s = scale[g];
            // Multiply, then add: two roundings, as ggml de-quantizes (no fused multiply-add).
            match bias {
                Some(b) => {
                    let b = b[g];
                    chunk.iter_mut().for_each(|v| *v = *v * s + b);
                }
                None => chunk.iter_mut().for_each(|v| *v *= s),
            }
        }
    }

    /// Rows `first..first + out.len() / cols` in f32 into `out`, across the pool.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        super::for_rows(out, self.cols, |start, chunk| {
            for (i, row) in chunk.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row(first + start + i, row);
            }
        });
    }

    /// Calls `f(first, rows, tile)` on each tile of rows de-quantised in turn into one scratch
    /// buffer: as many rows as fit [`SCRATCH_ELEMENTS`], at least one.
    fn for_each_tile(&self, mut f: impl FnMut(usize, usize, &[f32])) {
        let tile = (SCRATCH_ELEMENTS / self.cols.max(1)).clamp(1, self.rows.max(1));
        let mut scratch = vec![0f32; tile * self.cols];
        for first in (0..self.rows).step_by(tile) {
            let t = tile.min(self.rows - first);
            let scratch = &mut scratch[..t * self.cols];
            self.dequantize_rows(first, scratch);
            f(first, t, scratch);
        }
    }
}

fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    // Below this much work, splitting costs more than it saves (Burn's Flex uses the same bound).
    if m.saturating_mul(n).saturating_mul(k) >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// `y = x · Wᵀ`: `x` `[n, cols]`, `y` `[n, rows]` (a linear layer's forward, W in HF layout).
pub fn qmatmul(x: &[f32], n: usize, w: QuantRef<'_>, y: &mut [f32]) {
    assert!(
        w.is_consistent(),
        "quantized matrix storage does not match its shape"
    );
    assert!(x.len() == n * w.cols && y.len() == n * w.rows);
    if n == 0 || w.rows == 0 {
        return;
    }
    w.for_each_tile(|first, t, scratch| {
        // SAFETY: every pointer and stride stays inside its slice: dst is columns
        // first..first + t of y's n rows (row stride rows), lhs is x (row stride cols), rhs is
        // the tile read transposed ([cols, t] with column stride cols).
        unsafe {
            gemm::gemm(
                n,
                t,
                w.cols,
                y.as_mut_ptr().add(first),
                1,
                w.rows as isize,
                false,
                x.as_ptr(),
                1,
                w.cols as isize,
                scratch.as_ptr(),
                w.cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism(n, t, w.cols),
            );
        }
    });
}

/// `dx = dy · W`: `dy` `[n, rows]`, `dx` `[n, cols]` (the input gradient of [`qmatmul`]; a
/// frozen weight gets none).
pub fn qmatmul_backward(dy: &[f32], n: usize, w: QuantRef<'_>, dx: &mut [f32]) {
    assert!(
        w.is_consistent(),
        "quantized matrix storage does not match its shape"
    );
    assert!(dy.len() == n * w.rows && dx.len() == n * w.cols);
    if n == 0 || w.cols == 0 {
        return;
    }
    if w.rows == 0 {
        dx.fill(0.0);
        return;
    }
    w.for_each_tile(|first, t, scratch| {
        // SAFETY: dst is dx (row stride cols); lhs is columns first..first + t of dy (row
        // stride rows); rhs is the tile [t, cols], row-major. The first tile overwrites dx, the
        // others add to it.
        unsafe {
            gemm::gemm(
                n,
                w.cols,
                t,
                dx.as_mut_ptr(),
                1,
                w.cols as isize,
                first > 0,
                dy.as_ptr().add(first),
                1,
                w.rows as isize,
                scratch.as_ptr(),
                1,
                w.cols as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(n, w.cols, t),
            );
        }
    });
}
