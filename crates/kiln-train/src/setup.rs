//! What a run trains and on what: the model (fresh, or pretrained with LoRA or fully trained),
//! its tokenizer, and the data (text windows or JSONL examples), all from the config and, on
//! resume, the checkpoint.

use crate::TrainError;
use crate::checkpoint;
use crate::data::{TrainData, load_data};
use crate::plan::Plan;
pub use crate::shape::Method;
use crate::shape::{lora_spec, scratch_shape};
use burn::prelude::*;
use kiln_config::{Config, FinetuneMethod};
use kiln_data::{ChatTemplate, Tokenizer};
use kiln_models::lora::{self, LoraSpec};
use kiln_models::pretrained::Pretrained;
use kiln_models::safetensors_io;
use kiln_models::{Architecture, Model};
use std::path::Path;

impl Setup {
    /// What a checkpoint of this run holds besides weights and optimizer state.
    pub fn contents(&self) -> checkpoint::Contents<'_> {
        checkpoint::Contents {
            method: &self.method,
            tokenizer: &self.tokenizer,
            tokenizer_json: self.tokenizer_json.as_ref(),
            chat_template: self.chat_template.as_ref(),
        }
    }
}

/// Everything besides the model that a run needs before its first step.
pub struct Setup {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub tokenizer_json: Option<serde_json::Value>,
    pub data: TrainData,
    pub method: Method,
    /// The memory plan, made once from the declared model before any weight was allocated.
    pub plan: Plan,
    /// DPO under full fine-tuning: the pretrained model as it was before training (also on
    /// resume), the frozen reference. `None` otherwise (LoRA's reference is the base itself).
    pub reference: Option<Model>,
}

/// What `setup` asks before it builds or loads any weights, given the model's declaration and its
/// (trainable, total) parameter counts: `plan::planner` plans the run, or refuses one that
/// cannot fit.
pub type Planner<'a> =
    &'a dyn Fn(&Architecture, u64, u64, kiln_models::quant::Held) -> Result<Plan, TrainError>;

/// The model (on the plain, non-autodiff device) and the rest of the run's setup. `check` sees
/// the model's shape first, so an impossible run stops before anything is allocated.
pub fn setup(
    config: &Config,
    device: &Device,
    resume: Option<&Path>,
    planner: Planner<'_>,
) -> Result<(Model, Setup), TrainError> {
    let Some(base) = &config.model.pretrained else {
        return setup_scratch(config, device, resume, planner);
    };
    // The shape comes from config.json or the GGUF metadata; a GGUF file is read once.
    let (gguf, shape) = crate::shape::read_base(base)?;
    let arch = crate::shape::declare(&shape)?;
    let (trainable, total) = crate::shape::param_counts(config, &arch)?;
    let held = crate::shape::held(config, &arch, gguf.as_ref());
    let plan = planner(&arch, trainable, total, held)?;
    let quant = crate::shape::base_quant(config);
    let mut p = match gguf {
        Some(file) => Pretrained::from_gguf_held(&file, device, quant)?,
        None => Pretrained::load_held(base, device, quant)?,
    };
    if let (Some(t), Some(think)) = (p.chat_template.as_mut(), config.data.enable_thinking) {
        t.kwargs.insert("enable_thinking".into(), think.into());
    }
    let (tokenizer, data) = load_data(
        config,
        Some(p.tokenizer.clone()),
        p.chat_template.as_ref(),
        &p.stop_ids,
    )?;
    let mut reference = None;
    let (model, method) = match config.finetune.method {
        FinetuneMethod::Full => {
            if config.finetune.objective == kiln_config::Objective::Dpo {
                reference = Some(p.model.clone());
            }
            let model = match resume {
                Some(dir) => checkpoint::load_model(dir, device)?,
                None => p.model,
            };
            (model, Method::Full { base: base.clone() })
        }
        FinetuneMethod::Lora => {
            let spec = lora_spec(config, p.model.arch())?;
            let mut model = lora::attach(p.model, &spec, config.run.seed);
            if let Some(dir) = resume {
                model = load_adapter(model, &dir.join(checkpoint::ADAPTER_FILE))?;
            }
            (
                model,
                Method::Lora {
                    base: base.clone(),
                    spec,
                },
            )
        }
    };
    Ok((
        model,
        Setup {
            tokenizer,
            chat_template: p.chat_template,
            tokenizer_json: p.tokenizer_json,
            data,
            method,
            plan,
            reference,
        },
    ))
}

