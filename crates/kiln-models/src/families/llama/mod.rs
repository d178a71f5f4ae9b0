//! The Llama family: Llama 2/3.x, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2. Pre-norm blocks of
//! grouped-query attention and a SwiGLU MLP; Qwen2 adds q/k/v biases, Mistral an optional
//! sliding window, Llama 3 its RoPE scaling.

mod gguf;

pub use gguf::{permute_qk, unpermute_qk};

use crate::arch::{Architecture, PreNormBlock, pre_norm_decoder};
use crate::config::{FieldError, ModelConfig, opt_bool};
use crate::family::{Family, GgufExport, GgufNames};
use crate::gguf::GgufFile;
use crate::layers::Rope;
use crate::layers::rope::rope_params;
use crate::safetensors_io::HostTensor;
use serde_json::{Map, Value};

pub struct Llama;

const CLASSES: &[(&str, &str)] = &[
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
];

fn class_of(model_type: &str) -> &'static str {
    CLASSES
        .iter()
        .find(|(_, t)| *t == model_type)
        .map_or("LlamaForCausalLM", |(c, _)| c)
}

/// The window of every layer: Mistral's `sliding_window` (all layers); Qwen2's per-layer
/// windows (`use_sliding_window`) are refused.
fn window(config: &ModelConfig) -> Result<Option<usize>, FieldError> {
    match config.model_type.as_str() {
        "qwen2" => {
            if opt_bool(&config.hf, "use_sliding_window")?.unwrap_or(false) {
                return Err((
                    "use_sliding_window".into(),
                    "Qwen2's per-layer sliding window is not supported".into(),
                ));
            }
            Ok(None)
        }
        "mistral" => super::sliding_window(config),
        _ => Ok(None),
    }
}

impl Family for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["llama", "mistral", "qwen2"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["llama", "qwen2"]
    }

    fn config(&self, hf: &Map<String, Value>) -> Result<ModelConfig, FieldError> {
        let model_type = super::model_type_of(hf, CLASSES).unwrap_or("llama");
        let model_type = match model_type {
            "mistral" | "qwen2" => model_type,
            _ => "llama",
        };
        super::require_act(hf, "hidden_act", &["silu"])?;
        // transformers' default differs by family: Llama and Qwen2 untie unless told.
        ModelConfig::from_hf(self.name(), model_type, hf, false)
    }

    fn declare(&self, config: &ModelConfig) -> Result<Architecture, FieldError> {
        let rope = Rope::from_hf(config, rope_params(&config.hf), 10000.0)?;
        let qwen2 = config.model_type == "qwen2";
        let attention_bias = opt_bool(&config.hf, "attention_bias")?.unwrap_or(false);
        let block = PreNormBlock {
            fused: false,
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias: opt_bool(&config.hf, "mlp_bias")?.unwrap_or(false),
            qk_norm: false,
            rope: Some(0),
            window: window(config)?,
        };
        Ok(pre_norm_decoder(
            config,
            rope,
            vec![block; config.num_hidden_layers],
        ))
    }

    fn hf_json(&self, config: &ModelConfig) -> Value {
        let mut m = config.common_json();
        super::set_identity(&mut m, &config.model_type, class_of(&config.model_type));
        m.entry("hidden_act").or_insert("silu".into());
        Value::Object(m)
    }

    fn gguf_config(&self, file: &GgufFile) -> Result<Map<String, Value>, String> {
        gguf::config(file)
    }

    fn gguf_names(&self) -> GgufNames {
        gguf::NAMES
    }

    /// Llama 3.x's `rope_freqs` is read into the config's RoPE parameters, not loaded.
    fn gguf_ignored(&self, gguf_name: &str) -> bool {
        gguf_name == "rope_freqs.weight"
    }

    fn gguf_values_to_hf(&self, config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
        // llama.cpp permutes Q/K rows for the llama-style ("NORM") RoPE only; Qwen2 is NEOX.
        if config.model_type != "qwen2" {
            gguf::unpermute_qk(config, hf_name, t);
        }
    }

    fn gguf_export(&self, config: &ModelConfig) -> Result<GgufExport, String> {
        let arch = self
            .declare(config)
            .map_err(|(f, m)| format!("`{f}`: {m}"))?;
        gguf::export(config, &arch.ropes[0])
    }

    fn hf_values_to_gguf(&self, config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
        if config.model_type != "qwen2" {
            gguf::permute_qk(config, hf_name, t);
        }
    }
}
