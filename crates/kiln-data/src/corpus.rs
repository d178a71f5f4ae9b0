use crate::{DataError, Rng, Tokenizer};
use kiln_config::{DataConfig, TokenizerKind};
use std::path::Path;

const PURPOSE_TRAIN: u64 = 1;
const PURPOSE_VALID: u64 = 2;

/// A micro-batch of token windows: `inputs[b][t]` predicts `targets[b][t]` (the next token).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Row-major `[batch_size, seq_len]`.
    pub inputs: Vec<u32>,
    /// Row-major `[batch_size, seq_len]`.
    pub targets: Vec<u32>,
    /// 1 where the target counts toward the loss (fine-tuning: no padding, no masked prompt);
    /// `None`: every target counts.
    pub loss_mask: Option<Vec<f32>>,
    /// Packed rows: the example each position belongs to, row-major `[batch_size, seq_len]`.
    /// Attention stays inside an example and positions restart at each one. `None`: one
    /// sequence per row.
    pub segments: Option<Vec<u32>>,
    /// Preference pairs (DPO, ORPO): `None` for plain examples.
    pub pairs: Option<Pairs>,
}

/// The rows of a preference micro-batch: rows `0..count` hold the chosen sequences and
/// `count..2·count` the rejected ones, pair `i` in rows `i` and `count + i`. The batch's
/// `loss_mask` marks the completion tokens (what the log-probabilities sum over).
#[derive(Debug, Clone, PartialEq)]
pub struct Pairs {
    pub count: usize,
    /// 1 at every real (not padding) target: ORPO's NLL term covers prompt and completion.
    pub sequence_mask: Vec<f32>,
}

/// Tokenized training and validation text.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
}

pub(crate) fn read_text(path: &Path) -> Result<String, DataError> {
    let bytes = kiln_config::paths::read_regular(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut text = String::from_utf8(bytes).map_err(|e| DataError::Corpus {
        path: path.to_path_buf(),
        message: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
    })?;
    // Windows editors start UTF-8 files with a byte-order mark; it is not text (and not JSON).
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

impl Corpus {
    /// Builds (or, with `existing`, reuses) the tokenizer the config asks for and tokenizes the data.
    pub fn prepare(
        config: &DataConfig,
        existing: Option<Tokenizer>,
    ) -> Result<(Tokenizer, Corpus), DataError> {
        let train_text = read_text(&config.train)?;
        let valid_text = config.valid.as_deref().map(read_text).transpose()?;
        let tokenizer = match existing {
            Some(t) => t,
            None => match config.tokenizer.kind {
                TokenizerKind::Char => {
                    let mut all = train_text.clone();
                    if let Some(v) = &valid_text {
                        all.push_str(v);
                    }
                    Tokenizer::Char(crate::CharTokenizer::from_text(&all))
                }
                TokenizerKind::Bpe => Tokenizer::train_bpe(
                    std::slice::from_ref(&config.train),
                    config.tokenizer.vocab_size,
                )?,
                TokenizerKind::File => {
                    let path = config.tokenizer.path.as_deref().ok_or_else(|| {
                        DataError::Other("data.tokenizer.path is required for kind `file`".into())
                    })?;
                    Tokenizer::from_hf_file(path)?
                }
            },
        };
        let encode = |text: &str, path: &Path| {
            tokenizer.encode(text).map_err(|e| DataError::Corpus {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
        };
        let all = encode(&train_text, &config.train)?;
        let (train, valid) = match (&valid_text, &config.valid) {
            (Some(text), Some(path)) => (all, encode(text, path)?),
            _ => {
                let cut = ((all.len() as f64) * (1.0 - config.val_fraction)).round() as usize;
                (all[..cut].to_vec(), all[cut..].to_vec())
            }
        };
        for (name, tokens) in [("training", &train), ("validation", &valid)] {
            if tokens.len() <= config.seq_len + 1 {
                return Err(DataError::Corpus {
                    path: config.train.clone(),
                    message: format!(
                        "{name} split has {} tokens, fewer than one window of data.seq_len + 1 = {}",
                        tokens.len(),
                        config.seq_len + 1
                    ),
                });
            }
        }
        Ok((tokenizer, Corpus { train, valid }))
    }

    fn windows(tokens: &[u32], rng: &mut Rng, batch_size: usize, seq_len: usize) -> Batch {
        let mut inputs = Vec::with_capacity(batch_size * seq_len);
        let mut targets = Vec::with_capacity(batch_size * seq_len);
        let starts = (tokens.len() - seq_len - 1) as u64 + 1;
        for _ in 0..batch_size {
            let s = rng.below(starts) as usize;
            inputs.extend_from_slice(&tokens[s..s + seq_len]);
            targets.extend_from_slice(&tokens[s + 1..s + seq_len + 1]);
        }
        Batch {
            batch_size,
            seq_len,
            inputs,
            targets,
            loss_mask: None,
            segments: None,
            pairs: None,
        }
    }

    /// The training micro-batch number `index` of a run seeded with `seed`: a pure function of its
    /// arguments, so a resumed run sees exactly the batches the uninterrupted run would have.
    pub fn train_batch(&self, seed: u64, index: u64, batch_size: usize, seq_len: usize) -> Batch {
        let mut rng = Rng::stream(seed, PURPOSE_TRAIN, index);
        Self::windows(&self.train, &mut rng, batch_size, seq_len)
    }

    /// Validation batch `index`: the same windows at every evaluation, so losses compare.
    pub fn valid_batch(&self, seed: u64, index: u64, batch_size: usize, seq_len: usize) -> Batch {
        let mut rng = Rng::stream(seed, PURPOSE_VALID, index);
        Self::windows(&self.valid, &mut rng, batch_size, seq_len)
    }
}

/// Consecutive non-overlapping windows covering `tokens` (the last one may be shorter), for
/// evaluating a whole file. Each window predicts `len - 1` tokens.
pub fn sequential_windows(tokens: &[u32], seq_len: usize) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < tokens.len() {
        let end = (start + seq_len).min(tokens.len() - 1);
        out.push(Batch {
            batch_size: 1,
            seq_len: end - start,
            inputs: tokens[start..end].to_vec(),
            targets: tokens[start + 1..end + 1].to_vec(),
            loss_mask: None,
            segments: None,
            pairs: None,
        });
        start = end;
    }
    out
}

/// Reads and tokenizes a whole text file (for `kiln eval`).
pub fn tokenize_file(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<u32>, DataError> {
    let text = read_text(path)?;
    tokenizer.encode(&text).map_err(|e| DataError::Corpus {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_shifted_and_reproducible() {
        let corpus = Corpus {
            train: (0..100).collect(),
            valid: (0..50).collect(),
        };
        let a = corpus.train_batch(1, 5, 3, 8);
        assert_eq!(a, corpus.train_batch(1, 5, 3, 8));
        assert_ne!(a, corpus.train_batch(1, 6, 3, 8));
        for b in 0..3 {
            for t in 0..8 {
                assert_eq!(a.targets[b * 8 + t], a.inputs[b * 8 + t] + 1);
            }
        }
        let w = sequential_windows(&(0..10).collect::<Vec<_>>(), 4);
        assert_eq!(w.iter().map(|b| b.seq_len).sum::<usize>(), 9);
    }
}
