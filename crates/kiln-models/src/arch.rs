//! A family's declaration of its decoder: every parameter's name, kind and shape, and the layers
//! that use them, with no tensor allocated. Building, loading, saving, visiting, counting and
//! planning all follow from this one declaration (see [`crate::model::Model`]).

use crate::config::ModelConfig;
use crate::layers::{
    Activation, Attention, Block, GateUpProjection, Linear, Mlp, QkvProjection, RmsNorm, Rope,
};
use crate::params::{P1, P2, ParamInfo, ParamKind};

/// A decoder as its family declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub config: ModelConfig,
    pub params: Vec<ParamInfo>,
    pub embed_tokens: P2,
    /// Embeddings are multiplied by this (Gemma: `√hidden`, in the weights' type).
    pub embed_scale: Option<f64>,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// Logits pass through `tanh(l / c) · c` (Gemma 2).
    pub final_softcap: Option<f64>,
    /// The distinct RoPEs the blocks use (by index).
    pub ropes: Vec<Rope>,
}

impl Architecture {
    /// Parameters in all (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        self.params.iter().map(ParamInfo::numel).sum()
    }

    /// Every linear layer, blocks first, then the output head.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = self.blocks.iter().flat_map(Block::linears).collect();
        v.extend(self.lm_head.as_ref());
        v
    }

    /// The module names LoRA can target in the blocks, in declaration order (`q_proj`, ...).
    pub fn block_modules(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for l in self.blocks.iter().flat_map(Block::linears) {
            if !names.iter().any(|n| n == l.module()) {
                names.push(l.module().to_string());
            }
        }
        names
    }

    /// The window of each block's attention.
    pub fn windows(&self) -> Vec<Option<usize>> {
        self.blocks.iter().map(|b| b.attn.window).collect()
    }
}

/// Declares parameters in order; layers keep the handles it returns.
#[derive(Debug, Default)]
pub struct ArchBuilder {
    pub params: Vec<ParamInfo>,
}

impl ArchBuilder {
    pub fn matrix(&mut self, name: String, kind: ParamKind, rows: usize, cols: usize) -> P2 {
        self.params.push(ParamInfo {
            name,
            kind,
            shape: vec![rows, cols],
        });
        P2(self.params.len() - 1)
    }

    pub fn vector(&mut self, name: String, kind: ParamKind, n: usize) -> P1 {
        self.params.push(ParamInfo {
            name,
            kind,
            shape: vec![n],
        });
        P1(self.params.len() - 1)
    }

    /// A linear `path` from `d_in` to `d_out`, with a bias if `bias`.
    pub fn linear(&mut self, path: String, d_in: usize, d_out: usize, bias: bool) -> Linear {
        let weight = self.matrix(
            format!("{path}.weight"),
            ParamKind::LinearWeight,
            d_in,
            d_out,
        );
        let bias = bias.then(|| self.vector(format!("{path}.bias"), ParamKind::Bias, d_out));
        Linear {
            path,
            weight,
            bias,
            lora: None,
            d_in,
            d_out,
        }
    }

    /// An RMSNorm `path` over `width`.
    pub fn norm(&mut self, path: String, width: usize, eps: f64, one_plus: bool) -> RmsNorm {
        RmsNorm {
            weight: self.vector(format!("{path}.weight"), ParamKind::Norm, width),
            eps,
            one_plus,
        }
    }

    /// The whole architecture around the blocks: embeddings, final norm, head (untied unless
    /// the config ties it). Declared in Hugging Face's order: embeddings, blocks, norm, head.
    pub fn finish(
        mut self,
        config: ModelConfig,
        embed_tokens: P2,
        blocks: Vec<Block>,
        norm_one_plus: bool,
        ropes: Vec<Rope>,
    ) -> Architecture {
        let d = config.hidden_size;
        let norm = self.norm("model.norm".into(), d, config.rms_norm_eps, norm_one_plus);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| self.linear("lm_head".into(), d, config.vocab_size, false));
        Architecture {
            params: self.params,
            embed_tokens,
            embed_scale: None,
            blocks,
            norm,
            lm_head,
            final_softcap: None,
            ropes,
            config,
        }
    }

    pub fn embedding(&mut self, config: &ModelConfig) -> P2 {
        self.matrix(
            "model.embed_tokens.weight".into(),
            ParamKind::Embedding,
            config.vocab_size,
            config.hidden_size,
        )
    }
}

