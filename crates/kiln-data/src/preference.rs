//! Preference data for DPO and ORPO: JSONL records `{"prompt", "chosen", "rejected"}` in TRL's
//! two forms, strings or conversational (`prompt` a list of messages, `chosen` and `rejected`
//! lists of assistant messages), tokenized as TRL's `DPOTrainer` tokenizes them:
//! - strings: `prompt` and `prompt + chosen` are encoded with the tokenizer's own special tokens
//!   (`tokenizer(text)`), and EOS ends each completion (added unless it already ends there);
//! - conversational: the chat template renders the prompt with the generation prompt, and the
//!   prompt followed by each answer without it; the template ends the turn itself.
//!
//! The completion starts where the prompt's tokens and the prompt+answer's tokens part (TRL's
//! `common_prefix_length`, the shorter of the two answers' prefixes). A sequence (prompt and
//! completion) longer than `max_len` tokens is cut at its end (TRL's `keep_start`), and a pair
//! whose prompt alone fills `max_len` is dropped, since nothing of its answers would remain.

use crate::jsonl::{line_err, messages_at, shuffled_indices};
use crate::{Batch, ChatTemplate, DataError, Message, Pairs, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One tokenized pair: the shared prompt and the two completions that follow it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// The pairs of one split, with how many were truncated and how many dropped.
#[derive(Debug, Clone, Default)]
pub struct PairSplit {
    pub pairs: Vec<Pair>,
    /// Pairs with a sequence cut to `max_len`.
    pub truncated: usize,
    /// Pairs whose prompt alone filled `max_len` (left out).
    pub dropped: usize,
}

/// How preference records become tokens.
pub struct PairEncoding<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
    /// Ends string completions.
    pub eos_id: Option<u32>,
    /// Tokens a sequence keeps, prompt and completion together (TRL's `max_length`).
    pub max_len: usize,
}

const FIELDS: [&str; 3] = ["prompt", "chosen", "rejected"];

/// A record's tokens before the split: the prompt alone, and the prompt followed by each answer.
struct Sequences {
    prompt: Vec<u32>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PairEncoding<'_> {
    fn tokens(
        &self,
        text: &str,
        special: bool,
        path: &Path,
        line: usize,
    ) -> Result<Vec<u32>, DataError> {
        let ids = if special {
            self.tokenizer.encode_with_special_tokens(text)
        } else {
            self.tokenizer.encode(text)
        };
        ids.map_err(|e| line_err(path, line, e.to_string()))
    }

    /// Tokenizes one record (untruncated).
    pub fn pair(&self, record: &Value, path: &Path, line: usize) -> Result<Pair, DataError> {
        let o = record
            .as_object()
            .ok_or_else(|| line_err(path, line, "a preference record must be a JSON object"))?;
        for key in FIELDS {
            if !o.contains_key(key) {
                return Err(line_err(
                    path,
                    line,
                    format!(
                        "missing `{key}` (preference records have `prompt`, `chosen` and `rejected`)"
                    ),
                ));
            }
        }
        let Sequences {
            prompt,
            chosen,
            rejected,
        } = if record["prompt"].is_array() {
            self.conversational(record, path, line)?
        } else {
            self.strings(record, path, line)?
        };
        let prompt_len = common_prefix(&prompt, &chosen)
            .min(common_prefix(&prompt, &rejected))
            .min(prompt.len());
        Ok(Pair {
            prompt: prompt[..prompt_len].to_vec(),
            chosen: chosen[prompt_len..].to_vec(),
            rejected: rejected[prompt_len..].to_vec(),
        })
    }

    fn strings(&self, record: &Value, path: &Path, line: usize) -> Result<Sequences, DataError> {
        let text = |key: &str| {
            let v = record[key].as_str().ok_or_else(|| {
                line_err(
                    path,
                    line,
                    format!(
                        "`{key}` must be a string, as `prompt` is (or all three lists of messages)"
                    ),
                )
            })?;
            if key != "prompt" && v.is_empty() {
                return Err(line_err(path, line, format!("`{key}` is an empty answer")));
            }
            Ok(v)
        };
        let (p, c, r) = (text("prompt")?, text("chosen")?, text("rejected")?);
        let with_eos = |mut ids: Vec<u32>| {
            if let Some(eos) = self.eos_id
                && ids.last() != Some(&eos)
            {
                ids.push(eos);
            }
            ids
        };
        Ok(Sequences {
            prompt: self.tokens(p, true, path, line)?,
            chosen: with_eos(self.tokens(&format!("{p}{c}"), true, path, line)?),
            rejected: with_eos(self.tokens(&format!("{p}{r}"), true, path, line)?),
        })
    }

