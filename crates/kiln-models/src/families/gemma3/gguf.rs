//! Gemma 3 in GGUF (llama.cpp's `gemma3`).

use crate::arch::Architecture;
use crate::config::ModelConfig;
use crate::family::{GGUF_GLOBAL, GgufExport, GgufNames, gguf_common_config, gguf_common_metadata};
use crate::gguf::GgufFile;
use kiln_formats::gguf_write::Meta;
use serde_json::{Map, Value, json};

pub const NAMES: GgufNames = GgufNames {
    global: GGUF_GLOBAL,
    block: &[
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("post_attention_norm", "post_attention_layernorm"),
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
    ],
};

pub fn config(file: &GgufFile) -> Result<Map<String, Value>, String> {
    let mut m = gguf_common_config(file, "gemma3", false)?;
    super::super::set_identity(&mut m, "gemma3_text", "Gemma3ForCausalLM");
    m.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    let get = |k: &str| file.metadata.get(&format!("gemma3.{k}"));
    let head_dim = m
        .get("head_dim")
        .and_then(Value::as_u64)
        .ok_or("metadata `gemma3.attention.key_length` is missing")?;
    // llama.cpp scales scores by head_dim^-0.5 (src/models/gemma3.cpp; 27B aside).
    m.insert("query_pre_attn_scalar".into(), head_dim.into());
    let n = m["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    match get("attention.sliding_window").and_then(|v| v.as_u64()) {
        Some(w) if w > 0 => {
            m.insert("sliding_window".into(), w.into());
            // llama.cpp's `sliding_window_pattern`: one flag per layer, or a period (default 6:
            // every sixth layer global).
            let pattern = get("attention.sliding_window_pattern");
            let sliding: Vec<bool> = match pattern.and_then(|v| v.as_array()) {
                Some(flags) if flags.len() == n => flags
                    .iter()
                    .map(|f| matches!(f, crate::gguf::Value::Bool(true)))
                    .collect(),
                Some(_) => {
                    return Err(format!(
                        "metadata `gemma3.attention.sliding_window_pattern` must have {n} entries"
                    ));
                }
                None => {
                    let period = pattern.and_then(|v| v.as_u64()).unwrap_or(6).max(1) as usize;
                    (0..n).map(|i| (i + 1) % period != 0).collect()
                }
            };
            let types: Vec<&str> = sliding
                .iter()
                .map(|&s| {
                    if s {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            m.insert("layer_types".into(), json!(types));
        }
        _ => {
            m.insert("layer_types".into(), json!(vec!["full_attention"; n]));
        }
    }
    let global_theta = m.remove("rope_theta").unwrap_or(1_000_000.0.into());
    let mut full = json!({"rope_type": "default", "rope_theta": global_theta});
    if get("rope.scaling.type").and_then(|v| v.as_str()) == Some("linear")
        && let Some(f) = get("rope.scaling.factor").and_then(|v| v.as_f64())
    {
        full = json!({"rope_type": "linear", "factor": f, "rope_theta": global_theta});
    }
    let local_theta = get("rope.freq_base_swa")
        .and_then(|v| v.as_f64())
        .unwrap_or(10_000.0);
    m.insert(
        "rope_parameters".into(),
        json!({"full_attention": full,
               "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}),
    );
    if let Some(c) = get("final_logit_softcapping").and_then(|v| v.as_f64()) {
        m.insert("final_logit_softcapping".into(), c.into());
    }
    Ok(m)
}

/// The header of a Gemma 3 model: the global layers' RoPE (and its linear factor), the local
/// layers' base, the window and which layers slide. llama.cpp scales scores by head_dim^-0.5
/// (hidden / heads for its 27B), so a `query_pre_attn_scalar` it would not use is refused.
pub fn export(
    config: &ModelConfig,
    arch: &Architecture,
    sliding: &[bool],
) -> Result<GgufExport, String> {
    let block = arch.blocks.first().ok_or("the model has no layers")?;
    let scale = block.attn.scale;
    let expected = if config.num_hidden_layers == 62 {
        (config.hidden_size / config.num_attention_heads.max(1)) as f64
    } else {
        config.head_dim as f64
    };
    if (scale - 1.0 / expected.sqrt()).abs() > 1e-6 * scale {
        return Err(format!(
            "llama.cpp scales Gemma 3's attention by 1/sqrt({expected}); this model's \
             query_pre_attn_scalar differs"
        ));
    }
    if block.attn.softcap.is_some() {
        return Err("llama.cpp's gemma3 has no attention logit softcapping".into());
    }
    let mut e = gguf_common_metadata("gemma3", config, &arch.ropes[0])?;
    let key = |k: &str| format!("gemma3.{k}");
    e.metadata
        .retain(|(k, _)| !k.ends_with("key_length") && !k.ends_with("value_length"));
    e.metadata.push((
        key("attention.key_length"),
        Meta::U32(config.head_dim as u32),
    ));
    e.metadata.push((
        key("attention.value_length"),
        Meta::U32(config.head_dim as u32),
    ));
    if let Some(local) = arch.ropes.get(1) {
        e.metadata
            .push((key("rope.freq_base_swa"), Meta::F32(local.theta as f32)));
    }
    if let Some(window) = arch.blocks.iter().find_map(|b| b.attn.window) {
        e.metadata
            .push((key("attention.sliding_window"), Meta::U32(window as u32)));
        e.metadata.push((
            key("attention.sliding_window_pattern"),
            Meta::BoolArray(sliding.to_vec()),
        ));
    }
    if let Some(c) = arch.final_softcap {
        e.metadata
            .push((key("final_logit_softcapping"), Meta::F32(c as f32)));
    }
    Ok(e)
}
