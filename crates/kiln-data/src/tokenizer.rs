use crate::DataError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File name of a char-level vocabulary inside a checkpoint.
pub const CHAR_TOKENIZER_FILE: &str = "char_tokenizer.json";
/// File name of a Hugging Face tokenizer inside a checkpoint or model directory.
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";

/// One token per distinct character of the training text, in sorted order (as nanoGPT's
/// shakespeare_char does).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CharTokenizer {
    chars: Vec<char>,
    #[serde(skip)]
    index: HashMap<char, u32>,
}

impl CharTokenizer {
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self::from_chars(chars)
    }

    fn from_chars(chars: Vec<char>) -> Self {
        let index = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Self { chars, index }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        text.chars()
            .map(|ch| {
                self.index
                    .get(&ch)
                    .copied()
                    .ok_or(DataError::UnknownChar { ch })
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{fffd}'))
            .collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }
}

/// The tokenizers kiln trains with.
#[derive(Clone)]
pub enum Tokenizer {
    Char(CharTokenizer),
    /// A Hugging Face tokenizer (trained BPE, or a model's `tokenizer.json`).
    Hf(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Char(t) => write!(f, "CharTokenizer({} chars)", t.vocab_size()),
            Tokenizer::Hf(t) => write!(f, "HfTokenizer({} tokens)", t.get_vocab_size(true)),
        }
    }
}

