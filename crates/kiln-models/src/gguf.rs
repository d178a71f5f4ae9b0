//! GGUF files loaded onto a device; the file reading is `kiln_formats::gguf`.

use crate::{LlamaModel, ModelError};
use burn::prelude::Device;

pub use kiln_formats::gguf::*;

/// Loads the model of a parsed GGUF file onto `device`, de-quantised to f32.
pub fn load_model(file: &GgufFile, device: &Device) -> Result<LlamaModel, ModelError> {
    let config = file.config()?;
    let tensors = file.hf_tensors(&config)?;
    LlamaModel::from_hf_tensors(config, &tensors, device).map_err(|(name, message)| {
        ModelError::Tensor {
            path: file.path.clone(),
            name,
            message,
        }
    })
}
