//! The Llama family: RMSNorm, rotary position embedding (rotate-half layout, as in HF), SwiGLU MLP,
//! grouped-query attention, optionally tied embeddings. Field names are Hugging Face's.

use crate::params::{ParamKind, ParamMapper, ParamVisitor};
use crate::safetensors_io::HostTensor;
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu, softmax};
use kiln_config::ModelConfig;
use kiln_data::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The model's shape, serialized as Hugging Face's `config.json` for `LlamaForCausalLM`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn from_model_config(m: &ModelConfig, vocab_size: usize) -> Self {
        Self {
            vocab_size: m.vocab_size.unwrap_or(vocab_size),
            hidden_size: m.hidden_size,
            intermediate_size: m.intermediate_size,
            num_hidden_layers: m.num_hidden_layers,
            num_attention_heads: m.num_attention_heads,
            num_key_value_heads: m.kv_heads(),
            max_position_embeddings: m.max_position_embeddings,
            rms_norm_eps: m.rms_norm_eps,
            rope_theta: m.rope_theta,
            tie_word_embeddings: m.tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// `config.json` as `transformers` writes it for this architecture.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = v.as_object_mut() {
            map.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
            map.insert("model_type".into(), "llama".into());
            map.insert("hidden_act".into(), "silu".into());
            map.insert("torch_dtype".into(), "float32".into());
            map.insert("head_dim".into(), self.head_dim().into());
            map.insert("attention_dropout".into(), 0.0.into());
            map.insert("initializer_range".into(), 0.02.into());
            map.insert("use_cache".into(), true.into());
        }
        v
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let kv = self.num_key_value_heads * self.head_dim();
        let attn = d * d * 2 + d * kv * 2;
        let mlp = 3 * d * self.intermediate_size;
        let layer = attn + mlp + 2 * d;
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * layer + d
    }
}

/// `x W + b` with `W` held as `[in, out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = x.matmul(self.weight.clone());
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
        let rms = (x.clone().square().mean_dim(1) + self.eps).sqrt();
        (x / rms) * self.weight.clone().unsqueeze_dim(0)
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
pub struct Dropout {
    pub p: f64,
    pub rng: Rng,
}