    fn conversational(
        &self,
        record: &Value,
        path: &Path,
        line: usize,
    ) -> Result<Sequences, DataError> {
        let template = self.chat_template.ok_or_else(|| {
            line_err(
                path,
                line,
                "conversational records need a model with a chat template",
            )
        })?;
        let prompt = messages_at(record, "prompt", path, line)?;
        let answer = |key: &str| -> Result<Vec<Message>, DataError> {
            if !record[key].is_array() {
                return Err(line_err(
                    path,
                    line,
                    format!("`{key}` must be a list of messages, as `prompt` is"),
                ));
            }
            let msgs = messages_at(record, key, path, line)?;
            if msgs.iter().all(|m| m.content.is_empty()) {
                return Err(line_err(path, line, format!("`{key}` is an empty answer")));
            }
            Ok(msgs)
        };
        let (chosen, rejected) = (answer("chosen")?, answer("rejected")?);
        let render = |msgs: &[Message], generation: bool| {
            template
                .render(msgs, generation)
                .map_err(|e| line_err(path, line, e.to_string()))
        };
        let joined = |answer: &[Message]| [prompt.as_slice(), answer].concat();
        Ok(Sequences {
            prompt: self.tokens(&render(&prompt, true)?, false, path, line)?,
            chosen: self.tokens(&render(&joined(&chosen), false)?, false, path, line)?,
            rejected: self.tokens(&render(&joined(&rejected), false)?, false, path, line)?,
        })
    }
}

/// Parses preference JSONL `text`; `path` names it in errors (with the line number).
pub fn parse_pairs(
    text: &str,
    path: &Path,
    enc: &PairEncoding<'_>,
) -> Result<PairSplit, DataError> {
    let mut split = PairSplit::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(raw)
            .map_err(|e| line_err(path, line, format!("not JSON: {e}")))?;
        let mut pair = enc.pair(&record, path, line)?;
        if pair.prompt.len() >= enc.max_len {
            split.dropped += 1;
            continue;
        }
        let room = enc.max_len - pair.prompt.len();
        if pair.chosen.len() > room || pair.rejected.len() > room {
            pair.chosen.truncate(room);
            pair.rejected.truncate(room);
            split.truncated += 1;
        }
        split.pairs.push(pair);
    }
    Ok(split)
}

/// A directory of preference data: `train.jsonl` and `valid.jsonl`.
pub struct PreferenceDataset {
    pub dir: PathBuf,
    pub train: PairSplit,
    pub valid: PairSplit,
}

impl PreferenceDataset {
    pub fn load(dir: &Path, enc: &PairEncoding<'_>) -> Result<Self, DataError> {
        let split = |name: &str| -> Result<PairSplit, DataError> {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(DataError::Corpus {
                    path: dir.to_path_buf(),
                    message: format!("no {name} in this directory"),
                });
            }
            let split = parse_pairs(&crate::corpus::read_text(&path)?, &path, enc)?;
            if split.pairs.is_empty() {
                return Err(DataError::Corpus {
                    path,
                    message: format!(
                        "no preference pairs left ({} dropped: their prompts fill data.seq_len)",
                        split.dropped
                    ),
                });
            }
            Ok(split)
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            train: split("train.jsonl")?,
            valid: split("valid.jsonl")?,
        })
    }
}

/// Whether the first record of `dir/train.jsonl` is a preference record (has `chosen` and
/// `rejected`); `None` when it cannot be read or parsed (the loader then names the problem).
pub fn is_preference_dir(dir: &Path) -> Option<bool> {
    use std::io::BufRead;
    // The first record only: a training file may be large.
    let file = std::fs::File::open(dir.join("train.jsonl")).ok()?;
    let first = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find(|l| !l.trim().is_empty())?;
    let v: Value = serde_json::from_str(&first).ok()?;
    Some(v.get("chosen").is_some() && v.get("rejected").is_some())
}

