//! The model-family boundary: what a family tells kiln, and nothing else does. A family reads
//! its `config.json` and its GGUF metadata, declares its decoder ([`Architecture`]) from the
//! shared layers, and names its tensors in both formats. Everything outside `families/` (the
//! trainer, recompute, the planner, checkpoints, export, generation, the CLI) sees only this.

use crate::arch::Architecture;
use crate::config::{FieldError, ModelConfig};
use crate::gguf::GgufFile;
use crate::layers::rope::{Rope, RopeScaling};
use crate::safetensors_io::HostTensor;
use kiln_formats::gguf_write::Meta;
use serde_json::{Map, Value};

pub trait Family: Sync {
    /// The registry's name (`llama`); also what `model.architecture` names in a run's YAML.
    fn name(&self) -> &'static str;

    /// Hugging Face `model_type` values this family reads.
    fn model_types(&self) -> &'static [&'static str];

    /// Hugging Face `architectures` class names this family reads.
    fn hf_architectures(&self) -> &'static [&'static str];

    /// GGUF `general.architecture` values this family reads.
    fn gguf_architectures(&self) -> &'static [&'static str];

    /// The config of a `config.json` document, its common fields checked. What the family
    /// cannot compute is refused by [`Family::declare`], which [`config_from_hf`] runs on every
    /// config it accepts.
    fn config(&self, hf: &Map<String, Value>) -> Result<ModelConfig, FieldError>;

    /// The decoder a config describes.
    fn declare(&self, config: &ModelConfig) -> Result<Architecture, FieldError>;

    /// The `config.json` to write for `config` (checkpoints, fused models).
    fn hf_json(&self, config: &ModelConfig) -> Value;

    /// A checkpoint's tensor name in kiln's form (`model.layers.0...`), `None` for tensors the
    /// text decoder does not use (a multimodal checkpoint's vision tower).
    fn hf_tensor_name(&self, name: &str) -> Option<String> {
        Some(name.to_string())
    }

    /// `config.json` as transformers would have it, from a GGUF file's metadata.
    fn gguf_config(&self, file: &GgufFile) -> Result<Map<String, Value>, String>;

    /// GGUF tensor names (without `.weight`/`.bias`) and Hugging Face's: per block (`attn_q` ↔
    /// `self_attn.q_proj`) and global (`token_embd` ↔ `model.embed_tokens`).
    fn gguf_names(&self) -> GgufNames;

    /// Converts a tensor read from GGUF (already renamed, in HF shape) to HF's values: undoing
    /// llama.cpp's Q/K row permutation, or the +1 its converter folds into Gemma's norms.
    fn gguf_values_to_hf(&self, _config: &ModelConfig, _hf_name: &str, _tensor: &mut HostTensor) {}

    /// GGUF tensors that carry no parameter (LongRoPE's factors, which config.json holds).
    fn gguf_ignored(&self, _gguf_name: &str) -> bool {
        false
    }

    /// What a GGUF file of `config` holds besides its parameters, as llama.cpp's
    /// `convert_hf_to_gguf.py` writes it: `general.architecture`, the `<arch>.*` metadata and
    /// tensors computed from the config (Llama 3's `rope_freqs`). An error says why llama.cpp
    /// could not compute this model.
    fn gguf_export(&self, _config: &ModelConfig) -> Result<GgufExport, String> {
        Err(format!(
            "writing the {} family as GGUF is not supported yet (write a Hugging Face directory \
             with --out and convert it with llama.cpp's convert_hf_to_gguf.py)",
            self.name()
        ))
    }

    /// The reverse of [`Family::gguf_values_to_hf`]: a tensor in HF's values and shape, as
    /// llama.cpp expects it (Q/K rows permuted, Gemma's norms less one).
    fn hf_values_to_gguf(&self, _config: &ModelConfig, _hf_name: &str, _tensor: &mut HostTensor) {}
}

/// A family's GGUF header for one model: see [`Family::gguf_export`].
pub struct GgufExport {
    pub architecture: &'static str,
    pub metadata: Vec<(String, Meta)>,
    /// (GGUF name, values in GGUF order, GGUF dims), written as f32.
    pub extra_tensors: Vec<(String, Vec<f32>, Vec<u64>)>,
}

/// A family's tensor names in GGUF and Hugging Face form.
#[derive(Debug, Clone, Copy)]
pub struct GgufNames {
    pub global: &'static [(&'static str, &'static str)],
    pub block: &'static [(&'static str, &'static str)],
}

/// llama.cpp's names of the tensors outside the blocks, shared by every family here.
pub const GGUF_GLOBAL: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

