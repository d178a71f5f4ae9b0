//! GGUF files loaded onto a device: the container is `kiln_formats::gguf`; the family that
//! `general.architecture` names gives the config, the tensor names and their layout.

use crate::ModelError;
use crate::config::ModelConfig;
use crate::family::{Family, config_from_hf};
use crate::model::{HostParam, Model};
use crate::params::ParamKind;
use crate::quant::{self, BaseQuant};
use crate::registry;
use crate::safetensors_io::HostTensor;
use burn::prelude::Device;
use kiln_formats::{ggml_repack, ggml_types};
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

/// The file's parameter tensors with their Hugging Face names (the family's ignored ones left
/// out); a tensor the family does not know is an error naming it.
fn named_tensors<'a>(
    file: &'a GgufFile,
    family: &dyn Family,
) -> Result<Vec<(&'a TensorInfo, String)>, ModelError> {
    let names = family.gguf_names();
    file.tensors
        .iter()
        .filter(|info| !family.gguf_ignored(&info.name))
        .map(|info| {
            let name = names.to_hf(&info.name).ok_or_else(|| ModelError::Tensor {
                path: file.path.clone(),
                name: info.name.clone(),
                message: format!("not a tensor of the {} architecture", file.architecture()),
            })?;
            Ok((info, name))
        })
        .collect()
}

/// Every tensor de-quantised to f32, renamed to Hugging Face's names, in HF layout.
pub fn hf_tensors(
    file: &GgufFile,
    family: &dyn Family,
    config: &ModelConfig,
) -> Result<BTreeMap<String, HostTensor>, ModelError> {
    let mut out = BTreeMap::new();
    for (info, name) in named_tensors(file, family)? {
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
    load_model_held(file, device, BaseQuant::None)
}

/// Loads the model of a parsed GGUF file onto `device`, its matrices held as `quant` says:
/// `Keep` holds each quantized matrix in the file's own blocks (refusing, before anything is
/// loaded, a type that cannot be held), `To` quantizes each one as it is de-quantised.
pub fn load_model_held(
    file: &GgufFile,
    device: &Device,
    quant: BaseQuant,
) -> Result<Model, ModelError> {
    let (family, config) = read_config(file)?;
    let arch = config
        .declare()
        .map_err(|(field, message)| file_err(file, format!("`{field}`: {message}")))?;
    let kinds: BTreeMap<String, ParamKind> = arch
        .params
        .iter()
        .map(|p| (p.name.clone(), p.kind))
        .collect();
    let mut planned = Vec::new();
    for (info, name) in named_tensors(file, family)? {
        let matrix = info.dims.len() == 2 && kinds.get(&name).is_some_and(|&k| quant::holdable(k));
        let float = matches!(
            info.ggml_type,
            ggml_types::F32 | ggml_types::F16 | ggml_types::BF16
        );
        if quant == BaseQuant::Keep && matrix && !holdable_type(info.ggml_type) {
            return Err(ModelError::Tensor {
                path: file.path.clone(),
                name: info.name.clone(),
                message: format!(
                    "base_quant: keep cannot hold its type {} quantized (it holds Q4_0, Q4_1, \
                     Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K); re-quantize it with \
                     base_quant: q8_0 or q4_k, or load it in float with base_quant: none",
                    ggml_types::type_name(info.ggml_type)
                ),
            });
        }
        planned.push((info, name, matrix && !float));
    }
    let mut tensors = BTreeMap::new();
    for (info, name, quantized) in planned {
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let held = match quant {
            BaseQuant::Keep if quantized => {
                let packed = ggml_repack::repack(
                    info.ggml_type,
                    file.tensor_bytes(info),
                    shape[0],
                    shape[1],
                )
                .map_err(|e| ModelError::Tensor {
                    path: file.path.clone(),
                    name: info.name.clone(),
                    message: e.to_string(),
                })?;
                row_order(family, &config, &name, shape[0]).map(|order| match order {
                    Some(order) => HostParam::Packed(packed.reorder_rows(&order)),
                    None => HostParam::Packed(packed),
                })
            }
            _ => None,
        };
        let held = match held {
            Some(h) => h,
            None => {
                let mut t = HostTensor {
                    shape,
                    data: file.dequantize(info),
                };
                family.gguf_values_to_hf(&config, &name, &mut t);
                match kinds.get(&name) {
                    Some(&k) if quant::holdable(k) => quant::hold_dense(t, quant),
                    _ => HostParam::Dense(t),
                }
            }
        };
        tensors.insert(name, held);
    }
    Model::from_host_params(arch, tensors, device).map_err(|(name, message)| ModelError::Tensor {
        path: file.path.clone(),
        name,
        message,
    })
}

/// The GGML type of each tensor of the file, by its Hugging Face name (for the planner).
pub fn matrix_types(file: &GgufFile) -> BTreeMap<String, u32> {
    let Ok((family, _)) = read_config(file) else {
        return BTreeMap::new();
    };
    let names = family.gguf_names();
    file.tensors
        .iter()
        .filter_map(|t| Some((names.to_hf(&t.name)?, t.ggml_type)))
        .collect()
}

/// The first tensor of `file` that is quantized in a type `keep` cannot hold (IQ4_NL, IQ4_XS).
pub fn first_unholdable(file: &GgufFile) -> Option<&TensorInfo> {
    file.tensors.iter().find(|t| !holdable_type(t.ggml_type))
}

/// A type `keep` holds as it is: float (held as f32) or a layout of `ggml_repack`.
fn holdable_type(ggml_type: u32) -> bool {
    matches!(
        ggml_type,
        ggml_types::F32 | ggml_types::F16 | ggml_types::BF16
    ) || ggml_repack::layout(ggml_type).is_some()
}

/// How the family reorders the rows of a matrix on its way from GGUF to HF (llama.cpp permutes
/// Q/K rows): `Some(None)` when it keeps them, `Some(Some(order))` for a reordering, `None`
/// when it does more than reorder rows (the matrix is then de-quantised and transformed).
/// Found by passing the row numbers through the family's own transform.
fn row_order(
    family: &dyn Family,
    config: &ModelConfig,
    name: &str,
    rows: usize,
) -> Option<Option<Vec<usize>>> {
    let identity: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    let mut probe = HostTensor {
        shape: vec![rows, 1],
        data: identity.clone(),
    };
    family.gguf_values_to_hf(config, name, &mut probe);
    if probe.data == identity {
        return Some(None);
    }
    let order: Vec<usize> = probe.data.iter().map(|&v| v as usize).collect();
    let mut seen = vec![false; rows];
    let permutation = probe.shape == [rows, 1]
        && probe
            .data
            .iter()
            .zip(&order)
            .all(|(&v, &r)| r as f32 == v && r < rows)
        && order
            .iter()
            .all(|&r| !std::mem::replace(&mut seen[r], true));
    permutation.then_some(Some(order))
}
