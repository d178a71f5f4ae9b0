use std::path::PathBuf;

/// Everything that can be wrong with a config. Each variant names where the mistake is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: the config is empty; write `{{}}` to train with every default, or start from \
         configs/shakespeare-char.yaml"
    )]
    Empty { path: PathBuf },
    #[error("{origin}:{line}:{column}: {field}{message}")]
    Yaml {
        origin: String,
        line: u64,
        column: u64,
        /// `field `a.b`: ` when the field could be named, else empty.
        field: String,
        message: String,
    },
    #[error("{origin}: field `{field}`: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
    #[error("--set {item}: {message}")]
    Override { item: String, message: String },
    #[error("internal config error: {0}")]
    Internal(String),
}

impl ConfigError {
    pub(crate) fn yaml(origin: &str, error: &serde_saphyr::Error) -> Self {
        let (line, column) = error
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        // The library's message repeats the location and a snippet; keep its first line only.
        let rendered = error.to_string();
        let message = rendered
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("invalid YAML")
            .to_string();
        let message = strip_location_suffix(&message);
        ConfigError::Yaml {
            origin: origin.to_string(),
            line,
            column,
            field: String::new(),
            message,
        }
    }

    /// Names the dotted field at the error's line, read from the YAML text's indentation.
    pub(crate) fn with_field_from(mut self, text: &str) -> Self {
        if let ConfigError::Yaml {
            line,
            column,
            field,
            ..
        } = &mut self
            && let Some(mut path) = field_at_line(text, *line as usize)
        {
            if let Some(inner) = flow_key_before(text, *line as usize, *column as usize) {
                path = format!("{path}.{inner}");
            }
            *field = format!("field `{path}`: ");
        }
        self
    }
}

/// serde-saphyr's messages carry their own `error: line L column C: ` prefix (or an ` at line L
/// column C` suffix); ours already says where, so keep only the description.
fn strip_location_suffix(message: &str) -> String {
    let mut m = message.trim_start_matches("error:").trim_start();
    if let Some(rest) = m.strip_prefix("line ")
        && let Some(i) = rest.find(": ")
        && rest[..i].contains("column")
    {
        m = &rest[i + 2..];
    }
    match m.find(" at line ") {
        Some(i) => m[..i].to_string(),
        None => m.to_string(),
    }
}

/// The dotted key path of the mapping entry on 1-based `line` of a block-style YAML document.
pub(crate) fn field_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    if line == 0 || line > lines.len() {
        return None;
    }
    let key_of = |l: &str| -> Option<(usize, String)> {
        let indent = l.len() - l.trim_start().len();
        let body = l.trim_start().trim_start_matches("- ");
        if body.starts_with('#') {
            return None;
        }
        let colon = body.find(':')?;
        let key = body[..colon].trim().trim_matches(|c| c == '"' || c == '\'');
        if key.is_empty() || key.contains([' ', '{', '[', '"']) {
            return None;
        }
        Some((indent, key.to_string()))
    };
    let (mut indent, first) = key_of(lines[line - 1])?;
    let mut path = vec![first];
    for l in lines[..line - 1].iter().rev() {
        if indent == 0 {
            break;
        }
        if let Some((i, key)) = key_of(l)
            && i < indent
        {
            path.push(key);
            indent = i;
        }
    }
    path.reverse();
    Some(path.join("."))
}

/// Inside a flow mapping (`a: { b: 1, c: x }`), the key whose value starts before `column`.
fn flow_key_before(text: &str, line: usize, column: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let prefix: String = l.chars().take(column.saturating_sub(1)).collect();
    let brace = prefix.rfind('{')?;
    let inside = &prefix[brace + 1..];
    let entry = inside.rsplit(',').next()?;
    let key = entry.split(':').next()?.trim().trim_matches('"');
    (!key.is_empty() && key.chars().all(|c| c.is_alphanumeric() || c == '_'))
        .then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::{field_at_line, flow_key_before};

    #[test]
    fn keeps_only_the_description_of_library_messages() {
        assert_eq!(
            super::strip_location_suffix("error: line 31 column 7: invalid floating point"),
            "invalid floating point"
        );
        assert_eq!(
            super::strip_location_suffix("unknown field `x` at line 2 column 3"),
            "unknown field `x`"
        );
    }

    #[test]
    fn names_keys_inside_flow_mappings() {
        let text = "optim:\n  schedule: { kind: cosin, warmup_steps: 5 }\n";
        assert_eq!(flow_key_before(text, 2, 21).as_deref(), Some("kind"));
        assert_eq!(flow_key_before(text, 2, 3), None);
    }

    #[test]
    fn names_nested_fields_from_indentation() {
        let text = "run:\n  name: x\noptim:\n  lr: abc\n  schedule:\n    kind: cosine\n";
        assert_eq!(field_at_line(text, 2).as_deref(), Some("run.name"));
        assert_eq!(field_at_line(text, 4).as_deref(), Some("optim.lr"));
        assert_eq!(
            field_at_line(text, 6).as_deref(),
            Some("optim.schedule.kind")
        );
    }
}
