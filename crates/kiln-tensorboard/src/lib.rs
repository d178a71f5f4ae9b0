//! A TensorBoard event-file writer: scalars, histograms and text.
//!
//! Records are framed as TensorFlow's TFRecord: `u64 length | u32 masked crc32c(length) | payload |
//! u32 masked crc32c(payload)`; payloads are `tensorflow.Event` protobufs. Every write goes straight
//! to the file and I/O errors are returned, never panicked on.

mod proto;

use prost::Message;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use proto::{Event, HistogramProto, Summary};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TensorBoard event file {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Appends events to one `events.out.tfevents.*` file in a log directory.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The masked CRC-32C TFRecord uses for lengths and payloads.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, starting with the file-version record.
    pub fn create(dir: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let secs = now() as u64;
        let path = dir.join(format!(
            "events.out.tfevents.{secs}.{host}.{}.kiln",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
        };
        writer.write_event(&Event {
            wall_time: now(),
            step: 0,
            what: Some(proto::event::What::FileVersion("brain.Event:2".into())),
        })?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, event: &Event) -> Result<(), Error> {
        let payload = event.encode_to_vec();
        let len = (payload.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(payload.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(&payload);
        record.extend_from_slice(&masked_crc32c(&payload).to_le_bytes());
        let path = self.path.clone();
        self.out
            .write_all(&record)
            .map_err(|source| Error::Io { path, source })
    }

    fn write_value(&mut self, step: i64, value: proto::summary::Value) -> Result<(), Error> {
        self.write_event(&Event {
            wall_time: now(),
            step,
            what: Some(proto::event::What::Summary(Summary { value: vec![value] })),
        })
    }

    /// A scalar at `step`, shown in TensorBoard's Scalars tab.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<(), Error> {
        self.write_value(
            step,
            proto::summary::Value {
                tag: tag.into(),
                value: Some(proto::summary::value::Value::SimpleValue(value)),
                ..Default::default()
            },
        )
    }

    /// A histogram of `values` at `step` (exponential buckets as TensorFlow makes them).
    pub fn add_histogram(&mut self, tag: &str, values: &[f32], step: i64) -> Result<(), Error> {
        let histo = histogram(values);
        self.write_value(
            step,
            proto::summary::Value {
                tag: tag.into(),
                value: Some(proto::summary::value::Value::Histo(histo)),
                ..Default::default()
            },
        )
    }

    /// Markdown text at `step`, shown in TensorBoard's Text tab.
    pub fn add_text(&mut self, tag: &str, text: &str, step: i64) -> Result<(), Error> {
        let tensor = proto::TensorProto {
            dtype: proto::DT_STRING,
            tensor_shape: Some(proto::TensorShapeProto {
                dim: vec![proto::tensor_shape_proto::Dim {
                    size: 1,
                    name: String::new(),
                }],
            }),
            string_val: vec![text.as_bytes().to_vec()],
        };
        self.write_value(
            step,
            proto::summary::Value {
                tag: tag.into(),
                metadata: Some(proto::SummaryMetadata {
                    plugin_data: Some(proto::summary_metadata::PluginData {
                        plugin_name: "text".into(),
                        content: Vec::new(),
                    }),
                }),
                value: Some(proto::summary::value::Value::Tensor(tensor)),
            },
        )
    }

    /// Pushes buffered records to the OS so a live TensorBoard sees them.
    pub fn flush(&mut self) -> Result<(), Error> {
        let path = self.path.clone();
        self.out
            .flush()
            .map_err(|source| Error::Io { path, source })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// Bucket edges as TensorFlow's default histogram uses: ±1e-12 × 1.1^k up to 1e20, and 0.
fn default_bucket_limits() -> Vec<f64> {
    let mut positive = Vec::new();
    let mut v = 1e-12;
    while v < 1e20 {
        positive.push(v);
        v *= 1.1;
    }
    let mut limits: Vec<f64> = positive.iter().rev().map(|x| -x).collect();
    limits.push(0.0);
    limits.extend(positive);
    limits.push(f64::MAX);
    limits
}

/// Summarises `values` as a `HistogramProto`, keeping only non-empty buckets (as TensorFlow does).
pub fn histogram(values: &[f32]) -> HistogramProto {
    let limits = default_bucket_limits();
    let mut counts = vec![0.0f64; limits.len()];
    let (mut min, mut max, mut sum, mut sum_squares) = (f64::MAX, f64::MIN, 0.0, 0.0);
    let mut num = 0.0;
    for &v in values {
        let v = v as f64;
        if !v.is_finite() {
            continue;
        }
        num += 1.0;
        min = min.min(v);
        max = max.max(v);
        sum += v;
        sum_squares += v * v;
        let bucket = limits.partition_point(|&limit| limit < v);
        counts[bucket.min(limits.len() - 1)] += 1.0;
    }
    if num == 0.0 {
        min = 0.0;
        max = 0.0;
    }
    let mut bucket_limit = Vec::new();
    let mut bucket = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        if count > 0.0 {
            bucket_limit.push(limits[i]);
            bucket.push(count);
        }
    }
    HistogramProto {
        min,
        max,
        num,
        sum,
        sum_squares,
        bucket_limit,
        bucket,
    }
}

/// Reads back the records of an event file, checking both CRCs of each (used by tests and tools).
pub fn read_records(path: &Path) -> Result<Vec<Event>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + 12)
            .ok_or_else(|| format!("truncated record header at byte {at}"))?;
        let len_bytes: [u8; 8] = header[..8].try_into().map_err(|_| "header")?;
        let crc = u32::from_le_bytes(header[8..12].try_into().map_err(|_| "header")?);
        if crc != masked_crc32c(&len_bytes) {
            return Err(format!("length CRC mismatch at byte {at}"));
        }
        let len = u64::from_le_bytes(len_bytes) as usize;
        let start = at + 12;
        let payload = bytes
            .get(start..start.saturating_add(len))
            .ok_or_else(|| format!("truncated payload at byte {start}"))?;
        let crc_at = start + len;
        let crc = bytes
            .get(crc_at..crc_at + 4)
            .ok_or_else(|| format!("truncated payload CRC at byte {crc_at}"))?;
        if u32::from_le_bytes(crc.try_into().map_err(|_| "crc")?) != masked_crc32c(payload) {
            return Err(format!("payload CRC mismatch at byte {start}"));
        }
        events.push(Event::decode(payload).map_err(|e| format!("bad event at byte {start}: {e}"))?);
        at = crc_at + 4;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // TFRecord of an empty payload: crc32c("") = 0, masked = 0xa282ead8.
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        // crc32c("123456789") = 0xe3069283 (the standard check value).
        let c: u32 = 0xe306_9283;
        assert_eq!(
            masked_crc32c(b"123456789"),
            c.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn records_round_trip() {
        let dir = std::env::temp_dir().join(format!("kiln-tb-test-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).unwrap();
        w.add_scalar("train/loss", 2.5, 3).unwrap();
        w.add_histogram("w", &[0.0, 1.0, -1.0, 2.0], 3).unwrap();
        w.add_text("config", "a: 1", 0).unwrap();
        w.flush().unwrap();
        let events = read_records(w.path()).unwrap();
        assert_eq!(events.len(), 4);
        assert!(
            matches!(&events[0].what, Some(proto::event::What::FileVersion(v)) if v == "brain.Event:2")
        );
        assert_eq!(events[1].step, 3);
        let h = histogram(&[0.0, 1.0, -1.0, 2.0]);
        assert_eq!(h.num, 4.0);
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        std::fs::remove_dir_all(&dir).ok();
    }
}
