//! A GGUF file's tokenizer, rebuilt from its `tokenizer.ggml.*` metadata as a Hugging Face
//! `tokenizer.json` document, so that one implementation (the `tokenizers` crate) tokenizes for
//! HF directories and GGUF files alike. Two vocabularies, as llama.cpp names them:
//! - `gpt2`: byte-level BPE with merges (SmolLM, Qwen2/Qwen3, Llama 3, Phi-4-mini's family);
//!   the pre-tokenizer named by `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece BPE with scores and no merges (Llama 2, Mistral v0.1, TinyLlama,
//!   Phi-3, Gemma). llama.cpp merges the adjacent pair whose join is the highest-scoring piece;
//!   the merges are rebuilt in that order, as transformers' `generate_merges` does, so that BPE
//!   by rank makes the same choices.
//!
//! Checked against llama.cpp's own tokenizer test vectors (`models/ggml-vocab-*.gguf.inp/.out`,
//! which llama.cpp generated with transformers) in kiln's tests.

use crate::ModelError;
use crate::gguf::{GgufFile, Value};
use serde_json::json;
use std::collections::HashMap;

/// SentencePiece's escaped space.
const SPM_SPACE: &str = "\u{2581}";

/// Pieces longer than this are not rebuilt as merges (see [`merges_by_score`]).
const MAX_MERGED_PIECE_BYTES: usize = 256;

/// llama.cpp's token types (`llama_token_type`).
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;
const TYPE_BYTE: u64 = 6;

impl GgufFile {
    /// Rebuilds the tokenizer as a Hugging Face `tokenizer.json` document.
    pub fn tokenizer_json(&self) -> Result<serde_json::Value, ModelError> {
        let model = self.meta("tokenizer.ggml.model")?.as_str().unwrap_or("");
        match model {
            "gpt2" => self.byte_level_bpe(),
            "llama" => self.sentencepiece_bpe(),
            other => Err(self.tokenizer_error(format!(
                "tokenizer model `{other}` is not supported (kiln reads `gpt2`, byte-level BPE, \
                 and `llama`, SentencePiece BPE)"
            ))),
        }
    }

    pub fn chat_template(&self) -> Option<String> {
        self.metadata
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    pub fn token_id(&self, key: &str) -> Option<u32> {
        self.metadata
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as u32)
    }

