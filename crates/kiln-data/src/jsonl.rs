//! Fine-tuning data: JSONL files of `{"text"}`, `{"prompt", "completion"}` or
//! `{"messages": [{"role", "content"}]}` records (the format is detected from the first line or
//! declared), tokenized into examples with a loss mask, and batched reproducibly.

use crate::{Batch, ChatTemplate, DataError, Message, Rng, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

const PURPOSE_SHUFFLE: u64 = 4;

/// Record layout of a JSONL file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Completions,
    Chat,
}

/// One tokenized example: `ids` and, per id, whether it is trained on (predicted).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

/// How records become tokens.
pub struct Encoding<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
    /// Appended to text and completion records (chat templates end turns themselves).
    pub eos_id: Option<u32>,
    /// Train on the completion (assistant) tokens only.
    pub mask_prompt: bool,
    /// Longer examples are cut to this many tokens.
    pub max_seq_len: usize,
}

/// Tokenized examples of one split, and how many were truncated.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub examples: Vec<Example>,
    pub truncated: usize,
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

pub(crate) fn line_err(path: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError::Corpus {
        path: path.to_path_buf(),
        message: format!("line {line}: {}", message.into()),
    }
}

/// The format of a record, from its keys.
pub fn detect(record: &Value) -> Option<Format> {
    let o = record.as_object()?;
    if o.contains_key("messages") {
        Some(Format::Chat)
    } else if o.contains_key("prompt") && o.contains_key("completion") {
        Some(Format::Completions)
    } else if o.contains_key("text") {
        Some(Format::Text)
    } else {
        None
    }
}

pub(crate) fn string_field<'v>(
    record: &'v Value,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<&'v str, DataError> {
    record
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| line_err(path, line, format!("`{key}` must be a string")))
}

fn messages(record: &Value, path: &Path, line: usize) -> Result<Vec<Message>, DataError> {
    messages_at(record, "messages", path, line)
}

/// The list of `{"role", "content"}` messages under `key`, checked.
pub(crate) fn messages_at(
    record: &Value,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<Vec<Message>, DataError> {
    let list = record
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| line_err(path, line, format!("`{key}` must be a list")))?;
    if list.is_empty() {
        return Err(line_err(path, line, format!("`{key}` is empty")));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| line_err(path, line, format!("{key}[{i}] has no string `role`")))?;
            if !ROLES.contains(&role) {
                return Err(line_err(
                    path,
                    line,
                    format!(
                        "{key}[{i}]: unknown role `{role}` (expected one of {})",
                        ROLES.join(", ")
                    ),
                ));
            }
            let content = m.get("content").and_then(Value::as_str).ok_or_else(|| {
                line_err(path, line, format!("{key}[{i}] has no string `content`"))
            })?;
            Ok(Message::new(role, content))
        })
        .collect()
}

/// Bytes of text read per token wanted when a record is far longer than the longest example:
/// tokens of real tokenizers average 3-5 bytes, and none is near this long.
const PREFIX_BYTES_PER_TOKEN: usize = 64;
/// Tokens encoded beyond the ones kept, so that the cut of the text cannot change them.
const PREFIX_MARGIN_TOKENS: usize = 64;

