//! Qwen3 dense (`Qwen3ForCausalLM`): Llama's block with an RMSNorm over each head's queries
//! and keys before RoPE, `head_dim` from the config, no biases unless `attention_bias`, and
//! sliding-window layers where `layer_types` says so.

use crate::arch::{Architecture, PreNormBlock, pre_norm_decoder};
use crate::config::{FieldError, ModelConfig, opt_bool};
use crate::family::{
    Family, GGUF_GLOBAL, GgufExport, GgufNames, gguf_common_config, gguf_common_metadata,
};
use crate::gguf::GgufFile;
use crate::layers::Rope;
use crate::layers::rope::rope_params;
use serde_json::{Map, Value};

pub struct Qwen3;

const NAMES: GgufNames = GgufNames {
    global: GGUF_GLOBAL,
    block: &[
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ],
};

impl Family for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen3"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["Qwen3ForCausalLM"]
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["qwen3"]
    }

    fn config(&self, hf: &Map<String, Value>) -> Result<ModelConfig, FieldError> {
        super::require_act(hf, "hidden_act", &["silu"])?;
        ModelConfig::from_hf(self.name(), "qwen3", hf, false)
    }

    fn declare(&self, config: &ModelConfig) -> Result<Architecture, FieldError> {
        let rope = Rope::from_hf(config, rope_params(&config.hf), 1_000_000.0)?;
        let bias = opt_bool(&config.hf, "attention_bias")?.unwrap_or(false);
        let blocks = super::layer_windows(config)?
            .into_iter()
            .map(|window| PreNormBlock {
                fused: false,
                qkv_bias: bias,
                o_bias: bias,
                mlp_bias: false,
                qk_norm: true,
                rope: Some(0),
                window,
            })
            .collect();
        Ok(pre_norm_decoder(config, rope, blocks))
    }

    fn hf_json(&self, config: &ModelConfig) -> Value {
        let mut m = config.common_json();
        super::set_identity(&mut m, "qwen3", "Qwen3ForCausalLM");
        m.entry("hidden_act").or_insert("silu".into());
        Value::Object(m)
    }

    fn gguf_config(&self, file: &GgufFile) -> Result<Map<String, Value>, String> {
        let mut m = gguf_common_config(file, "qwen3", true)?;
        super::set_identity(&mut m, "qwen3", "Qwen3ForCausalLM");
        m.insert("hidden_act".into(), "silu".into());
        m.insert(
            "attention_bias".into(),
            file.tensors
                .iter()
                .any(|t| t.name.ends_with("attn_q.bias"))
                .into(),
        );
        Ok(m)
    }

    fn gguf_names(&self) -> GgufNames {
        NAMES
    }

    /// llama.cpp's `qwen3` attends over every position: a model with sliding-window layers
    /// would compute something else there, so it is refused.
    fn gguf_export(&self, config: &ModelConfig) -> Result<GgufExport, String> {
        let arch = self
            .declare(config)
            .map_err(|(f, m)| format!("`{f}`: {m}"))?;
        if arch.windows().iter().any(Option::is_some) {
            return Err("llama.cpp's qwen3 has no sliding-window layers; this model has".into());
        }
        gguf_common_metadata("qwen3", config, &arch.ropes[0])
    }
}
