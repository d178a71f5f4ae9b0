//! Attention computed in tiles of query rows, forward and backward (the FlashAttention-2
//! scheme on the CPU): no `batch × heads × queries × keys` scores are ever held. The forward
//! keeps the output and each row's log-sum-exp; the backward recomputes the scores of one tile
//! at a time from them.
//!
//! - A tile is up to [`TILE`] query rows of one head against the keys its rows can see, a range
//!   (causal, packed rows and sliding windows all give each query one contiguous run of keys:
//!   `first[i] ..= i + keys − queries`). Its softmax is exact over that range in two passes (max,
//!   then exponentials): the tile's scores fit a thread's cache, so the online rescaling a GPU
//!   needs for its small shared memory would only add work here.
//! - The products are `gemm`'s (the same crate and version as Burn's Flex matmul), each on one
//!   thread; tiles are the parallel tasks.
//! - Grouped-query attention reads each shared K/V head in place for all its query heads.
//! - The backward runs twice over the scores: by query tiles for dQ, and by key tiles (every
//!   query head of a K/V head, every query tile that sees them) for dK and dV, so each output
//!   element is written by one task and summed in one order: deterministic whatever the thread
//!   count, without atomics. When every key fits one tile, the key pass writes dQ as well.
//!
//! Layouts (row-major f32): q, out, dq `[batch, queries, heads, head_dim]`; k, v, dk, dv
//! `[batch, keys, kv_heads, head_dim]`, the projections' own layout, so no transposes; lse
//! `[batch, heads, queries]`; `first` `[mask_rows, queries]`, `mask_rows` 1 or batch.

use rayon::prelude::*;

/// Query rows (forward, dQ) and keys (dK/dV) per tile.
pub const TILE: usize = 64;

/// One attention call's shape and constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub queries: usize,
    /// At least `queries`: the last `queries` keys are the queries' own positions (earlier ones
    /// come from a cache).
    pub keys: usize,
    pub head_dim: usize,
    /// Rows of `first`: 1 (shared by the batch) or `batch`.
    pub mask_rows: usize,
    /// The factor on `q · k`.
    pub scale: f32,
    /// Scores pass through `c · tanh(s / c)` when set.
    pub softcap: Option<f32>,
}

impl AttentionShape {
    /// Position of query `i` among the keys.
    fn offset(&self) -> usize {
        self.keys - self.queries
    }

    fn q_len(&self) -> usize {
        self.batch * self.queries * self.heads * self.head_dim
    }

    fn kv_len(&self) -> usize {
        self.batch * self.keys * self.kv_heads * self.head_dim
    }

    fn lse_len(&self) -> usize {
        self.batch * self.heads * self.queries
    }

    /// Whether `first` describes one contiguous, causal run of keys per query, starting no
    /// later than a run before it (what the tiling relies on).
    pub fn accepts(&self, first: &[u32]) -> bool {
        let s = self.queries;
        let heads_fit = self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads);
        let rows_fit = self.mask_rows == 1 || self.mask_rows == self.batch;
        heads_fit
            && rows_fit
            && self.keys >= s
            && first.len() == self.mask_rows * s
            && first.chunks(s.max(1)).all(|row| {
                row.iter()
                    .enumerate()
                    .all(|(i, &f)| f as usize <= i + self.offset() && (i == 0 || row[i - 1] <= f))
            })
    }

    /// The keys query `i` of batch row `b` sees.
    fn visible(&self, first: &[u32], b: usize, i: usize) -> (usize, usize) {
        let row = if self.mask_rows == 1 { 0 } else { b };
        (
            first[row * self.queries + i] as usize,
            i + self.offset() + 1,
        )
    }

    /// Query tiles of every head of every batch row: the forward's and dQ's tasks.
    fn query_tasks(&self) -> usize {
        self.batch * self.heads * self.queries.div_ceil(TILE)
    }

    /// Query tile `task` (of [`AttentionShape::query_tasks`]): its rows and the keys they see.
    fn query_tile(&self, first: &[u32], task: usize) -> QueryTile {
        let tiles = self.queries.div_ceil(TILE);
        let (b, h, tile) = (
            task / (self.heads * tiles),
            task / tiles % self.heads,
            task % tiles,
        );
        let rows = tile * TILE..((tile + 1) * TILE).min(self.queries);
        // Runs start in order and end at each query's own position.
        let keys = self.visible(first, b, rows.start).0..self.visible(first, b, rows.end - 1).1;
        QueryTile { b, h, rows, keys }
    }

    fn first_row<'a>(&self, first: &'a [u32], b: usize) -> &'a [u32] {
        let row = if self.mask_rows == 1 { 0 } else { b };
        &first[row * self.queries..(row + 1) * self.queries]
    }
}

