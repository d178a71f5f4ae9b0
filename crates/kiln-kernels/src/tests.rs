//! Each kernel against a plain f64 computation of the same formula, on shapes that take both the
//! single-task and the parallel path and rows that are not a multiple of the vector width.

use super::*;

fn values(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32 * scale as f32
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} against {w} (error {err:e})"
        );
    }
}

#[test]
fn exp_is_within_a_few_ulp_and_saturates_safely() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let got = exp(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
        x += 0.0137;
    }
    assert!(
        worst < 4.0 * f32::EPSILON as f64,
        "relative error {worst:e}"
    );
    assert_eq!(exp(0.0), 1.0);
    assert!(exp(-1e9) >= 0.0 && exp(-1e9) < 1e-37);
    assert!(exp(1e9).is_finite());
    assert!(exp(f32::NAN).is_nan());
}

fn softmax_ref(x: &[f32], bias: &[f32], heads: usize, seq: usize, len: usize) -> Vec<f64> {
    let bias_batch = bias.len() / (seq * len);
    let mut out = Vec::with_capacity(x.len());
    for (r, row) in x.chunks(len).enumerate() {
        let b = if bias_batch == 1 {
            0
        } else {
            r / (heads * seq)
        };
        let m = &bias[(b * seq + r % seq) * len..][..len];
        let z: Vec<f64> = row.iter().zip(m).map(|(a, b)| (a + b) as f64).collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - mx).exp()).sum();
        out.extend(z.iter().map(|v| (v - mx).exp() / s));
    }
    out
}