impl GgufNames {
    /// The Hugging Face name of GGUF tensor `gguf` (`blk.3.attn_q.weight`).
    pub fn to_hf(&self, gguf: &str) -> Option<String> {
        let (module, suffix) = gguf.rsplit_once('.')?;
        if !matches!(suffix, "weight" | "bias") {
            return None;
        }
        if let Some((_, hf)) = self.global.iter().find(|(g, _)| *g == module) {
            return Some(format!("{hf}.{suffix}"));
        }
        let (layer, module) = module.strip_prefix("blk.")?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, hf) = self.block.iter().find(|(g, _)| *g == module)?;
        Some(format!("model.layers.{layer}.{hf}.{suffix}"))
    }

    /// The GGUF name of Hugging Face tensor `hf` (`model.layers.3.self_attn.q_proj.weight`).
    pub fn to_gguf(&self, hf: &str) -> Option<String> {
        let (module, suffix) = hf.rsplit_once('.')?;
        if let Some((g, _)) = self.global.iter().find(|(_, h)| *h == module) {
            return Some(format!("{g}.{suffix}"));
        }
        let (layer, module) = module.strip_prefix("model.layers.")?.split_once('.')?;
        let (g, _) = self.block.iter().find(|(_, h)| *h == module)?;
        Some(format!("blk.{layer}.{g}.{suffix}"))
    }
}

/// `config.json` fields every family's GGUF metadata gives the same way
/// (`<arch>.block_count`, ...), as transformers names them.
/// Where `rope.dimension_count` is the whole head (`rotary_is_head`), it gives the head width
/// when `attention.key_length` is absent; Phi-3 rotates only part of each head.
pub fn gguf_common_config(
    file: &GgufFile,
    arch: &str,
    rotary_is_head: bool,
) -> Result<Map<String, Value>, String> {
    let get = |key: &str| file.metadata.get(&format!("{arch}.{key}"));
    let need = |key: &str| -> Result<u64, String> {
        get(key)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| format!("metadata `{arch}.{key}` is missing or not an integer"))
    };
    let heads = need("attention.head_count")?;
    let hidden = need("embedding_length")?;
    let mut m = Map::new();
    m.insert("hidden_size".into(), hidden.into());
    m.insert("num_hidden_layers".into(), need("block_count")?.into());
    m.insert(
        "intermediate_size".into(),
        need("feed_forward_length")?.into(),
    );
    m.insert("num_attention_heads".into(), heads.into());
    let kv = get("attention.head_count_kv")
        .and_then(|v| v.as_u64())
        .unwrap_or(heads);
    m.insert("num_key_value_heads".into(), kv.into());
    let vocab = match get("vocab_size").and_then(|v| v.as_u64()) {
        Some(v) => v,
        None => file
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len() as u64)
            .ok_or_else(|| format!("metadata `{arch}.vocab_size` is missing (and no tokenizer)"))?,
    };
    m.insert("vocab_size".into(), vocab.into());
    // The head width: llama.cpp writes key_length when it differs from hidden / heads.
    if let Some(hd) = get("attention.key_length").and_then(|v| v.as_u64()) {
        m.insert("head_dim".into(), hd.into());
    } else if let Some(hd) = get("rope.dimension_count")
        .and_then(|v| v.as_u64())
        .filter(|_| rotary_is_head)
    {
        m.insert("head_dim".into(), hd.into());
    }
    if let Some(ctx) = get("context_length").and_then(|v| v.as_u64()) {
        m.insert("max_position_embeddings".into(), ctx.into());
    }
    let eps = get("attention.layer_norm_rms_epsilon")
        .and_then(|v| v.as_f64())
        .unwrap_or(1e-5);
    m.insert("rms_norm_eps".into(), eps.into());
    if let Some(theta) = get("rope.freq_base").and_then(|v| v.as_f64()) {
        m.insert("rope_theta".into(), theta.into());
    }
    let tied = !file.tensors.iter().any(|t| t.name == "output.weight");
    m.insert("tie_word_embeddings".into(), tied.into());
    Ok(m)
}

