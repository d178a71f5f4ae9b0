//! Checkpoints: `<run dir>/step-NNNNNNN/` holds
//! - `model.safetensors` and `config.json`: a Hugging Face Llama model directory,
//! - the tokenizer (`tokenizer.json`, or `char_tokenizer.json` for char-level runs),
//! - `optimizer.safetensors`: AdamW moments keyed by parameter name,
//! - `trainer_state.json`: step, data position, scheduler and best-loss bookkeeping,
//! - `kiln.yaml`: the resolved config.
//!
//! A checkpoint is written into a hidden temp directory and renamed into place, so a directory
//! named `step-*` is always complete. `latest` and `best` are symlinks, replaced atomically.

use crate::TrainError;
use crate::shape::Method;
use kiln_config::Config;
use kiln_data::{ChatTemplate, Tokenizer};
use kiln_models::ParamKind;
use kiln_models::fsutil::{atomic_write, sync_dir};
use kiln_models::lora::LoraSpec;
use kiln_models::safetensors_io::{self, HostTensor};
use kiln_models::{Model, ModelConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const CONFIG_FILE: &str = "config.json";
pub const KILN_CONFIG_FILE: &str = "kiln.yaml";
/// Written last: every other file's size and CRC-32C. A checkpoint without a valid manifest is
/// not used.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's key prefix for a causal LM's adapter tensors.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Total steps of the run (the schedule's horizon).
    pub total_steps: usize,
    /// Micro-batches consumed: the data position (batches are a function of seed and index).
    pub micro_batches: u64,
    /// Sequences per micro-batch (what `train.batch_size: auto` resolved to).
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// The recompute the run's plan chose (`Some(0)`: none); a resumed run with
    /// `memory.checkpointing: auto` keeps it, since recompute changes float rounding.
    #[serde(default)]
    pub recompute_every: Option<usize>,
    /// AdamW's bias-correction counter.
    pub optimizer_t: u64,
    pub tokens_seen: u64,
    pub seed: u64,
    pub learning_rate: f64,
    pub last_train_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<usize>,
    /// Seconds of training before this checkpoint (excluding time spent before a resume's load).
    pub elapsed_secs: f64,
    pub kiln_version: String,
    /// The processes that trained it (`mpirun -np N`); `None` in checkpoints of one process
    /// and in those written before runs could have several.
    #[serde(default)]
    pub ranks: Option<usize>,
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// An I/O error on a checkpoint file, kept as the error's source.
fn io_err(path: &Path, source: std::io::Error) -> TrainError {
    TrainError::CheckpointIo {
        path: path.to_path_buf(),
        source,
    }
}

pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:07}")
}

/// What a checkpoint holds besides weights and optimizer state: how the weights were trained
/// (a LoRA run's checkpoint is its adapter) and the tokenizer files a model directory carries.
pub struct Contents<'a> {
    pub method: &'a Method,
    pub tokenizer: &'a Tokenizer,
    pub tokenizer_json: Option<&'a serde_json::Value>,
    pub chat_template: Option<&'a ChatTemplate>,
}

/// Writes a checkpoint for `state.step` and points `latest` at it.
pub fn save(
    run_dir: &Path,
    config: &Config,
    model: &Model,
    optimizer_state: &BTreeMap<String, HostTensor>,
    state: &TrainerState,
    contents: &Contents<'_>,
) -> Result<PathBuf, TrainError> {
    let final_dir = run_dir.join(step_dir_name(state.step));
    let tmp = run_dir.join(format!(".{}.tmp", step_dir_name(state.step)));
    let io = io_err;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;

    match contents.method {
        Method::Lora { base, spec } => {
            write_adapter(&tmp, model, spec, base, config.finetune.lora.dropout)?;
            if config.finetune.lora.mlx_export {
                write_mlx_adapter(&tmp.join("mlx"), model, spec, config.finetune.lora.dropout)?;
            }
        }
        Method::Scratch | Method::Full { .. } => {
            let base = match contents.method {
                Method::Full { base } => Some(base.as_path()),
                _ => None,
            };
            write_model_dir(
                &tmp,
                model,
                contents.tokenizer,
                contents.tokenizer_json,
                contents.chat_template,
                base,
            )?;
        }
    }
    safetensors_io::write_f32(&tmp.join(OPTIMIZER_FILE), optimizer_state, &[])?;
    let st = serde_json::to_vec_pretty(state).map_err(|e| ckpt_err(&tmp, e.to_string()))?;
    atomic_write(&tmp.join(STATE_FILE), &st).map_err(|e| io(&tmp, e))?;
    atomic_write(&tmp.join(KILN_CONFIG_FILE), config.to_yaml().as_bytes())
        .map_err(|e| io(&tmp, e))?;
    write_manifest(&tmp)?;
    sync_dir(&tmp);

    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
    sync_dir(run_dir);
    point(run_dir, "latest", &final_dir)?;
    Ok(final_dir)
}

