//! Per-forward constants: the rotary tables of each RoPE an architecture uses and, for each
//! window size, the keys each query sees, for one batch shape (plain, packed, or cached
//! decoding). Causal attention, packed rows and sliding windows all give a query one run of
//! keys, from a first one to its own position: that run is what attention takes, never a
//! queries × keys mask.

use crate::dtype::to_dtype;
use crate::fused;
use crate::layers::rope::Rope;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, TensorCreationOptions};

/// cos/sin `[1 or batch, seq, rotary_dim]` of one RoPE.
pub struct RopeTable {
    cos: Tensor<3>,
    sin: Tensor<3>,
    rotary_dim: usize,
}

impl RopeTable {
    /// Rotates the first `rotary_dim` dimensions of each head of `x` `[b, s, heads, hd]`.
    pub fn rotate(&self, x: Tensor<4>) -> Tensor<4> {
        let hd = x.dims()[3];
        if self.rotary_dim == hd {
            return fused::rope(x, self.cos.clone(), self.sin.clone());
        }
        let rd = self.rotary_dim;
        let rotated = fused::rope(
            x.clone().narrow(3, 0, rd),
            self.cos.clone(),
            self.sin.clone(),
        );
        Tensor::cat(vec![rotated, x.narrow(3, rd, hd - rd)], 3)
    }
}

/// The keys each query of one window size sees: query i, `first[i] ..= i + keys − queries`.
pub struct KeyRuns {
    /// `[rows, queries]` i32 (rows: 1, or the batch's when packed).
    pub first: Tensor<2, Int>,
    host: Vec<u32>,
    rows: usize,
    queries: usize,
    keys: usize,
}

impl KeyRuns {
    fn new(host: Vec<u32>, rows: usize, queries: usize, keys: usize, device: &Device) -> Self {
        let first = Tensor::<2, Int>::from_data(
            Self::data(&host, rows, queries),
            TensorCreationOptions::new(device.clone()).with_dtype(DType::I32),
        );
        Self {
            first,
            host,
            rows,
            queries,
            keys,
        }
    }

    fn data(host: &[u32], rows: usize, queries: usize) -> TensorData {
        let data: Vec<i32> = host.iter().map(|&f| f as i32).collect();
        TensorData::new(data, [rows, queries])
    }

    /// Other runs of the same shape in the same device buffer (see [`ForwardConsts::refill`]).
    fn refill(self, host: Vec<u32>, rows: usize, queries: usize, keys: usize) -> Self {
        debug_assert_eq!((rows, queries, keys), (self.rows, self.queries, self.keys));
        Self {
            first: fused::overwrite_int(self.first, Self::data(&host, rows, queries)),
            host,
            ..self
        }
    }

    /// The same runs as an additive mask `[rows, 1, queries, keys]` in f32 (0 where a query
    /// sees a key), for attention that materialises its scores (with dropout on them).
    pub fn bias(&self, device: &Device) -> Tensor<4> {
        let (s, t) = (self.queries, self.keys);
        let mut bias = vec![MASKED; self.rows * s * t];
        for (r, row) in bias.chunks_mut((s * t).max(1)).enumerate().take(self.rows) {
            for i in 0..s {
                let first = self.host[r * s + i] as usize;
                row[i * t + first..=i * t + i + t - s].fill(0.0);
            }
        }
        Tensor::from_data(TensorData::new(bias, [self.rows, 1, s, t]), device)
    }
}

pub struct ForwardConsts {
    pub ropes: Vec<RopeTable>,
    runs: Vec<(Option<usize>, KeyRuns)>,
    /// Sequences in the batch.
    pub batch: usize,
    /// New positions per sequence.
    pub seq: usize,
}

/// Where the positions of a forward come from.
pub enum Positions<'a> {
    /// `batch` rows of positions `0..seq`.
    Plain { batch: usize, seq: usize },
    /// One sequence's `n` new positions after `offset` cached ones.
    Cached { offset: usize, n: usize },
    /// Packed rows: positions restart and attention stays within each segment (`[batch, seq]`).
    Packed {
        batch: usize,
        seq: usize,
        segments: &'a [u32],
    },
}

impl<'a> Positions<'a> {
    /// A batch's positions: plain rows, or packed ones by its segments.
    pub fn of(batch: &'a kiln_data::Batch) -> Self {
        match &batch.segments {
            Some(segments) => Positions::Packed {
                batch: batch.batch_size,
                seq: batch.seq_len,
                segments,
            },
            None => Positions::Plain {
                batch: batch.batch_size,
                seq: batch.seq_len,
            },
        }
    }
}

const MASKED: f32 = -1e9;

impl ForwardConsts {
    /// The key runs of layers whose window is `window`.
    pub fn runs(&self, window: Option<usize>) -> &KeyRuns {
        self.runs
            .iter()
            .find(|(w, _)| *w == window)
            .map(|(_, r)| r)
            .expect("key runs for every window the architecture declares")
    }

