//! Hugging Face model directories loaded onto a device; the file reading is `kiln_formats::hf`.

use crate::{LlamaModel, ModelError};
use burn::prelude::Device;
use std::path::Path;

pub use kiln_formats::hf::*;

/// Loads a Hugging Face model directory onto `device`.
pub fn load_model(dir: &Path, device: &Device) -> Result<LlamaModel, ModelError> {
    let config = read_config(dir)?;
    let mut tensors = read_weights(dir)?;
    // Some tied checkpoints still carry lm_head.weight; it is the embedding, ignore it.
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    // Rotary caches some older checkpoints store are recomputed here.
    tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    let expected = config.num_params();
    let found: usize = tensors.values().map(|t| t.data.len()).sum();
    let model =
        LlamaModel::from_hf_tensors(config, &tensors, device).map_err(|(name, message)| {
            ModelError::Tensor {
                path: dir.to_path_buf(),
                name,
                message,
            }
        })?;
    if found != expected {
        let known = crate::params::names(&model);
        let extra: Vec<&String> = tensors
            .keys()
            .filter(|k| !known.contains(*k))
            .take(3)
            .collect();
        return Err(ModelError::Tensor {
            path: dir.to_path_buf(),
            name: extra.first().map(|s| s.to_string()).unwrap_or_default(),
            message: format!("unexpected tensor(s) {extra:?} not used by the architecture"),
        });
    }
    Ok(model)
}