/// A Hugging Face model directory: config, weights, tokenizer files (and, for a fine-tuned
/// pretrained model, its tokenizer_config.json / generation_config.json).
pub fn write_model_dir(
    dir: &Path,
    model: &Model,
    tokenizer: &Tokenizer,
    tokenizer_json: Option<&serde_json::Value>,
    chat_template: Option<&ChatTemplate>,
    base: Option<&Path>,
) -> Result<(), TrainError> {
    let io = io_err;
    let weights = model.hf_tensors_where(|k| !k.is_lora());
    safetensors_io::write_f32(&dir.join(MODEL_FILE), &weights, &[])?;
    let base_dir = base.filter(|b| b.is_dir());
    let copied = |name: &str| base_dir.map(|b| b.join(name)).filter(|p| p.is_file());
    // Where the base brings no generation_config.json (a GGUF base, a model trained here),
    // transformers' generate() would not know where a turn ends: the chat template's end token
    // (the model's stop token) goes into one, and into config.json.
    let mut config = model.config().to_hf_json();
    let mut generation = serde_json::Map::new();
    if copied("generation_config.json").is_none() {
        let id = |text: &str| {
            (!text.is_empty())
                .then(|| tokenizer.token_id(text))
                .flatten()
        };
        let ids = chat_template.map(|t| {
            [
                ("bos_token_id", id(&t.bos_token)),
                ("eos_token_id", id(&t.eos_token)),
            ]
        });
        for (key, value) in ids.into_iter().flatten() {
            if let Some(v) = value {
                generation.insert(key.into(), v.into());
                if let Some(c) = config.as_object_mut() {
                    c.entry(key).or_insert(v.into());
                }
            }
        }
    }
    let hf = serde_json::to_vec_pretty(&config).map_err(|e| ckpt_err(dir, e.to_string()))?;
    atomic_write(&dir.join(CONFIG_FILE), &hf).map_err(|e| io(dir, e))?;
    match tokenizer_json {
        Some(json) => atomic_write(&dir.join("tokenizer.json"), json.to_string().as_bytes())
            .map_err(|e| io(dir, e))?,
        None => {
            tokenizer.save(dir)?;
        }
    }
    for name in [
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        if let Some(src) = copied(name) {
            let bytes = std::fs::read(&src).map_err(|e| io(&src, e))?;
            atomic_write(&dir.join(name), &bytes).map_err(|e| io(dir, e))?;
        }
    }
    if !generation.is_empty() {
        let text =
            serde_json::to_vec_pretty(&generation).map_err(|e| ckpt_err(dir, e.to_string()))?;
        atomic_write(&dir.join("generation_config.json"), &text).map_err(|e| io(dir, e))?;
    }
    if base_dir.is_none()
        && let Some(t) = chat_template
    {
        let tc = serde_json::json!({"chat_template": t.source, "bos_token": t.bos_token,
            "eos_token": t.eos_token, "tokenizer_class": "PreTrainedTokenizerFast"});
        atomic_write(
            &dir.join("tokenizer_config.json"),
            tc.to_string().as_bytes(),
        )
        .map_err(|e| io(dir, e))?;
    }
    Ok(())
}