/// The reverse of [`gguf_common_config`]: the `<arch>.*` keys every family writes the same way,
/// and the RoPE of `rope` (its base, the rotated width, a linear factor, or Llama 3's
/// per-frequency divisors as the `rope_freqs` tensor). Other scalings are refused.
pub fn gguf_common_metadata(
    arch: &'static str,
    config: &ModelConfig,
    rope: &Rope,
) -> Result<GgufExport, String> {
    let key = |k: &str| format!("{arch}.{k}");
    let u = |v: usize| Meta::U32(v as u32);
    let mut m = vec![
        (key("context_length"), u(config.max_position_embeddings)),
        (key("embedding_length"), u(config.hidden_size)),
        (key("block_count"), u(config.num_hidden_layers)),
        (key("feed_forward_length"), u(config.intermediate_size)),
        (key("attention.head_count"), u(config.num_attention_heads)),
        (
            key("attention.head_count_kv"),
            u(config.num_key_value_heads),
        ),
        (key("rope.freq_base"), Meta::F32(rope.theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Meta::F32(config.rms_norm_eps as f32),
        ),
        (key("rope.dimension_count"), u(rope.rotary_dim)),
        (key("vocab_size"), u(config.vocab_size)),
    ];
    if config.head_dim * config.num_attention_heads != config.hidden_size {
        m.push((key("attention.key_length"), u(config.head_dim)));
        m.push((key("attention.value_length"), u(config.head_dim)));
    }
    let mut extra = Vec::new();
    match &rope.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            m.push((key("rope.scaling.type"), Meta::str("linear")));
            m.push((key("rope.scaling.factor"), Meta::F32(*factor as f32)));
        }
        RopeScaling::Llama3 { .. } => {
            let plain = Rope {
                scaling: RopeScaling::None,
                ..rope.clone()
            };
            let divisors: Vec<f32> = plain
                .inv_freq(0)
                .iter()
                .zip(rope.inv_freq(0))
                .map(|(f, scaled)| (f / scaled) as f32)
                .collect();
            let n = divisors.len() as u64;
            extra.push(("rope_freqs.weight".to_string(), divisors, vec![n]));
        }
        RopeScaling::LongRope { .. } => {
            return Err("LongRoPE scaling has no GGUF form for this architecture".into());
        }
    }
    Ok(GgufExport {
        architecture: arch,
        metadata: m,
        extra_tensors: extra,
    })
}

impl ModelConfig {
    /// The family this config belongs to.
    pub fn family(&self) -> &'static dyn Family {
        crate::registry::by_name(&self.family)
            .expect("a ModelConfig is only made by a registered family")
    }

    /// The decoder this config describes.
    pub fn declare(&self) -> Result<Architecture, FieldError> {
        self.family().declare(self)
    }

    /// `config.json` as transformers writes it for this model.
    pub fn to_hf_json(&self) -> Value {
        self.family().hf_json(self)
    }

    /// Parameters in all (tied embeddings once); `None` when the family refuses the config.
    pub fn num_params(&self) -> Option<usize> {
        self.declare().ok().map(|a| a.num_params())
    }
}

/// The config of a `config.json` document, by whichever family reads it.
pub fn config_from_hf(hf: &Map<String, Value>) -> Result<ModelConfig, FieldError> {
    let family = crate::registry::for_hf_config(hf).map_err(|m| ("architectures".into(), m))?;
    let config = family.config(hf)?;
    // A config the family accepts must declare: the sizes are checked here once, for everyone.
    let arch = family.declare(&config)?;
    let mut total = 0usize;
    for p in &arch.params {
        total = total.saturating_add(p.numel());
    }
    if total > crate::config::MAX_PARAMS {
        return Err((
            "hidden_size".into(),
            "the parameter count this shape implies is beyond any model kiln can hold".into(),
        ));
    }
    Ok(config)
}

/// The config of a model trained from scratch: the run's `model` section in `config.json`
/// terms, read by the family it names, in the canonical form a checkpoint writes back.
pub fn config_from_scratch(
    m: &kiln_config::ModelConfig,
    vocab_size: usize,
) -> Result<ModelConfig, FieldError> {
    let family = crate::registry::by_name(&m.architecture).ok_or_else(|| {
        (
            "architecture".to_string(),
            format!(
                "`{}` is not a model family kiln has (it has {})",
                m.architecture,
                crate::registry::FAMILIES
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let mut hf = Map::new();
    hf.insert("model_type".into(), family.model_types()[0].into());
    hf.insert(
        "architectures".into(),
        serde_json::json!([family.hf_architectures()[0]]),
    );
    let heads = m.num_attention_heads.max(1);
    let mut set = |k: &str, v: Value| {
        hf.insert(k.into(), v);
    };
    set("vocab_size", m.vocab_size.unwrap_or(vocab_size).into());
    set("hidden_size", m.hidden_size.into());
    set("intermediate_size", m.intermediate_size.into());
    set("num_hidden_layers", m.num_hidden_layers.into());
    set("num_attention_heads", m.num_attention_heads.into());
    set("num_key_value_heads", m.kv_heads().into());
    set("head_dim", (m.hidden_size / heads).into());
    set("max_position_embeddings", m.max_position_embeddings.into());
    set("rms_norm_eps", m.rms_norm_eps.into());
    set("rope_theta", m.rope_theta.into());
    set("tie_word_embeddings", m.tie_word_embeddings.into());
    set("initializer_range", m.initializer_range.into());
    let config = family.config(&hf)?;
    match config.to_hf_json() {
        Value::Object(canonical) => config_from_hf(&canonical),
        _ => unreachable!("families write config.json as an object"),
    }
}
