//! Gemma 3 text (`Gemma3ForCausalLM`, and the language model inside
//! `Gemma3ForConditionalGeneration` checkpoints). Against Llama: (1+w) RMSNorms before and after
//! both attention and MLP, (1+w) q/k norms, a GELU(tanh) MLP, embeddings × √hidden, scores scaled
//! by `query_pre_attn_scalar^-0.5`, five sliding-window layers (local RoPE base) to one global
//! (global RoPE base and scaling), tied embeddings.

mod gguf;

use crate::arch::{ArchBuilder, Architecture};
use crate::config::{FieldError, ModelConfig, opt_bool, opt_f64, opt_usize};
use crate::family::{Family, GgufExport, GgufNames};
use crate::gguf::GgufFile;
use crate::layers::{Activation, Attention, Block, GateUpProjection, Mlp, QkvProjection, Rope};
use crate::safetensors_io::HostTensor;
use serde_json::{Map, Value};

pub struct Gemma3;

/// Whether each layer is a sliding-window one: `layer_types`, else every layer but each
/// `sliding_window_pattern`-th (default 6).
fn sliding_layers(config: &ModelConfig) -> Result<Vec<bool>, FieldError> {
    let n = config.num_hidden_layers;
    match config.field("layer_types") {
        Some(Value::Array(list)) => {
            if list.len() != n {
                return Err((
                    "layer_types".into(),
                    format!("has {} entries for {n} layers", list.len()),
                ));
            }
            list.iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err((
                        "layer_types".into(),
                        "entries must be sliding_attention or full_attention".into(),
                    )),
                })
                .collect()
        }
        Some(_) => Err(("layer_types".into(), "must be a list".into())),
        None => {
            let pattern = opt_usize(&config.hf, "sliding_window_pattern")?
                .unwrap_or(6)
                .max(1);
            Ok((0..n).map(|i| (i + 1) % pattern != 0).collect())
        }
    }
}

/// The RoPE of global and of local layers: v5's `rope_parameters` per layer type, or v4's
/// `rope_theta` + `rope_scaling` (global) and `rope_local_base_freq` (local).
fn ropes(config: &ModelConfig) -> Result<(Rope, Rope), FieldError> {
    let hf = &config.hf;
    let per_type = hf.get("rope_parameters").and_then(Value::as_object);
    let of = |t: &str| per_type.and_then(|p| p.get(t)).and_then(Value::as_object);
    match (of("full_attention"), of("sliding_attention")) {
        (Some(full), Some(local)) => Ok((
            Rope::from_hf(config, Some(full), 1_000_000.0)?,
            Rope::from_hf(config, Some(local), 10_000.0)?,
        )),
        _ => {
            let global = Rope::from_hf(
                config,
                hf.get("rope_scaling").and_then(Value::as_object),
                1_000_000.0,
            )?;
            let mut local_params = Map::new();
            local_params.insert(
                "rope_theta".into(),
                opt_f64(hf, "rope_local_base_freq")?
                    .unwrap_or(10_000.0)
                    .into(),
            );
            let local = Rope::from_hf(config, Some(&local_params), 10_000.0)?;
            Ok((global, local))
        }
    }
}

/// The text config of a `config.json`: itself, or a multimodal checkpoint's `text_config`.
fn text_config(hf: &Map<String, Value>) -> Map<String, Value> {
    match hf.get("text_config").and_then(Value::as_object) {
        Some(text) => {
            let mut t = text.clone();
            super::set_identity(&mut t, "gemma3_text", "Gemma3ForCausalLM");
            // The multimodal config keeps the tie at the top level.
            if let Some(tie) = hf.get("tie_word_embeddings") {
                t.entry("tie_word_embeddings").or_insert(tie.clone());
            }
            t
        }
        None => hf.clone(),
    }
}

