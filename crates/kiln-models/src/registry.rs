//! Which family reads which model: Hugging Face `model_type`/`architectures` and GGUF
//! `general.architecture` to a [`Family`], over the list in `families/mod.rs`.

use crate::family::Family;
use serde_json::{Map, Value};

pub use crate::families::FAMILIES;

/// The family registered as `name`.
pub fn by_name(name: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.name() == name)
}

/// What kiln reads, for messages: class names and model types.
pub fn known_hf() -> String {
    let mut names: Vec<&str> = FAMILIES
        .iter()
        .flat_map(|f| f.hf_architectures().iter().copied())
        .collect();
    names.sort_unstable();
    names.join(", ")
}

/// GGUF architectures kiln reads, for messages.
pub fn known_gguf() -> String {
    let mut names: Vec<&str> = FAMILIES
        .iter()
        .flat_map(|f| f.gguf_architectures().iter().copied())
        .collect();
    names.sort_unstable();
    names.join(", ")
}

/// The family of a `config.json`: by its first `architectures` entry, else by `model_type`.
pub fn for_hf_config(hf: &Map<String, Value>) -> Result<&'static dyn Family, String> {
    let arch = hf
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let model_type = hf.get("model_type").and_then(Value::as_str);
    let found = match arch {
        Some(a) => FAMILIES.iter().find(|f| f.hf_architectures().contains(&a)),
        None => model_type.and_then(|t| FAMILIES.iter().find(|f| f.model_types().contains(&t))),
    };
    found.copied().ok_or_else(|| {
        format!(
            "unsupported architecture `{}`: kiln reads {}",
            arch.or(model_type).unwrap_or("(none given)"),
            known_hf()
        )
    })
}

/// The family of a GGUF `general.architecture`.
pub fn for_gguf(arch: &str) -> Result<&'static dyn Family, String> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.gguf_architectures().contains(&arch))
        .ok_or_else(|| {
            format!(
                "unsupported GGUF architecture `{arch}`: kiln reads {}",
                known_gguf()
            )
        })
}
