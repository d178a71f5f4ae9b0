//! One folder per model family: its config (from `config.json` and from GGUF metadata), its
//! tensor names in both formats, and its decoder declared from the shared layers. Adding a
//! family is its folder, its `mod` line and its entry in [`FAMILIES`].

pub mod gemma3;
pub mod llama;
pub mod phi3;
pub mod qwen3;
pub mod smollm3;

use crate::config::FieldError;
use crate::family::Family;
use serde_json::{Map, Value};

/// Every family kiln reads (`crate::registry` looks them up), one line each.
#[rustfmt::skip]
pub static FAMILIES: &[&dyn Family] = &[
    &llama::Llama,
    &qwen3::Qwen3,
    &gemma3::Gemma3,
    &phi3::Phi3,
    &smollm3::SmolLm3,
];

/// `model_type`, then the class name in `architectures`, in a config document.
pub(crate) fn set_identity(m: &mut Map<String, Value>, model_type: &str, class: &str) {
    m.insert("model_type".into(), model_type.into());
    m.insert("architectures".into(), serde_json::json!([class]));
}

/// Refuses a `hidden_act` other than the one the family's MLP computes.
pub(crate) fn require_act(
    hf: &Map<String, Value>,
    key: &str,
    expected: &[&str],
) -> Result<(), FieldError> {
    match hf.get(key).and_then(Value::as_str) {
        Some(act) if !expected.contains(&act) => Err((
            key.into(),
            format!(
                "`{act}` is not supported (this family computes {})",
                expected[0]
            ),
        )),
        _ => Ok(()),
    }
}

/// The `model_type` a config names, or the one its class name implies.
pub(crate) fn model_type_of<'a>(
    hf: &'a Map<String, Value>,
    classes: &[(&'a str, &'a str)],
) -> Option<&'a str> {
    hf.get("model_type").and_then(Value::as_str).or_else(|| {
        let class = hf.get("architectures")?.as_array()?.first()?.as_str()?;
        classes.iter().find(|(c, _)| *c == class).map(|(_, t)| *t)
    })
}

/// `sliding_window` when the config sets one: a positive number of positions.
pub(crate) fn sliding_window(
    config: &crate::config::ModelConfig,
) -> Result<Option<usize>, FieldError> {
    match crate::config::opt_usize(&config.hf, "sliding_window")? {
        Some(0) => Err(("sliding_window".to_string(), "must be positive".to_string())),
        w => Ok(w),
    }
}

/// Each layer's attention window from `layer_types` (`sliding_attention` layers see the last
/// `sliding_window` positions), as Qwen3 and SmolLM3 declare them; `None` everywhere when the
/// config has no such layers.
pub(crate) fn layer_windows(
    config: &crate::config::ModelConfig,
) -> Result<Vec<Option<usize>>, FieldError> {
    let n = config.num_hidden_layers;
    let Some(types) = config.field("layer_types") else {
        return Ok(vec![None; n]);
    };
    let types = types.as_array().filter(|t| t.len() == n).ok_or_else(|| {
        (
            "layer_types".to_string(),
            format!("must list {n} layer types"),
        )
    })?;
    let window = sliding_window(config)?;
    types
        .iter()
        .map(|t| match t.as_str() {
            Some("full_attention") => Ok(None),
            Some("sliding_attention") => match window {
                Some(w) => Ok(Some(w)),
                None => Err((
                    "sliding_window".to_string(),
                    "sliding_attention layers need a positive sliding_window".to_string(),
                )),
            },
            _ => Err((
                "layer_types".to_string(),
                "entries must be full_attention or sliding_attention".to_string(),
            )),
        })
        .collect()
}