impl Tokenizer {
    /// Trains a byte-level BPE with `vocab_size` tokens on the given text files.
    pub fn train_bpe(files: &[PathBuf], vocab_size: usize) -> Result<Self, DataError> {
        use tokenizers::models::TrainerWrapper;
        use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::{DecoderWrapper, ModelWrapper, PreTokenizerWrapper};

        let byte_level = ByteLevel::new(false, true, true);
        let mut tokenizer = tokenizers::Tokenizer::new(ModelWrapper::BPE(BPE::default()));
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)));
        tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)));
        let mut trainer = TrainerWrapper::BpeTrainer(
            BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build(),
        );
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        tokenizer
            .train_from_files(&mut trainer, names)
            .map_err(|e| DataError::Tokenizer {
                path: files.first().cloned().unwrap_or_default(),
                message: format!("BPE training failed: {e}"),
            })?;
        Ok(Tokenizer::Hf(Box::new(tokenizer)))
    }

    /// Reads a Hugging Face `tokenizer.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, DataError> {
        if !path.is_file() {
            return Err(DataError::Tokenizer {
                path: path.to_path_buf(),
                message: "file not found".into(),
            });
        }
        let text =
            kiln_config::paths::read_regular_to_string(path).map_err(|source| DataError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_hf_json(&text, path)
    }

    /// Parses a Hugging Face `tokenizer.json` document; `origin` names it in errors.
    pub fn from_hf_json(text: &str, origin: &Path) -> Result<Self, DataError> {
        let err = |message: String| DataError::Tokenizer {
            path: origin.to_path_buf(),
            message,
        };
        // JSON syntax is checked first, into a tree: tokenizers 0.23 parsing straight from text
        // panics (`expect("Helper")`) on a syntax error inside the `decoder` object (found by
        // fuzzing; fuzz/regressions/tokenizer_json).
        let tree: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        let t: tokenizers::Tokenizer =
            serde_json::from_value(tree).map_err(|e| err(e.to_string()))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// Id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Char(t) => {
                let mut chars = token.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => t.index.get(&c).copied(),
                    _ => None,
                }
            }
            Tokenizer::Hf(t) => t.token_to_id(token),
        }
    }

    /// Writes the tokenizer into directory `dir` (as `char_tokenizer.json` or `tokenizer.json`).
    pub fn save(&self, dir: &Path) -> Result<PathBuf, DataError> {
        let (path, text) = match self {
            Tokenizer::Char(t) => (
                dir.join(CHAR_TOKENIZER_FILE),
                serde_json::to_string(t).map_err(|e| DataError::Other(e.to_string()))?,
            ),
            Tokenizer::Hf(t) => (
                dir.join(HF_TOKENIZER_FILE),
                t.to_string(false)
                    .map_err(|e| DataError::Other(e.to_string()))?,
            ),
        };
        std::fs::write(&path, text).map_err(|source| DataError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Reads the tokenizer a checkpoint or model directory holds.
    pub fn load_dir(dir: &Path) -> Result<Self, DataError> {
        let char_path = dir.join(CHAR_TOKENIZER_FILE);
        if char_path.is_file() {
            let text = std::fs::read_to_string(&char_path).map_err(|source| DataError::Read {
                path: char_path.clone(),
                source,
            })?;
            let t: CharTokenizer =
                serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
                    path: char_path.clone(),
                    message: e.to_string(),
                })?;
            return Ok(Tokenizer::Char(CharTokenizer::from_chars(t.chars)));
        }
        let hf = dir.join(HF_TOKENIZER_FILE);
        if hf.is_file() {
            return Self::from_hf_file(&hf);
        }
        Err(DataError::Tokenizer {
            path: dir.to_path_buf(),
            message: format!("no {CHAR_TOKENIZER_FILE} or {HF_TOKENIZER_FILE} in this directory"),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Hf(t) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Other(format!("tokenization failed: {e}"))),
        }
    }

    /// The ids with the tokenizer's own special tokens added (its post-processor's BOS/EOS), as
    /// transformers' `tokenizer.encode(text)` gives them.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Hf(t) => t
                .encode_fast(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| DataError::Other(format!("tokenization failed: {e}"))),
        }
    }

    /// The `tokenizer.json` document of a Hugging Face tokenizer (`None` for the character one).
    pub fn hf_json(&self) -> Option<serde_json::Value> {
        match self {
            Tokenizer::Char(_) => None,
            Tokenizer::Hf(t) => serde_json::from_str(&t.to_string(false).ok()?).ok(),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        match self {
            Tokenizer::Char(t) => Ok(t.decode(ids)),
            Tokenizer::Hf(t) => t
                .decode(ids, false)
                .map_err(|e| DataError::Other(format!("detokenization failed: {e}"))),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.vocab_size(),
            Tokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// One past the largest id the tokenizer can produce (ids may be sparse, so this can exceed
    /// [`Self::vocab_size`]): a model needs at least this many embedding rows.
    pub fn id_bound(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.vocab_size(),
            Tokenizer::Hf(t) => t
                .get_vocab(true)
                .values()
                .max()
                .map_or(0, |&m| m as usize + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_round_trip_and_unknown() {
        let t = CharTokenizer::from_text("hello world");
        assert_eq!(t.vocab_size(), 8);
        let ids = t.encode("hellz").unwrap_err();
        assert!(matches!(ids, DataError::UnknownChar { ch: 'z' }));
        assert_eq!(t.decode(&t.encode("hello").unwrap()), "hello");
    }

    #[test]
    fn bpe_trains_to_size_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("kiln-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.txt");
        let text = "the quick brown fox jumps over the lazy dog\n".repeat(50);
        std::fs::write(&file, &text).unwrap();
        let t = Tokenizer::train_bpe(&[file], 300).unwrap();
        assert!(t.vocab_size() <= 300 && t.vocab_size() > 256);
        let ids = t.encode("the lazy fox").unwrap();
        assert!(ids.len() < "the lazy fox".len());
        assert_eq!(t.decode(&ids).unwrap(), "the lazy fox");
        let saved = t.save(&dir).unwrap();
        assert!(saved.ends_with("tokenizer.json"));
        let back = Tokenizer::load_dir(&dir).unwrap();
        assert_eq!(back.encode("the lazy fox").unwrap(), ids);
        std::fs::remove_dir_all(&dir).ok();
    }
}