impl Encoding<'_> {
    fn encode(&self, text: &str, path: &Path, line: usize) -> Result<Vec<u32>, DataError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| line_err(path, line, e.to_string()))
    }

    /// The tokens of `text`, or of a prefix of it long enough to give more than `keep` of them
    /// unchanged: a record is truncated to the longest example anyway, and tokenizing a 50 MB
    /// line whole takes a minute. The result is longer than `keep` exactly when `text`'s is.
    fn encode_at_least(
        &self,
        text: &str,
        keep: usize,
        path: &Path,
        line: usize,
    ) -> Result<Vec<u32>, DataError> {
        let want = keep + PREFIX_MARGIN_TOKENS;
        let limit = want.saturating_mul(PREFIX_BYTES_PER_TOKEN);
        if text.len() > limit {
            let mut cut = limit;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let ids = self.encode(&text[..cut], path, line)?;
            if ids.len() > want {
                return Ok(ids[..keep + 1].to_vec());
            }
        }
        self.encode(text, path, line)
    }

    fn template(&self, path: &Path, line: usize) -> Result<&ChatTemplate, DataError> {
        self.chat_template
            .ok_or_else(|| line_err(path, line, "chat records need a model with a chat template"))
    }

    /// Tokenizes one record. The prompt part is the rendered text before the completion (or
    /// before the last assistant turn); the mask covers the rest.
    pub fn example(
        &self,
        record: &Value,
        format: Format,
        path: &Path,
        line: usize,
    ) -> Result<Example, DataError> {
        let (prompt, full, append_eos) = match format {
            Format::Text => (
                String::new(),
                string_field(record, "text", path, line)?.to_string(),
                true,
            ),
            Format::Completions => {
                let p = string_field(record, "prompt", path, line)?;
                let c = string_field(record, "completion", path, line)?;
                match self.chat_template {
                    Some(t) => {
                        let prompt = t
                            .render(&[Message::new("user", p)], true)
                            .map_err(|e| line_err(path, line, e.to_string()))?;
                        let full = t
                            .render(
                                &[Message::new("user", p), Message::new("assistant", c)],
                                false,
                            )
                            .map_err(|e| line_err(path, line, e.to_string()))?;
                        (prompt, full, false)
                    }
                    None => (p.to_string(), format!("{p}{c}"), true),
                }
            }
            Format::Chat => {
                let msgs = messages(record, path, line)?;
                let t = self.template(path, line)?;
                let last_assistant = msgs.iter().rposition(|m| m.role == "assistant");
                let full = t
                    .render(&msgs, false)
                    .map_err(|e| line_err(path, line, e.to_string()))?;
                let prompt = match last_assistant {
                    Some(i) => t
                        .render(&msgs[..i], true)
                        .map_err(|e| line_err(path, line, e.to_string()))?,
                    None => String::new(),
                };
                (prompt, full, false)
            }
        };
        let mut ids = self.encode_at_least(&full, self.max_seq_len + 1, path, line)?;
        // The prompt's tokens are a prefix of the full text's when the split falls on a token
        // boundary, which chat templates guarantee with their special tokens; count them.
        let prompt_len = if prompt.is_empty() || !full.starts_with(&prompt) {
            0
        } else {
            self.encode_at_least(&prompt, self.max_seq_len + 1, path, line)?
                .len()
                .min(ids.len())
        };
        if append_eos && let Some(eos) = self.eos_id {
            ids.push(eos);
        }
        let trained = (0..ids.len())
            .map(|i| !self.mask_prompt || i >= prompt_len)
            .collect();
        Ok(Example { ids, trained })
    }
}

/// Reads a JSONL file into examples; `format: None` detects it from the first record.
pub fn read_split(
    path: &Path,
    format: Option<Format>,
    enc: &Encoding<'_>,
) -> Result<(Format, Split), DataError> {
    let text = crate::corpus::read_text(path)?;
    parse_split(&text, path, format, enc)
}

/// Parses JSONL `text` into examples; `path` names it in errors (with the line number).
pub fn parse_split(
    text: &str,
    path: &Path,
    format: Option<Format>,
    enc: &Encoding<'_>,
) -> Result<(Format, Split), DataError> {
    let mut split = Split::default();
    let mut format = format;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(raw)
            .map_err(|e| line_err(path, line, format!("not JSON: {e}")))?;
        let f = match format {
            Some(f) => f,
            None => {
                let f = detect(&record).ok_or_else(|| {
                    let pairs = record.get("chosen").is_some() && record.get("rejected").is_some();
                    line_err(
                        path,
                        line,
                        if pairs {
                            "a preference pair (prompt, chosen, rejected): these train with \
                             finetune.objective: dpo or orpo, not as examples"
                        } else {
                            "cannot tell the format: expected `text`, `prompt`+`completion`, or \
                             `messages`"
                        },
                    )
                })?;
                format = Some(f);
                f
            }
        };
        let mut ex = enc.example(&record, f, path, line)?;
        if ex.ids.len() > enc.max_seq_len + 1 {
            ex.ids.truncate(enc.max_seq_len + 1);
            ex.trained.truncate(enc.max_seq_len + 1);
            split.truncated += 1;
        }
        if ex.ids.len() >= 2 {
            split.examples.push(ex);
        }
    }
    let format = format.ok_or_else(|| line_err(path, 1, "no records"))?;
    Ok((format, split))
}

/// A dataset directory: `train.jsonl`, `valid.jsonl`, optional `test.jsonl`.
pub struct Dataset {
    pub dir: PathBuf,
    pub format: Format,
    pub train: Split,
    pub valid: Split,
    pub test: Option<Split>,
}

