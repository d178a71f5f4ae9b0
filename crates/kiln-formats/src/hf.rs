//! Hugging Face model directories: `config.json`, `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, f32/f16/bf16 weights. Architectures: `LlamaForCausalLM`
//! (Llama 2/3, SmolLM, TinyLlama), `MistralForCausalLM` without sliding window, `Qwen2ForCausalLM`.

use crate::ModelError;
use crate::config::{Llama3RopeScaling, LlamaConfig};
use crate::safetensors_io::{self, HostTensor};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// `config.json` as transformers writes it (v4 keys and v5's `rope_parameters` alike).
#[derive(Debug, Deserialize)]
struct HfConfigJson {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    sliding_window: Option<Value>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

fn file_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parses `config.json` text; `path` names it in errors.
pub fn parse_config(text: &str, path: &Path) -> Result<LlamaConfig, ModelError> {
    let c: HfConfigJson = serde_json::from_str(text).map_err(|e| file_err(path, e.to_string()))?;
    let arch = c.architectures.first().cloned().unwrap_or_default();
    let model_type = match (arch.as_str(), c.model_type.as_deref()) {
        ("LlamaForCausalLM", _) | ("", Some("llama")) => "llama",
        ("MistralForCausalLM", _) | ("", Some("mistral")) => "mistral",
        ("Qwen2ForCausalLM", _) | ("", Some("qwen2")) => "qwen2",
        (other, t) => {
            return Err(file_err(
                path,
                format!(
                    "unsupported architecture `{}`: kiln loads LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM",
                    if other.is_empty() {
                        t.unwrap_or("unknown")
                    } else {
                        other
                    }
                ),
            ));
        }
    };
    if let Some(act) = &c.hidden_act
        && act != "silu"
    {
        return Err(file_err(
            path,
            format!("hidden_act `{act}` is not supported (only silu)"),
        ));
    }
    let windowed = match model_type {
        "qwen2" => c.use_sliding_window.unwrap_or(false),
        _ => c.sliding_window.as_ref().is_some_and(|w| !w.is_null()),
    };
    if windowed {
        return Err(file_err(path, "sliding-window attention is not supported"));
    }
    // transformers ≥ 5 folds rope_theta and rope_scaling into rope_parameters.
    let rope = c.rope_parameters.as_ref().or(c.rope_scaling.as_ref());
    let rope_theta = c
        .rope_theta
        .or_else(|| c.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
        .unwrap_or(10000.0);
    let rope_scaling = match rope {
        None => None,
        Some(r) => {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => None,
                "llama3" => {
                    let num = |k: &str| r.get(k).and_then(Value::as_f64);
                    let field = |k: &str| {
                        num(k).ok_or_else(|| {
                            file_err(path, format!("rope scaling `llama3` needs `{k}`"))
                        })
                    };
                    Some(Llama3RopeScaling {
                        factor: field("factor")?,
                        low_freq_factor: field("low_freq_factor")?,
                        high_freq_factor: field("high_freq_factor")?,
                        original_max_position_embeddings: field("original_max_position_embeddings")?
                            as usize,
                    })
                }
                other => {
                    return Err(file_err(
                        path,
                        format!("rope scaling `{other}` is not supported (default and llama3 are)"),
                    ));
                }
            }
        }
    };
    if c.num_attention_heads == 0 || c.hidden_size == 0 {
        return Err(file_err(
            path,
            "num_attention_heads and hidden_size must be positive",
        ));
    }
    let kv = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
    if kv == 0 || !c.num_attention_heads.is_multiple_of(kv) {
        return Err(file_err(
            path,
            format!(
                "num_key_value_heads = {kv} must divide num_attention_heads = {}",
                c.num_attention_heads
            ),
        ));
    }
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
    if !head_dim.is_multiple_of(2) {
        return Err(file_err(
            path,
            format!("head_dim {head_dim} must be even for RoPE"),
        ));
    }
    let config = LlamaConfig {
        model_type: model_type.into(),
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: kv,
        head_dim,
        max_position_embeddings: c.max_position_embeddings,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta,
        rope_scaling,
        // transformers' default differs by family: Llama and Qwen2 untie unless told.
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        qkv_bias: model_type == "qwen2" || c.attention_bias,
        o_bias: model_type != "qwen2" && c.attention_bias,
        mlp_bias: c.mlp_bias,
    };
    config
        .validate()
        .map_err(|(field, message)| file_err(path, format!("`{field}`: {message}")))?;
    Ok(config)
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    parse_config(&text, &path)
}

/// The safetensors files of a model directory: the one file, or the shards the index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(file_err(
            dir,
            format!("no {WEIGHTS_FILE} or {INDEX_FILE} in this directory"),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        path: index.clone(),
        source,
    })?;
    let files = parse_index(&text, &index)?;
    let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(file_err(
            &index,
            format!("shard {} is missing", missing.display()),
        ));
    }
    Ok(paths)
}

/// The shard file names `model.safetensors.index.json` lists, sorted and without repeats; names
/// that would leave the model directory are refused. `path` names the index in errors.
pub fn parse_index(text: &str, path: &Path) -> Result<Vec<String>, ModelError> {
    let v: Value = serde_json::from_str(text).map_err(|e| file_err(path, e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| file_err(path, "no `weight_map` object"))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| file_err(path, format!("weight_map[{tensor}] is not a file name")))?;
        if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(file_err(
                path,
                format!("weight_map[{tensor}] = `{file}` leaves the directory"),
            ));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files)
}

/// All tensors of a model directory as f32 host tensors.
pub fn read_weights(dir: &Path) -> Result<BTreeMap<String, HostTensor>, ModelError> {
    let mut all = BTreeMap::new();
    for file in weight_files(dir)? {
        for (name, t) in safetensors_io::read_all(&file)? {
            if all.insert(name.clone(), t).is_some() {
                return Err(ModelError::Tensor {
                    path: file.clone(),
                    name,
                    message: "appears in more than one shard".into(),
                });
            }
        }
    }
    Ok(all)
}
