//! Per-forward constants: the rotary tables of each RoPE an architecture uses and the additive
//! attention mask of each window size, for one batch shape (plain, packed, or cached decoding).

use crate::dtype::to_dtype;
use crate::fused;
use crate::layers::rope::Rope;
use burn::prelude::*;
use burn::tensor::FloatDType;

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

pub struct ForwardConsts {
    pub ropes: Vec<RopeTable>,
    masks: Vec<(Option<usize>, Tensor<4>)>,
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

const MASKED: f32 = -1e9;

impl ForwardConsts {
    /// The mask of layers whose window is `window`.
    pub fn mask(&self, window: Option<usize>) -> Tensor<4> {
        self.masks
            .iter()
            .find(|(w, _)| *w == window)
            .map(|(_, m)| m.clone())
            .expect("a mask for every window the architecture declares")
    }

    pub fn new(
        ropes: &[Rope],
        windows: &[Option<usize>],
        at: Positions<'_>,
        dtype: FloatDType,
        device: &Device,
    ) -> Self {
        // Positions of the table rows (one shared row unless packed) and the mask builder.
        let (batch, seq, rows, positions) = match &at {
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
        };
        let reach = positions.iter().max().map_or(0, |p| p + 1);
        let ropes = ropes
            .iter()
            .map(|rope| {
                let inv_freq = rope.inv_freq(reach);
                let (mut cos, mut sin) = (Vec::new(), Vec::new());
                for &p in &positions {
                    rope.push_row(&inv_freq, p, &mut cos, &mut sin);
                }
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
        let masks = distinct
            .into_iter()
            .map(|window| (window, mask(&at, window, device)))
            .collect();
        Self {
            ropes,
            masks,
            batch,
            seq,
        }
    }
}

/// The additive mask of one window size: `[1 or batch, 1, queries, keys]`.
fn mask(at: &Positions<'_>, window: Option<usize>, device: &Device) -> Tensor<4> {
    let within = |q: usize, k: usize| k <= q && window.is_none_or(|w| q - k < w);
    let (rows, queries, keys, bias) = match at {
        Positions::Plain { seq, .. } => {
            let mut bias = vec![0f32; seq * seq];
            for q in 0..*seq {
                for k in 0..*seq {
                    if !within(q, k) {
                        bias[q * seq + k] = MASKED;
                    }
                }
            }
            (1, *seq, *seq, bias)
        }
        Positions::Cached { offset, n } => {
            // A windowed layer's cache holds only the last `window - 1` earlier positions.
            let start = window.map_or(0, |w| offset - (*offset).min(w.saturating_sub(1)));
            let keys = offset + n - start;
            let mut bias = vec![0f32; n * keys];
            for q in 0..*n {
                for k in 0..keys {
                    if !within(offset + q, start + k) {
                        bias[q * keys + k] = MASKED;
                    }
                }
            }
            (1, *n, keys, bias)
        }
        Positions::Packed {
            batch,
            seq,
            segments,
        } => {
            let mut bias = vec![0f32; batch * seq * seq];
            for b in 0..*batch {
                let seg = &segments[b * seq..(b + 1) * seq];
                for q in 0..*seq {
                    for k in 0..*seq {
                        if seg[k] != seg[q] || !within(q, k) {
                            bias[(b * seq + q) * seq + k] = MASKED;
                        }
                    }
                }
            }
            (*batch, *seq, *seq, bias)
        }
    };
    Tensor::from_data(TensorData::new(bias, [rows, 1, queries, keys]), device)
}