#[test]
fn softmax_with_a_mask_per_sequence_or_shared_and_its_backward() {
    for (batch, heads, seq, len, shared) in [(2, 3, 5, 5, true), (3, 4, 37, 37, false)] {
        let n = batch * heads * seq * len;
        let x = values(n, 1, 4.0);
        let bias_batch = if shared { 1 } else { batch };
        let mut bias = vec![0f32; bias_batch * seq * len];
        for (i, b) in bias.iter_mut().enumerate() {
            let (q, k) = ((i / len) % seq, i % len);
            if k > q || (i * 7) % 11 == 0 && k != q {
                *b = -1e9;
            }
        }
        let want = softmax_ref(&x, &bias, heads, seq, len);
        let mut y = x.clone();
        softmax_bias(&mut y, &bias, heads, seq, len);
        assert_close(&y, &want, 1e-6, "softmax");

        let g = values(n, 2, 1.0);
        let mut dx = g.clone();
        softmax_backward(&y, &mut dx, len);
        let want: Vec<f64> = y
            .chunks(len)
            .zip(g.chunks(len))
            .flat_map(|(yr, gr)| {
                let d: f64 = yr.iter().zip(gr).map(|(a, b)| *a as f64 * *b as f64).sum();
                yr.iter()
                    .zip(gr)
                    .map(move |(a, b)| *a as f64 * (*b as f64 - d))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_close(&dx, &want, 1e-6, "softmax backward");
    }
}

#[test]
fn rms_norm_and_its_backward() {
    for (rows, len) in [(3, 7), (300, 129)] {
        let x = values(rows * len, 3, 2.0);
        let w = values(len, 4, 1.0);
        let g = values(rows * len, 5, 1.0);
        let eps = 1e-5f32;
        let mut y = vec![0f32; rows * len];
        rms_norm(&x, &w, eps, &mut y, len);
        let mut want = Vec::new();
        let mut want_dx = Vec::new();
        let mut want_dw = vec![0f64; len];
        for (xr, gr) in x.chunks(len).zip(g.chunks(len)) {
            let ms: f64 = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / len as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            want.extend(xr.iter().zip(&w).map(|(a, b)| *a as f64 * inv * *b as f64));
            let c: f64 = (0..len)
                .map(|j| gr[j] as f64 * w[j] as f64 * xr[j] as f64 * inv)
                .sum::<f64>()
                / len as f64;
            for j in 0..len {
                let n = xr[j] as f64 * inv;
                want_dx.push(inv * (gr[j] as f64 * w[j] as f64 - n * c));
                want_dw[j] += gr[j] as f64 * n;
            }
        }
        assert_close(&y, &want, 1e-6, "rms_norm");
        let mut dx = vec![0f32; rows * len];
        let dw = rms_norm_backward(&x, &w, &g, eps, &mut dx, len);
        assert_close(&dx, &want_dx, 1e-5, "rms_norm dx");
        assert_close(&dw, &want_dw, 1e-5, "rms_norm dw");
    }
}

#[test]
fn swiglu_and_its_backward() {
    for n in [37, 50_000] {
        let gate = values(n, 6, 6.0);
        let up = values(n, 7, 2.0);
        let g = values(n, 8, 1.0);
        let mut y = vec![0f32; n];
        swiglu(&gate, &up, &mut y);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let want: Vec<f64> = (0..n)
            .map(|i| gate[i] as f64 * sig(gate[i] as f64) * up[i] as f64)
            .collect();
        assert_close(&y, &want, 1e-6, "swiglu");
        let mut dgate = g.clone();
        let mut dup = vec![0f32; n];
        swiglu_backward(&gate, &up, &mut dgate, &mut dup);
        let (mut wg, mut wu) = (Vec::new(), Vec::new());
        for i in 0..n {
            let (a, u, gi) = (gate[i] as f64, up[i] as f64, g[i] as f64);
            let s = sig(a);
            wu.push(gi * a * s);
            wg.push(gi * u * s * (1.0 + a * (1.0 - s)));
        }
        assert_close(&dgate, &wg, 1e-6, "swiglu dgate");
        assert_close(&dup, &wu, 1e-6, "swiglu dup");
    }
}

#[test]
fn rope_rotates_and_inverse_rotation_undoes_it() {
    for (batch, seq, heads, dim, per_batch) in [(1, 3, 2, 4, false), (3, 40, 5, 34, true)] {
        let n = batch * seq * heads * dim;
        let x = values(n, 9, 1.0);
        let tb = if per_batch { batch } else { 1 };
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for b in 0..tb {
            for s in 0..seq {
                for j in 0..dim {
                    let angle = ((s + 3 * b) as f64) / (1.0 + (j % (dim / 2)) as f64);
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let mut y = x.clone();
        rope(&mut y, &cos, &sin, seq, heads, dim, false);
        let half = dim / 2;
        let mut want = Vec::new();
        for (r, row) in x.chunks(heads * dim).enumerate() {
            let (b, s) = (r / seq, r % seq);
            let t = ((if per_batch { b } else { 0 }) * seq + s) * dim;
            for h in row.chunks(dim) {
                for j in 0..dim {
                    let rot = if j < half { -h[j + half] } else { h[j - half] };
                    want.push(h[j] as f64 * cos[t + j] as f64 + rot as f64 * sin[t + j] as f64);
                }
            }
        }
        assert_close(&y, &want, 1e-6, "rope");
        let mut back = y.clone();
        rope(&mut back, &cos, &sin, seq, heads, dim, true);
        let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
        assert_close(&back, &x64, 1e-5, "rope inverse");
    }
}

#[test]
fn cross_entropy_and_its_backward_skip_unweighted_rows() {
    for (rows, len) in [(4, 63), (70, 1000)] {
        let logits = values(rows * len, 10, 8.0);
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 31 + 7) % len) as u32).collect();
        let weights: Vec<f32> = (0..rows)
            .map(|r| if r % 3 == 1 { 0.0 } else { 1.0 })
            .collect();
        let grad: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 / rows as f32).collect();
        let mut loss = vec![0f32; rows];
        cross_entropy(&logits, &targets, &weights, &mut loss, len);
        let mut want = Vec::new();
        let mut want_g = Vec::new();
        for (r, row) in logits.chunks(len).enumerate() {
            let mx = row
                .iter()
                .map(|v| *v as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|v| (*v as f64 - mx).exp()).sum();
            let lse = mx + s.ln();
            let w = weights[r] as f64;
            want.push(w * (lse - row[targets[r] as usize] as f64));
            let gw = grad[r] as f64 * w;
            for (j, v) in row.iter().enumerate() {
                let p = (*v as f64 - mx).exp() / s;
                let onehot = if j == targets[r] as usize { 1.0 } else { 0.0 };
                want_g.push(gw * (p - onehot));
            }
        }
        assert_close(&loss, &want, 1e-5, "cross_entropy");
        let mut g = logits.clone();
        cross_entropy_backward(&mut g, &targets, &weights, &grad, len);
        assert_close(&g, &want_g, 1e-6, "cross_entropy backward");
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (rows, len) = (300, 129);
    let x = values(rows * len, 11, 2.0);
    let w = values(len, 12, 1.0);
    let g = values(rows * len, 13, 1.0);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool")
            .install(|| {
                let mut dx = vec![0f32; rows * len];
                let dw = rms_norm_backward(&x, &w, &g, 1e-6, &mut dx, len);
                (dx, dw)
            })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn adamw_matches_the_formula() {
    for n in [7, 40_000] {
        let (p0, m0, g) = (values(n, 14, 1.0), values(n, 15, 0.1), values(n, 16, 1.0));
        let v0: Vec<f32> = values(n, 17, 0.01).iter().map(|x| x.abs()).collect();
        let h = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            decay: 1.0 - 1e-3 * 0.1,
            bc1: 1.0 - 0.9f32.powi(3),
            bc2: 1.0 - 0.95f32.powi(3),
        };
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        adamw(&mut p, &mut m, &mut v, &g, 0.5, h);
        let (mut wp, mut wm, mut wv) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let gi = g[i] as f64 * 0.5;
            let mi = m0[i] as f64 * 0.9 + gi * 0.1;
            let vi = v0[i] as f64 * 0.95 + gi * gi * 0.05;
            let denom = (vi / h.bc2 as f64).sqrt() + 1e-8;
            wp.push(p0[i] as f64 * h.decay as f64 - (mi / h.bc1 as f64) / denom * 1e-3);
            wm.push(mi);
            wv.push(vi);
        }
        assert_close(&p, &wp, 1e-6, "adamw p");
        assert_close(&m, &wm, 1e-6, "adamw m");
        assert_close(&v, &wv, 1e-6, "adamw v");
    }
}

/// Attention written out in f64 over the materialised scores: (out, dq, dk, dv) for the
/// gradient `d_out`.
fn attention_ref(
    sh: &attention::AttentionShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    first: &[u32],
    d_out: &[f32],
) -> [Vec<f64>; 4] {
    let (hd, rep, off) = (sh.head_dim, sh.heads / sh.kv_heads, sh.keys - sh.queries);
    let qi = |b: usize, i: usize, h: usize| ((b * sh.queries + i) * sh.heads + h) * hd;
    let ki = |b: usize, j: usize, h: usize| ((b * sh.keys + j) * sh.kv_heads + h / rep) * hd;
    let mut out = vec![0f64; q.len()];
    let (mut dq, mut dk, mut dv) = (
        vec![0f64; q.len()],
        vec![0f64; k.len()],
        vec![0f64; v.len()],
    );
    for b in 0..sh.batch {
        let row = if sh.mask_rows == 1 { 0 } else { b };
        for h in 0..sh.heads {
            for i in 0..sh.queries {
                let keys = first[row * sh.queries + i] as usize..i + off + 1;
                let raw: Vec<f64> = keys
                    .clone()
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[qi(b, i, h) + d] as f64 * k[ki(b, j, h) + d] as f64)
                            .sum::<f64>()
                            * sh.scale as f64
                    })
                    .collect();
                let c = sh.softcap.map(|c| c as f64);
                let s: Vec<f64> = raw
                    .iter()
                    .map(|&x| c.map_or(x, |c| c * (x / c).tanh()))
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                let go = &d_out[qi(b, i, h)..qi(b, i, h) + hd];
                let dp: Vec<f64> = keys
                    .clone()
                    .map(|j| {
                        (0..hd)
                            .map(|d| go[d] as f64 * v[ki(b, j, h) + d] as f64)
                            .sum()
                    })
                    .collect();
                let delta: f64 = p.iter().zip(&dp).map(|(p, g)| p * g).sum();
                for (n, j) in keys.enumerate() {
                    let mut ds = p[n] * (dp[n] - delta);
                    if let Some(c) = c {
                        ds *= 1.0 - (raw[n] / c).tanh().powi(2);
                    }
                    ds *= sh.scale as f64;
                    for d in 0..hd {
                        out[qi(b, i, h) + d] += p[n] * v[ki(b, j, h) + d] as f64;
                        dv[ki(b, j, h) + d] += p[n] * go[d] as f64;
                        dq[qi(b, i, h) + d] += ds * k[ki(b, j, h) + d] as f64;
                        dk[ki(b, j, h) + d] += ds * q[qi(b, i, h) + d] as f64;
                    }
                }
            }
        }
    }
    [out, dq, dk, dv]
}