/// An mlx-lm adapter directory: `adapters.safetensors` (`...q_proj.lora_a` `[in, r]`,
/// `lora_b` `[r, out]`) and `adapter_config.json` with an absolute `scale`.
pub fn write_mlx_adapter(
    dir: &Path,
    model: &Model,
    spec: &LoraSpec,
    dropout: f64,
) -> Result<(), TrainError> {
    let io = io_err;
    let n = model.config().num_hidden_layers;
    let suffix: Vec<usize> = (n - spec.layers.len().min(n)..n).collect();
    let mut sorted = spec.layers.clone();
    sorted.sort_unstable();
    if sorted != suffix {
        return Err(ckpt_err(
            dir,
            "mlx-lm adapts the last N blocks only; finetune.lora.layers is not such a suffix",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    // kiln holds A as [in, r] and B as [r, out]: mlx-lm's own layout, so no transpose.
    let tensors: BTreeMap<String, HostTensor> = model
        .hf_tensors_where(|k| matches!(k, ParamKind::LoraA | ParamKind::LoraB))
        .into_iter()
        .map(|(name, t)| {
            let (stem, mlx) = match name.strip_suffix(".lora_A.weight") {
                Some(stem) => (stem.to_string(), "lora_a"),
                None => (
                    name.trim_end_matches(".lora_B.weight").to_string(),
                    "lora_b",
                ),
            };
            let data = kiln_models::params::transpose_host(&t.data, t.shape[0], t.shape[1]);
            (
                format!("{stem}.{mlx}"),
                HostTensor {
                    shape: vec![t.shape[1], t.shape[0]],
                    data,
                },
            )
        })
        .collect();
    safetensors_io::write_f32(&dir.join("adapters.safetensors"), &tensors, &[])?;
    // mlx-lm names a key by its path inside the block (`self_attn.q_proj`).
    let mut keys: Vec<String> = Vec::new();
    for (path, _, _) in spec.selected(model.arch()) {
        let key = path.splitn(4, '.').nth(3).unwrap_or(&path).to_string();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let cfg = serde_json::json!({
        "fine_tune_type": "lora",
        "num_layers": spec.layers.len(),
        "lora_parameters": {"rank": spec.rank, "scale": spec.scale(), "dropout": dropout, "keys": keys},
    });
    let text = serde_json::to_vec_pretty(&cfg).map_err(|e| ckpt_err(dir, e.to_string()))?;
    atomic_write(&dir.join("adapter_config.json"), &text).map_err(|e| io(dir, e))
}

/// A PEFT LoRA adapter directory: `adapter_model.safetensors` + `adapter_config.json`.
pub fn write_adapter(
    dir: &Path,
    model: &Model,
    spec: &LoraSpec,
    base: &Path,
    dropout: f64,
) -> Result<(), TrainError> {
    let io = io_err;
    let tensors: BTreeMap<String, HostTensor> = model
        .hf_tensors_where(ParamKind::is_lora)
        .into_iter()
        .map(|(name, t)| (format!("{PEFT_PREFIX}{name}"), t))
        .collect();
    safetensors_io::write_f32(&dir.join(ADAPTER_FILE), &tensors, &[])?;
    let all_layers = spec.layers.len() == model.config().num_hidden_layers;
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": dropout,
        "target_modules": spec.targets,
        "layers_to_transform": if all_layers { serde_json::Value::Null } else { serde_json::json!(spec.layers) },
        "bias": "none",
        "base_model_name_or_path": std::fs::canonicalize(base).unwrap_or(base.to_path_buf()).display().to_string(),
        "fan_in_fan_out": false,
        "use_rslora": spec.rslora,
        "use_dora": spec.dora,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "revision": null,
    });
    let text = serde_json::to_vec_pretty(&cfg).map_err(|e| ckpt_err(dir, e.to_string()))?;
    atomic_write(&dir.join(ADAPTER_CONFIG_FILE), &text).map_err(|e| io(dir, e))
}

/// Atomically makes `run_dir/<link>` a relative symlink to `target`.
pub fn point(run_dir: &Path, link: &str, target: &Path) -> Result<(), TrainError> {
    let name = target
        .file_name()
        .ok_or_else(|| ckpt_err(target, "no directory name"))?;
    let tmp = run_dir.join(format!(".{link}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(name, &tmp).map_err(|e| io_err(&tmp, e))?;
    #[cfg(not(unix))]
    std::fs::write(&tmp, name.to_string_lossy().as_bytes()).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, run_dir.join(link)).map_err(|e| io_err(run_dir, e))?;
    sync_dir(run_dir);
    Ok(())
}

/// Step checkpoint directories in `run_dir`, oldest first, whole or not ([`verify`] says which).
pub fn list(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn files_under(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() {
            files_under(&e.path(), &format!("{name}/"), out);
        } else if name != MANIFEST_FILE && !name.starts_with('.') {
            out.push((name, e.path()));
        }
    }
}

/// Every file of the checkpoint `dir` (its manifest too), as one byte string that [`unpack`]
/// writes out again: how rank 0 hands the checkpoint a run resumes from to ranks on machines
/// that do not hold it.
pub fn pack(dir: &Path) -> Result<Vec<u8>, TrainError> {
    let mut files = Vec::new();
    files_under(dir, "", &mut files);
    files.push((MANIFEST_FILE.to_string(), dir.join(MANIFEST_FILE)));
    let mut out = Vec::new();
    for (name, path) in files {
        let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// Writes the files of a [`pack`]ed checkpoint into `dir`, which then verifies as the original.
pub fn unpack(packed: &[u8], dir: &Path) -> Result<(), TrainError> {
    let damaged = || ckpt_err(dir, "the checkpoint rank 0 sent is cut short");
    fn take<'a>(packed: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
        let piece = packed.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(piece)
    }
    fn length(packed: &[u8], at: &mut usize) -> Option<usize> {
        Some(u64::from_le_bytes(take(packed, at, 8)?.try_into().ok()?) as usize)
    }
    let mut files = Vec::new();
    let mut at = 0;
    while at < packed.len() {
        let entry = (|| {
            let n = length(packed, &mut at)?;
            let name = String::from_utf8(take(packed, &mut at, n)?.to_vec()).ok()?;
            let n = length(packed, &mut at)?;
            Some((name, take(packed, &mut at, n)?))
        })();
        files.push(entry.ok_or_else(damaged)?);
    }
    for (name, bytes) in files {
        // Names are the sender's relative paths; nothing may land outside `dir`.
        if name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(ckpt_err(dir, format!("rank 0 sent a file named {name:?}")));
        }
        let path = dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| io_err(&path, e))?;
    }
    Ok(())
}

/// Records every file's size and CRC-32C in `manifest.json`, written last (also how a checkpoint
/// edited by hand is sealed again).
pub fn write_manifest(dir: &Path) -> Result<(), TrainError> {
    let mut files = Vec::new();
    files_under(dir, "", &mut files);
    let mut entries = Vec::new();
    for (name, path) in files {
        let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        entries.push(serde_json::json!({"file": name, "bytes": bytes.len(), "crc32c": crc32c::crc32c(&bytes)}));
    }
    let manifest = serde_json::json!({"kiln_version": env!("CARGO_PKG_VERSION"), "files": entries});
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| ckpt_err(dir, e.to_string()))?;
    atomic_write(&dir.join(MANIFEST_FILE), &text).map_err(|e| io_err(dir, e))
}

/// Checks a checkpoint against its manifest: the manifest lists what a checkpoint must hold
/// (trainer state, optimizer state, weights or adapter, configs), every listed file is present
/// with its size and checksum, the safetensors files parse, and the trainer state is one this
/// directory can hold. A checkpoint that fails is never read.
pub fn verify(dir: &Path) -> Result<(), String> {
    let text = match std::fs::read(dir.join(MANIFEST_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("no {MANIFEST_FILE} (an incomplete write)"));
        }
        Err(e) => return Err(format!("{MANIFEST_FILE}: {e}")),
    };
    let m: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{MANIFEST_FILE} is damaged (not JSON: {e})"))?;
    let files = m
        .get("files")
        .and_then(|f| f.as_array())
        .ok_or_else(|| format!("{MANIFEST_FILE} is damaged (no file list)"))?;
    let mut listed = Vec::new();
    for f in files {
        let name = f
            .get("file")
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("{MANIFEST_FILE} is damaged (an entry without a name)"))?;
        if name.split('/').any(|part| part == ".." || part.is_empty()) || name.starts_with('/') {
            return Err(format!(
                "{MANIFEST_FILE} names `{name}` outside the checkpoint"
            ));
        }
        let bytes = match std::fs::read(dir.join(name)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("{name} is missing"));
            }
            Err(e) => return Err(format!("{name}: {e}")),
        };
        if Some(bytes.len() as u64) != f.get("bytes").and_then(|v| v.as_u64()) {
            return Err(format!(
                "{name} has {} bytes, the manifest says {}",
                bytes.len(),
                f["bytes"]
            ));
        }
        if Some(crc32c::crc32c(&bytes) as u64) != f.get("crc32c").and_then(|v| v.as_u64()) {
            return Err(format!("{name} fails its checksum"));
        }
        if name.ends_with(".safetensors") {
            safetensors_io::check(&bytes, &dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        }
        listed.push(name);
    }
    let weights = [MODEL_FILE, ADAPTER_FILE];
    if !weights.iter().any(|w| listed.contains(w)) {
        return Err(format!(
            "{MANIFEST_FILE} lists neither {MODEL_FILE} nor {ADAPTER_FILE}"
        ));
    }
    for required in [STATE_FILE, OPTIMIZER_FILE, KILN_CONFIG_FILE] {
        if !listed.contains(&required) {
            return Err(format!("{MANIFEST_FILE} does not list {required}"));
        }
    }
    let state = read_state(dir).map_err(|e| crate::error::chain(&e))?;
    check_state(dir, &state)
}

