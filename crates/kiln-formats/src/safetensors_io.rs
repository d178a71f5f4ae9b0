//! Reading and writing safetensors files of host tensors (f32 in memory; f16/bf16 widened on read).

use crate::ModelError;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A tensor on the host: shape and row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// An f32 host tensor as the safetensors crate writes it: its bytes are made when the writer
/// asks for them, one tensor at a time, so writing holds no copy of the whole map.
struct F32View<'a>(&'a HostTensor);

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.0.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// Writes `tensors` as an f32 safetensors file, atomically (a temp file beside it, fsync,
/// rename), with `{"format": "pt"}` metadata, streamed tensor by tensor.
pub fn write_f32(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    extra_metadata: &[(&str, &str)],
) -> Result<(), ModelError> {
    if let Some((name, t)) = tensors
        .iter()
        .find(|(_, t)| t.shape.iter().product::<usize>() != t.data.len())
    {
        return Err(ModelError::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            message: format!("shape {:?} does not hold {} values", t.shape, t.data.len()),
        });
    }
    let mut metadata: HashMap<String, String> = HashMap::from([("format".into(), "pt".into())]);
    for (k, v) in extra_metadata {
        metadata.insert((*k).into(), (*v).into());
    }
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = crate::fsutil::temp_beside(path);
    let views = tensors.iter().map(|(name, t)| (name.as_str(), F32View(t)));
    let written = safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| match e {
            // A full disk reaches the user as the OS says it (checkpoint errors keep the cause).
            safetensors::SafeTensorError::IoError(source) => io(source),
            other => ModelError::File {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        })
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io)
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    crate::fsutil::sync_dir(crate::fsutil::dir_of(path));
    Ok(())
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

/// Reads every tensor of a safetensors file as f32, one tensor's bytes at a time: the file is
/// never held whole beside the f32 values (a bf16 checkpoint would otherwise cost its size on
/// top of twice its size).
pub fn read_all(path: &Path) -> Result<BTreeMap<String, HostTensor>, ModelError> {
    let mut out = BTreeMap::new();
    read_each(path, &mut |name, t| {
        out.insert(name, t);
        Ok(())
    })?;
    Ok(out)
}

