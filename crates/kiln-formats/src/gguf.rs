//! GGUF files (llama.cpp's format), the container: metadata, tensor infos, and their tensors
//! de-quantised to f32 in GGUF element order (the types: `ggml_types`). What the tensors mean
//! (names, layouts, the config) is each model family's (`kiln_models::families`). The tokenizer
//! is rebuilt from the `tokenizer.ggml.*` metadata (`gguf_tokenizer`).
//!
//! Every count and size read from the file is checked against the bytes that remain before
//! anything is allocated, so a truncated or hostile file gives an error, not a panic or an OOM.

use crate::ModelError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor's data lies and how it is encoded.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the innermost (fastest-varying) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Absolute offset in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

/// A parsed GGUF file, its bytes held in memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
}

use crate::ggml_types::{block_layout, readable_types, type_name};

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::File {
            path: self.path.to_path_buf(),
            message: format!("{} (at byte {})", message.into(), self.at),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.err(format!("truncated: needs {n} more bytes")))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| self.err("u32"))?,
        ))
    }
    fn u64(&mut self) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| self.err("u64"))?,
        ))
    }
    /// A count of items each at least `min_item_bytes` long: refuses counts the file cannot hold.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, ModelError> {
        let n = self.u64()?;
        let remaining = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > remaining {
            return Err(self.err(format!("{what} count {n} exceeds what the file can hold")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, ModelError> {
        let n = self.count(1, "string length")?;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, ModelError> {
        Ok(match ty {
            0 => Value::U64(self.take(1)?[0] as u64),
            1 => Value::I64(self.take(1)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(
                self.take(2)?.try_into().map_err(|_| self.err("u16"))?,
            ) as u64),
            3 => Value::I64(i16::from_le_bytes(
                self.take(2)?.try_into().map_err(|_| self.err("i16"))?,
            ) as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let item = self.u32()?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    other => return Err(self.err(format!("unknown array item type {other}"))),
                };
                let n = self.count(min, "array")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => return Err(self.err(format!("unknown metadata type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let bytes = kiln_config::paths::read_regular(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(bytes, path)
    }

    pub fn parse(bytes: Vec<u8>, path: &Path) -> Result<Self, ModelError> {
        let mut c = Cursor {
            bytes: &bytes,
            at: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(c.err("not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        // A tensor info takes at least 8 (name length) + 4 + 8 + 4 + 8 bytes; a KV pair 8 + 4 + 1.
        let n_tensors = c.count(32, "tensor")?;
        let n_kv = c.count(13, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.err(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64()?);
            }
            let ggml_type = c.u32()?;
            let offset = c.u64()?;
            infos.push((name, dims, ggml_type, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.at.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ggml_type, offset) in infos {
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| c.err(format!("tensor `{name}`: element count overflows")))?;
            let (block, block_bytes) = block_layout(ggml_type).ok_or_else(|| {
                c.err(format!(
                    "tensor `{name}` is {}: kiln reads {}",
                    type_name(ggml_type),
                    readable_types()
                ))
            })?;
            // GGML quantises row by row: a row is whole blocks.
            let row = dims.first().copied().unwrap_or(1);
            if row % block as u64 != 0 {
                return Err(c.err(format!(
                    "tensor `{name}`: rows of {row} elements are not whole {} blocks of {block}",
                    type_name(ggml_type)
                )));
            }
            let n_bytes = (elements / block as u64).saturating_mul(block_bytes as u64);
            let start = (data_start as u64).saturating_add(offset);
            if start.saturating_add(n_bytes) > bytes.len() as u64 {
                return Err(ModelError::Tensor {
                    path: path.to_path_buf(),
                    name,
                    message: format!(
                        "data at {start}..{} lies beyond the end of the file ({} bytes): truncated?",
                        start.saturating_add(n_bytes),
                        bytes.len()
                    ),
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset: start as usize,
                n_bytes: n_bytes as usize,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    pub(crate) fn meta(&self, key: &str) -> Result<&Value, ModelError> {
        self.metadata.get(key).ok_or_else(|| ModelError::File {
            path: self.path.clone(),
            message: format!("metadata `{key}` is missing"),
        })
    }

    /// `general.architecture` (empty when absent or not a string).
    pub fn architecture(&self) -> &str {
        self.metadata
            .get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// One tensor's encoded bytes, as the file holds them.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[info.offset..info.offset + info.n_bytes]
    }

    /// De-quantises one tensor to f32 in GGUF element order.
    pub fn dequantize(&self, info: &TensorInfo) -> Vec<f32> {
        let raw = self.tensor_bytes(info);
        // Parsing admitted only types `block_layout` knows, and those all decode.
        crate::ggml_types::dequantize(info.ggml_type, raw).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_hostile_headers_are_errors() {
        let p = Path::new("x.gguf");
        assert!(GgufFile::parse(b"GGU".to_vec(), p).is_err());
        assert!(GgufFile::parse(b"GGML\x03\0\0\0".to_vec(), p).is_err());
        // Claims 2^60 tensors in a 24-byte file.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((1u64 << 60).to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let e = GgufFile::parse(b, p).err().unwrap().to_string();
        assert!(e.contains("exceeds"), "{e}");
    }
}