/// A decoder of Llama-style pre-norm blocks, block `i` built as `blocks[i]` says, with one RoPE
/// (index 0) and untied or tied embeddings as the config says.
pub fn pre_norm_decoder(
    config: &ModelConfig,
    rope: Rope,
    blocks: Vec<PreNormBlock>,
) -> Architecture {
    let mut b = ArchBuilder::default();
    let embed = b.embedding(config);
    let blocks = blocks
        .into_iter()
        .enumerate()
        .map(|(i, o)| pre_norm_block(&mut b, config, i, o))
        .collect();
    b.finish(config.clone(), embed, blocks, false, vec![rope])
}

/// Choices of a Llama-style pre-norm block (Llama, Mistral, Qwen2/3, SmolLM3, Phi-3).
#[derive(Debug, Clone, Copy, Default)]
pub struct PreNormBlock {
    /// Phi-3's `self_attn.qkv_proj` (rows `[q | k | v]`) and `mlp.gate_up_proj` (`[gate | up]`)
    /// instead of one linear each.
    pub fused: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub qk_norm: bool,
    pub rope: Option<usize>,
    pub window: Option<usize>,
}

/// Block `i` with Hugging Face's Llama names: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
/// `input_layernorm`, `post_attention_layernorm` (and `self_attn.{q,k}_norm` when asked, Phi-3's
/// fused `self_attn.qkv_proj` and `mlp.gate_up_proj` when `fused`).
pub fn pre_norm_block(
    b: &mut ArchBuilder,
    config: &ModelConfig,
    i: usize,
    o: PreNormBlock,
) -> Block {
    let p = format!("model.layers.{i}");
    let (d, q, kv, ff) = (
        config.hidden_size,
        config.q_width(),
        config.kv_width(),
        config.intermediate_size,
    );
    let eps = config.rms_norm_eps;
    let qkv = if o.fused {
        QkvProjection::Fused(b.linear(format!("{p}.self_attn.qkv_proj"), d, q + 2 * kv, o.qkv_bias))
    } else {
        QkvProjection::Separate {
            q: b.linear(format!("{p}.self_attn.q_proj"), d, q, o.qkv_bias),
            k: b.linear(format!("{p}.self_attn.k_proj"), d, kv, o.qkv_bias),
            v: b.linear(format!("{p}.self_attn.v_proj"), d, kv, o.qkv_bias),
        }
    };
    let o_proj = b.linear(format!("{p}.self_attn.o_proj"), q, d, o.o_bias);
    let (q_norm, k_norm) = if o.qk_norm {
        (
            Some(b.norm(format!("{p}.self_attn.q_norm"), config.head_dim, eps, false)),
            Some(b.norm(format!("{p}.self_attn.k_norm"), config.head_dim, eps, false)),
        )
    } else {
        (None, None)
    };
    let gate_up = if o.fused {
        GateUpProjection::Fused(b.linear(format!("{p}.mlp.gate_up_proj"), d, 2 * ff, o.mlp_bias))
    } else {
        GateUpProjection::Separate {
            gate: b.linear(format!("{p}.mlp.gate_proj"), d, ff, o.mlp_bias),
            up: b.linear(format!("{p}.mlp.up_proj"), d, ff, o.mlp_bias),
        }
    };
    let down_proj = b.linear(format!("{p}.mlp.down_proj"), ff, d, o.mlp_bias);
    let attn_norm = b.norm(format!("{p}.input_layernorm"), d, eps, false);
    let mlp_norm = b.norm(format!("{p}.post_attention_layernorm"), d, eps, false);
    Block {
        attn_norm,
        attn: Attention {
            qkv,
            o_proj,
            q_norm,
            k_norm,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            scale: 1.0 / (config.head_dim as f64).sqrt(),
            rope: o.rope,
            window: o.window,
            softcap: None,
        },
        attn_out_norm: None,
        mlp_norm,
        mlp: Mlp {
            gate_up,
            down_proj,
            activation: Activation::Silu,
            width: ff,
        },
        mlp_out_norm: None,
    }
}
