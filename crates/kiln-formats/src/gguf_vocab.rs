//! A Hugging Face tokenizer as GGUF's `tokenizer.ggml.*` metadata, the way llama.cpp's
//! `convert_hf_to_gguf.py` writes it (the reverse of `gguf_tokenizer`):
//! - byte-level BPE (SmolLM2, Llama 3, Qwen, Phi-4-mini) as `gpt2`: tokens, types, merges, and
//!   `pre`, the pre-tokenizer llama.cpp names by the fingerprint of the converter's check text;
//! - SentencePiece-style BPE (byte fallback and `▁`: Llama 2, Mistral, Gemma) as `llama`: tokens,
//!   types and scores that rank the pieces in merge order.
//!
//! Special tokens (bos/eos/unk/pad, whether bos is added) and the chat template come from the
//! caller, who knows the model directory.

use crate::gguf_pre_tokenizers::{CHECK_TEXT, PRE_TOKENIZERS};
use crate::gguf_write::Meta;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The ids and flags GGUF records beside the vocabulary.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
}

/// What the metadata is made from.
pub struct VocabSource<'a> {
    /// The tokenizer as its `tokenizer.json` document.
    pub tokenizer_json: &'a Value,
    /// The ids the tokenizer gives a text with its special tokens (the fingerprint's input).
    pub encode_with_special: &'a dyn Fn(&str) -> Result<Vec<u32>, String>,
    /// The model's embedding rows: ids without a token become `[PAD<id>]`, as the converter does.
    pub vocab_size: usize,
    pub special: SpecialTokens,
    pub chat_template: Option<&'a str>,
}

