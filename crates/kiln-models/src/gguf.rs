//! GGUF files loaded onto a device: the container is `kiln_formats::gguf`; the family that
//! `general.architecture` names gives the config, the tensor names and their layout.

use crate::ModelError;
use crate::config::ModelConfig;
use crate::family::{Family, config_from_hf};
use crate::model::Model;
use crate::registry;
use crate::safetensors_io::HostTensor;
use burn::prelude::Device;
use std::collections::BTreeMap;

pub use kiln_formats::gguf::*;

fn file_err(file: &GgufFile, message: impl Into<String>) -> ModelError {
    ModelError::File {
        path: file.path.clone(),
        message: message.into(),
    }
}

/// The family and model config of a GGUF file, from its metadata.
pub fn read_config(file: &GgufFile) -> Result<(&'static dyn Family, ModelConfig), ModelError> {
    if !file.metadata.contains_key("general.architecture") {
        return Err(file_err(file, "metadata `general.architecture` is missing"));
    }
    let family = registry::for_gguf(file.architecture()).map_err(|m| file_err(file, m))?;
    let hf = family.gguf_config(file).map_err(|m| file_err(file, m))?;
    let config = config_from_hf(&hf).map_err(|(field, message)| {
        file_err(file, format!("metadata gives `{field}` {message}"))
    })?;
    Ok((family, config))
}

/// Every tensor de-quantised to f32, renamed to Hugging Face's names, in HF layout.
pub fn hf_tensors(
    file: &GgufFile,
    family: &dyn Family,
    config: &ModelConfig,
) -> Result<BTreeMap<String, HostTensor>, ModelError> {
    let names = family.gguf_names();
    let mut out = BTreeMap::new();
    for info in &file.tensors {
        if family.gguf_ignored(&info.name) {
            continue;
        }
        let name = names.to_hf(&info.name).ok_or_else(|| ModelError::Tensor {
            path: file.path.clone(),
            name: info.name.clone(),
            message: format!("not a tensor of the {} architecture", file.architecture()),
        })?;
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let mut t = HostTensor {
            shape,
            data: file.dequantize(info),
        };
        family.gguf_values_to_hf(config, &name, &mut t);
        out.insert(name, t);
    }
    Ok(out)
}

/// Loads the model of a parsed GGUF file onto `device`, de-quantised to f32.
pub fn load_model(file: &GgufFile, device: &Device) -> Result<Model, ModelError> {
    let (family, config) = read_config(file)?;
    let tensors = hf_tensors(file, family, &config)?;
    let arch = config
        .declare()
        .map_err(|(field, message)| file_err(file, format!("`{field}`: {message}")))?;
    Model::from_hf_tensors(arch, tensors, device).map_err(|(name, message)| ModelError::Tensor {
        path: file.path.clone(),
        name,
        message,
    })
}