/// A micro-batch of `pairs`: the chosen sequences (prompt + chosen), then the rejected ones, each
/// `inputs = ids[..n-1]`, `targets = ids[1..]`, padded with `pad_id` to the longest; the loss mask
/// marks completion targets, `Pairs::sequence_mask` every real target.
pub fn collate_pairs(pairs: &[&Pair], pad_id: u32) -> Batch {
    let sequences: Vec<(Vec<u32>, usize)> = pairs
        .iter()
        .map(|p| ([p.prompt.as_slice(), &p.chosen].concat(), p.prompt.len()))
        .chain(
            pairs
                .iter()
                .map(|p| ([p.prompt.as_slice(), &p.rejected].concat(), p.prompt.len())),
        )
        .collect();
    let seq_len = sequences
        .iter()
        .map(|(ids, _)| ids.len().saturating_sub(1))
        .max()
        .unwrap_or(1)
        .max(1);
    let rows = sequences.len();
    let mut inputs = Vec::with_capacity(rows * seq_len);
    let mut targets = Vec::with_capacity(rows * seq_len);
    let mut completion = Vec::with_capacity(rows * seq_len);
    let mut real = Vec::with_capacity(rows * seq_len);
    for (ids, prompt_len) in &sequences {
        let n = ids.len().saturating_sub(1);
        for t in 0..seq_len {
            if t < n {
                inputs.push(ids[t]);
                targets.push(ids[t + 1]);
                completion.push(if t + 1 >= *prompt_len { 1.0 } else { 0.0 });
                real.push(1.0);
            } else {
                inputs.push(pad_id);
                targets.push(pad_id);
                completion.push(0.0);
                real.push(0.0);
            }
        }
    }
    Batch {
        batch_size: rows,
        seq_len,
        inputs,
        targets,
        loss_mask: Some(completion),
        segments: None,
        pairs: Some(Pairs {
            count: pairs.len(),
            sequence_mask: real,
        }),
    }
}

/// Micro-batch `index` of `batch_size` pairs from shuffled passes over `split`: a pure function of
/// (seed, index), so resume is exact (the same order as plain examples).
pub fn train_pairs(
    split: &PairSplit,
    seed: u64,
    index: u64,
    batch_size: usize,
    pad_id: u32,
) -> Batch {
    let picked: Vec<&Pair> = shuffled_indices(split.pairs.len(), seed, index, batch_size)
        .into_iter()
        .map(|i| &split.pairs[i])
        .collect();
    collate_pairs(&picked, pad_id)
}

/// All of `split` in order, `batch_size` pairs a batch (validation).
pub fn sequential_pairs(split: &PairSplit, batch_size: usize, pad_id: u32) -> Vec<Batch> {
    split
        .pairs
        .chunks(batch_size.max(1))
        .map(|c| collate_pairs(&c.iter().collect::<Vec<_>>(), pad_id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_collate_chosen_then_rejected_with_completion_masks() {
        let a = Pair {
            prompt: vec![1, 2],
            chosen: vec![3, 4],
            rejected: vec![5],
        };
        let b = Pair {
            prompt: vec![6],
            chosen: vec![7],
            rejected: vec![8, 9, 10],
        };
        let batch = collate_pairs(&[&a, &b], 0);
        assert_eq!((batch.batch_size, batch.seq_len), (4, 3));
        assert_eq!(batch.inputs, vec![1, 2, 3, 6, 0, 0, 1, 2, 0, 6, 8, 9]);
        assert_eq!(batch.targets, vec![2, 3, 4, 7, 0, 0, 2, 5, 0, 8, 9, 10]);
        let m = batch.loss_mask.unwrap();
        assert_eq!(m, vec![0., 1., 1., 1., 0., 0., 0., 1., 0., 1., 1., 1.]);
        let p = batch.pairs.unwrap();
        assert_eq!(p.count, 2);
        assert_eq!(
            p.sequence_mask,
            vec![1., 1., 1., 1., 0., 0., 1., 1., 0., 1., 1., 1.]
        );
    }
}