/// The `tokenizer.*` metadata of `src`.
pub fn vocab_metadata(src: &VocabSource<'_>) -> Result<Vec<(String, Meta)>, String> {
    let json = src.tokenizer_json;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(format!(
            "tokenizer model `{}` has no GGUF form kiln writes (it writes BPE tokenizers)",
            model["type"].as_str().unwrap_or("?")
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or("tokenizer.json has no model.vocab")?;
    let mut tokens: Vec<Option<String>> = vec![None; src.vocab_size];
    let mut types = vec![UNUSED; src.vocab_size];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<(), String> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            format!(
                "token `{text}` has id {id}, beyond the model's {} embedding rows",
                src.vocab_size
            )
        })?;
        *slot = Some(text.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    let byte_level = mentions(&json["pre_tokenizer"], "ByteLevel");
    let unk = model["unk_token"].as_str();
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or("tokenizer.json: a vocabulary id is not a number")?;
        let ty = if Some(text.as_str()) == unk {
            UNKNOWN
        } else if !byte_level && is_byte_token(text) {
            BYTE
        } else {
            NORMAL
        };
        place(id, text, ty)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        let special = added["special"].as_bool().unwrap_or(false) || looks_special(text);
        place(id, text, if special { CONTROL } else { USER_DEFINED })?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();

    let mut meta = Vec::new();
    if byte_level {
        let ids = (src.encode_with_special)(CHECK_TEXT)?;
        let listed = format!(
            "[{}]",
            ids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let hash = Sha256::digest(listed.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let pre = PRE_TOKENIZERS
            .iter()
            .find(|(h, _)| *h == hex)
            .map_or("default", |(_, name)| name);
        meta.push(("tokenizer.ggml.model".into(), Meta::str("gpt2")));
        meta.push(("tokenizer.ggml.pre".into(), Meta::str(pre)));
        meta.push(("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)));
        meta.push(("tokenizer.ggml.token_type".into(), Meta::I32Array(types)));
        meta.push((
            "tokenizer.ggml.merges".into(),
            Meta::StrArray(merges(model)?),
        ));
    } else {
        // SentencePiece BPE assigns ids in merge order: llama.cpp merges the pair whose join
        // scores highest, so a falling score per id makes the same choices as the merge ranks.
        let scores = (0..tokens.len())
            .map(|i| match types[i] {
                NORMAL => -(i as f32),
                _ => 0.0,
            })
            .collect();
        meta.push(("tokenizer.ggml.model".into(), Meta::str("llama")));
        meta.push(("tokenizer.ggml.pre".into(), Meta::str("default")));
        meta.push(("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)));
        meta.push(("tokenizer.ggml.scores".into(), Meta::F32Array(scores)));
        meta.push(("tokenizer.ggml.token_type".into(), Meta::I32Array(types)));
        meta.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Meta::Bool(prepends_space(json)),
        ));
    }
    let s = &src.special;
    for (key, id) in [
        ("bos_token_id", s.bos),
        ("eos_token_id", s.eos),
        ("unknown_token_id", s.unk),
        ("padding_token_id", s.pad),
    ] {
        // An id past the vocabulary (a config.json that names its big sibling's ids) would
        // make llama.cpp index past its token list: it is left out.
        if let Some(id) = id.filter(|&id| (id as usize) < src.vocab_size) {
            meta.push((format!("tokenizer.ggml.{key}"), Meta::U32(id)));
        }
    }
    for (key, flag) in [("add_bos_token", s.add_bos), ("add_eos_token", s.add_eos)] {
        if let Some(flag) = flag {
            meta.push((format!("tokenizer.ggml.{key}"), Meta::Bool(flag)));
        }
    }
    if let Some(t) = src.chat_template {
        meta.push(("tokenizer.chat_template".into(), Meta::str(t)));
    }
    Ok(meta)
}

/// Merges as `"left right"`, spaces inside a piece written as `Ġ` (gguf-py's `SpecialVocab`).
fn merges(model: &Value) -> Result<Vec<String>, String> {
    let pieces = |p: &str| p.replace(' ', "\u{120}");
    model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|merge| match merge {
                    Value::String(s) => Ok(s.clone()),
                    Value::Array(pair) => match (pair.first(), pair.get(1)) {
                        (Some(Value::String(a)), Some(Value::String(b))) => {
                            Ok(format!("{} {}", pieces(a), pieces(b)))
                        }
                        _ => Err("tokenizer.json: a merge is not a pair of strings".to_string()),
                    },
                    _ => Err("tokenizer.json: a merge is not a string or a pair".to_string()),
                })
                .collect()
        })
        .unwrap_or_else(|| Ok(Vec::new()))
}

/// `<0x0A>`: a SentencePiece byte-fallback piece.
fn is_byte_token(text: &str) -> bool {
    text.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && u8::from_str_radix(&text[3..5], 16).is_ok()
}

/// The converter's `does_token_look_special`: added tokens shaped like control tokens.
fn looks_special(text: &str) -> bool {
    (text.starts_with("<|") && text.ends_with("|>"))
        || (text.starts_with("<\u{ff5c}") && text.ends_with("\u{ff5c}>"))
        || matches!(
            text,
            "<s>" | "</s>" | "<unk>" | "<pad>" | "<mask>" | "<eos>" | "<bos>"
        )
}

/// Whether a component of type `ty` appears in `v` (a normalizer or pre-tokenizer, or a
/// `Sequence` of them).
fn mentions(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(o) => {
            o.get("type").and_then(Value::as_str) == Some(ty) || o.values().any(|x| mentions(x, ty))
        }
        Value::Array(a) => a.iter().any(|x| mentions(x, ty)),
        _ => false,
    }
}

/// SentencePiece's `add_dummy_prefix`: a normalizer that prepends `▁`, or a Metaspace
/// pre-tokenizer that prepends one.
fn prepends_space(json: &Value) -> bool {
    let prepend = |v: &Value| -> bool {
        fn find(v: &Value) -> bool {
            match v {
                Value::Object(o) => {
                    let ty = o.get("type").and_then(Value::as_str);
                    (ty == Some("Prepend"))
                        || (ty == Some("Metaspace")
                            && o.get("prepend_scheme").and_then(Value::as_str) != Some("never")
                            && o.get("add_prefix_space").and_then(Value::as_bool) != Some(false))
                        || o.values().any(find)
                }
                Value::Array(a) => a.iter().any(find),
                _ => false,
            }
        }
        find(v)
    };
    prepend(&json["normalizer"]) || prepend(&json["pre_tokenizer"])
}