/// One query tile: batch row `b`, head `h`, query rows `rows`, and the keys any of them sees.
struct QueryTile {
    b: usize,
    h: usize,
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
}

/// A pointer shared by tasks that write disjoint elements of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every use below writes elements no other task touches (stated where it is used).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The element `offset` places in (a method, so that closures capture the whole `Shared`).
    ///
    /// # Safety
    /// `offset` must be inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

/// `dst = [dst +] beta · lhs · rhs` for `m × k` by `k × n`, strides in elements (row, column).
///
/// # Safety
/// Every element the strides reach must be inside its buffer, and `dst` must not be written by
/// another thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2 as isize,
            dst.1 as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The scores of query rows `rows` of head `h` against keys `keys` (both of batch row `b`) into
/// `scores` (`rows.len() × keys.len()`), scaled.
fn scores(
    sh: &AttentionShape,
    q: &[f32],
    k: &[f32],
    (b, h): (usize, usize),
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    scores: &mut [f32],
) {
    let (hd, kvh) = (sh.head_dim, h / (sh.heads / sh.kv_heads));
    let n = keys.len();
    debug_assert!(scores.len() >= rows.len() * n);
    let q0 = ((b * sh.queries + rows.start) * sh.heads + h) * hd;
    let k0 = ((b * sh.keys + keys.start) * sh.kv_heads + kvh) * hd;
    // SAFETY: q's rows `rows` of head h and k's rows `keys` of head kvh lie inside q and k (the
    // shape was checked against their lengths); `scores` is this task's own.
    unsafe {
        product(
            (rows.len(), n, hd),
            (scores.as_mut_ptr(), n, 1),
            false,
            (q.as_ptr().add(q0), sh.heads * hd, 1),
            (k.as_ptr().add(k0), 1, sh.kv_heads * hd),
            sh.scale,
        );
    }
}

/// Soft-caps a row's visible scores, keeping `1 − tanh²` (the cap's slope) in `slope`.
#[inline(always)]
fn cap(row: &mut [f32], c: f32, slope: Option<&mut [f32]>) {
    match slope {
        Some(slope) => {
            for (x, d) in row.iter_mut().zip(slope.iter_mut()) {
                let t = (*x / c).tanh();
                *x = c * t;
                *d = 1.0 - t * t;
            }
        }
        None => {
            for x in row.iter_mut() {
                *x = c * (*x / c).tanh();
            }
        }
    }
}