    pub fn new(
        ropes: &[Rope],
        windows: &[Option<usize>],
        at: Positions<'_>,
        dtype: FloatDType,
        device: &Device,
    ) -> Self {
        let (batch, seq, rows, positions) = positions_of(&at);
        let ropes = ropes
            .iter()
            .map(|rope| {
                let (cos, sin) = rope_rows(rope, &positions);
                let shape = [rows, seq, rope.rotary_dim];
                let table = |v: Vec<f32>| {
                    to_dtype(
                        Tensor::<3>::from_data(TensorData::new(v, shape), device),
                        dtype,
                    )
                };
                RopeTable {
                    cos: table(cos),
                    sin: table(sin),
                    rotary_dim: rope.rotary_dim,
                }
            })
            .collect();
        let mut distinct: Vec<Option<usize>> = Vec::new();
        for w in windows {
            if !distinct.contains(w) {
                distinct.push(*w);
            }
        }
        let runs = distinct
            .into_iter()
            .map(|window| {
                let (first, rows, queries, keys) = first_keys(&at, window);
                (window, KeyRuns::new(first, rows, queries, keys, device))
            })
            .collect();
        Self {
            ropes,
            runs,
            batch,
            seq,
        }
    }

    /// These constants for `at` (of the same shape: the same batch, sequence and table rows),
    /// written into the same device buffers (in place on the GPU backends), for a captured
    /// training step that reads them there. `ropes` as given to [`ForwardConsts::new`].
    pub fn refill(self, ropes: &[Rope], at: Positions<'_>) -> Self {
        let (_, seq, rows, positions) = positions_of(&at);
        let tables = self
            .ropes
            .into_iter()
            .zip(ropes)
            .map(|(table, rope)| {
                let (cos, sin) = rope_rows(rope, &positions);
                let shape = [rows, seq, rope.rotary_dim];
                RopeTable {
                    cos: fused::overwrite(table.cos, TensorData::new(cos, shape)),
                    sin: fused::overwrite(table.sin, TensorData::new(sin, shape)),
                    rotary_dim: table.rotary_dim,
                }
            })
            .collect();
        let runs = self
            .runs
            .into_iter()
            .map(|(window, runs)| {
                let (first, rows, queries, keys) = first_keys(&at, window);
                (window, runs.refill(first, rows, queries, keys))
            })
            .collect();
        Self {
            ropes: tables,
            runs,
            ..self
        }
    }
}

/// The batch, sequence, table rows (one shared row unless packed) and the position of each
/// table entry, for `at`.
fn positions_of(at: &Positions<'_>) -> (usize, usize, usize, Vec<usize>) {
    match at {
        Positions::Plain { batch, seq } => (*batch, *seq, 1, (0..*seq).collect::<Vec<_>>()),
        Positions::Cached { offset, n } => (1, *n, 1, (*offset..offset + n).collect()),
        Positions::Packed {
            batch,
            seq,
            segments,
        } => {
            let mut p = Vec::with_capacity(batch * seq);
            for b in 0..*batch {
                let seg = &segments[b * seq..(b + 1) * seq];
                let mut pos = 0usize;
                for t in 0..*seq {
                    if t > 0 && seg[t] != seg[t - 1] {
                        pos = 0;
                    }
                    p.push(pos);
                    pos += 1;
                }
            }
            (*batch, *seq, *batch, p)
        }
    }
}

/// `rope`'s cos and sin rows for `positions`, concatenated.
fn rope_rows(rope: &Rope, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let reach = positions.iter().max().map_or(0, |p| p + 1);
    let inv_freq = rope.inv_freq(reach);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in positions {
        rope.push_row(&inv_freq, p, &mut cos, &mut sin);
    }
    (cos, sin)
}

/// The first key of each query of one window size, and the runs' rows, queries and keys.
fn first_keys(at: &Positions<'_>, window: Option<usize>) -> (Vec<u32>, usize, usize, usize) {
    // The first key a query at position `p` sees, by the window alone.
    let reach = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
    match at {
        Positions::Plain { seq, .. } => {
            let first = (0..*seq).map(|i| reach(i) as u32).collect();
            (first, 1, *seq, *seq)
        }
        Positions::Cached { offset, n } => {
            // A windowed layer's cache holds only the last `window - 1` earlier positions.
            let start = window.map_or(0, |w| offset - (*offset).min(w.saturating_sub(1)));
            let first = (0..*n)
                .map(|q| (reach(offset + q) - start) as u32)
                .collect();
            (first, 1, *n, offset + n - start)
        }
        Positions::Packed {
            batch,
            seq,
            segments,
        } => {
            let mut first = Vec::with_capacity(batch * seq);
            for b in 0..*batch {
                let seg = &segments[b * seq..(b + 1) * seq];
                let mut start = 0;
                for i in 0..*seq {
                    if i > 0 && seg[i] != seg[i - 1] {
                        start = i;
                    }
                    first.push(start.max(reach(i)) as u32);
                }
            }
            (first, *batch, *seq, *seq)
        }
    }
}
