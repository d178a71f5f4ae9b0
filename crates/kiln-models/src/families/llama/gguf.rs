//! The Llama family in GGUF: llama.cpp's `llama` (Llama, Mistral, SmolLM2) and `qwen2`.

use crate::config::ModelConfig;
use crate::family::{GGUF_GLOBAL, GgufExport, GgufNames, gguf_common_config, gguf_common_metadata};
use crate::gguf::GgufFile;
use crate::layers::rope::{Rope, RopeScaling};
use crate::safetensors_io::HostTensor;
use serde_json::{Map, Value};

pub const NAMES: GgufNames = GgufNames {
    global: GGUF_GLOBAL,
    block: &[
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ],
};

pub fn config(file: &GgufFile) -> Result<Map<String, Value>, String> {
    let arch = file.architecture();
    let mut m = gguf_common_config(file, arch, true)?;
    let has = |suffix: &str| file.tensors.iter().any(|t| t.name.ends_with(suffix));
    if arch == "qwen2" {
        super::super::set_identity(&mut m, "qwen2", "Qwen2ForCausalLM");
    } else {
        super::super::set_identity(&mut m, "llama", "LlamaForCausalLM");
        m.insert("attention_bias".into(), has("attn_q.bias").into());
    }
    if let Some(info) = file.tensors.iter().find(|t| t.name == "rope_freqs.weight") {
        llama3_rope(&mut m, file, &file.dequantize(info))?;
    }
    m.insert("hidden_act".into(), "silu".into());
    Ok(m)
}

/// Llama 3.x's RoPE scaling, which llama.cpp stores as the per-frequency divisors `rope_freqs`
/// rather than as parameters: the parameters that reproduce them go into `rope_parameters`.
fn llama3_rope(
    m: &mut Map<String, Value>,
    file: &GgufFile,
    divisors: &[f32],
) -> Result<(), String> {
    let theta = m
        .get("rope_theta")
        .and_then(Value::as_f64)
        .unwrap_or(10000.0);
    let hidden = m.get("hidden_size").and_then(Value::as_u64).unwrap_or(0);
    let heads = m
        .get("num_attention_heads")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1);
    let head_dim = m
        .get("head_dim")
        .and_then(Value::as_u64)
        .unwrap_or(hidden / heads);
    let dim = file
        .metadata
        .get(&format!("{}.rope.dimension_count", file.architecture()))
        .and_then(|v| v.as_u64())
        .unwrap_or(head_dim) as usize;
    match Rope::llama3_from_divisors(theta, dim, divisors) {
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            m.remove("rope_theta");
            m.insert(
                "rope_parameters".into(),
                serde_json::json!({
                    "rope_type": "llama3",
                    "rope_theta": theta,
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                }),
            );
            Ok(())
        }
        Some(_) => Ok(()),
        None => Err(format!(
            "tensor `rope_freqs.weight` ({} divisors) matches Llama 3's RoPE scaling for no \
             parameters (load the Hugging Face directory)",
            divisors.len()
        )),
    }
}

/// The header of a Llama-family model in GGUF: `llama` (Llama, Mistral, SmolLM2) or `qwen2`.
pub fn export(config: &ModelConfig, rope: &Rope) -> Result<GgufExport, String> {
    let arch = if config.model_type == "qwen2" {
        "qwen2"
    } else {
        "llama"
    };
    gguf_common_metadata(arch, config, rope)
}

/// llama.cpp's Q/K permutation (`convert_hf_to_gguf.py`'s `LlamaModel.permute`): each head's
/// rotate-half pairs `(i, i + d/2)` become adjacent rows, as its interleaved RoPE reads them.
pub fn permute_qk(config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
    if let Some(heads) = qk_heads(config, hf_name) {
        t.data = reorder_rows(&t.data, &t.shape, heads, true);
    }
}

fn qk_heads(config: &ModelConfig, hf_name: &str) -> Option<usize> {
    if hf_name.ends_with("self_attn.q_proj.weight") || hf_name.ends_with("self_attn.q_proj.bias") {
        Some(config.num_attention_heads)
    } else if hf_name.ends_with("self_attn.k_proj.weight")
        || hf_name.ends_with("self_attn.k_proj.bias")
    {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's Q/K permutation: `w.reshape(h, rows/h/2, 2, cols).swapaxes(1, 2)`.
pub fn unpermute_qk(config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
    if let Some(heads) = qk_heads(config, hf_name) {
        t.data = reorder_rows(&t.data, &t.shape, heads, false);
    }
}

/// Row `(h, i, j)` of the permuted layout `[heads, d/2, 2]` is row `(h, j, i)` of HF's
/// `[heads, 2, d/2]`; `to_gguf` says which way the rows move.
fn reorder_rows(data: &[f32], shape: &[usize], heads: usize, to_gguf: bool) -> Vec<f32> {
    let (rows, cols) = (shape[0], shape.get(1).copied().unwrap_or(1));
    if heads == 0 || !rows.is_multiple_of(heads * 2) || data.len() != rows * cols {
        return data.to_vec();
    }
    let half = rows / heads / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                // source row (h, i, j) in the permuted layout goes to (h, j, i)
                let permuted = (h * half * 2 + i * 2 + j) * cols;
                let hf = (h * half * 2 + j * half + i) * cols;
                let (src, dst) = if to_gguf {
                    (hf, permuted)
                } else {
                    (permuted, hf)
                };
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}
