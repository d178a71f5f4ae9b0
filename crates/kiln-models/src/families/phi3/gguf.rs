//! Phi-3 in GGUF (llama.cpp's `phi3`): fused `attn_qkv` and `ffn_up` (gate and up), LongRoPE's
//! factors as the tensors `rope_factors_long` / `rope_factors_short`.

use crate::arch::Architecture;
use crate::config::ModelConfig;
use crate::family::{GGUF_GLOBAL, GgufExport, GgufNames, gguf_common_config, gguf_common_metadata};
use crate::gguf::GgufFile;
use crate::layers::rope::{Rope, RopeScaling};
use kiln_formats::gguf_write::Meta;
use serde_json::{Map, Value, json};

pub const NAMES: GgufNames = GgufNames {
    global: GGUF_GLOBAL,
    block: &[
        ("attn_qkv", "self_attn.qkv_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_up", "mlp.gate_up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ],
};

pub fn config(file: &GgufFile) -> Result<Map<String, Value>, String> {
    let mut m = gguf_common_config(file, "phi3", false)?;
    super::super::set_identity(&mut m, "phi3", "Phi3ForCausalLM");
    m.insert("hidden_act".into(), "silu".into());
    let get = |k: &str| file.metadata.get(&format!("phi3.{k}"));
    let hidden = m["hidden_size"].as_u64().unwrap_or(0);
    let heads = m["num_attention_heads"].as_u64().unwrap_or(1).max(1);
    let head_dim = m
        .get("head_dim")
        .and_then(Value::as_u64)
        .unwrap_or(hidden / heads);
    let rotary = get("rope.dimension_count")
        .and_then(|v| v.as_u64())
        .unwrap_or(head_dim);
    let mut rope = Map::new();
    rope.insert(
        "rope_theta".into(),
        m.remove("rope_theta").unwrap_or(10000.0.into()),
    );
    if rotary != head_dim && head_dim > 0 {
        rope.insert(
            "partial_rotary_factor".into(),
            (rotary as f64 / head_dim as f64).into(),
        );
    }
    let factors = |name: &str| -> Option<Vec<f32>> {
        let info = file.tensors.iter().find(|t| t.name == name)?;
        Some(file.dequantize(info))
    };
    match (
        factors("rope_factors_long.weight"),
        factors("rope_factors_short.weight"),
    ) {
        (Some(long), Some(short)) => {
            rope.insert("rope_type".into(), "longrope".into());
            rope.insert("long_factor".into(), json!(long));
            rope.insert("short_factor".into(), json!(short));
            let original = get("rope.scaling.original_context_length")
                .and_then(|v| v.as_u64())
                .ok_or("metadata `phi3.rope.scaling.original_context_length` is missing")?;
            rope.insert("original_max_position_embeddings".into(), original.into());
            if let Some(a) = get("rope.scaling.attn_factor").and_then(|v| v.as_f64()) {
                rope.insert("attention_factor".into(), a.into());
            }
            m.insert("original_max_position_embeddings".into(), original.into());
        }
        _ => {
            rope.insert("rope_type".into(), "default".into());
        }
    }
    m.insert("rope_parameters".into(), Value::Object(rope));
    if let Some(w) = get("attention.sliding_window").and_then(|v| v.as_u64())
        && w > 0
    {
        m.insert("sliding_window".into(), w.into());
    }
    Ok(m)
}

/// The header of a Phi-3 model: its partial rotary width, LongRoPE as the factor tensors
/// `rope_factors_long` / `rope_factors_short` with the original context and attention factor,
/// and the sliding window (0 for none, as the converter writes to tell Phi-4 apart).
pub fn export(config: &ModelConfig, arch: &Architecture) -> Result<GgufExport, String> {
    let rope = &arch.ropes[0];
    let plain = Rope {
        scaling: RopeScaling::None,
        ..rope.clone()
    };
    let mut e = gguf_common_metadata("phi3", config, &plain)?;
    let key = |k: &str| format!("phi3.{k}");
    if let RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings,
        attention_factor,
    } = &rope.scaling
    {
        e.metadata.push((
            key("rope.scaling.original_context_length"),
            Meta::U32(*original_max_position_embeddings as u32),
        ));
        e.metadata.push((
            key("rope.scaling.attn_factor"),
            Meta::F32(*attention_factor as f32),
        ));
        for (name, factors) in [("long", long_factor), ("short", short_factor)] {
            let values: Vec<f32> = factors.iter().map(|&f| f as f32).collect();
            let n = values.len() as u64;
            e.extra_tensors
                .push((format!("rope_factors_{name}.weight"), values, vec![n]));
        }
    }
    let window = arch.blocks.iter().find_map(|b| b.attn.window).unwrap_or(0);
    e.metadata
        .push((key("attention.sliding_window"), Meta::U32(window as u32)));
    Ok(e)
}
