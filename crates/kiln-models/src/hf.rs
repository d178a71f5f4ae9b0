//! Hugging Face model directories loaded onto a device: the files are read by
//! `kiln_formats::hf`; the family `config.json` names decides what they mean.

use crate::ModelError;
use crate::config::ModelConfig;
use crate::family::config_from_hf;
use crate::model::Model;
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
    let config = read_config(dir)?;
    let family = config.family();
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in read_weights(dir)? {
        if let Some(name) = family.hf_tensor_name(&name) {
            tensors.insert(name, t);
        }
    }
    // Some tied checkpoints still carry lm_head.weight; it is the embedding, ignore it.
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    // Rotary caches some older checkpoints store are recomputed here.
    tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    let arch = config.declare().map_err(|(field, message)| {
        file_err(&dir.join(CONFIG_FILE), format!("`{field}`: {message}"))
    })?;
    Model::from_hf_tensors(arch, tensors, device).map_err(|(name, message)| ModelError::Tensor {
        path: dir.to_path_buf(),
        name,
        message,
    })
}
