//! Writing GGUF files (version 3), tensor by tensor: the header (metadata and every tensor's
//! name, shape, type and offset) is laid out from a plan before any data exists, then each
//! tensor's encoded bytes are streamed in the plan's order. Nothing holds more than one tensor.
//! The file appears atomically: a temp file beside it, fsync, rename, fsync of the directory; a
//! failure or a drop before [`GgufWriter::finish`] leaves no file behind.

use crate::fsutil::{dir_of, sync_dir, temp_beside};
use crate::ggml_quantize::encoded_len;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// GGUF's default alignment of tensor data (llama.cpp and gguf-py write 32).
pub const ALIGNMENT: u64 = 32;

/// A metadata value with the width GGUF stores it at.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
    BoolArray(Vec<bool>),
}

impl Meta {
    pub fn str(s: impl Into<String>) -> Self {
        Meta::Str(s.into())
    }

    /// A value read from a GGUF file (`gguf::Value`, widths folded) at the widths llama.cpp
    /// writes them: integers as u32/i32, floats as f32, integer arrays as i32.
    pub fn from_read(v: &crate::gguf::Value) -> Option<Self> {
        use crate::gguf::Value as V;
        Some(match v {
            V::U64(x) => Meta::U32(u32::try_from(*x).ok()?),
            V::I64(x) => Meta::I32(i32::try_from(*x).ok()?),
            V::F64(x) => Meta::F32(*x as f32),
            V::Bool(b) => Meta::Bool(*b),
            V::Str(s) => Meta::Str(s.clone()),
            V::Array(items) => match items.first() {
                None | Some(V::Str(_)) => Meta::StrArray(
                    items
                        .iter()
                        .map(|i| i.as_str().map(str::to_string))
                        .collect::<Option<_>>()?,
                ),
                Some(V::F64(_)) => Meta::F32Array(
                    items
                        .iter()
                        .map(|i| i.as_f64().map(|f| f as f32))
                        .collect::<Option<_>>()?,
                ),
                Some(V::U64(_) | V::I64(_)) => Meta::I32Array(
                    items
                        .iter()
                        .map(|i| match i {
                            V::U64(x) => i32::try_from(*x).ok(),
                            V::I64(x) => i32::try_from(*x).ok(),
                            _ => None,
                        })
                        .collect::<Option<_>>()?,
                ),
                Some(V::Bool(_)) => Meta::BoolArray(
                    items
                        .iter()
                        .map(|i| match i {
                            V::Bool(b) => Some(*b),
                            _ => None,
                        })
                        .collect::<Option<_>>()?,
                ),
                Some(_) => return None,
            },
        })
    }
}

/// A tensor as the header declares it.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    /// GGUF order: `dims[0]` is the row (innermost) length.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
}

impl PlannedTensor {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The encoded size, `None` when the rows are not whole blocks of the type.
    pub fn n_bytes(&self) -> Option<u64> {
        let row = *self.dims.first()? as usize;
        encoded_len(self.ggml_type, row)?;
        encoded_len(self.ggml_type, self.elements() as usize).map(|n| n as u64)
    }
}

/// A GGUF file being written; its tensors' bytes go in with [`GgufWriter::write_tensor`] in the
/// order they were planned.
pub struct GgufWriter {
    out: Option<BufWriter<std::fs::File>>,
    tmp: PathBuf,
    path: PathBuf,
    tensors: Vec<(PlannedTensor, u64)>,
    next: usize,
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

fn put_meta(buf: &mut Vec<u8>, value: &Meta) {
    let ty = |buf: &mut Vec<u8>, t: u32| buf.extend(t.to_le_bytes());
    let array_head = |buf: &mut Vec<u8>, item: u32, n: usize| {
        ty(buf, 9);
        ty(buf, item);
        buf.extend((n as u64).to_le_bytes());
    };
    match value {
        Meta::U32(v) => {
            ty(buf, 4);
            buf.extend(v.to_le_bytes());
        }
        Meta::I32(v) => {
            ty(buf, 5);
            buf.extend(v.to_le_bytes());
        }
        Meta::F32(v) => {
            ty(buf, 6);
            buf.extend(v.to_le_bytes());
        }
        Meta::Bool(v) => {
            ty(buf, 7);
            buf.push(u8::from(*v));
        }
        Meta::Str(s) => {
            ty(buf, 8);
            put_str(buf, s);
        }
        Meta::StrArray(items) => {
            array_head(buf, 8, items.len());
            items.iter().for_each(|s| put_str(buf, s));
        }
        Meta::F32Array(items) => {
            array_head(buf, 6, items.len());
            items.iter().for_each(|v| buf.extend(v.to_le_bytes()));
        }
        Meta::I32Array(items) => {
            array_head(buf, 5, items.len());
            items.iter().for_each(|v| buf.extend(v.to_le_bytes()));
        }
        Meta::BoolArray(items) => {
            array_head(buf, 7, items.len());
            buf.extend(items.iter().map(|&b| u8::from(b)));
        }
    }
}

impl GgufWriter {
    /// Lays out the header and writes it to a temp file next to `path`.
    pub fn create(
        path: &Path,
        metadata: &[(String, Meta)],
        tensors: Vec<PlannedTensor>,
    ) -> std::io::Result<Self> {
        let mut header = Vec::new();
        header.extend(b"GGUF");
        header.extend(3u32.to_le_bytes());
        header.extend((tensors.len() as u64).to_le_bytes());
        header.extend((metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_str(&mut header, key);
            put_meta(&mut header, value);
        }
        let mut offset = 0u64;
        let mut laid_out = Vec::with_capacity(tensors.len());
        for t in tensors {
            let n_bytes = t.n_bytes().ok_or_else(|| {
                invalid(format!(
                    "tensor `{}`: rows of {} are not whole blocks of type {}",
                    t.name,
                    t.dims.first().copied().unwrap_or(0),
                    crate::ggml_types::type_name(t.ggml_type)
                ))
            })?;
            put_str(&mut header, &t.name);
            header.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| header.extend(d.to_le_bytes()));
            header.extend(t.ggml_type.to_le_bytes());
            header.extend(offset.to_le_bytes());
            laid_out.push((t, n_bytes));
            offset = (offset + n_bytes).div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        header.resize(
            header.len().div_ceil(ALIGNMENT as usize) * ALIGNMENT as usize,
            0,
        );

        let tmp = temp_beside(path);
        let out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        // From here a failure drops the writer, which removes the temp file.
        let mut writer = GgufWriter {
            out: Some(out),
            tmp,
            path: path.to_path_buf(),
            tensors: laid_out,
            next: 0,
        };
        writer
            .out
            .as_mut()
            .expect("just opened")
            .write_all(&header)?;
        Ok(writer)
    }

    /// The plan's next tensor, or `None` when all are written.
    pub fn next_tensor(&self) -> Option<&PlannedTensor> {
        self.tensors.get(self.next).map(|(t, _)| t)
    }

    /// Writes the next planned tensor's encoded bytes (`name` must be that tensor's).
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let Some((planned, n_bytes)) = self.tensors.get(self.next) else {
            return Err(invalid(format!("tensor `{name}` is not in the plan")));
        };
        if planned.name != name || bytes.len() as u64 != *n_bytes {
            return Err(invalid(format!(
                "tensor `{name}` ({} bytes) written where the plan has `{}` ({n_bytes} bytes)",
                bytes.len(),
                planned.name
            )));
        }
        let out = self.out.as_mut().expect("open until finish");
        out.write_all(bytes)?;
        let padded = (*n_bytes).div_ceil(ALIGNMENT) * ALIGNMENT;
        out.write_all(&vec![0u8; (padded - n_bytes) as usize])?;
        self.next += 1;
        Ok(())
    }

