//! The shape every family shares, read from Hugging Face's `config.json`. The file itself is kept
//! (`hf`): a family reads its own fields from it (q/k norms, sliding windows, RoPE variants), and
//! writes it back, so a loaded model's config survives checkpoints, fuse and export unchanged.

use serde_json::{Map, Value};

// The bounds every size is checked against: kiln_config::limits, shared with the run config.
pub use kiln_config::limits::{
    MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_PARAMS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH,
};

/// A decoder's common shape: the fields every family's computation and the planner depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The registry's name of the family (`llama`, `qwen3`, `gemma3`, `phi3`, `smollm3`).
    pub family: String,
    /// Hugging Face's `model_type` (`llama`, `mistral`, `qwen2`, `qwen3`, `gemma3_text`, ...).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width; HF's default is `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// The `config.json` document (as read, or as the family wrote it for a GGUF or a new model).
    pub hf: Map<String, Value>,
}

/// A field of `config.json` and what is wrong with it.
pub type FieldError = (String, String);

impl ModelConfig {
    /// Reads the common fields of `hf`. `eps_key` is the family's name for the norm epsilon;
    /// `default_tied` is transformers' default of `tie_word_embeddings` for the family.
    pub fn from_hf(
        family: &str,
        model_type: &str,
        hf: &Map<String, Value>,
        default_tied: bool,
    ) -> Result<Self, FieldError> {
        let heads = usize_field(hf, "num_attention_heads")?;
        let hidden = usize_field(hf, "hidden_size")?;
        let kv = opt_usize(hf, "num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match opt_usize(hf, "head_dim")? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        let config = Self {
            family: family.into(),
            model_type: model_type.into(),
            vocab_size: usize_field(hf, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: usize_field(hf, "intermediate_size")?,
            num_hidden_layers: usize_field(hf, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            max_position_embeddings: opt_usize(hf, "max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: opt_f64(hf, "rms_norm_eps")?.unwrap_or(1e-6),
            tie_word_embeddings: opt_bool(hf, "tie_word_embeddings")?.unwrap_or(default_tied),
            hf: hf.clone(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the shape before anything is sized from it: every width positive and within what
    /// any real model uses, heads divisible by key/value heads, an even head width (RoPE), and
    /// finite norm constants.
    pub fn validate(&self) -> Result<(), FieldError> {
        use kiln_config::limits::bounded;
        bounded("vocab_size", self.vocab_size, MAX_VOCAB)?;
        bounded("hidden_size", self.hidden_size, MAX_WIDTH)?;
        bounded("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        bounded("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        bounded("num_attention_heads", self.num_attention_heads, MAX_HEADS)?;
        bounded("num_key_value_heads", self.num_key_value_heads, MAX_HEADS)?;
        bounded("head_dim", self.head_dim, MAX_HEAD_DIM)?;
        bounded(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
        )?;
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err((
                "num_key_value_heads".into(),
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err((
                "head_dim".into(),
                format!("{} must be even for RoPE", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err((
                "rms_norm_eps".into(),
                format!("{} is not usable", self.rms_norm_eps),
            ));
        }
        Ok(())
    }

    /// Query width (all heads).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Key (and value) width.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The family's own field `key` of `config.json`.
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.hf.get(key).filter(|v| !v.is_null())
    }

    /// `config.json` with the common fields as they are now (a from-scratch vocabulary, say).
    pub fn common_json(&self) -> Map<String, Value> {
        let mut m = self.hf.clone();
        let mut set = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        set("model_type", self.model_type.clone().into());
        set("vocab_size", self.vocab_size.into());
        set("hidden_size", self.hidden_size.into());
        set("intermediate_size", self.intermediate_size.into());
        set("num_hidden_layers", self.num_hidden_layers.into());
        set("num_attention_heads", self.num_attention_heads.into());
        set("num_key_value_heads", self.num_key_value_heads.into());
        set("head_dim", self.head_dim.into());
        set(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        set("rms_norm_eps", self.rms_norm_eps.into());
        set("tie_word_embeddings", self.tie_word_embeddings.into());
        set("torch_dtype", "float32".into());
        m.remove("dtype");
        m
    }
}

fn type_err(key: &str, what: &str) -> FieldError {
    (key.to_string(), format!("must be {what}"))
}

/// A required non-negative integer field.
pub fn usize_field(hf: &Map<String, Value>, key: &str) -> Result<usize, FieldError> {
    opt_usize(hf, key)?.ok_or_else(|| (key.to_string(), "is missing".to_string()))
}

/// An optional non-negative integer field (`null` counts as absent).
pub fn opt_usize(hf: &Map<String, Value>, key: &str) -> Result<Option<usize>, FieldError> {
    match hf.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| type_err(key, "a non-negative integer")),
    }
}

/// An optional number field.
pub fn opt_f64(hf: &Map<String, Value>, key: &str) -> Result<Option<f64>, FieldError> {
    match hf.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| type_err(key, "a finite number")),
    }
}

/// An optional boolean field.
pub fn opt_bool(hf: &Map<String, Value>, key: &str) -> Result<Option<bool>, FieldError> {
    match hf.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| type_err(key, "true or false")),
    }
}
