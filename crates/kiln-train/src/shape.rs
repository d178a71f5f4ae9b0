//! What a run's model is before any weight exists: the family's declaration (from the pretrained
//! model's `config.json` or GGUF metadata, or from the config for a model trained from scratch),
//! the LoRA spec over its modules, and the parameter counts the planner sizes the run by.

use crate::TrainError;
use kiln_config::Config;
use kiln_models::lora::LoraSpec;
use kiln_models::quant::{BaseQuant, Held};
use kiln_models::{Architecture, ModelConfig};
use std::path::PathBuf;

/// How the weights are trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// A fresh model, every weight trained.
    Scratch,
    /// A pretrained model, every weight trained.
    Full { base: PathBuf },
    /// A pretrained model frozen, adapters trained.
    Lora { base: PathBuf, spec: LoraSpec },
}

/// The LoRA spec the config asks for, for a model declared as `arch`: `all-linear` is every
/// linear module of its blocks; other names must be modules it has.
pub fn lora_spec(config: &Config, arch: &Architecture) -> Result<LoraSpec, TrainError> {
    let l = &config.finetune.lora;
    let spec = LoraSpec {
        rank: l.rank,
        alpha: l.alpha,
        rslora: l.rslora,
        dora: l.dora,
        targets: if l.all_linear() {
            arch.block_modules()
        } else {
            l.targets()
        },
        layers: l.layer_indices(arch.blocks.len()),
    };
    if let Some((bad, modules)) = spec.unknown_target(arch) {
        return Err(TrainError::Field {
            field: "finetune.lora.target_modules".into(),
            message: format!(
                "`{bad}` is not a module of this {} model (its linear modules: {}, or all-linear)",
                arch.config.model_type,
                modules.join(", ")
            ),
        });
    }
    let n_layers = arch.blocks.len();
    if let Some(bad) = spec.layers.iter().find(|&&i| i >= n_layers) {
        return Err(TrainError::Field {
            field: "finetune.lora.layers".into(),
            message: format!("block {bad} does not exist (the model has {n_layers})"),
        });
    }
    Ok(spec)
}

/// The shape of a model trained from scratch on a tokenizer of `vocab` tokens.
pub fn scratch_shape(config: &Config, vocab: usize) -> Result<ModelConfig, TrainError> {
    if let Some(v) = config.model.vocab_size
        && v < vocab
    {
        return Err(TrainError::Other(format!(
            "model.vocab_size = {v} is smaller than the tokenizer's {vocab} tokens"
        )));
    }
    kiln_models::family::config_from_scratch(&config.model, vocab)
        .map_err(|(field, message)| TrainError::Other(format!("model.{field}: {message}")))
}

/// The decoder a config declares (its family refusing it names the field).
pub fn declare(m: &ModelConfig) -> Result<Architecture, TrainError> {
    m.declare()
        .map_err(|(field, message)| TrainError::Other(format!("model.{field}: {message}")))
}

/// A model's declaration and parameter counts (trainable, total), read without loading its
/// weights: `config.json` or GGUF metadata for pretrained models, the tokenizer for models from
/// scratch.
pub fn model_shape(config: &Config) -> Result<(Architecture, u64, u64, Held), TrainError> {
    match &config.model.pretrained {
        Some(base) => pretrained_shape(config, base),
        None => {
            let (tokenizer, _) = crate::data::load_data(config, None, None, &[])?;
            let m = declare(&scratch_shape(config, tokenizer.vocab_size())?)?;
            let n = m.num_params() as u64;
            Ok((m, n, n, Held::default()))
        }
    }
}

/// `finetune.base_quant` as the loaders take it.
pub fn base_quant(config: &Config) -> BaseQuant {
    use kiln_config::BaseQuantConfig as C;
    use kiln_models::ggml_types as t;
    match config.finetune.base_quant {
        C::None => BaseQuant::None,
        C::Keep => BaseQuant::Keep,
        C::Q8_0 => BaseQuant::To(t::Q8_0),
        C::Q4_0 => BaseQuant::To(t::Q4_0),
        C::Q4_1 => BaseQuant::To(t::Q4_1),
        C::Q5_0 => BaseQuant::To(t::Q5_0),
        C::Q5_1 => BaseQuant::To(t::Q5_1),
        C::Q4K => BaseQuant::To(t::Q4_K),
        C::Q5K => BaseQuant::To(t::Q5_K),
        C::Q6K => BaseQuant::To(t::Q6_K),
    }
}

/// What the frozen matrices of `arch` cost held as the config asks (`gguf`: the base file,
/// whose own types `keep` holds).
pub fn held(
    config: &Config,
    arch: &Architecture,
    gguf: Option<&kiln_models::gguf::GgufFile>,
) -> Held {
    let types = gguf.map(kiln_models::gguf::matrix_types);
    kiln_models::quant::held_for(arch, base_quant(config), types.as_ref())
}

/// A pretrained model's declaration from its `config.json` or GGUF metadata, and the parameter
/// counts the config's fine-tuning method gives it (LoRA adapters counted from the spec).
pub fn pretrained_shape(
    config: &Config,
    base: &std::path::Path,
) -> Result<(Architecture, u64, u64, Held), TrainError> {
    let (gguf, m) = read_base(base)?;
    let arch = declare(&m)?;
    let (trainable, total) = param_counts(config, &arch)?;
    let held = held(config, &arch, gguf.as_ref());
    Ok((arch, trainable, total, held))
}

/// A pretrained base's config, from its GGUF metadata (the file, read once, comes back for the
/// loader) or its `config.json`.
pub fn read_base(
    base: &std::path::Path,
) -> Result<(Option<kiln_models::gguf::GgufFile>, ModelConfig), TrainError> {
    let gguf = match kiln_models::pretrained::is_gguf(base) {
        true => Some(kiln_models::gguf::GgufFile::read(base)?),
        false => None,
    };
    let m = match &gguf {
        Some(file) => kiln_models::gguf::read_config(file)?.1,
        None => kiln_models::hf::read_config(base)?,
    };
    Ok((gguf, m))
}

/// (trainable, total) parameters of a pretrained model declared as `m` under the config's
/// fine-tuning method (LoRA adapters counted from the spec).
pub fn param_counts(config: &Config, m: &Architecture) -> Result<(u64, u64), TrainError> {
    let base_params = m.num_params() as u64;
    if config.finetune.method == kiln_config::FinetuneMethod::Full {
        return Ok((base_params, base_params));
    }
    let lora = lora_spec(config, m)?.num_params(m) as u64;
    Ok((lora, base_params + lora))
}
