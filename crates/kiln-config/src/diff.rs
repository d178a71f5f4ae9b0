//! The fields in which two configs differ, by dotted path: what a resumed run would change.

use crate::Config;
use serde_json::Value;

/// `(field, old, new)` for every leaf that differs between `old` and `new`, in field order.
pub fn differences(old: &Config, new: &Config) -> Vec<(String, String, String)> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<(String, String, String)>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let field = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(
                    &field,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push((path.to_string(), a.to_string(), b.to_string())),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_changed_leaf() {
        let a = Config::default();
        let b = a
            .clone()
            .with_overrides(&["train.max_steps=2000".into(), "optim.lr=0.01".into()]);
        let d = differences(&a, &b.unwrap());
        let fields: Vec<&str> = d.iter().map(|(f, ..)| f.as_str()).collect();
        assert_eq!(fields, ["optim.lr", "train.max_steps"], "{d:?}");
        assert!(differences(&a, &a).is_empty());
    }
}
