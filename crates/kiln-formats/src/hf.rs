//! Hugging Face model directories, the files: `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`, f32/f16/bf16 weights. What `config.json` means is each model
//! family's (`kiln_models::families`).

use crate::ModelError;
use crate::safetensors_io::{self, HostTensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

fn file_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The safetensors files of a model directory: the one file, or the shards the index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(file_err(
            dir,
            format!("no {WEIGHTS_FILE} or {INDEX_FILE} in this directory"),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        path: index.clone(),
        source,
    })?;
    let files = parse_index(&text, &index)?;
    let paths: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(file_err(
            &index,
            format!("shard {} is missing", missing.display()),
        ));
    }
    Ok(paths)
}

/// The shard file names `model.safetensors.index.json` lists, sorted and without repeats; names
/// that would leave the model directory are refused. `path` names the index in errors.
pub fn parse_index(text: &str, path: &Path) -> Result<Vec<String>, ModelError> {
    let v: Value = serde_json::from_str(text).map_err(|e| file_err(path, e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| file_err(path, "no `weight_map` object"))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| file_err(path, format!("weight_map[{tensor}] is not a file name")))?;
        if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(file_err(
                path,
                format!("weight_map[{tensor}] = `{file}` leaves the directory"),
            ));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files)
}

/// All tensors of a model directory as f32 host tensors.
pub fn read_weights(dir: &Path) -> Result<BTreeMap<String, HostTensor>, ModelError> {
    let mut all = BTreeMap::new();
    for file in weight_files(dir)? {
        for (name, t) in safetensors_io::read_all(&file)? {
            if all.insert(name.clone(), t).is_some() {
                return Err(ModelError::Tensor {
                    path: file.clone(),
                    name,
                    message: "appears in more than one shard".into(),
                });
            }
        }
    }
    Ok(all)
}
