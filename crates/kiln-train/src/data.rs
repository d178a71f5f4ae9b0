//! The data a run trains on: text windows of a corpus or tokenized JSONL examples, built from
//! the config for a tokenizer (the pretrained model's, a saved one, or one trained here).

use crate::TrainError;
use kiln_config::{Config, DataFormat};
use kiln_data::jsonl::{self, Dataset, Encoding, Format};
use kiln_data::preference::{self, PairEncoding, PreferenceDataset};
use kiln_data::{Batch, ChatTemplate, Corpus, Tokenizer};

/// The data a run samples batches from.
pub enum TrainData {
    /// Random contiguous windows of a token stream.
    Text(Corpus),
    /// Tokenized JSONL examples, padded per batch.
    Examples {
        dataset: Dataset,
        pad_id: u32,
        pack: bool,
    },
    /// Tokenized preference pairs (DPO, ORPO), `batch_size` pairs a micro-batch.
    Pairs {
        dataset: PreferenceDataset,
        pad_id: u32,
    },
}

impl TrainData {
    pub fn train_batch(&self, seed: u64, index: u64, batch_size: usize, seq_len: usize) -> Batch {
        match self {
            TrainData::Text(c) => c.train_batch(seed, index, batch_size, seq_len),
            TrainData::Examples {
                dataset,
                pad_id,
                pack: true,
            } => {
                jsonl::packed_train_batch(&dataset.train, seed, index, batch_size, seq_len, *pad_id)
            }
            TrainData::Examples {
                dataset, pad_id, ..
            } => jsonl::train_batch(&dataset.train, seed, index, batch_size, *pad_id),
            TrainData::Pairs { dataset, pad_id } => {
                preference::train_pairs(&dataset.train, seed, index, batch_size, *pad_id)
            }
        }
    }

    /// Validation batches: `count` fixed random windows, or every validation example (at most
    /// `count` batches of them).
    pub fn valid_batches(
        &self,
        seed: u64,
        count: usize,
        batch_size: usize,
        seq_len: usize,
    ) -> Box<dyn Iterator<Item = Batch> + '_> {
        // Built one at a time as evaluation consumes them: `train.eval_batches` may be large.
        match self {
            TrainData::Text(c) => Box::new(
                (0..count as u64).map(move |i| c.valid_batch(seed, i, batch_size, seq_len)),
            ),
            TrainData::Examples {
                dataset, pad_id, ..
            } => {
                let mut b = jsonl::sequential_batches(&dataset.valid, batch_size, *pad_id);
                b.truncate(count.max(1));
                Box::new(b.into_iter())
            }
            TrainData::Pairs { dataset, pad_id } => {
                let mut b = preference::sequential_pairs(&dataset.valid, batch_size, *pad_id);
                b.truncate(count.max(1));
                Box::new(b.into_iter())
            }
        }
    }

    /// Micro-batches of `batch_size` in one pass over the training data, where that is counted
    /// in records (pairs) rather than tokens.
    pub fn records_per_epoch(&self) -> Option<usize> {
        match self {
            TrainData::Pairs { dataset, .. } => Some(dataset.train.pairs.len()),
            _ => None,
        }
    }

    /// Tokens in one pass over the training data.
    pub fn train_tokens(&self) -> usize {
        match self {
            TrainData::Text(c) => c.train.len(),
            TrainData::Examples { dataset, .. } => {
                dataset.train.examples.iter().map(|e| e.ids.len()).sum()
            }
            TrainData::Pairs { dataset, .. } => dataset
                .train
                .pairs
                .iter()
                .map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len())
                .sum(),
        }
    }

    /// A checksum of every token the run trains and validates on (and which positions train):
    /// ranks of one run compare theirs, so a rank whose data file differs is found before it
    /// trains on other data.
    pub fn fingerprint(&self) -> u32 {
        fn ids(crc: u32, ids: &[u32]) -> u32 {
            let crc = crc32c::crc32c_append(crc, &(ids.len() as u64).to_le_bytes());
            ids.iter()
                .fold(crc, |c, id| crc32c::crc32c_append(c, &id.to_le_bytes()))
        }
        match self {
            TrainData::Text(c) => ids(ids(0, &c.train), &c.valid),
            TrainData::Examples { dataset, .. } => dataset
                .train
                .examples
                .iter()
                .chain(&dataset.valid.examples)
                .fold(0, |crc, e| {
                    let trained: Vec<u8> = e.trained.iter().map(|&t| t as u8).collect();
                    crc32c::crc32c_append(ids(crc, &e.ids), &trained)
                }),
            TrainData::Pairs { dataset, .. } => dataset
                .train
                .pairs
                .iter()
                .chain(&dataset.valid.pairs)
                .fold(0, |crc, p| {
                    ids(ids(ids(crc, &p.prompt), &p.chosen), &p.rejected)
                }),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TrainData::Text(c) => format!(
                "{} train / {} validation tokens",
                c.train.len(),
                c.valid.len()
            ),
            TrainData::Examples { dataset, .. } => format!(
                "{} train / {} validation examples ({:?}; {} train and {} validation truncated to data.seq_len)",
                dataset.train.examples.len(),
                dataset.valid.examples.len(),
                dataset.format,
                dataset.train.truncated,
                dataset.valid.truncated
            ),
            TrainData::Pairs { dataset, .. } => format!(
                "{} train / {} validation preference pairs ({} train and {} validation truncated \
                 to data.seq_len + 1 tokens a sequence; {} and {} dropped: their prompts fill it)",
                dataset.train.pairs.len(),
                dataset.valid.pairs.len(),
                dataset.train.truncated,
                dataset.valid.truncated,
                dataset.train.dropped,
                dataset.valid.dropped
            ),
        }
    }
}