/// A trainer state this checkpoint directory can hold: its step is the directory's, within the
/// run's horizon, and the data position and counters are ones a run of that many steps reaches.
fn check_state(dir: &Path, state: &TrainerState) -> Result<(), String> {
    use kiln_config::limits::{MAX_BATCH, MAX_STEPS};
    let bad = |what: String| Err(format!("{STATE_FILE}: {what}"));
    if let Some(step) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<usize>().ok())
        && step != state.step
    {
        return bad(format!(
            "step {} in a directory for step {step}",
            state.step
        ));
    }
    if state.total_steps == 0 || state.total_steps > MAX_STEPS || state.step > state.total_steps {
        return bad(format!(
            "step {} of total_steps {} is not a step of a run",
            state.step, state.total_steps
        ));
    }
    if state.micro_batches > (state.step as u64).saturating_mul(MAX_BATCH as u64)
        || state.optimizer_t > state.step as u64
    {
        return bad(format!(
            "micro_batches {} / optimizer_t {} do not fit step {}",
            state.micro_batches, state.optimizer_t, state.step
        ));
    }
    if state.micro_batch.is_some_and(|b| b == 0 || b > MAX_BATCH) {
        return bad("micro_batch is outside 1..=MAX_BATCH".into());
    }
    if !(state.learning_rate.is_finite() && state.elapsed_secs.is_finite()) {
        return bad("learning_rate or elapsed_secs is not finite".into());
    }
    Ok(())
}