impl Family for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["gemma3_text", "gemma3"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"]
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["gemma3"]
    }

    fn config(&self, hf: &Map<String, Value>) -> Result<ModelConfig, FieldError> {
        let mut hf = text_config(hf);
        super::require_act(
            &hf,
            "hidden_activation",
            &["gelu_pytorch_tanh", "gelu_tanh"],
        )?;
        if opt_bool(&hf, "use_bidirectional_attention")?.unwrap_or(false) {
            return Err((
                "use_bidirectional_attention".into(),
                "bidirectional Gemma (embedding models) is not a causal decoder".into(),
            ));
        }
        // Gemma3TextConfig's own default head width.
        hf.entry("head_dim").or_insert(256.into());
        ModelConfig::from_hf(self.name(), "gemma3_text", &hf, true)
    }

    fn declare(&self, config: &ModelConfig) -> Result<Architecture, FieldError> {
        let hf = &config.hf;
        let (global, local) = ropes(config)?;
        let window = opt_usize(hf, "sliding_window")?.unwrap_or(4096);
        if window == 0 {
            return Err(("sliding_window".into(), "must be positive".into()));
        }
        let scalar = opt_f64(hf, "query_pre_attn_scalar")?.unwrap_or(256.0);
        if scalar <= 0.0 {
            return Err(("query_pre_attn_scalar".into(), "must be positive".into()));
        }
        let softcap = |key: &str| -> Result<Option<f64>, FieldError> {
            match opt_f64(hf, key)? {
                Some(c) if c <= 0.0 => Err((key.into(), "must be positive".into())),
                c => Ok(c),
            }
        };
        let attn_softcap = softcap("attn_logit_softcapping")?;
        let final_softcap = softcap("final_logit_softcapping")?;
        let bias = opt_bool(hf, "attention_bias")?.unwrap_or(false);
        let (d, q, kv, ff, hd) = (
            config.hidden_size,
            config.q_width(),
            config.kv_width(),
            config.intermediate_size,
            config.head_dim,
        );
        let eps = config.rms_norm_eps;
        let mut b = ArchBuilder::default();
        let embed = b.embedding(config);
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for (i, sliding) in sliding_layers(config)?.into_iter().enumerate() {
            let p = format!("model.layers.{i}");
            let qkv = QkvProjection::Separate {
                q: b.linear(format!("{p}.self_attn.q_proj"), d, q, bias),
                k: b.linear(format!("{p}.self_attn.k_proj"), d, kv, bias),
                v: b.linear(format!("{p}.self_attn.v_proj"), d, kv, bias),
            };
            let o_proj = b.linear(format!("{p}.self_attn.o_proj"), q, d, bias);
            let q_norm = b.norm(format!("{p}.self_attn.q_norm"), hd, eps, true);
            let k_norm = b.norm(format!("{p}.self_attn.k_norm"), hd, eps, true);
            let gate_up = GateUpProjection::Separate {
                gate: b.linear(format!("{p}.mlp.gate_proj"), d, ff, false),
                up: b.linear(format!("{p}.mlp.up_proj"), d, ff, false),
            };
            let down_proj = b.linear(format!("{p}.mlp.down_proj"), ff, d, false);
            let mut norm = |name: &str| b.norm(format!("{p}.{name}"), d, eps, true);
            blocks.push(Block {
                attn_norm: norm("input_layernorm"),
                attn_out_norm: Some(norm("post_attention_layernorm")),
                mlp_norm: norm("pre_feedforward_layernorm"),
                mlp_out_norm: Some(norm("post_feedforward_layernorm")),
                attn: Attention {
                    qkv,
                    o_proj,
                    q_norm: Some(q_norm),
                    k_norm: Some(k_norm),
                    heads: config.num_attention_heads,
                    kv_heads: config.num_key_value_heads,
                    head_dim: hd,
                    scale: 1.0 / scalar.sqrt(),
                    rope: Some(if sliding { 1 } else { 0 }),
                    window: sliding.then_some(window),
                    softcap: attn_softcap,
                },
                mlp: Mlp {
                    gate_up,
                    down_proj,
                    activation: Activation::GeluTanh,
                    width: ff,
                },
            });
        }
        let mut arch = b.finish(config.clone(), embed, blocks, true, vec![global, local]);
        // transformers keeps the scale as an f32 tensor cast to the weights' type.
        arch.embed_scale = Some((d as f64).sqrt() as f32 as f64);
        arch.final_softcap = final_softcap;
        Ok(arch)
    }

    fn hf_json(&self, config: &ModelConfig) -> Value {
        let mut m = config.common_json();
        super::set_identity(&mut m, "gemma3_text", "Gemma3ForCausalLM");
        m.entry("hidden_activation")
            .or_insert("gelu_pytorch_tanh".into());
        Value::Object(m)
    }

    fn hf_tensor_name(&self, name: &str) -> Option<String> {
        // Multimodal checkpoints: `model.language_model.*` (transformers ≥ 4.52) or
        // `language_model.model.*`; the vision tower and projector are not the decoder's.
        if let Some(rest) = name.strip_prefix("model.language_model.") {
            return Some(format!("model.{rest}"));
        }
        if let Some(rest) = name.strip_prefix("language_model.") {
            return Some(rest.to_string());
        }
        if name.contains("vision_tower") || name.contains("multi_modal_projector") {
            return None;
        }
        Some(name.to_string())
    }

    fn gguf_config(&self, file: &GgufFile) -> Result<Map<String, Value>, String> {
        gguf::config(file)
    }

    fn gguf_names(&self) -> GgufNames {
        gguf::NAMES
    }

    fn gguf_values_to_hf(&self, _config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
        // llama.cpp's converter folds Gemma's +1 into every norm weight; kiln keeps HF's.
        if hf_name.ends_with("norm.weight") {
            t.data.iter_mut().for_each(|v| *v -= 1.0);
        }
    }

    fn gguf_export(&self, config: &ModelConfig) -> Result<GgufExport, String> {
        let arch = self
            .declare(config)
            .map_err(|(f, m)| format!("`{f}`: {m}"))?;
        gguf::export(
            config,
            &arch,
            &sliding_layers(config).map_err(|(f, m)| format!("`{f}`: {m}"))?,
        )
    }

    fn hf_values_to_gguf(&self, _config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
        if hf_name.ends_with("norm.weight") {
            t.data.iter_mut().for_each(|v| *v += 1.0);
        }
    }
}