impl Dropout {
    fn apply<const D: usize>(&mut self, x: Tensor<D>) -> Tensor<D> {
        if self.p <= 0.0 {
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
        x * mask
    }
}

/// Per-forward constants: rotary tables and the causal mask for one sequence length.
pub struct ForwardConsts {
    cos: Tensor<4>,
    sin: Tensor<4>,
    causal_bias: Tensor<4>,
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

fn normal_tensor<const D: usize>(
    rng: &mut Rng,
    shape: [usize; D],
    std: f64,
    device: &Device,
) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

impl LlamaModel {
    /// A freshly initialised model: normal(0, std) matrices with the residual projections scaled
    /// by 1/sqrt(2 × layers) (as GPT-2 does), unit norms. Drawn on the host from the run seed, so
    /// every backend starts from the same weights.
    pub fn init(config: LlamaConfig, std: f64, seed: u64, device: &Device) -> Self {
        let d = config.hidden_size;
        let kv = config.num_key_value_heads * config.head_dim();
        let ff = config.intermediate_size;
        let residual_std = std / (2.0 * config.num_hidden_layers as f64).sqrt();
        let mut counter = 0u64;
        let mut next_rng = || {
            counter += 1;
            Rng::stream(seed, INIT_PURPOSE, counter)
        };
        let mut linear = |din: usize, dout: usize, std: f64| Linear {
            weight: normal_tensor(&mut next_rng(), [din, dout], std, device),
            bias: None,
        };
        let ones = |n: usize| Tensor::<1>::ones([n], device);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: linear(d, d, std),
                    k_proj: linear(d, kv, std),
                    v_proj: linear(d, kv, std),
                    o_proj: linear(d, d, residual_std),
                },
                mlp: Mlp {
                    gate_proj: linear(d, ff, std),
                    up_proj: linear(d, ff, std),
                    down_proj: linear(ff, d, residual_std),
                },
                input_layernorm: RmsNorm {
                    weight: ones(d),
                    eps: config.rms_norm_eps,
                },
                post_attention_layernorm: RmsNorm {
                    weight: ones(d),
                    eps: config.rms_norm_eps,
                },
            });
        }
        let lm_head = (!config.tie_word_embeddings).then(|| linear(d, config.vocab_size, std));
        let embed_tokens = normal_tensor(
            &mut Rng::stream(seed, INIT_PURPOSE, 0),
            [config.vocab_size, d],
            std,
            device,
        );
        Self {
            norm: RmsNorm {
                weight: ones(d),
                eps: config.rms_norm_eps,
            },
            config,
            embed_tokens,
            layers,
            lm_head,
        }
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Rotary tables (rotate-half layout) and the additive causal mask for `seq_len` positions.
    pub fn consts(&self, seq_len: usize) -> ForwardConsts {
        let device = self.device().without_autodiff();
        let hd = self.config.head_dim();
        let half = hd / 2;
        let mut cos = Vec::with_capacity(seq_len * hd);
        let mut sin = Vec::with_capacity(seq_len * hd);
        for pos in 0..seq_len {
            for j in 0..hd {
                let i = j % half;
                let freq = 1.0 / self.config.rope_theta.powf(2.0 * i as f64 / hd as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let mut bias = vec![0f32; seq_len * seq_len];
        for q in 0..seq_len {
            for k in q + 1..seq_len {
                bias[q * seq_len + k] = -1e9;
            }
        }
        ForwardConsts {
            cos: Tensor::from_data(TensorData::new(cos, [1, 1, seq_len, hd]), &device),
            sin: Tensor::from_data(TensorData::new(sin, [1, 1, seq_len, hd]), &device),
            causal_bias: Tensor::from_data(
                TensorData::new(bias, [1, 1, seq_len, seq_len]),
                &device,
            ),
        }
    }

    fn rope(x: Tensor<4>, consts: &ForwardConsts) -> Tensor<4> {
        let [_, _, _, hd] = x.dims();
        let half = hd / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * consts.cos.clone() + rotated * consts.sin.clone()
    }

    fn attention(
        &self,
        layer: &DecoderLayer,
        x: Tensor<2>,
        batch: usize,
        seq: usize,
        consts: &ForwardConsts,
        dropout: &mut Option<Dropout>,
    ) -> Tensor<2> {
        let c = &self.config;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let a = &layer.self_attn;
        let heads = |t: Tensor<2>, n: usize| t.reshape([batch, seq, n, hd]).swap_dims(1, 2);
        let q = Self::rope(heads(a.q_proj.forward(x.clone()), h), consts);
        let k = Self::rope(heads(a.k_proj.forward(x.clone()), kvh), consts);
        let v = heads(a.v_proj.forward(x), kvh);
        let (k, v) = if kvh == h {
            (k, v)
        } else {
            let rep = h / kvh;
            let expand = |t: Tensor<4>| {
                t.unsqueeze_dim::<5>(2)
                    .expand([batch, kvh, rep, seq, hd])
                    .reshape([batch, h, seq, hd])
            };
            (expand(k), expand(v))
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(k.swap_dims(2, 3)) * scale + consts.causal_bias.clone();
        let mut probs = softmax(scores, 3);
        if let Some(d) = dropout.as_mut() {
            probs = d.apply(probs);
        }
        let out = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch * seq, h * hd]);
        a.o_proj.forward(out)
    }

    /// One decoder block on `[batch × seq, hidden]` activations.
    pub fn block(
        &self,
        index: usize,
        x: Tensor<2>,
        batch: usize,
        seq: usize,
        consts: &ForwardConsts,
        dropout: &mut Option<Dropout>,
    ) -> Tensor<2> {
        let layer = &self.layers[index];
        let mut attn = self.attention(
            layer,
            layer.input_layernorm.forward(x.clone()),
            batch,
            seq,
            consts,
            dropout,
        );
        if let Some(d) = dropout.as_mut() {
            attn = d.apply(attn);
        }
        let x = x + attn;
        let h = layer.post_attention_layernorm.forward(x.clone());
        let m = &layer.mlp;
        let mut mlp = m
            .down_proj
            .forward(silu(m.gate_proj.forward(h.clone())) * m.up_proj.forward(h));
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
            Some(head) => head.forward(x),
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
        let consts = self.consts(seq);
        let mut x = self.embed(ids);
        for i in 0..self.layers.len() {
            x = self.block(i, x, batch, seq, &consts, dropout);
        }
        self.head(x)
    }

    /// Mean next-token cross-entropy of `logits` `[n, vocab]` against `targets` (length n).
    pub fn cross_entropy(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
        let device = logits.device().without_autodiff();
        let n = targets.len();
        let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [n, 1]), &device);
        let picked = log_softmax(logits, 1).gather(1, idx);
        picked.mean().neg()
    }

    /// Mean loss of a batch of windows.
    pub fn loss(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
        dropout: &mut Option<Dropout>,
    ) -> Tensor<1> {
        Self::cross_entropy(self.forward(inputs, batch, seq, dropout), targets)
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

    /// Moves every parameter to `device` (e.g. the autodiff view of the same backend), marking
    /// them as requiring gradients when `trainable`.
    pub fn to_device(self, device: &Device, trainable: bool) -> Self {
        struct Move<'a>(&'a Device, bool);
        impl ParamMapper for Move<'_> {
            fn map<const D: usize>(&mut self, _: &str, _: ParamKind, p: Tensor<D>) -> Tensor<D> {
                let p = p.detach().to_device(self.0);
                let p = if self.0.is_autodiff() {
                    p.autodiff()
                } else {
                    p.without_autodiff()
                };
                if self.1 { p.require_grad() } else { p }
            }
        }
        self.map_params(&mut Move(device, trainable))
    }

    /// All parameters in Hugging Face layout (linear weights as `[out, in]`), read to the host.
    pub fn to_hf_tensors(&self) -> BTreeMap<String, HostTensor> {
        struct Export(BTreeMap<String, HostTensor>);
        impl ParamVisitor for Export {
            fn visit<const D: usize>(&mut self, name: &str, kind: ParamKind, p: &Tensor<D>) {
                let data = p.clone().detach().into_data();
                let mut shape = data.shape().to_vec();
                let mut values = data
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap_or_default();
                if kind == ParamKind::LinearWeight {
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
        let mut e = Export(BTreeMap::new());
        self.visit_params(&mut e);
        e.0
    }

    /// Replaces every parameter from HF-layout host tensors; names and shapes must all match.
    pub fn load_hf_tensors(
        self,
        tensors: &BTreeMap<String, HostTensor>,
    ) -> Result<Self, (String, String)> {
        struct Import<'a> {
            tensors: &'a BTreeMap<String, HostTensor>,
            error: Option<(String, String)>,
        }
        impl ParamMapper for Import<'_> {
            fn map<const D: usize>(
                &mut self,
                name: &str,
                kind: ParamKind,
                p: Tensor<D>,
            ) -> Tensor<D> {
                if self.error.is_some() {
                    return p;
                }
                let Some(t) = self.tensors.get(name) else {
                    self.error = Some((name.into(), "missing".into()));
                    return p;
                };
                let mut expected = p.dims().to_vec();
                if kind == ParamKind::LinearWeight {
                    expected.reverse();
                }
                if t.shape != expected {
                    self.error = Some((
                        name.into(),
                        format!("shape {:?}, expected {:?}", t.shape, expected),
                    ));
                    return p;
                }
                let device = p.device();
                // Transposed on the host so that the weight is contiguous in kiln's layout, as
                // a trained one is: the same memory layout gives bit-identical matmuls on resume.
                let values = if kind == ParamKind::LinearWeight {
                    transpose_host(&t.data, t.shape[0], t.shape[1])
                } else {
                    t.data.clone()
                };
                Tensor::<D>::from_data(TensorData::new(values, p.shape()), &device)
            }
        }
        let mut import = Import {
            tensors,
            error: None,
        };
        let model = self.map_params(&mut import);
        match import.error {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }
}
