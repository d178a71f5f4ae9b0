//! The Llama family in GGUF: llama.cpp's `llama` (Llama, Mistral, SmolLM2) and `qwen2`.

use crate::config::ModelConfig;
use crate::family::{GGUF_GLOBAL, GgufNames, gguf_common_config};
use crate::gguf::GgufFile;
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
    if file.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        return Err(
            "Llama 3 RoPE scaling stored as `rope_freqs` is not supported yet (load the Hugging Face directory)"
                .into(),
        );
    }
    m.insert("hidden_act".into(), "silu".into());
    Ok(m)
}

/// Undoes llama.cpp's Q/K permutation: `w.reshape(h, rows/h/2, 2, cols).swapaxes(1, 2)`.
pub fn unpermute_qk(config: &ModelConfig, hf_name: &str, t: &mut HostTensor) {
    let heads = if hf_name.ends_with("self_attn.q_proj.weight")
        || hf_name.ends_with("self_attn.q_proj.bias")
    {
        config.num_attention_heads
    } else if hf_name.ends_with("self_attn.k_proj.weight")
        || hf_name.ends_with("self_attn.k_proj.bias")
    {
        config.num_key_value_heads
    } else {
        return;
    };
    t.data = unpermute(&t.data, &t.shape, heads);
}

pub fn unpermute(data: &[f32], shape: &[usize], heads: usize) -> Vec<f32> {
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
                let src = (h * half * 2 + i * 2 + j) * cols;
                let dst = (h * half * 2 + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}
