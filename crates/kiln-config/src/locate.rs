//! Models by the names people use: a path, a Hugging Face repo id found in the local Hub cache,
//! `ollama:NAME[:TAG]` found in Ollama's store, or a model in LM Studio's folder. Nothing is
//! downloaded: a name that is not on this machine gets a message saying where kiln looked and
//! how to fetch it.
//!
//! - Hugging Face: `ORG/NAME` (or `ORG/NAME/FILE.gguf` for one file of a GGUF repo) in
//!   `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//!   `~/.cache/huggingface/hub`: `models--ORG--NAME/snapshots/<the commit refs/main names>`.
//! - Ollama: `ollama:NAME[:TAG]` (tag `latest`; `NAME` may be `NAMESPACE/NAME` or
//!   `HOST/NAMESPACE/NAME`) in `$OLLAMA_MODELS`, else `~/.ollama/models`: the manifest
//!   `manifests/registry.ollama.ai/library/NAME/TAG` names the GGUF blob
//!   `blobs/sha256-<digest>` by its layer of media type `application/vnd.ollama.image.model`.
//! - LM Studio: `lmstudio:PUBLISHER/REPO[/FILE.gguf]`, or a bare `PUBLISHER/REPO[/FILE.gguf]`
//!   not in the Hugging Face cache, in `~/.lmstudio/models` (or the older
//!   `~/.cache/lm-studio/models`).

use std::path::{Path, PathBuf};

/// Why a model reference names nothing on this machine.
#[derive(Debug, thiserror::Error)]
#[error("{reference}: {message}")]
pub struct LocateError {
    pub reference: String,
    pub message: String,
}

/// The file or directory `reference` names (see the module's documentation).
pub fn locate_model(reference: &Path) -> Result<PathBuf, LocateError> {
    if reference.exists() {
        return Ok(reference.to_path_buf());
    }
    let text = reference.to_string_lossy().to_string();
    let fail = |message: String| LocateError {
        reference: text.clone(),
        message,
    };
    if let Some(name) = text.strip_prefix("ollama:") {
        return ollama(name).map_err(fail);
    }
    if let Some(name) = text.strip_prefix("lmstudio:") {
        let id = repo_id(name).ok_or_else(|| {
            fail("an LM Studio model is named `lmstudio:PUBLISHER/REPO[/FILE.gguf]`".into())
        })?;
        return lm_studio(&id).map_err(|e| match e {
            Lookup::Missing(looked) => fail(not_found(&looked, "")),
            Lookup::Ambiguous(message) => fail(message),
        });
    }
    let Some(id) = repo_id(&text) else {
        return Err(fail("not found (no such file or directory)".into()));
    };
    let mut looked = Vec::new();
    for lookup in [hugging_face, lm_studio] {
        match lookup(&id) {
            Ok(found) => return Ok(found),
            Err(Lookup::Ambiguous(message)) => return Err(fail(message)),
            Err(Lookup::Missing(dirs)) => looked.extend(dirs),
        }
    }
    let fetch = format!(
        "; fetch it with `huggingface-cli download {}/{}` (or `hf download`), or give a path",
        id.org, id.name
    );
    Err(fail(not_found(&looked, &fetch)))
}

fn not_found(looked: &[PathBuf], fetch: &str) -> String {
    let places: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    format!(
        "not found: no such file or directory, and no model of that name in {}{fetch}",
        places.join(", ")
    )
}

/// `ORG/NAME` or `ORG/NAME/FILE.gguf`.
struct RepoId {
    org: String,
    name: String,
    file: Option<String>,
}

fn repo_id(text: &str) -> Option<RepoId> {
    let parts: Vec<&str> = text.split('/').collect();
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match parts.as_slice() {
        [org, name] if plain(org) && plain(name) => Some(RepoId {
            org: org.to_string(),
            name: name.to_string(),
            file: None,
        }),
        [org, name, file] if plain(org) && plain(name) && plain(file) => Some(RepoId {
            org: org.to_string(),
            name: name.to_string(),
            file: Some(file.to_string()),
        }),
        _ => None,
    }
}