    /// Makes the file durable and puts it in place; every planned tensor must have been written.
    pub fn finish(mut self) -> std::io::Result<u64> {
        if let Some((t, _)) = self.tensors.get(self.next) {
            return Err(invalid(format!("tensor `{}` was never written", t.name)));
        }
        let out = self.out.take().expect("open until finish");
        let placed = out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| {
                file.sync_all()?;
                file.metadata().map(|m| m.len())
            })
            .and_then(|size| std::fs::rename(&self.tmp, &self.path).map(|()| size));
        // Past this point Drop no longer cleans up: a failure here removes the temp file itself.
        if placed.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        sync_dir(dir_of(&self.path));
        placed
    }
}

impl Drop for GgufWriter {
    /// An unfinished file is removed: no half-written GGUF is ever left.
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml_types::{F32, Q8_0};
    use crate::gguf::{GgufFile, Value};

    #[test]
    fn what_is_written_reads_back_and_an_unfinished_file_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("kiln-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf");
        let meta = vec![
            ("general.architecture".to_string(), Meta::str("llama")),
            ("llama.block_count".to_string(), Meta::U32(2)),
            ("x.f".to_string(), Meta::F32(0.5)),
            (
                "x.tokens".to_string(),
                Meta::StrArray(vec!["a".into(), "b c".into()]),
            ),
            ("x.types".to_string(), Meta::I32Array(vec![1, 3])),
        ];
        let plan = vec![
            PlannedTensor {
                name: "a.weight".into(),
                dims: vec![3],
                ggml_type: F32,
            },
            PlannedTensor {
                name: "b.weight".into(),
                dims: vec![32, 2],
                ggml_type: Q8_0,
            },
        ];
        let mut w = GgufWriter::create(&path, &meta, plan.clone()).unwrap();
        w.write_tensor("a.weight", &[0u8; 12]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing left");

        let mut w = GgufWriter::create(&path, &meta, plan).unwrap();
        let a: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(
            w.write_tensor("b.weight", &a).is_err(),
            "order is the plan's"
        );
        w.write_tensor("a.weight", &a).unwrap();
        let mut b = Vec::new();
        crate::ggml_quantize::quantize_into(Q8_0, &[0.25f32; 64], &mut b);
        w.write_tensor("b.weight", &b).unwrap();
        w.finish().unwrap();

        let f = GgufFile::read(&path).unwrap();
        assert_eq!(f.architecture(), "llama");
        assert_eq!(f.metadata["llama.block_count"], Value::U64(2));
        assert_eq!(f.metadata["x.f"], Value::F64(0.5));
        assert_eq!(
            Meta::from_read(&f.metadata["x.tokens"]),
            Some(meta[3].1.clone())
        );
        assert_eq!(
            Meta::from_read(&f.metadata["x.types"]),
            Some(meta[4].1.clone())
        );
        assert_eq!(f.dequantize(&f.tensors[0]), vec![1.0, 2.0, 3.0]);
        assert_eq!(f.tensors[1].offset % 32, 0);
        assert!(
            f.dequantize(&f.tensors[1])
                .iter()
                .all(|&v| (v - 0.25).abs() < 1e-3)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
