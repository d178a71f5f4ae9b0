//! kiln's experiment schema.
//!
//! A run is described by one YAML file whose sections mirror the pipeline: `run`, `backend`,
//! `model`, `data`, `optim`, `train`, `logging`. Every field has a default, unknown keys are
//! refused, and `--set section.field=value` overrides any field after the file is read. Errors
//! name the file, line, column and field.

pub mod diff;
mod error;
mod finite;
pub mod limits;
pub mod locate;
mod overrides;
pub mod paths;
mod schema;

pub use error::ConfigError;
pub use overrides::parse_override;
pub use schema::*;

use std::path::Path;

/// `path` with `.` and `dir/..` removed, without asking the file system (so a path that does not
/// exist yet, an output directory, reads as the user would write it).
fn lexically_normal(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl Config {
    /// Reads a YAML config from `path` and applies `overrides` (`a.b=c` strings) on top.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // An empty file would silently be a default 1000-step run: almost always a mistake
        // (a truncated copy, the wrong path). `{}` asks for the defaults on purpose.
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Err(ConfigError::Empty {
                path: path.to_path_buf(),
            });
        }
        let config = Self::from_yaml_str(&text, &path.display().to_string())?
            .expand_home()
            .relative_to_file(path, &text);
        // A model named by `--set` is blamed on the override, not on the file.
        let set_here = overrides
            .iter()
            .any(|o| o.split('=').next().map(str::trim) == Some("model.pretrained"));
        let origin = if set_here {
            "--set".to_string()
        } else {
            path.display().to_string()
        };
        config
            .with_overrides(overrides)?
            .expand_home()
            .locate_pretrained(&origin)
    }

    /// Finds `model.pretrained` when it names a model rather than a path (`locate`: a Hugging
    /// Face repo id in the local cache, `ollama:NAME`, an LM Studio model); `origin` names the
    /// config in errors.
    pub fn locate_pretrained(mut self, origin: &str) -> Result<Self, ConfigError> {
        if let Some(p) = self.model.pretrained.as_mut() {
            *p = locate::locate_model(p).map_err(|e| ConfigError::Invalid {
                origin: origin.to_string(),
                field: "model.pretrained".into(),
                message: e.to_string(),
            })?;
        }
        Ok(self)
    }

    /// Relative paths written in the file at `path` are the file's, as docker-compose and
    /// Cargo read theirs: `run.output_dir` lies next to the file; an input (`data.train`,
    /// `data.valid`, `data.tokenizer.path`, `model.pretrained`) is taken next to the file when
    /// it is there, and from the current directory only when it is there alone (configs written
    /// before paths were the file's, run from where they were written). A `model.pretrained`
    /// found in neither place stays as written: it may be a model's name (`locate`). Fields the
    /// file leaves at their defaults, and `--set` values, are the current directory's.
    pub fn relative_to_file(mut self, path: &Path, text: &str) -> Self {
        let written: serde_json::Value = serde_saphyr::from_str(text).unwrap_or_default();
        let has =
            |section: &str, field: &str| written.get(section).and_then(|s| s.get(field)).is_some();
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let beside = |p: &Path| p.is_relative().then(|| lexically_normal(&dir.join(p)));
        let input = |p: &mut std::path::PathBuf| {
            if let Some(b) = beside(p)
                && (b.exists() || !p.exists())
            {
                *p = b;
            }
        };
        if has("run", "output_dir")
            && let Some(b) = beside(&self.run.output_dir)
        {
            self.run.output_dir = b;
        }
        if has("data", "train") {
            input(&mut self.data.train);
        }
        if has("data", "valid")
            && let Some(p) = self.data.valid.as_mut()
        {
            input(p);
        }
        let tokenizer_path = written
            .get("data")
            .and_then(|d| d.get("tokenizer"))
            .and_then(|t| t.get("path"))
            .is_some();
        if tokenizer_path && let Some(p) = self.data.tokenizer.path.as_mut() {
            input(p);
        }
        if has("model", "pretrained")
            && let Some(p) = self.model.pretrained.as_mut()
            && let Some(b) = beside(p)
            && b.exists()
        {
            *p = b;
        }
        self
    }

    /// Expands a leading `~/` in path fields to `$HOME/`.
    pub fn expand_home(mut self) -> Self {
        let Some(home) = std::env::var_os("HOME") else {
            return self;
        };
        let expand = |p: &mut std::path::PathBuf| {
            if let Ok(rest) = p.strip_prefix("~") {
                *p = std::path::Path::new(&home).join(rest);
            }
        };
        expand(&mut self.run.output_dir);
        expand(&mut self.data.train);
        if let Some(p) = self.data.valid.as_mut() {
            expand(p);
        }
        if let Some(p) = self.model.pretrained.as_mut() {
            expand(p);
        }
        if let Some(p) = self.data.tokenizer.path.as_mut() {
            expand(p);
        }
        self
    }

    /// Parses YAML text; `origin` names the text in errors (usually the file path).
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_saphyr::from_str(text)
            .map_err(|e| ConfigError::yaml(origin, &e).with_field_from(text))?;
        config
            .validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                origin: origin.to_string(),
                field,
                message,
            })?;
        Ok(config)
    }

    /// Applies `key.path=value` overrides, re-validating the result.
    pub fn with_overrides(self, overrides: &[String]) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Ok(self);
        }
        let mut tree =
            serde_json::to_value(&self).map_err(|e| ConfigError::Internal(e.to_string()))?;
        let mut trees = Vec::with_capacity(overrides.len());
        for item in overrides {
            let (key, value) = parse_override(item)?;
            overrides::set_path(&mut tree, &key, value, item)?;
            trees.push(tree.clone());
        }
        let config: Config = serde_json::from_value(tree).map_err(|e| {
            // Blame the first override after which the config no longer reads, not all of them.
            let culprit = trees
                .into_iter()
                .position(|t| serde_json::from_value::<Config>(t).is_err())
                .map_or_else(|| overrides.join(" "), |i| overrides[i].clone());
            ConfigError::Override {
                item: culprit,
                message: e.to_string(),
            }
        })?;
        config
            .validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                origin: "--set".to_string(),
                field,
                message,
            })?;
        Ok(config)
    }

    /// The resolved config as YAML, as written into a run directory.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self)
            .unwrap_or_else(|e| format!("# could not serialize config: {e}\n"))
    }
}