fn setup_scratch(
    config: &Config,
    device: &Device,
    resume: Option<&Path>,
    planner: Planner<'_>,
) -> Result<(Model, Setup), TrainError> {
    let saved_tokenizer = match resume {
        Some(dir) => Some(Tokenizer::load_dir(dir)?),
        None => None,
    };
    let (tokenizer, data) = load_data(config, saved_tokenizer, None, &[])?;
    let model_config = scratch_shape(config, tokenizer.vocab_size())?;
    let arch = crate::shape::declare(&model_config)?;
    let n = arch.num_params() as u64;
    let plan = planner(&arch, n, n, Default::default())?;
    let model = match resume {
        Some(dir) => {
            let saved = checkpoint::read_model_config(dir)?;
            if saved.to_hf_json() != model_config.to_hf_json() {
                return Err(TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: "its model shape differs from this config's `model` section".into(),
                });
            }
            checkpoint::load_model(dir, device)?
        }
        None => Model::init(
            arch,
            config.model.initializer_range,
            config.run.seed,
            device,
        ),
    };
    Ok((
        model,
        Setup {
            tokenizer,
            chat_template: None,
            tokenizer_json: None,
            data,
            method: Method::Scratch,
            plan,
            reference: None,
        },
    ))
}

/// Replaces the adapter matrices of `model` with those of a PEFT `adapter_model.safetensors`.
pub fn load_adapter(model: Model, path: &Path) -> Result<Model, TrainError> {
    use kiln_models::{ParamKind, ParamMapper};
    let tensors = safetensors_io::read_all(path)?;
    struct Load<'a> {
        tensors: &'a std::collections::BTreeMap<String, safetensors_io::HostTensor>,
        error: Option<String>,
        used: usize,
    }
    impl ParamMapper for Load<'_> {
        fn map<const D: usize>(&mut self, name: &str, kind: ParamKind, p: Tensor<D>) -> Tensor<D> {
            if !kind.is_lora() || self.error.is_some() {
                return p;
            }
            let key = format!("{}{name}", checkpoint::PEFT_PREFIX);
            let Some(t) = self.tensors.get(&key) else {
                self.error = Some(format!("`{key}` missing"));
                return p;
            };
            let dims = p.dims();
            if kind == ParamKind::LoraMagnitude {
                if t.shape != dims {
                    self.error = Some(format!(
                        "`{key}` has shape {:?}, expected {dims:?}",
                        t.shape
                    ));
                    return p;
                }
                self.used += 1;
                return Tensor::from_data(TensorData::new(t.data.clone(), p.shape()), &p.device());
            }
            if t.shape.len() != 2 || t.shape[0] != dims[1] || t.shape[1] != dims[0] {
                self.error = Some(format!(
                    "`{key}` has shape {:?}, expected [{}, {}]",
                    t.shape, dims[1], dims[0]
                ));
                return p;
            }
            self.used += 1;
            let values = kiln_models::params::transpose_host(&t.data, t.shape[0], t.shape[1]);
            Tensor::from_data(TensorData::new(values, p.shape()), &p.device())
        }
    }
    let mut load = Load {
        tensors: &tensors,
        error: None,
        used: 0,
    };
    let model = model.map_params(&mut load);
    if let Some(message) = load.error {
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            message,
        });
    }
    if load.used != tensors.len() {
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: format!(
                "{} tensors in the file, {} adapter tensors in the model: the adapter does not fit this config \
                 (a DoRA adapter has lora_magnitude_vector tensors and `use_dora: true`)",
                tensors.len(),
                load.used
            ),
        });
    }
    Ok(model)
}

/// The LoRA spec a PEFT `adapter_config.json` describes, for a model declared as `arch`.
pub fn read_adapter_spec(dir: &Path, arch: &Architecture) -> Result<LoraSpec, TrainError> {
    let n_layers = arch.blocks.len();
    let path = dir.join(checkpoint::ADAPTER_CONFIG_FILE);
    let err = |message: String| TrainError::Checkpoint {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if v.get("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
        return Err(err("peft_type is not LORA".into()));
    }
    let rank = v
        .get("r")
        .and_then(|r| r.as_u64())
        .ok_or_else(|| err("no integer `r`".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(|a| a.as_f64())
        .unwrap_or(rank as f64);
    let targets: Vec<String> = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect(),
        Some(serde_json::Value::String(s)) if s == kiln_config::ALL_LINEAR => arch.block_modules(),
        _ => return Err(err("`target_modules` must be a list of module names".into())),
    };
    let layers = match v.get("layers_to_transform") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|l| l.as_u64().map(|l| l as usize))
            .collect(),
        Some(serde_json::Value::Number(n)) => vec![n.as_u64().unwrap_or(0) as usize],
        _ => (0..n_layers).collect(),
    };
    let spec = LoraSpec {
        rank,
        alpha,
        rslora: v
            .get("use_rslora")
            .and_then(|b| b.as_bool())
            .unwrap_or(false),
        dora: v.get("use_dora").and_then(|b| b.as_bool()).unwrap_or(false),
        targets,
        layers,
    };
    if let Some((bad, modules)) = spec.unknown_target(arch) {
        return Err(err(format!(
            "target module `{bad}` is not in this model (its linear modules: {})",
            modules.join(", ")
        )));
    }
    Ok(spec)
}

/// Attaches the PEFT adapter in `dir` to `model`.
pub fn apply_adapter_dir(model: Model, dir: &Path) -> Result<Model, TrainError> {
    let spec = read_adapter_spec(dir, model.arch())?;
    let model = lora::attach(model, &spec, 0);
    load_adapter(model, &dir.join(checkpoint::ADAPTER_FILE))
}
