//! SmolLM3 (`SmolLM3ForCausalLM`): Llama's block, with RoPE left out of every fourth layer
//! (`no_rope_layers[i] == 0`: layers 3, 7, 11, ...), tied embeddings.

use crate::arch::{Architecture, PreNormBlock, pre_norm_decoder};
use crate::config::{FieldError, ModelConfig, opt_bool, opt_usize};
use crate::families::llama;
use crate::family::{Family, GgufExport, GgufNames};
use crate::gguf::GgufFile;
use crate::layers::Rope;
use crate::layers::rope::rope_params;
use crate::safetensors_io::HostTensor;
use serde_json::{Map, Value};

pub struct SmolLm3;

/// Whether each layer uses RoPE: `no_rope_layers` as given, else every
/// `no_rope_layer_interval`-th layer (default 4) without.
fn uses_rope(config: &ModelConfig) -> Result<Vec<bool>, FieldError> {
    let n = config.num_hidden_layers;
    match config.field("no_rope_layers") {
        Some(Value::Array(list)) => {
            if list.len() != n {
                return Err((
                    "no_rope_layers".into(),
                    format!("has {} entries for {n} layers", list.len()),
                ));
            }
            list.iter()
                .map(|v| match v.as_u64() {
                    Some(0) => Ok(false),
                    Some(1) => Ok(true),
                    _ => Err(("no_rope_layers".into(), "entries must be 0 or 1".into())),
                })
                .collect()
        }
        Some(_) => Err(("no_rope_layers".into(), "must be a list".into())),
        None => {
            let interval = opt_usize(&config.hf, "no_rope_layer_interval")?
                .unwrap_or(4)
                .max(1);
            Ok((0..n).map(|i| (i + 1) % interval != 0).collect())
        }
    }
}

impl Family for SmolLm3 {
    fn name(&self) -> &'static str {
        "smollm3"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["smollm3"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["SmolLM3ForCausalLM"]
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["smollm3"]
    }

    fn config(&self, hf: &Map<String, Value>) -> Result<ModelConfig, FieldError> {
        super::require_act(hf, "hidden_act", &["silu"])?;
        ModelConfig::from_hf(self.name(), "smollm3", hf, true)
    }

    fn declare(&self, config: &ModelConfig) -> Result<Architecture, FieldError> {
        let rope = Rope::from_hf(config, rope_params(&config.hf), 2_000_000.0)?;
        let bias = opt_bool(&config.hf, "attention_bias")?.unwrap_or(false);
        let mlp_bias = opt_bool(&config.hf, "mlp_bias")?.unwrap_or(false);
        // transformers windows a layer only when `use_sliding_window` is on.
        let windows = match opt_bool(&config.hf, "use_sliding_window")?.unwrap_or(false) {
            true => super::layer_windows(config)?,
            false => vec![None; config.num_hidden_layers],
        };
        let blocks = uses_rope(config)?
            .into_iter()
            .zip(windows)
            .map(|(rope, window)| PreNormBlock {
                fused: false,
                qkv_bias: bias,
                o_bias: bias,
                mlp_bias,
                qk_norm: false,
                rope: rope.then_some(0),
                window,
            })
            .collect();
        Ok(pre_norm_decoder(config, rope, blocks))
    }

    fn hf_json(&self, config: &ModelConfig) -> Value {
        let mut m = config.common_json();
        super::set_identity(&mut m, "smollm3", "SmolLM3ForCausalLM");
        m.entry("hidden_act").or_insert("silu".into());
        Value::Object(m)
    }

    fn gguf_config(&self, file: &GgufFile) -> Result<Map<String, Value>, String> {
        let mut m = crate::family::gguf_common_config(file, "smollm3", true)?;
        super::set_identity(&mut m, "smollm3", "SmolLM3ForCausalLM");
        m.insert("hidden_act".into(), "silu".into());
        // llama.cpp fixes the NoPE pattern at every fourth layer (src/models/smollm3.cpp).
        m.insert("no_rope_layer_interval".into(), 4.into());
        Ok(m)
    }

    fn gguf_names(&self) -> GgufNames {
        llama::Llama.gguf_names()
    }

    fn gguf_values_to_hf(&self, config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
        // llama.cpp's converter treats SmolLM3 as Llama: Q/K rows permuted for NORM RoPE.
        llama::unpermute_qk(config, hf_name, t);
    }

    /// llama.cpp's smollm3 skips RoPE on every fourth layer and attends over every position:
    /// another NoPE pattern or a sliding window would compute something else, so it is refused.
    fn gguf_export(&self, config: &ModelConfig) -> Result<GgufExport, String> {
        let arch = self
            .declare(config)
            .map_err(|(f, m)| format!("`{f}`: {m}"))?;
        let every_fourth = arch
            .blocks
            .iter()
            .enumerate()
            .all(|(i, b)| b.attn.rope.is_some() == ((i + 1) % 4 != 0));
        if !every_fourth {
            return Err(
                "llama.cpp's smollm3 skips RoPE on every fourth layer; this model's \
                        no_rope_layers differ"
                    .into(),
            );
        }
        if arch.windows().iter().any(Option::is_some) {
            return Err("llama.cpp's smollm3 has no sliding-window layers; this model has".into());
        }
        crate::family::gguf_common_metadata("smollm3", config, &arch.ropes[0])
    }

    fn hf_values_to_gguf(&self, config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
        llama::permute_qk(config, hf_name, t);
    }
}