fn format_of(f: DataFormat) -> Option<Format> {
    match f {
        DataFormat::Auto => None,
        DataFormat::Text => Some(Format::Text),
        DataFormat::Completions => Some(Format::Completions),
        DataFormat::Chat => Some(Format::Chat),
    }
}

/// Loads or builds the data for `tokenizer`.
pub fn load_data(
    config: &Config,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<&ChatTemplate>,
    stop_ids: &[u32],
) -> Result<(Tokenizer, TrainData), TrainError> {
    let d = &config.data;
    if d.train.is_dir() {
        let tokenizer = tokenizer.ok_or_else(|| {
            TrainError::Other(format!(
                "data.train {} is a JSONL dataset: it needs a tokenizer, from model.pretrained",
                d.train.display()
            ))
        })?;
        let eos_id = stop_ids.first().copied();
        let pad_id = eos_id.unwrap_or(0);
        let preference_records = preference::is_preference_dir(&d.train) == Some(true);
        if config.finetune.objective.is_preference() {
            let enc = PairEncoding {
                tokenizer: &tokenizer,
                chat_template,
                eos_id,
                // TRL's max_length counts the tokens of a sequence; data.seq_len, as for SFT
                // examples, the positions it predicts from.
                max_len: d.seq_len + 1,
            };
            let dataset = PreferenceDataset::load(&d.train, &enc)?;
            return Ok((tokenizer, TrainData::Pairs { dataset, pad_id }));
        }
        if preference_records {
            return Err(kiln_data::DataError::Corpus {
                path: d.train.join("train.jsonl"),
                message: "holds preference records (prompt, chosen, rejected): train on them \
                          with finetune.objective: dpo or orpo"
                    .into(),
            }
            .into());
        }
        let enc = Encoding {
            tokenizer: &tokenizer,
            chat_template,
            eos_id,
            mask_prompt: d.mask_prompt,
            max_seq_len: d.seq_len,
        };
        let dataset = Dataset::load(&d.train, format_of(d.format), &enc)?;
        return Ok((
            tokenizer,
            TrainData::Examples {
                dataset,
                pad_id,
                pack: d.pack,
            },
        ));
    }
    let (tokenizer, corpus) = Corpus::prepare(d, tokenizer)?;
    Ok((tokenizer, TrainData::Text(corpus)))
}