impl Dataset {
    pub fn load(dir: &Path, format: Option<Format>, enc: &Encoding<'_>) -> Result<Self, DataError> {
        let file = |name: &str| dir.join(name);
        if !file("train.jsonl").is_file() {
            return Err(DataError::Corpus {
                path: dir.to_path_buf(),
                message: "no train.jsonl in this directory".into(),
            });
        }
        let (format, train) = read_split(&file("train.jsonl"), format, enc)?;
        let valid = if file("valid.jsonl").is_file() {
            read_split(&file("valid.jsonl"), Some(format), enc)?.1
        } else {
            return Err(DataError::Corpus {
                path: dir.to_path_buf(),
                message: "no valid.jsonl in this directory".into(),
            });
        };
        let test = match file("test.jsonl").is_file() {
            true => Some(read_split(&file("test.jsonl"), Some(format), enc)?.1),
            false => None,
        };
        if train.examples.is_empty() || valid.examples.is_empty() {
            return Err(DataError::Corpus {
                path: dir.to_path_buf(),
                message: "train.jsonl and valid.jsonl need at least one example each".into(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            format,
            train,
            valid,
            test,
        })
    }
}

/// Builds a padded batch from examples: inputs `ids[..n-1]`, targets `ids[1..]`, padded with
/// `pad_id` to the longest example; the loss mask is 1 where a trained token is predicted.
pub fn collate(examples: &[&Example], pad_id: u32) -> Batch {
    let seq_len = examples.iter().map(|e| e.ids.len() - 1).max().unwrap_or(1);
    let mut inputs = Vec::with_capacity(examples.len() * seq_len);
    let mut targets = Vec::with_capacity(examples.len() * seq_len);
    let mut mask = Vec::with_capacity(examples.len() * seq_len);
    for e in examples {
        let n = e.ids.len() - 1;
        for t in 0..seq_len {
            if t < n {
                inputs.push(e.ids[t]);
                targets.push(e.ids[t + 1]);
                mask.push(if e.trained[t + 1] { 1.0 } else { 0.0 });
            } else {
                inputs.push(pad_id);
                targets.push(pad_id);
                mask.push(0.0);
            }
        }
    }
    Batch {
        batch_size: examples.len(),
        seq_len,
        inputs,
        targets,
        loss_mask: Some(mask),
        segments: None,
        pairs: None,
    }
}

/// Packs examples into `rows` of `seq_len` positions: each example adds `len - 1` positions, the
/// next one starts where it ends; the rest of a row is padding (its own segment, masked).
pub fn pack_rows(
    examples: &[&Example],
    seq_len: usize,
    pad_id: u32,
) -> Vec<Vec<(u32, u32, f32, u32)>> {
    let mut rows: Vec<Vec<(u32, u32, f32, u32)>> = Vec::new();
    let mut row: Vec<(u32, u32, f32, u32)> = Vec::new();
    let mut segment = 0u32;
    for e in examples {
        let n = (e.ids.len() - 1).min(seq_len);
        if row.len() + n > seq_len && !row.is_empty() {
            rows.push(std::mem::take(&mut row));
            segment = 0;
        }
        for t in 0..n {
            row.push((
                e.ids[t],
                e.ids[t + 1],
                if e.trained[t + 1] { 1.0 } else { 0.0 },
                segment,
            ));
        }
        segment += 1;
    }
    if !row.is_empty() {
        rows.push(row);
    }
    for r in rows.iter_mut() {
        let pad_segment = r.last().map_or(0, |p| p.3 + 1);
        r.resize(seq_len, (pad_id, pad_id, 0.0, pad_segment));
    }
    rows
}

fn rows_batch(rows: &[Vec<(u32, u32, f32, u32)>], seq_len: usize) -> Batch {
    let flat = rows.iter().flatten();
    Batch {
        batch_size: rows.len(),
        seq_len,
        inputs: flat.clone().map(|p| p.0).collect(),
        targets: flat.clone().map(|p| p.1).collect(),
        loss_mask: Some(flat.clone().map(|p| p.2).collect()),
        segments: Some(flat.map(|p| p.3).collect()),
        pairs: None,
    }
}

/// Micro-batch `index` of packed rows: each epoch's shuffled examples are packed into rows of
/// `seq_len`, and batches take `batch_size` consecutive rows. A pure function of (seed, index).
pub fn packed_train_batch(
    split: &Split,
    seed: u64,
    index: u64,
    batch_size: usize,
    seq_len: usize,
    pad_id: u32,
) -> Batch {
    let n = split.examples.len();
    let mut wanted = index as usize * batch_size;
    let mut out: Vec<Vec<(u32, u32, f32, u32)>> = Vec::with_capacity(batch_size);
    let mut epoch = 0u64;
    while out.len() < batch_size {
        let perm = permutation(n, seed, epoch);
        let ordered: Vec<&Example> = perm.iter().map(|&i| &split.examples[i]).collect();
        let rows = pack_rows(&ordered, seq_len, pad_id);
        if wanted >= rows.len() {
            wanted -= rows.len();
        } else {
            let take = (batch_size - out.len()).min(rows.len() - wanted);
            out.extend(rows[wanted..wanted + take].iter().cloned());
            wanted = 0;
        }
        epoch += 1;
    }
    rows_batch(&out, seq_len)
}

/// Micro-batch `index` of size `batch_size` from shuffled passes over `split`: a pure function
/// of (seed, index), so resume is exact. Epoch `e` is a permutation seeded by (seed, e).
pub fn train_batch(split: &Split, seed: u64, index: u64, batch_size: usize, pad_id: u32) -> Batch {
    let picked: Vec<&Example> = shuffled_indices(split.examples.len(), seed, index, batch_size)
        .into_iter()
        .map(|i| &split.examples[i])
        .collect();
    collate(&picked, pad_id)
}

/// The records of micro-batch `index` (`batch_size` of `n`), taken in order from shuffled
/// passes: epoch `e` is a permutation seeded by (seed, e).
pub(crate) fn shuffled_indices(n: usize, seed: u64, index: u64, batch_size: usize) -> Vec<usize> {
    let start = index as usize * batch_size;
    let mut epoch_perm: Option<(usize, Vec<usize>)> = None;
    (start..start + batch_size)
        .map(|k| {
            let (epoch, pos) = (k / n, k % n);
            match &epoch_perm {
                Some((e, perm)) if *e == epoch => perm[pos],
                _ => {
                    let perm = permutation(n, seed, epoch as u64);
                    let i = perm[pos];
                    epoch_perm = Some((epoch, perm));
                    i
                }
            }
        })
        .collect()
}

fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut rng = Rng::stream(seed, PURPOSE_SHUFFLE, epoch);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// All of `split` in order, in batches (for validation and `kiln eval`).
pub fn sequential_batches(split: &Split, batch_size: usize, pad_id: u32) -> Vec<Batch> {
    split
        .examples
        .chunks(batch_size.max(1))
        .map(|c| collate(&c.iter().collect::<Vec<_>>(), pad_id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_masks_padding_and_prompt() {
        let a = Example {
            ids: vec![1, 2, 3, 4],
            trained: vec![false, false, true, true],
        };
        let b = Example {
            ids: vec![5, 6],
            trained: vec![true, true],
        };
        let batch = collate(&[&a, &b], 0);
        assert_eq!(batch.seq_len, 3);
        assert_eq!(batch.inputs, vec![1, 2, 3, 5, 0, 0]);
        assert_eq!(batch.targets, vec![2, 3, 4, 6, 0, 0]);
        assert_eq!(batch.loss_mask.unwrap(), vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn detects_formats_and_rejects_bad_roles() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(detect(&v(r#"{"text": "x"}"#)), Some(Format::Text));
        assert_eq!(
            detect(&v(r#"{"prompt": "x", "completion": "y"}"#)),
            Some(Format::Completions)
        );
        assert_eq!(detect(&v(r#"{"messages": []}"#)), Some(Format::Chat));
        let e = messages(
            &v(r#"{"messages": [{"role": "robot", "content": "x"}]}"#),
            Path::new("d.jsonl"),
            3,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("d.jsonl") && e.contains("line 3") && e.contains("robot"),
            "{e}"
        );
    }

    #[test]
    fn packing_keeps_examples_whole_and_segmented() {
        let ex = |ids: Vec<u32>| Example {
            trained: vec![true; ids.len()],
            ids,
        };
        let (a, b, c) = (ex(vec![1, 2, 3]), ex(vec![4, 5, 6, 7]), ex(vec![8, 9]));
        let rows = pack_rows(&[&a, &b, &c], 6, 0);
        assert_eq!(rows.len(), 1);
        let batch = rows_batch(&rows, 6);
        assert_eq!(batch.inputs, vec![1, 2, 4, 5, 6, 8]);
        assert_eq!(batch.targets, vec![2, 3, 5, 6, 7, 9]);
        assert_eq!(batch.segments.unwrap(), vec![0, 0, 1, 1, 1, 2]);
        let rows = pack_rows(&[&a, &b, &c], 4, 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].iter().map(|p| p.3).collect::<Vec<_>>(),
            vec![0, 0, 1, 1]
        );
        assert_eq!(
            rows[1].iter().map(|p| p.3).collect::<Vec<_>>(),
            vec![0, 0, 0, 1]
        );
    }

    #[test]
    fn batches_cover_each_epoch_once() {
        let split = Split {
            examples: (0..10)
                .map(|i| Example {
                    ids: vec![i, i],
                    trained: vec![true, true],
                })
                .collect(),
            truncated: 0,
        };
        let mut seen: Vec<u32> = (0..5)
            .flat_map(|i| train_batch(&split, 3, i, 2, 0).inputs)
            .collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
