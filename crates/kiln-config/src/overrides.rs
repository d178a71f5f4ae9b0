//! `--set a.b.c=value` overrides, applied to the config as a JSON tree so that types are checked
//! by the same serde code that reads the file.

use crate::ConfigError;
use serde_json::Value;

/// Splits `a.b=value` into its key path and a typed value (number, bool, null, list or string).
pub fn parse_override(item: &str) -> Result<(Vec<String>, Value), ConfigError> {
    let (key, raw) = item.split_once('=').ok_or_else(|| ConfigError::Override {
        item: item.to_string(),
        message: "expected key.path=value".into(),
    })?;
    let key: Vec<String> = key.trim().split('.').map(str::to_string).collect();
    if key.iter().any(String::is_empty) {
        return Err(ConfigError::Override {
            item: item.to_string(),
            message: "empty key segment".into(),
        });
    }
    Ok((key, scalar(raw.trim())))
}

fn scalar(raw: &str) -> Value {
    if raw == "null" || raw == "~" {
        return Value::Null;
    }
    if raw == "true" || raw == "false" {
        return Value::Bool(raw == "true");
    }
    if let Ok(i) = raw.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = raw.parse::<f64>()
        && f.is_finite()
    {
        return Value::from(f);
    }
    if let Some(inner) = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return Value::Array(
            inner
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(scalar)
                .collect(),
        );
    }
    Value::String(raw.trim_matches(|c| c == '"' || c == '\'').to_string())
}

pub(crate) fn set_path(
    tree: &mut Value,
    key: &[String],
    value: Value,
    item: &str,
) -> Result<(), ConfigError> {
    let mut node = tree;
    for (depth, segment) in key.iter().enumerate() {
        let path = key[..=depth].join(".");
        let map = match node {
            Value::Object(map) => map,
            _ => {
                return Err(ConfigError::Override {
                    item: item.to_string(),
                    message: format!("`{}` is not a section", key[..depth].join(".")),
                });
            }
        };
        if !map.contains_key(segment) {
            return Err(ConfigError::Override {
                item: item.to_string(),
                message: format!("unknown field `{path}`"),
            });
        }
        if depth + 1 == key.len() {
            // A top-level section set to a plain value is a missing field name (`--set
            // backend=cpu` for `backend.kind=cpu`). Deeper objects may be enums with plain forms
            // (`memory.checkpointing: {every: 2}` or `none`).
            if let (0, Some(Value::Object(fields)), false) =
                (depth, map.get(segment), value.is_object())
            {
                let names: Vec<String> = fields.keys().map(|f| format!("{path}.{f}")).collect();
                return Err(ConfigError::Override {
                    item: item.to_string(),
                    message: format!(
                        "`{path}` is a section; set one of its fields: {}",
                        names.join(", ")
                    ),
                });
            }
            map.insert(segment.clone(), value);
            return Ok(());
        }
        let child = map.get_mut(segment).expect("checked above");
        if child.is_null() {
            *child = Value::Object(Default::default());
        }
        node = child;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_get_types() {
        assert_eq!(scalar("3e-4"), Value::from(3e-4));
        assert_eq!(scalar("200"), Value::from(200));
        assert_eq!(scalar("true"), Value::Bool(true));
        assert_eq!(scalar("cosine"), Value::from("cosine"));
        assert_eq!(scalar("[0.9, 0.95]"), serde_json::json!([0.9, 0.95]));
    }
}