/// The forward: `out` and `lse` from q, k, v. Panics when the shape does not match the buffers
/// or `first` is not what [`AttentionShape::accepts`] takes (the callers build both).
pub fn attention(
    sh: &AttentionShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    first: &[u32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    check(sh, q, k, v, first);
    assert!(out.len() == sh.q_len() && lse.len() == sh.lse_len());
    let (out_at, lse_at) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    let hd = sh.head_dim;
    (0..sh.query_tasks()).into_par_iter().for_each(|task| {
        let QueryTile { b, h, rows, keys } = sh.query_tile(first, task);
        let (lo, hi, n) = (keys.start, keys.end, keys.len());
        let mut p = vec![0f32; rows.len() * n];
        let mut row_lse = vec![0f32; rows.len()];
        super::simd(
            #[inline(always)]
            || {
                scores(sh, q, k, (b, h), rows.clone(), lo..hi, &mut p);
                for (r, i) in rows.clone().enumerate() {
                    let (a, e) = sh.visible(first, b, i);
                    let row = &mut p[r * n..(r + 1) * n];
                    row[..a - lo].fill(0.0);
                    row[e - lo..].fill(0.0);
                    let seen = &mut row[a - lo..e - lo];
                    if let Some(c) = sh.softcap {
                        cap(seen, c, None);
                    }
                    let m = super::max(seen);
                    let sum = super::exp_in_place(seen, m);
                    let inv = 1.0 / sum;
                    seen.iter_mut().for_each(|x| *x *= inv);
                    row_lse[r] = m + sum.ln();
                }
            },
        );
        let kvh = h / (sh.heads / sh.kv_heads);
        let o0 = ((b * sh.queries + rows.start) * sh.heads + h) * hd;
        let v0 = ((b * sh.keys + lo) * sh.kv_heads + kvh) * hd;
        // SAFETY: this task alone writes rows `rows` of head h of batch row b in `out` and
        // their lse entries; v's rows lo..hi of head kvh lie inside v.
        unsafe {
            product(
                (rows.len(), hd, n),
                (out_at.at(o0), sh.heads * hd, 1),
                false,
                (p.as_ptr(), n, 1),
                (v.as_ptr().add(v0), sh.kv_heads * hd, 1),
                1.0,
            );
            let l0 = (b * sh.heads + h) * sh.queries + rows.start;
            std::ptr::copy_nonoverlapping(row_lse.as_ptr(), lse_at.at(l0), rows.len());
        }
    });
}

fn check(sh: &AttentionShape, q: &[f32], k: &[f32], v: &[f32], first: &[u32]) {
    assert!(
        q.len() == sh.q_len() && k.len() == sh.kv_len() && v.len() == sh.kv_len(),
        "attention buffers do not match their shape {sh:?}"
    );
    assert!(
        sh.accepts(first),
        "attention key ranges are not causal runs for {sh:?}"
    );
}

/// Probabilities of one tile from its scores (in place) and the rows' lse; masked entries 0.
/// With a soft-cap, its slope goes to `slope`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn probabilities(
    sh: &AttentionShape,
    first: &[u32],
    lse: &[f32],
    (b, h): (usize, usize),
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    p: &mut [f32],
    mut slope: Option<&mut [f32]>,
) {
    let n = keys.len();
    for (r, i) in rows.enumerate() {
        let (a, e) = sh.visible(first, b, i);
        let (a, e) = (a.clamp(keys.start, keys.end), e.clamp(keys.start, keys.end));
        let row = &mut p[r * n..(r + 1) * n];
        if a >= e {
            row.fill(0.0);
            continue;
        }
        row[..a - keys.start].fill(0.0);
        row[e - keys.start..].fill(0.0);
        let seen = &mut row[a - keys.start..e - keys.start];
        if let (Some(c), Some(slope)) = (sh.softcap, slope.as_deref_mut()) {
            cap(
                seen,
                c,
                Some(&mut slope[r * n + a - keys.start..r * n + e - keys.start]),
            );
        }
        super::exp_in_place(seen, lse[(b * sh.heads + h) * sh.queries + i]);
    }
}

/// `ds = p · (dp − D_row) [· slope]` in place of `dp`.
#[inline(always)]
fn score_gradients(p: &[f32], dp: &mut [f32], slope: Option<&[f32]>, delta: &[f32], n: usize) {
    for (r, (dp, p)) in dp.chunks_exact_mut(n).zip(p.chunks_exact(n)).enumerate() {
        let d = delta[r];
        for (g, &p) in dp.iter_mut().zip(p) {
            *g = p * (*g - d);
        }
        if let Some(slope) = slope {
            for (g, &s) in dp.iter_mut().zip(&slope[r * n..(r + 1) * n]) {
                *g *= s;
            }
        }
    }
}