#[test]
fn tiled_attention_matches_materialised_scores_in_values_and_gradients() {
    use attention::{AttentionShape, attention, attention_backward};
    // (batch, heads, kv heads, queries, keys, head dim, softcap, first keys of each query)
    let window = |s: usize, off: usize, w: usize| -> Vec<u32> {
        (0..s)
            .map(|i| (i + off + 1).saturating_sub(w) as u32)
            .collect()
    };
    // Packed: documents of lengths 5, 70, then the rest, per batch row (rows differ).
    let packed = |s: usize, batch: usize| -> Vec<u32> {
        (0..batch)
            .flat_map(|b| {
                let cuts = [0, 5 + b, 75 + b];
                (0..s).map(move |i| *cuts.iter().filter(|&&c| c <= i).max().unwrap() as u32)
            })
            .collect()
    };
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<f32>,
        Vec<u32>,
    );
    let cases: Vec<(&str, Case)> = vec![
        (
            "causal, one tile",
            (1, 2, 2, 7, 7, 8, None, window(7, 0, usize::MAX)),
        ),
        (
            "causal GQA 9/3, odd length over tiles",
            (1, 9, 3, 131, 131, 16, None, window(131, 0, usize::MAX)),
        ),
        (
            "GQA 4/1, batch 2",
            (2, 4, 1, 70, 70, 8, None, window(70, 0, usize::MAX)),
        ),
        (
            "sliding window 17",
            (1, 2, 1, 150, 150, 8, None, window(150, 0, 17)),
        ),
        ("packed rows", (2, 3, 3, 140, 140, 8, None, packed(140, 2))),
        (
            "soft-cap",
            (1, 2, 2, 65, 65, 8, Some(0.7), window(65, 0, usize::MAX)),
        ),
        (
            "cached keys before the queries",
            (1, 4, 2, 3, 100, 8, None, window(3, 97, 40)),
        ),
    ];
    for (what, (batch, heads, kv_heads, s, t, hd, softcap, first)) in cases {
        let sh = AttentionShape {
            batch,
            heads,
            kv_heads,
            queries: s,
            keys: t,
            head_dim: hd,
            mask_rows: first.len() / s,
            scale: 0.9 / (hd as f32).sqrt(),
            softcap,
        };
        assert!(sh.accepts(&first), "{what}");
        let q = values(batch * s * heads * hd, 1, 2.0);
        let k = values(batch * t * kv_heads * hd, 2, 2.0);
        let v = values(batch * t * kv_heads * hd, 3, 1.0);
        let g = values(batch * s * heads * hd, 4, 1.0);
        let [want_out, want_dq, want_dk, want_dv] = attention_ref(&sh, (&q, &k, &v), &first, &g);
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; batch * heads * s];
        attention(&sh, (&q, &k, &v), &first, &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        attention_backward(
            &sh,
            (&q, &k, &v),
            &first,
            (&out, &lse),
            &g,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        assert_close(&out, &want_out, 2e-6, &format!("{what}: out"));
        assert_close(&dq, &want_dq, 4e-6, &format!("{what}: dq"));
        assert_close(&dk, &want_dk, 4e-6, &format!("{what}: dk"));
        assert_close(&dv, &want_dv, 4e-6, &format!("{what}: dv"));
    }
}