/// The newest checkpoint that passes [`verify`], and why each newer one was passed over.
pub fn latest_verified(run_dir: &Path) -> (Option<PathBuf>, Vec<String>) {
    let mut skipped = Vec::new();
    for (_, path) in list(run_dir).into_iter().rev() {
        match verify(&path) {
            Ok(()) => return (Some(path), skipped),
            Err(why) => skipped.push(format!("{}: {why}", path.display())),
        }
    }
    (None, skipped)
}

/// What `path` names, checked before anything reads it (for `generate`, `eval`, `fuse` and
/// `--adapter`, as for resume): a kiln checkpoint (it has a manifest or a trainer state) must
/// verify; a run directory gives its newest checkpoint that verifies, with a warning for each
/// newer one passed over; any other file or directory (a Hugging Face model, a PEFT adapter, a
/// GGUF file) is returned as it is.
pub fn resolve(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join(MANIFEST_FILE).exists() || path.join(STATE_FILE).exists() {
        return verify(path)
            .map(|()| path.to_path_buf())
            .map_err(|why| ckpt_err(path, why));
    }
    if list(path).is_empty() {
        return Ok(path.to_path_buf());
    }
    let (found, skipped) = latest_verified(path);
    for why in &skipped {
        crate::sinks::warn(&format!("not using {why}; trying the previous checkpoint"));
    }
    found.ok_or_else(|| {
        ckpt_err(
            path,
            format!(
                "none of its {} checkpoints is complete (each is named above)",
                skipped.len()
            ),
        )
    })
}

/// The newest complete, verified checkpoint of a run.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    latest_verified(run_dir).0
}

/// Removes step checkpoints beyond the newest `keep_last`, sparing `best`.
pub fn prune(run_dir: &Path, keep_last: usize, best_step: Option<usize>) -> Result<(), TrainError> {
    let all = list(run_dir);
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, path) in &all[..cut] {
        if Some(*step) == best_step {
            continue;
        }
        std::fs::remove_dir_all(path).map_err(|e| io_err(path, e))?;
    }
    Ok(())
}

pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ckpt_err(&path, e.to_string()))
}

/// Reads a checkpoint's (or any HF model directory's) `config.json`.
pub fn read_model_config(dir: &Path) -> Result<ModelConfig, TrainError> {
    Ok(kiln_models::hf::read_config(dir)?)
}

/// Loads a checkpoint's (or any HF directory's) weights onto `device`.
pub fn load_model(dir: &Path, device: &burn::tensor::Device) -> Result<Model, TrainError> {
    Ok(kiln_models::hf::load_model(dir, device)?)
}
