//! Phi-3, Phi-3.5 and Phi-4-mini (`Phi3ForCausalLM`): Llama's pre-norm block with the q/k/v
//! projections fused into `qkv_proj` (rows `[q | k | v]`) and gate/up into `gate_up_proj`
//! (`[gate | up]`), LongRoPE, RoPE over the first `partial_rotary_factor` of each head, and an
//! optional sliding window. LoRA targets are the fused names, as PEFT sees them.

mod gguf;

use crate::arch::{Architecture, PreNormBlock, pre_norm_decoder};
use crate::config::{FieldError, ModelConfig};
use crate::family::{Family, GgufExport, GgufNames};
use crate::gguf::GgufFile;
use crate::layers::Rope;
use crate::layers::rope::rope_params;
use serde_json::{Map, Value};

pub struct Phi3;

impl Family for Phi3 {
    fn name(&self) -> &'static str {
        "phi3"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["phi3"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["Phi3ForCausalLM"]
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["phi3"]
    }

    fn config(&self, hf: &Map<String, Value>) -> Result<ModelConfig, FieldError> {
        super::require_act(hf, "hidden_act", &["silu"])?;
        ModelConfig::from_hf(self.name(), "phi3", hf, false)
    }

    fn declare(&self, config: &ModelConfig) -> Result<Architecture, FieldError> {
        let rope = Rope::from_hf(config, rope_params(&config.hf), 10000.0)?;
        let window = super::sliding_window(config)?;
        let block = PreNormBlock {
            fused: true,
            rope: Some(0),
            window,
            ..PreNormBlock::default()
        };
        Ok(pre_norm_decoder(
            config,
            rope,
            vec![block; config.num_hidden_layers],
        ))
    }

    fn hf_json(&self, config: &ModelConfig) -> Value {
        let mut m = config.common_json();
        super::set_identity(&mut m, "phi3", "Phi3ForCausalLM");
        m.entry("hidden_act").or_insert("silu".into());
        Value::Object(m)
    }

    fn gguf_config(&self, file: &GgufFile) -> Result<Map<String, Value>, String> {
        gguf::config(file)
    }

    fn gguf_names(&self) -> GgufNames {
        gguf::NAMES
    }

    fn gguf_ignored(&self, gguf_name: &str) -> bool {
        gguf_name.starts_with("rope_factors_")
    }

    fn gguf_export(&self, config: &ModelConfig) -> Result<GgufExport, String> {
        let arch = self
            .declare(config)
            .map_err(|(f, m)| format!("`{f}`: {m}"))?;
        gguf::export(config, &arch)
    }
}