/// Reads every tensor of a safetensors file as f32 and hands each to `each` as it is read, so
/// that a loader that converts tensors (quantizes them) holds one f32 tensor at a time.
pub fn read_each(
    path: &Path,
    each: &mut dyn FnMut(String, HostTensor) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    kiln_config::paths::check_regular_file(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    read_from(std::io::BufReader::new(file), len, path, each)
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
    let mut out = BTreeMap::new();
    read_from(
        std::io::Cursor::new(bytes),
        bytes.len() as u64,
        path,
        &mut |name, t| {
            out.insert(name, t);
            Ok(())
        },
    )?;
    Ok(out)
}

/// The safetensors crate's bound on a header (100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// One entry of a header, checked: its dtype, shape, and byte range.
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// Reads a safetensors file of `len` bytes from `r`: the header is checked as the safetensors
/// crate checks it (a JSON object of dtypes, shapes and byte ranges that tile the data exactly,
/// every size checked before anything is allocated), then each tensor is read and widened to
/// f32 in file order.
fn read_from<R: std::io::Read>(
    mut r: R,
    len: u64,
    path: &Path,
    each: &mut dyn FnMut(String, HostTensor) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let invalid = |message: String| ModelError::File {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {message}"),
    };
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(invalid("shorter than its 8-byte header length".into()));
    }
    r.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len - 8 {
        return Err(invalid(format!(
            "a header of {n} bytes does not fit the file's {len}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("the header is not a JSON object: {e}")))?;
    let data_len = len - 8 - n;
    let mut entries = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| invalid(format!("tensor `{name}`: {what}"));
        let dtype = info["dtype"]
            .as_str()
            .ok_or_else(|| bad("no dtype"))?
            .to_string();
        let width = match dtype.as_str() {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
            "I16" | "U16" | "F16" | "BF16" => 2,
            "I32" | "U32" | "F32" => 4,
            "I64" | "U64" | "F64" => 8,
            _ => return Err(bad(&format!("unknown dtype {dtype}"))),
        };
        let dims = |v: &serde_json::Value| -> Option<Vec<u64>> {
            v.as_array()?
                .iter()
                .map(serde_json::Value::as_u64)
                .collect()
        };
        let shape = dims(&info["shape"]).ok_or_else(|| bad("shape is not a list of sizes"))?;
        let offsets = dims(&info["data_offsets"])
            .filter(|o| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad("data_offsets are not [start, end]"))?;
        let bytes = shape
            .iter()
            .try_fold(width as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad("its size overflows"))?;
        if offsets[1] - offsets[0] != bytes {
            return Err(bad(&format!(
                "{bytes} bytes by its shape, {} by its offsets",
                offsets[1] - offsets[0]
            )));
        }
        if offsets[1] > data_len {
            return Err(bad(&format!(
                "data at {}..{} lies beyond the file's {data_len} data bytes: truncated?",
                offsets[0], offsets[1]
            )));
        }
        entries.push(Entry {
            name,
            dtype,
            shape: shape.iter().map(|&d| d as usize).collect(),
            start: offsets[0],
            end: offsets[1],
        });
    }
    // The ranges tile the data: no gap, no overlap, nothing after the last.
    entries.sort_by_key(|e| (e.start, e.end));
    let mut at = 0;
    for e in &entries {
        if e.start != at {
            return Err(invalid(format!(
                "tensor `{}` starts at {} where the data before it ends at {at}",
                e.name, e.start
            )));
        }
        at = e.end;
    }
    if at != data_len {
        return Err(invalid(format!(
            "the tensors cover {at} of its {data_len} data bytes"
        )));
    }
    let mut raw = Vec::new();
    for e in entries {
        raw.resize((e.end - e.start) as usize, 0);
        r.read_exact(&mut raw).map_err(io)?;
        let data: Vec<f32> = match e.dtype.as_str() {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "F16" => raw
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            "BF16" => raw
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            other => {
                return Err(ModelError::Tensor {
                    path: path.to_path_buf(),
                    name: e.name,
                    message: format!("unsupported dtype {other} (expected F32, F16 or BF16)"),
                });
            }
        };
        each(
            e.name,
            HostTensor {
                shape: e.shape,
                data,
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streaming reader accepts what the safetensors crate accepts, with the same values, and
    /// refuses what it refuses, on a small file and every single-byte corruption (four flips a byte) of it.
    #[test]
    fn the_streaming_reader_agrees_with_the_safetensors_crate() {
        let dir = std::env::temp_dir().join(format!("kiln-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let tensors = BTreeMap::from([
            (
                "a".to_string(),
                HostTensor {
                    shape: vec![2, 3],
                    data: vec![1.0, -2.0, 3.5, 0.0, 7.0, 9.0],
                },
            ),
            (
                "b".to_string(),
                HostTensor {
                    shape: vec![1],
                    data: vec![0.25],
                },
            ),
        ]);
        write_f32(&path, &tensors, &[]).unwrap();
        let good = std::fs::read(&path).unwrap();
        assert_eq!(read_all(&path).unwrap(), tensors);
        // Streamed, the file is byte for byte what the crate makes in memory.
        let raw: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    t.shape.clone(),
                )
            })
            .collect();
        let views = raw.iter().map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        });
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        assert_eq!(safetensors::serialize(views, Some(metadata)).unwrap(), good);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        let crate_reads = |b: &[u8]| -> Option<BTreeMap<String, Vec<f32>>> {
            let st = SafeTensors::deserialize(b).ok()?;
            let mut out = BTreeMap::new();
            for (name, view) in st.tensors() {
                if view.dtype() != Dtype::F32 {
                    return None;
                }
                let v = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                out.insert(name, v.collect());
            }
            Some(out)
        };
        for at in 0..good.len() {
            for flip in [0x01u8, 0x20, 0x80, 0xff] {
                let mut b = good.clone();
                b[at] ^= flip;
                let ours = parse(&b, Path::new("x")).ok().map(|m| {
                    m.into_iter()
                        .map(|(k, t)| (k, t.data))
                        .collect::<BTreeMap<_, _>>()
                });
                let theirs = crate_reads(&b);
                let same = match (&ours, &theirs) {
                    (Some(a), Some(b)) => {
                        a.len() == b.len()
                            && a.iter().zip(b).all(|((ka, va), (kb, vb))| {
                                ka == kb
                                    && va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits())
                            })
                    }
                    (None, None) => true,
                    _ => false,
                };
                assert!(
                    same,
                    "byte {at} ^ {flip:#x}: kiln {ours:?}, crate {theirs:?}"
                );
            }
        }
        for cut in [0, 7, 8, 20, good.len() - 1] {
            assert!(parse(&good[..cut], Path::new("x")).is_err(), "cut at {cut}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn half_floats_widen_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
