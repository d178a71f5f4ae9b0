//! Reading and writing safetensors files of host tensors (f32 in memory; f16/bf16 widened on read).

use crate::ModelError;
use crate::fsutil::atomic_write;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A tensor on the host: shape and row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes `tensors` as an f32 safetensors file, atomically, with `{"format": "pt"}` metadata.
pub fn write_f32(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    extra_metadata: &[(&str, &str)],
) -> Result<(), ModelError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| {
            let raw: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), raw, t.shape.clone())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, raw, shape)| {
            TensorView::new(Dtype::F32, shape.clone(), raw)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut metadata: HashMap<String, String> = HashMap::from([("format".into(), "pt".into())]);
    for (k, v) in extra_metadata {
        metadata.insert((*k).into(), (*v).into());
    }
    let buffer = safetensors::serialize(views, Some(metadata)).map_err(|e| ModelError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    atomic_write(path, &buffer).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let frac = (bits & 0x3ff) as u32;
    let out = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(out)
}

/// Decodes one tensor view to f32 (F32, F16 and BF16 are supported).
pub fn view_to_f32(
    path: &Path,
    name: &str,
    view: &TensorView<'_>,
) -> Result<HostTensor, ModelError> {
    let raw = view.data();
    let data = match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        other => {
            return Err(ModelError::Tensor {
                path: path.to_path_buf(),
                name: name.into(),
                message: format!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
            });
        }
    };
    Ok(HostTensor {
        shape: view.shape().to_vec(),
        data,
    })
}

/// Reads every tensor of a safetensors file as f32.
pub fn read_all(path: &Path) -> Result<BTreeMap<String, HostTensor>, ModelError> {
    let bytes = kiln_config::paths::read_regular(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes, path)
}

/// Checks that `bytes` are a well-formed safetensors file (header, dtypes, offsets) without
/// decoding the tensors.
pub fn check(bytes: &[u8], path: &Path) -> Result<(), ModelError> {
    SafeTensors::deserialize(bytes)
        .map(|_| ())
        .map_err(|e| ModelError::File {
            path: path.to_path_buf(),
            message: format!("not a valid safetensors file: {e}"),
        })
}

/// Decodes the bytes of a safetensors file; `path` names it in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, HostTensor>, ModelError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ModelError::File {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| view_to_f32(path, &name, &view).map(|t| (name, t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_widen_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