enum Lookup {
    /// The places looked in.
    Missing(Vec<PathBuf>),
    Ambiguous(String),
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

fn env_dir(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The Hub cache directory, as huggingface_hub finds it.
fn hub_cache() -> Option<PathBuf> {
    env_dir("HF_HUB_CACHE")
        .or_else(|| env_dir("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env_dir("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| home().map(|h| h.join(".cache/huggingface/hub")))
}

fn hugging_face(id: &RepoId) -> Result<PathBuf, Lookup> {
    let Some(cache) = hub_cache() else {
        return Err(Lookup::Missing(Vec::new()));
    };
    let repo = cache.join(format!("models--{}--{}", id.org, id.name));
    let snapshots = repo.join("snapshots");
    // refs/main names the snapshot the last download of the default branch left; without it
    // (a download by commit), the most recently written snapshot.
    let main = std::fs::read_to_string(repo.join("refs/main"))
        .ok()
        .map(|c| snapshots.join(c.trim()))
        .filter(|p| p.is_dir());
    let snapshot = main.or_else(|| newest(&snapshots, |p| p.is_dir()));
    let Some(snapshot) = snapshot else {
        return Err(Lookup::Missing(vec![repo]));
    };
    pick(&snapshot, id).map_err(|e| match e {
        Lookup::Missing(_) => Lookup::Missing(vec![repo]),
        other => other,
    })
}

/// A model inside a repo directory: `FILE` when named, else the directory when it holds
/// `config.json`, else its one GGUF file.
fn pick(dir: &Path, id: &RepoId) -> Result<PathBuf, Lookup> {
    if let Some(file) = &id.file {
        let p = dir.join(file);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Lookup::Missing(vec![p]))
        };
    }
    if dir.join("config.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                })
                .collect()
        })
        .unwrap_or_default();
    ggufs.sort();
    match ggufs.len() {
        0 => Err(Lookup::Missing(vec![dir.to_path_buf()])),
        1 => Ok(ggufs.remove(0)),
        _ => {
            let names: Vec<String> = ggufs
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| format!("{}/{}/{}", id.org, id.name, n.to_string_lossy()))
                .collect();
            Err(Lookup::Ambiguous(format!(
                "{} holds {} GGUF files; name one: {}",
                dir.display(),
                names.len(),
                names.join(", ")
            )))
        }
    }
}

/// The entry of `dir` satisfying `keep` that was modified last.
fn newest(dir: &Path, keep: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| keep(p))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

fn lm_studio(id: &RepoId) -> Result<PathBuf, Lookup> {
    let Some(home) = home() else {
        return Err(Lookup::Missing(Vec::new()));
    };
    let mut looked = Vec::new();
    for root in [".lmstudio/models", ".cache/lm-studio/models"] {
        let dir = home.join(root).join(&id.org).join(&id.name);
        if dir.is_dir() {
            return pick(&dir, id);
        }
        looked.push(dir);
    }
    Err(Lookup::Missing(looked))
}

fn ollama(name: &str) -> Result<PathBuf, String> {
    let store = env_dir("OLLAMA_MODELS")
        .or_else(|| home().map(|h| h.join(".ollama/models")))
        .ok_or("no home directory to find Ollama's models in")?;
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, t),
        _ => (name, "latest"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let ok = |s: &&str| !s.is_empty() && !s.starts_with('.') && !s.contains('\\');
    if !parts.iter().all(ok) || tag.is_empty() || tag.starts_with('.') {
        return Err("an Ollama model is named `ollama:NAME[:TAG]`".into());
    }
    let full: Vec<&str> = match parts.as_slice() {
        [n] => vec!["registry.ollama.ai", "library", n],
        [ns, n] => vec!["registry.ollama.ai", ns, n],
        [host, ns, n] => vec![host, ns, n],
        _ => return Err("an Ollama model is named `ollama:NAME[:TAG]`".into()),
    };
    let manifest = full
        .iter()
        .fold(store.join("manifests"), |p, s| p.join(s))
        .join(tag);
    let text = std::fs::read_to_string(&manifest).map_err(|_| {
        format!(
            "no manifest {} in Ollama's store; fetch it with `ollama pull {name}`",
            manifest.display()
        )
    })?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("manifest {}: not JSON: {e}", manifest.display()))?;
    let digest = doc["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["mediaType"] == "application/vnd.ollama.image.model")
        .and_then(|l| l["digest"].as_str())
        .ok_or_else(|| format!("manifest {} names no model layer", manifest.display()))?;
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| format!("manifest {}: digest `{digest}`", manifest.display()))?;
    let blob = store.join("blobs").join(format!("sha256-{hex}"));
    if blob.is_file() {
        Ok(blob)
    } else {
        Err(format!(
            "the manifest names {}, which is missing; `ollama pull {name}` fetches it again",
            blob.display()
        ))
    }
}