    fn tokenizer_error(&self, message: String) -> ModelError {
        ModelError::File {
            path: self.path.clone(),
            message,
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, ModelError> {
        self.meta(key)?
            .as_array()
            .ok_or_else(|| self.tokenizer_error(format!("metadata `{key}` is not an array")))?
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    self.tokenizer_error(format!("metadata `{key}` holds a non-string"))
                })
            })
            .collect()
    }

    /// `tokenizer.ggml.token_type`, one per token (normal where the file has none).
    fn token_types(&self, count: usize) -> Vec<u64> {
        let mut types: Vec<u64> = self
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        types.resize(count, 1);
        types
    }

    fn byte_level_bpe(&self) -> Result<serde_json::Value, ModelError> {
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types = self.token_types(tokens.len());
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true});
        let pre = self
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let pre_tokenizer = match pre {
            "smollm" | "starcoder" | "refact" => {
                json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]})
            }
            "gpt2" | "default" | "gpt-2" => byte_level.clone(),
            // Qwen2/Qwen3 and Llama 3 (and the models that share their tokenizers): the split
            // regex of their tokenizer.json (llama.cpp's `llama-vocab.cpp` keeps the same), then
            // byte-level mapping without a regex of its own. They differ in digits: one at a
            // time, or up to three.
            "qwen2" | "llama-bpe" | "llama3" | "llama-v3" => {
                let digits = if pre == "qwen2" {
                    r"\p{N}"
                } else {
                    r"\p{N}{1,3}"
                };
                let pattern = format!(
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                );
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                     "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                     "use_regex": false}]})
            }
            other => {
                return Err(self.tokenizer_error(format!(
                    "tokenizer pre-tokenizer `{other}` is not supported yet"
                )));
            }
        };
        // Llama 3's tokenizer emits a pre-token that is itself a token whole, merges or not
        // (transformers' `ignore_merges`; llama.cpp sets it for these names).
        let ignore_merges = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens(&tokens, &types),
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": ignore_merges, "vocab": vocabulary(&tokens), "merges": merges},
        }))
    }

    fn sentencepiece_bpe(&self) -> Result<serde_json::Value, ModelError> {
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types = self.token_types(tokens.len());
        let scores: Vec<f64> = self
            .meta("tokenizer.ggml.scores")?
            .as_array()
            .unwrap_or(&[])
            .iter()
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
            .collect();
        if scores.len() != tokens.len() || scores.iter().any(|s| !s.is_finite()) {
            return Err(self.tokenizer_error(format!(
                "metadata `tokenizer.ggml.scores` must hold one finite number per token ({} \
                 tokens, {} scores)",
                tokens.len(),
                scores.len()
            )));
        }
        // llama.cpp prepends a space to text that starts the input or follows a special token,
        // unless the file says otherwise (Gemma: false).
        let add_space_prefix = self
            .metadata
            .get("tokenizer.ggml.add_space_prefix")
            .map(|v| matches!(v, Value::Bool(true)))
            .unwrap_or(true);
        let unk_token = self
            .token_id("tokenizer.ggml.unknown_token_id")
            .and_then(|id| tokens.get(id as usize).cloned());
        let mut vocab = vocabulary(&tokens);
        // llama.cpp starts from single characters whether or not they are pieces; BPE by rank
        // needs every start symbol in the vocabulary. An ASCII character that is only a byte
        // piece (`<0x09>` for a tab in Gemma's) stands for that byte, as transformers' Gemma
        // converter does.
        for (id, piece) in tokens.iter().enumerate() {
            if types[id] != TYPE_BYTE {
                continue;
            }
            let byte = piece
                .strip_prefix("<0x")
                .and_then(|p| p.strip_suffix('>'))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            if let Some(b) = byte.filter(u8::is_ascii) {
                vocab
                    .entry((b as char).to_string())
                    .or_insert_with(|| json!(id));
            }
        }
        let ids: HashMap<&str, usize> = vocab
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_u64()? as usize)))
            .collect();
        let merges = merges_by_score(&tokens, &scores, &ids);
        let mut normalizer = Vec::new();
        if add_space_prefix {
            normalizer.push(json!({"type": "Prepend", "prepend": SPM_SPACE}));
        }
        normalizer
            .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}));
        let mut decoder = vec![
            json!({"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_space_prefix {
            decoder.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens(&tokens, &types),
            "normalizer": {"type": "Sequence", "normalizers": normalizer},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": decoder},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk_token,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
        }))
    }
}

/// Token → id (a piece listed twice keeps its last id, as a JSON object would).
fn vocabulary(tokens: &[String]) -> serde_json::Map<String, serde_json::Value> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect()
}

/// Control (3) and user-defined (4) tokens are matched whole in the text, before BPE.
fn added_tokens(tokens: &[String], types: &[u64]) -> Vec<serde_json::Value> {
    tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types[*i], TYPE_CONTROL | TYPE_USER_DEFINED))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types[i] == TYPE_CONTROL})
        })
        .collect()
}

/// Every split of every piece into two pieces, ranked by the joined piece's score (highest
/// first; ties by the joined piece's id, then by the halves' ids): SentencePiece's BPE order.
fn merges_by_score(
    tokens: &[String],
    scores: &[f64],
    ids: &HashMap<&str, usize>,
) -> Vec<serde_json::Value> {
    let mut merges: Vec<(f64, usize, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // A duplicate piece: its last id is the one BPE produces. A piece longer than any real
        // vocabulary's (Gemma's longest are runs of 31 spaces, 93 bytes) is left unsplit, which
        // keeps a hostile file's cost linear in its size.
        if ids.get(piece.as_str()) != Some(&id) || piece.len() > MAX_MERGED_PIECE_BYTES {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push((scores[id], id, l, r, left, right));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges
        .into_iter()
        .map(|(.., left, right)| json!([left, right]))
        .collect()
}
