//! Hugging Face model directories loaded onto a device: the files are read by
//! `kiln_formats::hf`; the family `config.json` names decides what they mean.

use crate::ModelError;
use crate::config::ModelConfig;
use crate::family::config_from_hf;
use crate::model::{HostParam, Model};
use crate::quant::BaseQuant;
use burn::prelude::Device;
use serde_json::{Map, Value};
use std::path::Path;

pub use kiln_formats::hf::*;

fn file_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parses `config.json` text; `path` names it in errors.
pub fn parse_config(text: &str, path: &Path) -> Result<ModelConfig, ModelError> {
    let hf: Map<String, Value> =
        serde_json::from_str(text).map_err(|e| file_err(path, e.to_string()))?;
    config_from_hf(&hf).map_err(|(field, message)| file_err(path, format!("`{field}`: {message}")))
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    parse_config(&text, &path)
}

/// Loads a Hugging Face model directory onto `device`.
pub fn load_model(dir: &Path, device: &Device) -> Result<Model, ModelError> {
    load_model_held(dir, device, BaseQuant::None)
}

/// Loads a Hugging Face model directory onto `device`, each matrix quantized as it is read
/// when `quant` asks for a type (the f32 model is never held whole). `Keep` is for GGUF files.
pub fn load_model_held(dir: &Path, device: &Device, quant: BaseQuant) -> Result<Model, ModelError> {
    let config = read_config(dir)?;
    if quant == BaseQuant::Keep {
        return Err(file_err(
            dir,
            "base_quant: keep holds a GGUF file's own blocks, and this is a Hugging Face \
             directory: quantize it as it loads with base_quant: q8_0, q4_0 or q4_k",
        ));
    }
    let family = config.family();
    let arch = config.declare().map_err(|(field, message)| {
        file_err(&dir.join(CONFIG_FILE), format!("`{field}`: {message}"))
    })?;
    let kinds: std::collections::BTreeMap<String, crate::params::ParamKind> = arch
        .params
        .iter()
        .map(|p| (p.name.clone(), p.kind))
        .collect();
    let mut tensors = std::collections::BTreeMap::new();
    for file in weight_files(dir)? {
        crate::safetensors_io::read_each(&file, &mut |name, t| {
            let Some(name) = family.hf_tensor_name(&name) else {
                return Ok(());
            };
            // Some tied checkpoints still carry lm_head.weight; it is the embedding, ignore
            // it. Rotary caches some older checkpoints store are recomputed here.
            if (config.tie_word_embeddings && name == "lm_head.weight")
                || name.ends_with("rotary_emb.inv_freq")
            {
                return Ok(());
            }
            let held = match kinds.get(&name) {
                Some(&k) if crate::quant::holdable(k) => crate::quant::hold_dense(t, quant),
                _ => HostParam::Dense(t),
            };
            if tensors.insert(name.clone(), held).is_some() {
                return Err(ModelError::Tensor {
                    path: file.clone(),
                    name,
                    message: "appears in more than one shard".into(),
                });
            }
            Ok(())
        })?;
    }
    Model::from_host_params(arch, tensors, device).map_err(|(name, message)| ModelError::Tensor {
        path: dir.to_path_buf(),
        name,
        message,
    })
}