/// The gradients of q, k and v from the output's gradient `d_out` (and the forward's `out` and
/// `lse`). Same contract as [`attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    sh: &AttentionShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    first: &[u32],
    (out, lse): (&[f32], &[f32]),
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    check(sh, q, k, v, first);
    assert!(out.len() == sh.q_len() && d_out.len() == sh.q_len() && lse.len() == sh.lse_len());
    assert!(dq.len() == sh.q_len() && dk.len() == sh.kv_len() && dv.len() == sh.kv_len());
    let hd = sh.head_dim;
    // D = rowsum(dO ∘ O), [batch, heads, queries].
    let mut delta = vec![0f32; sh.lse_len()];
    delta
        .par_chunks_mut(sh.queries.max(1))
        .enumerate()
        .for_each(|(bh, row)| {
            let (b, h) = (bh / sh.heads, bh % sh.heads);
            super::simd(
                #[inline(always)]
                || {
                    for (i, d) in row.iter_mut().enumerate() {
                        let at = ((b * sh.queries + i) * sh.heads + h) * hd;
                        *d = super::dot(&d_out[at..at + hd], &out[at..at + hd]);
                    }
                },
            )
        });
    let delta = &delta;
    let rep = sh.heads / sh.kv_heads;

    // With one key tile, the key tasks below see every key of their queries: they write dQ
    // too, and the scores are recomputed once instead of twice.
    let single_key_tile = sh.keys <= TILE;
    let dq_at = Shared(dq.as_mut_ptr());

    // dQ, by query tiles.
    let tasks = if single_key_tile { 0 } else { sh.query_tasks() };
    (0..tasks).into_par_iter().for_each(|task| {
        let QueryTile { b, h, rows, keys } = sh.query_tile(first, task);
        let (lo, hi, n) = (keys.start, keys.end, keys.len());
        let (mut p, mut dp) = (vec![0f32; rows.len() * n], vec![0f32; rows.len() * n]);
        let mut slope = sh.softcap.map(|_| vec![0f32; rows.len() * n]);
        let kvh = h / rep;
        let o0 = ((b * sh.queries + rows.start) * sh.heads + h) * hd;
        let kv0 = ((b * sh.keys + lo) * sh.kv_heads + kvh) * hd;
        let d0 = (b * sh.heads + h) * sh.queries + rows.start;
        super::simd(
            #[inline(always)]
            || {
                scores(sh, q, k, (b, h), rows.clone(), lo..hi, &mut p);
                let keys = lo..hi;
                probabilities(
                    sh,
                    first,
                    lse,
                    (b, h),
                    rows.clone(),
                    keys,
                    &mut p,
                    slope.as_deref_mut(),
                );
                // SAFETY: d_out's rows of head h and v's rows lo..hi of head kvh are inside
                // them; dp is this task's own.
                unsafe {
                    product(
                        (rows.len(), n, hd),
                        (dp.as_mut_ptr(), n, 1),
                        false,
                        (d_out.as_ptr().add(o0), sh.heads * hd, 1),
                        (v.as_ptr().add(kv0), 1, sh.kv_heads * hd),
                        1.0,
                    );
                }
                score_gradients(
                    &p,
                    &mut dp,
                    slope.as_deref(),
                    &delta[d0..d0 + rows.len()],
                    n,
                );
            },
        );
        // SAFETY: this task alone writes rows `rows` of head h of batch row b in dq.
        unsafe {
            product(
                (rows.len(), hd, n),
                (dq_at.at(o0), sh.heads * hd, 1),
                false,
                (dp.as_ptr(), n, 1),
                (k.as_ptr().add(kv0), sh.kv_heads * hd, 1),
                sh.scale,
            );
        }
    });

    // dK and dV, by key tiles: every query head of the K/V head, every query tile that sees them.
    let key_tiles = sh.keys.div_ceil(TILE);
    let (dk_at, dv_at) = (Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
    (0..sh.batch * sh.kv_heads * key_tiles)
        .into_par_iter()
        .for_each(|task| {
            let (b, kvh, tile) = (
                task / (sh.kv_heads * key_tiles),
                task / key_tiles % sh.kv_heads,
                task % key_tiles,
            );
            let keys = tile * TILE..((tile + 1) * TILE).min(sh.keys);
            let c = keys.len();
            let mut dk_tile = vec![0f32; c * hd];
            let mut dv_tile = vec![0f32; c * hd];
            // The queries that see any of these keys: from the first whose causal end reaches
            // the tile to the last whose run starts inside it (runs start in order).
            let from = keys.start.saturating_sub(sh.offset());
            let to = sh
                .first_row(first, b)
                .partition_point(|&f| (f as usize) < keys.end);
            let mut p = vec![0f32; TILE * c];
            let mut dp = vec![0f32; TILE * c];
            let mut slope = sh.softcap.map(|_| vec![0f32; TILE * c]);
            let kv0 = ((b * sh.keys + keys.start) * sh.kv_heads + kvh) * hd;
            super::simd(
                #[inline(always)]
                || {
                    for h in kvh * rep..(kvh + 1) * rep {
                        let mut start = from;
                        while start < to {
                            let rows = start..(start + TILE).min(to);
                            let m = rows.len();
                            start = rows.end;
                            let (p, dp) = (&mut p[..m * c], &mut dp[..m * c]);
                            let mut slope = slope.as_mut().map(|s| &mut s[..m * c]);
                            scores(sh, q, k, (b, h), rows.clone(), keys.clone(), p);
                            probabilities(
                                sh,
                                first,
                                lse,
                                (b, h),
                                rows.clone(),
                                keys.clone(),
                                p,
                                slope.as_deref_mut(),
                            );
                            let o0 = ((b * sh.queries + rows.start) * sh.heads + h) * hd;
                            let d0 = (b * sh.heads + h) * sh.queries + rows.start;
                            // SAFETY: the tiles are this task's own; d_out's, q's and v's rows are
                            // inside them.
                            unsafe {
                                // dV += Pᵀ · dO
                                product(
                                    (c, hd, m),
                                    (dv_tile.as_mut_ptr(), hd, 1),
                                    true,
                                    (p.as_ptr(), 1, c),
                                    (d_out.as_ptr().add(o0), sh.heads * hd, 1),
                                    1.0,
                                );
                                // dP = dO · Vᵀ
                                product(
                                    (m, c, hd),
                                    (dp.as_mut_ptr(), c, 1),
                                    false,
                                    (d_out.as_ptr().add(o0), sh.heads * hd, 1),
                                    (v.as_ptr().add(kv0), 1, sh.kv_heads * hd),
                                    1.0,
                                );
                            }
                            score_gradients(p, dp, slope.as_deref(), &delta[d0..d0 + m], c);
                            // SAFETY: as above. dK += scale · dSᵀ · Q
                            unsafe {
                                product(
                                    (c, hd, m),
                                    (dk_tile.as_mut_ptr(), hd, 1),
                                    true,
                                    (dp.as_ptr(), 1, c),
                                    (q.as_ptr().add(o0), sh.heads * hd, 1),
                                    sh.scale,
                                );
                                if single_key_tile {
                                    // dQ = scale · dS · K: these rows of head h are this
                                    // task's alone (one key tile, one task per K/V head).
                                    product(
                                        (m, hd, c),
                                        (dq_at.at(o0), sh.heads * hd, 1),
                                        false,
                                        (dp.as_ptr(), c, 1),
                                        (k.as_ptr().add(kv0), sh.kv_heads * hd, 1),
                                        sh.scale,
                                    );
                                }
                            }
                        }
                    }
                },
            );
            for (j, (dk_row, dv_row)) in dk_tile
                .chunks_exact(hd)
                .zip(dv_tile.chunks_exact(hd))
                .enumerate()
            {
                let at = kv0 + j * sh.kv_heads * hd;
                // SAFETY: this task alone writes keys `keys` of head kvh of batch row b.
                unsafe {
                    std::ptr::copy_nonoverlapping(dk_row.as_ptr(), dk_at.at(at), hd);
                    std::ptr::copy_nonoverlapping(dv_row.as_ptr(), dv_at.at(at), hd);
                }
            }
        });
}
