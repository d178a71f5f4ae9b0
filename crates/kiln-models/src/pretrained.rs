//! A pretrained model with what it needs to be used: tokenizer, chat template, end-of-turn ids.
//! From a Hugging Face directory (also kiln's own checkpoints) or a GGUF file.

use crate::gguf::GgufFile;
use crate::quant::BaseQuant;
use crate::{Model, ModelError, hf};
use burn::prelude::Device;
use kiln_data::{ChatTemplate, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct Pretrained {
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Ids that end a generated answer (EOS and end-of-turn tokens).
    pub stop_ids: Vec<u32>,
    /// `Some` for a GGUF source: its tokenizer as `tokenizer.json`, for writing HF directories.
    pub tokenizer_json: Option<Value>,
    /// `Some` for a GGUF source: its `tokenizer.*` metadata, written back as it was into GGUF.
    pub gguf_tokenizer: Option<Vec<(String, crate::gguf::Value)>>,
}

fn file_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// True when `path` is a GGUF file (by magic, not by name).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// Every id the tokenizer (and the end-of-turn list) can produce must have an embedding row:
/// a larger tokenizer than the model would index past the embedding table.
fn check_vocabulary(
    path: &Path,
    model: &Model,
    tokenizer: &Tokenizer,
    stop_ids: &[u32],
) -> Result<(), ModelError> {
    let rows = model.config().vocab_size;
    let ids = tokenizer.id_bound();
    if ids > rows {
        return Err(file_err(
            path,
            format!(
                "the tokenizer has ids up to {} but the model's vocab_size is {rows}: they do not \
                 belong together",
                ids - 1
            ),
        ));
    }
    if let Some(bad) = stop_ids.iter().find(|&&id| id as usize >= rows) {
        return Err(file_err(
            path,
            format!("end-of-turn token id {bad} is beyond the model's vocab_size {rows}"),
        ));
    }
    Ok(())
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Pretrained {
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_held(path, device, BaseQuant::None)
    }

    /// Loads with the frozen matrices held as `quant` says (`finetune.base_quant`).
    pub fn load_held(path: &Path, device: &Device, quant: BaseQuant) -> Result<Self, ModelError> {
        if is_gguf(path) {
            return Self::from_gguf_held(&GgufFile::read(path)?, device, quant);
        }
        if !path.is_dir() {
            return Err(file_err(path, "not a model directory or a GGUF file"));
        }
        let model = hf::load_model_held(path, device, quant)?;
        let tokenizer = Tokenizer::load_dir(path).map_err(|e| file_err(path, e.to_string()))?;
        let mut stop_ids = Vec::new();
        let mut chat_template = None;
        let tc_path = path.join("tokenizer_config.json");
        if tc_path.is_file() {
            let text = std::fs::read_to_string(&tc_path).map_err(|source| ModelError::Io {
                path: tc_path.clone(),
                source,
            })?;
            let tc: Value =
                serde_json::from_str(&text).map_err(|e| file_err(&tc_path, e.to_string()))?;
            let eos = token_text(tc.get("eos_token")).unwrap_or_default();
            let bos = token_text(tc.get("bos_token")).unwrap_or_default();
            if let Some(id) = tokenizer.token_id(&eos) {
                stop_ids.push(id);
            }
            let source = match tc.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
            chat_template = source.map(|source| ChatTemplate {
                source,
                bos_token: bos,
                eos_token: eos,
                kwargs: Default::default(),
            });
        }
        let gen_path = path.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path)
            && let Ok(g) = serde_json::from_str::<Value>(&text)
        {
            match g.get("eos_token_id") {
                Some(Value::Number(n)) => stop_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Value::Array(a)) => {
                    stop_ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                _ => {}
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        check_vocabulary(path, &model, &tokenizer, &stop_ids)?;
        Ok(Self {
            path: path.to_path_buf(),
            model,
            tokenizer,
            chat_template,
            stop_ids,
            tokenizer_json: None,
            gguf_tokenizer: None,
        })
    }

    /// From a GGUF file already read (callers that looked at its metadata first read it once).
    pub fn from_gguf(file: GgufFile, device: &Device) -> Result<Self, ModelError> {
        Self::from_gguf_held(&file, device, BaseQuant::None)
    }

    /// [`Pretrained::from_gguf`] with the frozen matrices held as `quant` says; the file stays
    /// the caller's (`kiln fuse --quant keep` copies blocks from it afterwards).
    pub fn from_gguf_held(
        file: &GgufFile,
        device: &Device,
        quant: BaseQuant,
    ) -> Result<Self, ModelError> {
        let path = file.path.clone();
        let path = path.as_path();
        // The architecture and config first: they decide whether the file is usable at all.
        crate::gguf::read_config(file)?;
        let json = file.tokenizer_json()?;
        let tokenizer = Tokenizer::from_hf_json(&json.to_string(), path)
            .map_err(|e| file_err(path, e.to_string()))?;
        let token = |key: &str| {
            file.token_id(key)
                .and_then(|id| {
                    file.metadata
                        .get("tokenizer.ggml.tokens")?
                        .as_array()?
                        .get(id as usize)?
                        .as_str()
                        .map(str::to_string)
                })
                .unwrap_or_default()
        };
        let eos = token("tokenizer.ggml.eos_token_id");
        let bos = token("tokenizer.ggml.bos_token_id");
        let stop_ids: Vec<u32> = file
            .token_id("tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect();
        let chat_template = file.chat_template().map(|source| ChatTemplate {
            source,
            bos_token: bos,
            eos_token: eos,
            kwargs: Default::default(),
        });
        let gguf_tokenizer = file
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let model = crate::gguf::load_model_held(file, device, quant)?;
        check_vocabulary(path, &model, &tokenizer, &stop_ids)?;
        Ok(Self {
            path: path.to_path_buf(),
            model,
            tokenizer,
            chat_template,
            stop_ids,
            tokenizer_json: Some(json),
            gguf_tokenizer: Some(gguf_tokenizer),
        })
    }
}
