//! The Llama family: RMSNorm, rotary position embedding (rotate-half layout, as in HF), SwiGLU MLP,
//! grouped-query attention, optionally tied embeddings. Field names are Hugging Face's.

use crate::fused;
use crate::lora::LoraAdapter;
use crate::params::{ParamKind, ParamMapper, ParamVisitor};
use crate::safetensors_io::HostTensor;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use kiln_data::{Batch, Rng};
use std::collections::BTreeMap;

pub use kiln_formats::config::{Llama3RopeScaling, LlamaConfig};

/// `t` as `dtype` (no operation when it already is).
pub fn to_dtype<const D: usize>(t: Tensor<D>, dtype: FloatDType) -> Tensor<D> {
    if FloatDType::from(t.dtype()) == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// The float type of `t`.
pub fn float_dtype<const D: usize>(t: &Tensor<D>) -> FloatDType {
    match t.dtype() {
        DType::BF16 => FloatDType::BF16,
        DType::F16 => FloatDType::F16,
        _ => FloatDType::F32,
    }
}

/// `x W + b` with `W` held as `[in, out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
    /// A trainable low-rank path beside the (then frozen) weight.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn forward(&self, x: Tensor<2>, dropout: &mut Option<Dropout>) -> Tensor<2> {
        let y = match &self.lora {
            Some(l) => {
                let xa = match dropout.as_mut() {
                    Some(d) => d.apply_p(x.clone(), d.lora_p),
                    None => x.clone(),
                };
                // The scale goes on the rank-r activations, the smaller side.
                x.matmul(self.weight.clone())
                    + (xa.matmul(l.a.clone()) * l.scale).matmul(l.b.clone())
            }
            None => x.matmul(self.weight.clone()),
        };
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze_dim(0),
            None => y,
        }
    }

    fn visit(&self, prefix: &str, v: &mut impl ParamVisitor) {
        v.visit(
            &format!("{prefix}.weight"),
            ParamKind::LinearWeight,
            &self.weight,
        );
        if let Some(b) = &self.bias {
            v.visit(&format!("{prefix}.bias"), ParamKind::Bias, b);
        }
        if let Some(l) = &self.lora {
            v.visit(&format!("{prefix}.lora_A.weight"), ParamKind::LoraA, &l.a);
            v.visit(&format!("{prefix}.lora_B.weight"), ParamKind::LoraB, &l.b);
        }
    }

    fn map(self, prefix: &str, m: &mut impl ParamMapper) -> Self {
        Self {
            weight: m.map(
                &format!("{prefix}.weight"),
                ParamKind::LinearWeight,
                self.weight,
            ),
            bias: self
                .bias
                .map(|b| m.map(&format!("{prefix}.bias"), ParamKind::Bias, b)),
            lora: self.lora.map(|l| LoraAdapter {
                a: m.map(&format!("{prefix}.lora_A.weight"), ParamKind::LoraA, l.a),
                b: m.map(&format!("{prefix}.lora_B.weight"), ParamKind::LoraB, l.b),
                scale: l.scale,
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor<1>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        // In half precision the statistics are taken in f32 (as transformers does).
        let dtype = float_dtype(&x);
        if dtype == FloatDType::F32 {
            return fused::rms_norm(x, self.weight.clone(), self.eps);
        }
        let w = to_dtype(self.weight.clone(), FloatDType::F32);
        to_dtype(fused::rms_norm(x.cast(FloatDType::F32), w, self.eps), dtype)
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

/// Dropout whose masks come from kiln's own seeded stream, so a step is reproducible on every
/// backend and a recomputed block can replay the same masks.
#[derive(Debug, Clone)]
pub struct Dropout {
    /// On attention probabilities and residual branches.
    pub p: f64,
    /// On the input of LoRA paths.
    pub lora_p: f64,
    pub rng: Rng,
}

impl Dropout {
    fn apply<const D: usize>(&mut self, x: Tensor<D>) -> Tensor<D> {
        let p = self.p;
        self.apply_p(x, p)
    }

    fn apply_p<const D: usize>(&mut self, x: Tensor<D>, p: f64) -> Tensor<D> {
        if p <= 0.0 {
            return x;
        }
        let shape = x.shape();
        let n = shape.num_elements();
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if self.rng.next_f64() < self.p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &x.device());
        let dtype = float_dtype(&x);
        x * to_dtype(mask, dtype)
    }
}

/// Keys and values (after RoPE, before grouped-query expansion) of one layer: `[1, kv, t, hd]`.
pub type LayerCache = Option<(Tensor<4>, Tensor<4>)>;

/// The attention keys and values of the tokens seen so far, per layer.
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Tokens cached.
    pub len: usize,
}

/// Per-forward constants: rotary tables and the causal mask for one sequence length.
pub struct ForwardConsts {
    /// Rotary tables `[1 or batch, seq, head_dim]`.
    cos: Tensor<3>,
    sin: Tensor<3>,
    causal_bias: Tensor<4>,
    /// Sequences in the batch.
    pub batch: usize,
    /// New positions per sequence.
    pub seq: usize,
}

#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor<2>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
}

const INIT_PURPOSE: u64 = 0x1417;

/// Row-major `[rows, cols]` to row-major `[cols, rows]`.
pub fn transpose_host(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Gives a parameter's values from its name, kind and shape (kiln's layout).
pub type ParamSource<'a> = dyn FnMut(&str, ParamKind, &[usize]) -> Vec<f32> + 'a;

/// FNV-1a: a stable per-parameter stream index from its name.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl LlamaModel {
    /// Builds every parameter by asking `make(name, kind, shape)` for its values, in kiln's
    /// layout (linear weights `[in, out]`). Names are Hugging Face's.
    pub fn build(config: LlamaConfig, device: &Device, make: &mut ParamSource<'_>) -> Self {
        let d = config.hidden_size;
        let q = config.num_attention_heads * config.head_dim;
        let kv = config.num_key_value_heads * config.head_dim;
        let ff = config.intermediate_size;
        let mut matrix = |name: &str, kind: ParamKind, rows: usize, cols: usize| {
            Tensor::<2>::from_data(
                TensorData::new(make(name, kind, &[rows, cols]), [rows, cols]),
                device,
            )
        };
        let mut linear_weights = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut w = |n: &str, rows: usize, cols: usize| {
                matrix(
                    &format!("{p}.{n}.weight"),
                    ParamKind::LinearWeight,
                    rows,
                    cols,
                )
            };
            linear_weights.push([
                w("self_attn.q_proj", d, q),
                w("self_attn.k_proj", d, kv),
                w("self_attn.v_proj", d, kv),
                w("self_attn.o_proj", q, d),
                w("mlp.gate_proj", d, ff),
                w("mlp.up_proj", d, ff),
                w("mlp.down_proj", ff, d),
            ]);
        }
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        let embed_tokens = matrix(
            "model.embed_tokens.weight",
            ParamKind::Embedding,
            config.vocab_size,
            d,
        );
        let lm_head_weight = (!config.tie_word_embeddings).then(|| {
            matrix(
                "lm_head.weight",
                ParamKind::LinearWeight,
                d,
                config.vocab_size,
            )
        });
        let mut vector = |name: String, kind: ParamKind, n: usize| {
            Tensor::<1>::from_data(TensorData::new(make(&name, kind, &[n]), [n]), device)
        };
        for (i, ws) in linear_weights.into_iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut bias = |on: bool, n: &str, width: usize| {
                on.then(|| vector(format!("{p}.{n}.bias"), ParamKind::Bias, width))
            };
            let [wq, wk, wv, wo, wg, wu, wd] = ws;
            let lin = |weight, bias| Linear {
                weight,
                bias,
                lora: None,
            };
            let self_attn = Attention {
                q_proj: lin(wq, bias(config.qkv_bias, "self_attn.q_proj", q)),
                k_proj: lin(wk, bias(config.qkv_bias, "self_attn.k_proj", kv)),
                v_proj: lin(wv, bias(config.qkv_bias, "self_attn.v_proj", kv)),
                o_proj: lin(wo, bias(config.o_bias, "self_attn.o_proj", d)),
            };
            let mlp = Mlp {
                gate_proj: lin(wg, bias(config.mlp_bias, "mlp.gate_proj", ff)),
                up_proj: lin(wu, bias(config.mlp_bias, "mlp.up_proj", ff)),
                down_proj: lin(wd, bias(config.mlp_bias, "mlp.down_proj", d)),
            };
            let input_layernorm = RmsNorm {
                weight: vector(format!("{p}.input_layernorm.weight"), ParamKind::Norm, d),
                eps: config.rms_norm_eps,
            };
            let post_attention_layernorm = RmsNorm {
                weight: vector(
                    format!("{p}.post_attention_layernorm.weight"),
                    ParamKind::Norm,
                    d,
                ),
                eps: config.rms_norm_eps,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm,
                post_attention_layernorm,
            });
        }
        let norm = RmsNorm {
            weight: vector("model.norm.weight".into(), ParamKind::Norm, d),
            eps: config.rms_norm_eps,
        };
        let lm_head = lm_head_weight.map(|weight| Linear {
            weight,
            bias: None,
            lora: None,
        });
        Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        }
    }

    /// A freshly initialised model: normal(0, std) matrices with the residual projections scaled
    /// by 1/sqrt(2 × layers) (as GPT-2 does), unit norms, zero biases. Drawn on the host from the
    /// run seed (one stream per parameter name), so every backend starts from the same weights.
    pub fn init(config: LlamaConfig, std: f64, seed: u64, device: &Device) -> Self {
        let residual_std = std / (2.0 * config.num_hidden_layers as f64).sqrt();
        Self::build(config, device, &mut |name, kind, shape| {
            let n: usize = shape.iter().product();
            match kind {
                ParamKind::Norm => vec![1.0; n],
                ParamKind::Bias | ParamKind::LoraA | ParamKind::LoraB => vec![0.0; n],
                ParamKind::LinearWeight | ParamKind::Embedding => {
                    let std =
                        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                            residual_std
                        } else {
                            std
                        };
                    let mut rng = Rng::stream(seed, INIT_PURPOSE, name_hash(name));
                    (0..n).map(|_| (rng.normal() * std) as f32).collect()
                }
            }
        })
    }

    /// A model whose every parameter comes from HF-layout host tensors (linear weights `[out, in]`).
    /// Names and shapes must all match; the first mismatch is returned as (name, what is wrong).
    pub fn from_hf_tensors(
        config: LlamaConfig,
        tensors: &BTreeMap<String, HostTensor>,
        device: &Device,
    ) -> Result<Self, (String, String)> {
        let mut error: Option<(String, String)> = None;
        let model = Self::build(config, device, &mut |name, kind, shape| {
            let n: usize = shape.iter().product();
            if error.is_some() {
                return vec![0.0; n];
            }
            let mut expected = shape.to_vec();
            if kind == ParamKind::LinearWeight {
                expected.reverse();
            }
            match tensors.get(name) {
                None => {
                    error = Some((name.into(), "missing from the weights".into()));
                    vec![0.0; n]
                }
                Some(t) if t.shape != expected => {
                    error = Some((
                        name.into(),
                        format!(
                            "shape {:?}, expected {:?} from config.json",
                            t.shape, expected
                        ),
                    ));
                    vec![0.0; n]
                }
                // Transposed on the host so that the weight is contiguous in kiln's layout, as a
                // trained one is: the same memory layout gives bit-identical matmuls on resume.
                Some(t) if kind == ParamKind::LinearWeight => {
                    transpose_host(&t.data, t.shape[0], t.shape[1])
                }
                Some(t) => t.data.clone(),
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }

    /// A rotary table in the model's float type.
    fn table(&self, values: Vec<f32>, shape: [usize; 3], device: &Device) -> Tensor<3> {
        let t = Tensor::from_data(TensorData::new(values, shape), device);
        to_dtype(t, float_dtype(&self.embed_tokens))
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Rotary tables (rotate-half layout) and the additive causal mask for `seq_len` positions.
    pub fn consts(&self, batch: usize, seq_len: usize) -> ForwardConsts {
        ForwardConsts {
            batch,
            ..self.consts_at(0, seq_len)
        }
    }

    /// Rotary tables for positions `offset..offset + n` and the causal mask of those `n` queries
    /// over all `offset + n` keys (the first `offset` come from a [`KvCache`]).
    pub fn consts_at(&self, offset: usize, n: usize) -> ForwardConsts {
        let device = self.device().without_autodiff();
        let hd = self.config.head_dim();
        let half = hd / 2;
        let inv_freq = self.config.inv_freq();
        let mut cos = Vec::with_capacity(n * hd);
        let mut sin = Vec::with_capacity(n * hd);
        for pos in offset..offset + n {
            for j in 0..hd {
                let angle = pos as f64 * inv_freq[j % half];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let total = offset + n;
        let mut bias = vec![0f32; n * total];
        for q in 0..n {
            for k in offset + q + 1..total {
                bias[q * total + k] = -1e9;
            }
        }
        ForwardConsts {
            cos: self.table(cos, [1, n, hd], &device),
            sin: self.table(sin, [1, n, hd], &device),
            causal_bias: Tensor::from_data(TensorData::new(bias, [1, 1, n, total]), &device),
            batch: 1,
            seq: n,
        }
    }

    fn attention(
        &self,
        layer: &DecoderLayer,
        x: Tensor<2>,
        consts: &ForwardConsts,
        dropout: &mut Option<Dropout>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<2> {
        let (batch, seq) = (consts.batch, consts.seq);
        let c = &self.config;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let a = &layer.self_attn;
        // Rotated in the projections' own `[batch, seq, heads, hd]` layout, then viewed as
        // `[batch, heads, seq, hd]`.
        let heads = |t: Tensor<2>, n: usize| t.reshape([batch, seq, n, hd]);
        let rotated =
            |t: Tensor<4>| fused::rope(t, consts.cos.clone(), consts.sin.clone()).swap_dims(1, 2);
        let q = rotated(heads(a.q_proj.forward(x.clone(), dropout), h));
        let k = rotated(heads(a.k_proj.forward(x.clone(), dropout), kvh));
        let v = heads(a.v_proj.forward(x, dropout), kvh).swap_dims(1, 2);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let total = k.dims()[2];
        let (k, v) = if kvh == h {
            (k, v)
        } else {
            let rep = h / kvh;
            let expand = |t: Tensor<4>| {
                t.unsqueeze_dim::<5>(2)
                    .expand([batch, kvh, rep, total, hd])
                    .reshape([batch, h, total, hd])
            };
            (expand(k), expand(v))
        };
        // The 1/sqrt(hd) scale goes on q, not on the b·h·s² scores: the same product, fewer
        // multiplications (and a cheaper forward to recompute).
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q * scale).matmul(k.swap_dims(2, 3));
        // The softmax (and its mask) in f32 whatever the compute type, as transformers does.
        let dtype = float_dtype(&scores);
        let scores = to_dtype(scores, FloatDType::F32);
        let mut probs = to_dtype(
            fused::softmax_bias(scores, consts.causal_bias.clone()),
            dtype,
        );
        if let Some(d) = dropout.as_mut() {
            probs = d.apply(probs);
        }
        let out = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch * seq, h * hd]);
        a.o_proj.forward(out, dropout)
    }

    /// One decoder block on `[batch × seq, hidden]` activations.
    pub fn block(
        &self,
        index: usize,
        x: Tensor<2>,
        consts: &ForwardConsts,
        dropout: &mut Option<Dropout>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<2> {
        let layer = &self.layers[index];
        let mut attn = self.attention(
            layer,
            layer.input_layernorm.forward(x.clone()),
            consts,
            dropout,
            cache,
        );
        if let Some(d) = dropout.as_mut() {
            attn = d.apply(attn);
        }
        let x = x + attn;
        let h = layer.post_attention_layernorm.forward(x.clone());
        let m = &layer.mlp;
        let gated = fused::swiglu(
            m.gate_proj.forward(h.clone(), dropout),
            m.up_proj.forward(h, dropout),
        );
        let mut mlp = m.down_proj.forward(gated, dropout);
        if let Some(d) = dropout.as_mut() {
            mlp = d.apply(mlp);
        }
        x + mlp
    }

    /// Token embeddings for `[batch, seq]` ids, as `[batch × seq, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Tensor<2> {
        let device = self.device().without_autodiff();
        let idx: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [ids.len()]), &device);
        self.embed_tokens.clone().select(0, idx)
    }

    /// Final norm and output projection: `[n, hidden]` to `[n, vocab]` logits.
    pub fn head(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.norm.forward(x);
        match &self.lm_head {
            Some(head) => head.forward(x, &mut None),
            None => x.matmul(self.embed_tokens.clone().transpose()),
        }
    }

    /// Logits `[batch × seq, vocab]` for row-major `[batch, seq]` token ids.
    pub fn forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout: &mut Option<Dropout>,
    ) -> Tensor<2> {
        let consts = self.consts(batch, seq);
        let mut x = self.embed(ids);
        for i in 0..self.layers.len() {
            x = self.block(i, x, &consts, dropout, None);
        }
        self.head(x)
    }

    /// Logits `[n, vocab]` for `n` new tokens of one sequence, attending to (and extending) the
    /// keys and values `cache` holds: generation without recomputing the prefix.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Tensor<2> {
        let n = ids.len();
        let consts = self.consts_at(cache.len, n);
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let mut x = self.embed(ids);
        for i in 0..self.layers.len() {
            x = self.block(i, x, &consts, &mut None, Some(&mut cache.layers[i]));
        }
        cache.len += n;
        self.head(x)
    }

    /// Mean next-token cross-entropy of `logits` `[n, vocab]` against `targets` (length n),
    /// over the positions where `mask` is 1 (all positions without a mask).
    pub fn cross_entropy(logits: Tensor<2>, targets: &[u32], mask: Option<&[f32]>) -> Tensor<1> {
        let count = mask.map_or(targets.len() as f32, |m| m.iter().sum());
        Self::cross_entropy_sum(logits, targets, mask).neg() / count.max(1.0) as f64
    }

    /// Sum over positions of `mask ×` the log-probability of the target: the cross-entropy
    /// numerator of a chunk of positions, before the sign and the division by the batch's count.
    /// Masked-out positions cost nothing (the fused kernel skips their rows).
    pub fn cross_entropy_sum(
        logits: Tensor<2>,
        targets: &[u32],
        mask: Option<&[f32]>,
    ) -> Tensor<1> {
        let device = logits.device().without_autodiff();
        let n = targets.len();
        let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device);
        let weights = mask.map_or_else(|| vec![1.0; n], <[f32]>::to_vec);
        let weights = Tensor::<1>::from_data(TensorData::new(weights, [n]), &device);
        // The loss in f32 whatever the compute type.
        let logits = to_dtype(logits, FloatDType::F32);
        fused::cross_entropy(logits, idx, weights).sum().neg()
    }

    /// Rotary tables and masks for a batch's shape (packed rows included).
    pub fn consts_for(&self, batch: &Batch) -> ForwardConsts {
        match &batch.segments {
            Some(seg) => self.consts_packed(batch.batch_size, batch.seq_len, seg),
            None => self.consts(batch.batch_size, batch.seq_len),
        }
    }

    /// Rotary tables and masks for packed rows: positions restart at each segment and attention
    /// stays inside it. `segments` is row-major `[batch, seq]`.
    pub fn consts_packed(&self, batch: usize, seq: usize, segments: &[u32]) -> ForwardConsts {
        let device = self.device().without_autodiff();
        let hd = self.config.head_dim();
        let half = hd / 2;
        let inv_freq = self.config.inv_freq();
        let mut cos = Vec::with_capacity(batch * seq * hd);
        let mut sin = Vec::with_capacity(batch * seq * hd);
        let mut bias = vec![0f32; batch * seq * seq];
        for b in 0..batch {
            let seg = &segments[b * seq..(b + 1) * seq];
            let mut pos = 0usize;
            for t in 0..seq {
                if t > 0 && seg[t] != seg[t - 1] {
                    pos = 0;
                }
                for j in 0..hd {
                    let angle = pos as f64 * inv_freq[j % half];
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
                pos += 1;
                for k in 0..seq {
                    if k > t || seg[k] != seg[t] {
                        bias[(b * seq + t) * seq + k] = -1e9;
                    }
                }
            }
        }
        ForwardConsts {
            cos: self.table(cos, [batch, seq, hd], &device),
            sin: self.table(sin, [batch, seq, hd], &device),
            causal_bias: Tensor::from_data(TensorData::new(bias, [batch, 1, seq, seq]), &device),
            batch,
            seq,
        }
    }

    /// Logits `[batch × seq, vocab]` of a batch (packed rows included).
    pub fn forward_batch(&self, batch: &Batch, dropout: &mut Option<Dropout>) -> Tensor<2> {
        let consts = self.consts_for(batch);
        let mut x = self.embed(&batch.inputs);
        for i in 0..self.layers.len() {
            x = self.block(i, x, &consts, dropout, None);
        }
        self.head(x)
    }

    /// Mean loss of a batch.
    pub fn loss(&self, batch: &Batch, dropout: &mut Option<Dropout>) -> Tensor<1> {
        let logits = self.forward_batch(batch, dropout);
        Self::cross_entropy(logits, &batch.targets, batch.loss_mask.as_deref())
    }

    pub fn visit_params(&self, v: &mut impl ParamVisitor) {
        v.visit(
            "model.embed_tokens.weight",
            ParamKind::Embedding,
            &self.embed_tokens,
        );
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            l.self_attn
                .q_proj
                .visit(&format!("{p}.self_attn.q_proj"), v);
            l.self_attn
                .k_proj
                .visit(&format!("{p}.self_attn.k_proj"), v);
            l.self_attn
                .v_proj
                .visit(&format!("{p}.self_attn.v_proj"), v);
            l.self_attn
                .o_proj
                .visit(&format!("{p}.self_attn.o_proj"), v);
            l.mlp.gate_proj.visit(&format!("{p}.mlp.gate_proj"), v);
            l.mlp.up_proj.visit(&format!("{p}.mlp.up_proj"), v);
            l.mlp.down_proj.visit(&format!("{p}.mlp.down_proj"), v);
            v.visit(
                &format!("{p}.input_layernorm.weight"),
                ParamKind::Norm,
                &l.input_layernorm.weight,
            );
            v.visit(
                &format!("{p}.post_attention_layernorm.weight"),
                ParamKind::Norm,
                &l.post_attention_layernorm.weight,
            );
        }
        v.visit("model.norm.weight", ParamKind::Norm, &self.norm.weight);
        if let Some(head) = &self.lm_head {
            head.visit("lm_head", v);
        }
    }

    pub fn map_params(self, m: &mut impl ParamMapper) -> Self {
        let embed_tokens = m.map(
            "model.embed_tokens.weight",
            ParamKind::Embedding,
            self.embed_tokens,
        );
        let layers = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let p = format!("model.layers.{i}");
                DecoderLayer {
                    self_attn: Attention {
                        q_proj: l.self_attn.q_proj.map(&format!("{p}.self_attn.q_proj"), m),
                        k_proj: l.self_attn.k_proj.map(&format!("{p}.self_attn.k_proj"), m),
                        v_proj: l.self_attn.v_proj.map(&format!("{p}.self_attn.v_proj"), m),
                        o_proj: l.self_attn.o_proj.map(&format!("{p}.self_attn.o_proj"), m),
                    },
                    mlp: Mlp {
                        gate_proj: l.mlp.gate_proj.map(&format!("{p}.mlp.gate_proj"), m),
                        up_proj: l.mlp.up_proj.map(&format!("{p}.mlp.up_proj"), m),
                        down_proj: l.mlp.down_proj.map(&format!("{p}.mlp.down_proj"), m),
                    },
                    input_layernorm: RmsNorm {
                        weight: m.map(
                            &format!("{p}.input_layernorm.weight"),
                            ParamKind::Norm,
                            l.input_layernorm.weight,
                        ),
                        eps: l.input_layernorm.eps,
                    },
                    post_attention_layernorm: RmsNorm {
                        weight: m.map(
                            &format!("{p}.post_attention_layernorm.weight"),
                            ParamKind::Norm,
                            l.post_attention_layernorm.weight,
                        ),
                        eps: l.post_attention_layernorm.eps,
                    },
                }
            })
            .collect();
        let norm = RmsNorm {
            weight: m.map("model.norm.weight", ParamKind::Norm, self.norm.weight),
            eps: self.norm.eps,
        };
        let lm_head = self.lm_head.map(|h| h.map("lm_head", m));
        Self {
            config: self.config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        }
    }

    /// All parameters in Hugging Face layout (linear weights as `[out, in]`), read to the host.
    pub fn to_hf_tensors(&self) -> BTreeMap<String, HostTensor> {
        self.hf_tensors_where(|_| true)
    }

    /// The parameters whose kind passes `keep`, in HF/PEFT layout, read to the host.
    pub fn hf_tensors_where(&self, keep: fn(ParamKind) -> bool) -> BTreeMap<String, HostTensor> {
        struct Export(BTreeMap<String, HostTensor>, fn(ParamKind) -> bool);
        impl ParamVisitor for Export {
            fn visit<const D: usize>(&mut self, name: &str, kind: ParamKind, p: &Tensor<D>) {
                if !(self.1)(kind) {
                    return;
                }
                let data = p.clone().detach().into_data();
                let mut shape = data.shape().to_vec();
                let mut values = data
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap_or_default();
                if kind.transposed() {
                    values = transpose_host(&values, shape[0], shape[1]);
                    shape.reverse();
                }
                self.0.insert(
                    name.to_string(),
                    HostTensor {
                        shape,
                        data: values,
                    },
                );
            }
        }
        let mut e = Export(BTreeMap::new(), keep);
        self.visit_params(&mut e);
        e.0
    }
}
