//! The config schema. A YAML key is a struct field; each field's doc comment says what it does
//! and its default. `deny_unknown_fields` everywhere: a misspelt key is an error, not a silent default.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub backend: BackendConfig,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub finetune: FinetuneConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    pub memory: MemoryConfig,
    pub logging: LoggingConfig,
}

/// `run`: naming, seeding and where outputs go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name; outputs go to `<output_dir>/<name>/`. Default `run`.
    pub name: String,
    /// Seed for weight init, data order and dropout. Default 1337.
    pub seed: u64,
    /// Parent directory of run directories. Default `checkpoints`.
    pub output_dir: PathBuf,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            seed: 1337,
            output_dir: PathBuf::from("checkpoints"),
        }
    }
}

/// Which compute backend trains the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Metal on macOS, else a hardware GPU through wgpu, else the CPU.
    #[default]
    Auto,
    /// Apple's Metal (macOS only).
    Metal,
    /// Vulkan through Burn's SPIR-V compiler (needs the `vulkan` cargo feature).
    Vulkan,
    /// wgpu with WGSL shaders: Vulkan on Linux, Metal on macOS.
    Wgpu,
    /// Burn's Flex CPU backend.
    Cpu,
}

/// Which adapter a GPU backend opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdapterChoice {
    /// The best hardware adapter.
    #[default]
    Default,
    /// A software rasterizer such as Mesa's lavapipe: only when asked for.
    Software,
}

/// Element type of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    F32,
}

/// `backend`: where the run computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// `auto | metal | vulkan | wgpu | cpu`. Default `auto`.
    pub kind: BackendKind,
    /// `default | software`: `software` opens a software adapter (lavapipe). Default `default`.
    pub adapter: AdapterChoice,
    /// Compute dtype. Default `f32` (the only one for now).
    pub dtype: DType,
    /// On the GPU backends, capture the training step once and replay it on later steps,
    /// which skips the host's work of issuing it (bit-identical results). `false` runs every
    /// step eagerly. Default `true`.
    pub capture: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            kind: BackendKind::default(),
            adapter: AdapterChoice::default(),
            dtype: DType::default(),
            capture: true,
        }
    }
}

/// `model`: a decoder-only transformer. Keys follow Hugging Face's `config.json` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A pretrained model to fine-tune: a Hugging Face directory or a GGUF file. When set, its own
    /// config decides the architecture and the size fields below are ignored. Default `null`.
    pub pretrained: Option<PathBuf>,
    /// The model family to build from scratch, by its name in kiln's registry (`llama`, `qwen3`,
    /// ..., as the README's table of families lists them). Default `llama`.
    pub architecture: String,
    /// Vocabulary size; `null` takes the tokenizer's. Default `null`.
    pub vocab_size: Option<usize>,
    /// Model width. Default 128.
    pub hidden_size: usize,
    /// Number of transformer blocks. Default 4.
    pub num_hidden_layers: usize,
    /// Attention heads. Default 4.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); `null` means as many as attention heads. Default `null`.
    pub num_key_value_heads: Option<usize>,
    /// SwiGLU inner width. Default 384.
    pub intermediate_size: usize,
    /// Longest sequence the model is built for. Default 256.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon. Default 1e-5.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency. Default 10000.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub rope_theta: f64,
    /// Share the input embedding with the output projection. Default true.
    pub tie_word_embeddings: bool,
    /// Dropout on attention probabilities and residual branches while training. Default 0.0.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub dropout: f64,
    /// Standard deviation of the normal weight init. Default 0.02.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub initializer_range: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            pretrained: None,
            architecture: "llama".into(),
            vocab_size: None,
            hidden_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: None,
            intermediate_size: 384,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            dropout: 0.0,
            initializer_range: 0.02,
        }
    }
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
}

/// How text becomes tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per character seen in the training text.
    #[default]
    Char,
    /// Byte-level BPE trained on the training text with `vocab_size` tokens.
    Bpe,
    /// A Hugging Face `tokenizer.json` at `path`.
    File,
}

/// `data.tokenizer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// `char | bpe | file`. Default `char`.
    pub kind: TokenizerKind,
    /// Target vocabulary for `bpe`. Default 512.
    pub vocab_size: usize,
    /// `tokenizer.json` for `file`. Default `null`.
    pub path: Option<PathBuf>,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self {
            kind: TokenizerKind::Char,
            vocab_size: 512,
            path: None,
        }
    }
}

/// `data`: the corpus for from-scratch training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// What to train on: a UTF-8 text file (random windows; from-scratch training), or a
    /// directory with `train.jsonl`, `valid.jsonl` and optional `test.jsonl` (examples; fine-tuning).
    /// Relative paths are relative to the working directory. Default `datasets/shakespeare/input.txt`.
    pub train: PathBuf,
    /// JSONL record format: `auto` (from the first line) | `text` | `completions` | `chat`.
    pub format: DataFormat,
    /// JSONL: train on completion / assistant tokens only. Default false.
    pub mask_prompt: bool,
    /// JSONL: pack short examples into rows of `seq_len` tokens; attention and positions stay
    /// inside each example. Default false.
    pub pack: bool,
    /// Validation text; `null` holds out the last `val_fraction` of `train`. Default `null`.
    pub valid: Option<PathBuf>,
    /// Share of `train` held out for validation when `valid` is `null`. Default 0.1.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub val_fraction: f64,
    /// Tokens per training window; for JSONL, the longest example (longer ones are truncated and
    /// counted). Default 64.
    pub seq_len: usize,
    pub tokenizer: TokenizerConfig,
    /// Passed to the model's chat template as `enable_thinking` (Qwen3's and SmolLM3's
    /// templates: `false` renders answers without a thinking block); `null` leaves the template's
    /// own default. Default `null`.
    pub enable_thinking: Option<bool>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: PathBuf::from("datasets/shakespeare/input.txt"),
            format: DataFormat::Auto,
            mask_prompt: false,
            pack: false,
            valid: None,
            val_fraction: 0.1,
            seq_len: 64,
            tokenizer: TokenizerConfig::default(),
            enable_thinking: None,
        }
    }
}

/// Record format of JSONL data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    #[default]
    Auto,
    Text,
    Completions,
    Chat,
}

/// How a pretrained model is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneMethod {
    /// Low-rank adapters; the base weights stay frozen.
    #[default]
    Lora,
    /// Every weight.
    Full,
}

/// `target_modules: all-linear`: every linear module of the adapted blocks, as PEFT means it.
pub const ALL_LINEAR: &str = "all-linear";

/// Which projections get adapters: a list of HF module names, or `all-linear`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Named(String),
    List(Vec<String>),
}

/// `finetune.lora`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Adapter rank r. Default 8.
    pub rank: usize,
    /// Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora). Default 16.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub alpha: f64,
    /// Dropout on the adapter's input. Default 0.05.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub dropout: f64,
    /// `[q_proj, v_proj]` style list of HF module names, or `all-linear`. Default `[q_proj, v_proj]`.
    pub target_modules: TargetModules,
    /// Adapt only the last N blocks; `null`: all (unless `layers` is given). Default `null`.
    pub num_layers: Option<usize>,
    /// Adapt exactly these block indices. Default `null`.
    pub layers: Option<Vec<usize>>,
    /// Rank-stabilised scaling alpha / sqrt(r). Default false.
    pub rslora: bool,
    /// DoRA: each adapted output also learns its magnitude, `m / ‖W + s·BA‖` rescaling it (PEFT's
    /// `use_dora`; saved as its `lora_magnitude_vector`). Default false.
    pub dora: bool,
    /// Also write each adapter checkpoint in mlx-lm's layout, in its `mlx/` subdirectory
    /// (needs the adapted blocks to be the last N, as mlx-lm's `num_layers`). Default false.
    pub mlx_export: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            num_layers: None,
            layers: None,
            rslora: false,
            dora: false,
            mlx_export: false,
        }
    }
}

impl LoraConfig {
    /// Target module names as written (`all-linear` stays a name: its meaning is the model's
    /// own linear modules, known once the model is).
    pub fn targets(&self) -> Vec<String> {
        match &self.target_modules {
            TargetModules::Named(n) => vec![n.clone()],
            TargetModules::List(l) => l.clone(),
        }
    }

    /// Every linear module of each adapted block (`all-linear`).
    pub fn all_linear(&self) -> bool {
        matches!(&self.target_modules, TargetModules::Named(n) if n == ALL_LINEAR)
    }

    /// Indices of the adapted blocks of a model with `n_layers` blocks.
    pub fn layer_indices(&self, n_layers: usize) -> Vec<usize> {
        match (&self.layers, self.num_layers) {
            (Some(list), _) => list.clone(),
            (None, Some(last)) => (n_layers.saturating_sub(last)..n_layers).collect(),
            (None, None) => (0..n_layers).collect(),
        }
    }
}

/// `finetune.base_quant`: how the frozen base's matrices (linear weights, embeddings) are held
/// during a LoRA run (QLoRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BaseQuantConfig {
    /// In float (`train.dtype`).
    #[default]
    #[serde(rename = "none")]
    None,
    /// A GGUF base in its own quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K).
    #[serde(rename = "keep")]
    Keep,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_1")]
    Q4_1,
    #[serde(rename = "q5_0")]
    Q5_0,
    #[serde(rename = "q5_1")]
    Q5_1,
    /// Rows that are not whole 256-element super-blocks are held as q4_1 (the same bytes).
    #[serde(rename = "q4_k")]
    Q4K,
    #[serde(rename = "q5_k")]
    Q5K,
    #[serde(rename = "q6_k")]
    Q6K,
}

impl BaseQuantConfig {
    /// The name the config spells.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Keep => "keep",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
        }
    }
}

/// `finetune`: how a `model.pretrained` is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// `lora | full`. Default `lora`.
    pub method: FinetuneMethod,
    pub lora: LoraConfig,
    /// `none | keep | q8_0 | q4_0 | q4_k` (also `q4_1 | q5_0 | q5_1 | q5_k | q6_k`): the frozen base held
    /// quantized while the adapters train in float (QLoRA). `keep` holds a GGUF base in its own
    /// blocks; the others quantize the base as it loads. Default `none`.
    pub base_quant: BaseQuantConfig,
    /// `sft | dpo | orpo`: what the run optimizes. `sft` is the next-token loss on the data's
    /// examples; `dpo` and `orpo` learn from preference pairs (`{"prompt", "chosen",
    /// "rejected"}` records) as TRL's `DPOTrainer` and `ORPOTrainer` do. Default `sft`.
    pub objective: Objective,
    pub dpo: DpoConfig,
    pub orpo: OrpoConfig,
}

/// `finetune.objective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    #[default]
    Sft,
    Dpo,
    Orpo,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Dpo => "dpo",
            Self::Orpo => "orpo",
        }
    }

    /// Whether the run trains on preference pairs.
    pub fn is_preference(self) -> bool {
        self != Self::Sft
    }
}

/// `finetune.dpo.loss`: TRL's `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// `-log σ(β·Δ)`, Δ the chosen log-ratio minus the rejected one (the DPO paper's loss).
    #[default]
    Sigmoid,
    /// `(Δ/n − 1/(2β))²` on log-ratios averaged over each completion's tokens (IPO, as TRL
    /// normalizes it).
    Ipo,
    /// Robust DPO: the sigmoid loss corrected for preference labels flipped with probability
    /// `label_smoothing`.
    Robust,
}

impl DpoLoss {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Ipo => "ipo",
            Self::Robust => "robust",
        }
    }
}

/// `finetune.dpo`: Direct Preference Optimization against the frozen base (under LoRA, the same
/// model with its adapters switched off; under full fine-tuning, a frozen copy of the start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// How far the policy may move from the reference (TRL's `beta`; IPO's τ). Default 0.1.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub beta: f64,
    /// `sigmoid | ipo | robust`. Default `sigmoid`.
    pub loss: DpoLoss,
    /// The probability that a pair's labels are flipped, for `loss: robust` (in [0, 0.5)).
    /// Default 0.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
            label_smoothing: 0.0,
        }
    }
}

/// `finetune.orpo`: Odds Ratio Preference Optimization (no reference model): the chosen
/// sequences' NLL plus `beta` times the odds-ratio term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrpoConfig {
    /// The weight of the odds-ratio term (TRL's `beta`, the paper's λ). Default 0.1.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub beta: f64,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

/// Learning-rate schedule shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// `optim.schedule`: warmup, then constant, linear decay or cosine decay to `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// `constant | linear | cosine`. Default `cosine`.
    pub kind: ScheduleKind,
    /// Linear warmup from 0 over this many steps. Default 100.
    pub warmup_steps: usize,
    /// Learning rate at the end of decay. Default 1e-4.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub min_lr: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Cosine,
            warmup_steps: 100,
            min_lr: 1e-4,
        }
    }
}

/// `optim`: AdamW with decoupled weight decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate. Default 1e-3.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub lr: f64,
    /// Adam betas. Default [0.9, 0.99].
    #[serde(deserialize_with = "crate::finite::finite_pair")]
    pub betas: [f64; 2],
    /// Adam epsilon. Default 1e-8.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub eps: f64,
    /// Decoupled weight decay on matrices (not norms). Default 0.1.
    #[serde(deserialize_with = "crate::finite::finite")]
    pub weight_decay: f64,
    pub schedule: ScheduleConfig,
    /// Clip the global gradient L2 norm to this; `null` or 0 turns clipping off. Default 1.0.
    #[serde(deserialize_with = "crate::finite::finite_opt")]
    pub grad_clip: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: [0.9, 0.99],
            eps: 1e-8,
            weight_decay: 0.1,
            schedule: ScheduleConfig::default(),
            grad_clip: Some(1.0),
        }
    }
}

/// `train`: how long and in what steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps to run. Default 1000. Ignored when `epochs` is set.
    pub max_steps: usize,
    /// Passes over the training tokens (steps = epochs × tokens / (batch × accumulation × seq_len));
    /// overrides `max_steps`. Default `null`.
    #[serde(deserialize_with = "crate::finite::finite_opt")]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch, or `auto`: the memory planner picks the largest micro-batch
    /// that divides `effective_batch_size` and fits the budget (with the least recompute), and
    /// accumulates gradients over the rest. Default 12.
    pub batch_size: BatchSize,
    /// Sequences per optimizer step when `batch_size` is `auto`. Default 16.
    pub effective_batch_size: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Validate every N steps (0: only at the end). Default 100.
    pub eval_every: usize,
    /// Batches per validation. Default 20.
    pub eval_batches: usize,
    /// Checkpoint every N steps (0: only at the end). Default 500.
    pub save_every: usize,
    /// Step checkpoints kept (older ones are removed). Default 2.
    pub keep_last: usize,
    /// Also keep the checkpoint with the lowest validation loss as `best/`. Default true.
    pub keep_best: bool,
    /// A step whose loss or gradient norm is NaN/inf is skipped; this many in a row stop the run
    /// (the last good checkpoint stays). Default 5.
    pub max_nonfinite_steps: usize,
    /// When a checkpoint cannot be written (disk full, permissions): `stop` the run, or `continue`
    /// training and try again at the next save. The previous checkpoint stays whole either way.
    /// Default `stop`.
    pub on_save_error: OnSaveError,
    /// The float type of the forward and backward: `f32`, `bf16` or `f16`. In half precision the
    /// trainable parameters, their gradients and AdamW's moments stay f32 (master weights, cast
    /// for each step), frozen weights (a LoRA base model) are held in the half type, and
    /// normalisation, softmax and the loss are computed in f32. `f16` scales the loss by 1024
    /// before backward (gradients are unscaled in f32); a step that overflows is skipped like
    /// any non-finite step. Pays on GPUs with fast half-precision arithmetic (Apple silicon);
    /// on the CPU it is slower than f32. Default `f32`.
    pub dtype: ComputeDtype,
}

/// `train.dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// `train.batch_size`: a number of sequences, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BatchSizeRepr", into = "BatchSizeRepr")]
pub enum BatchSize {
    Auto,
    Fixed(usize),
}

impl BatchSize {
    /// The micro-batch: the number, or 1 for an `auto` the planner has not resolved yet (the
    /// trainer resolves it before any batch is drawn).
    pub fn get(self) -> usize {
        match self {
            BatchSize::Fixed(n) => n,
            BatchSize::Auto => 1,
        }
    }
}

impl std::fmt::Display for BatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSize::Auto => f.write_str("auto"),
            BatchSize::Fixed(n) => write!(f, "{n}"),
        }
    }
}

impl From<usize> for BatchSize {
    fn from(n: usize) -> Self {
        BatchSize::Fixed(n)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum BatchSizeRepr {
    Number(usize),
    Text(String),
}

impl TryFrom<BatchSizeRepr> for BatchSize {
    type Error = String;
    fn try_from(r: BatchSizeRepr) -> Result<Self, String> {
        match r {
            BatchSizeRepr::Number(n) => Ok(BatchSize::Fixed(n)),
            BatchSizeRepr::Text(t) if t.trim() == "auto" => Ok(BatchSize::Auto),
            BatchSizeRepr::Text(t) => Err(format!("`{t}`: expected a number or `auto`")),
        }
    }
}

impl From<BatchSize> for BatchSizeRepr {
    fn from(b: BatchSize) -> Self {
        match b {
            BatchSize::Auto => BatchSizeRepr::Text("auto".into()),
            BatchSize::Fixed(n) => BatchSizeRepr::Number(n),
        }
    }
}

/// What a failed checkpoint write does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnSaveError {
    #[default]
    Stop,
    Continue,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 1000,
            epochs: None,
            batch_size: BatchSize::Fixed(12),
            effective_batch_size: 16,
            grad_accum: 1,
            eval_every: 100,
            eval_batches: 20,
            save_every: 500,
            keep_last: 2,
            keep_best: true,
            max_nonfinite_steps: 5,
            on_save_error: OnSaveError::Stop,
            dtype: ComputeDtype::F32,
        }
    }
}

/// `memory`: the budget a run must fit and how it trades compute for memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// `auto` (what the device can use: Metal's working set, the Vulkan device-local heap, or on
    /// CPU the available RAM within any cgroup limit), a size (`12GiB`, `800MB`), or a fraction
    /// of the detected budget (`0.8`). Default `auto`.
    pub budget: Budget,
    /// Block-level activation checkpointing: `none` keeps every block's activations for backward;
    /// `{every: k}` keeps the input of every k-th block and recomputes the blocks in backward;
    /// `auto` picks the least recompute that fits the budget (none when everything fits).
    /// Default `auto`.
    pub checkpointing: Checkpointing,
    /// Positions per chunk of the output projection and cross-entropy, so that batch × sequence ×
    /// vocabulary logits are never held whole; 0: chosen from the vocabulary size. Default 0.
    pub loss_chunk: usize,
}

/// A memory budget as written in the config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(try_from = "BudgetRepr", into = "BudgetRepr")]
pub enum Budget {
    #[default]
    Auto,
    Bytes(u64),
    /// Of the detected budget, in (0, 1].
    Fraction(f64),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum BudgetRepr {
    Number(f64),
    Text(String),
}

impl TryFrom<BudgetRepr> for Budget {
    type Error = String;
    fn try_from(r: BudgetRepr) -> Result<Self, String> {
        match r {
            BudgetRepr::Number(f) if f > 0.0 && f <= 1.0 => Ok(Budget::Fraction(f)),
            BudgetRepr::Number(f) => Err(format!(
                "{f} is not a fraction in (0, 1]; write a size with a unit, e.g. `12GiB`"
            )),
            BudgetRepr::Text(t) if t.trim() == "auto" => Ok(Budget::Auto),
            BudgetRepr::Text(t) => parse_size(&t).map(Budget::Bytes),
        }
    }
}

impl From<Budget> for BudgetRepr {
    fn from(b: Budget) -> Self {
        match b {
            Budget::Auto => BudgetRepr::Text("auto".into()),
            Budget::Bytes(n) => BudgetRepr::Text(format_size(n)),
            Budget::Fraction(f) => BudgetRepr::Number(f),
        }
    }
}

/// `12GiB`, `800 MB`, `1.5G`, `4096` (bytes): binary units for `KiB`..`TiB` and for bare
/// `K`/`M`/`G`/`T`, decimal ones for `KB`..`TB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. `12GiB`, `800MB`) or `auto`"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    let bytes = value * scale;
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("`{text}` is not a usable size"));
    }
    Ok(bytes as u64)
}

/// Bytes in the largest binary unit that keeps three significant digits: `12GiB`, `1.5GiB`.
pub fn format_size(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        return format!("{n}B");
    }
    let text = format!("{v:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{}", units[u])
}

/// Block-level activation checkpointing as written in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "CheckpointingRepr", into = "CheckpointingRepr")]
pub enum Checkpointing {
    None,
    #[default]
    Auto,
    /// Keep the input of every k-th block; recompute in backward.
    Every(usize),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum CheckpointingRepr {
    Every { every: usize },
    Text(String),
}

impl TryFrom<CheckpointingRepr> for Checkpointing {
    type Error = String;
    fn try_from(r: CheckpointingRepr) -> Result<Self, String> {
        let every = |k: usize| match k {
            0 => Err("`every` must be at least 1".to_string()),
            k => Ok(Checkpointing::Every(k)),
        };
        match r {
            CheckpointingRepr::Every { every: k } => every(k),
            CheckpointingRepr::Text(t) => match t.trim() {
                "none" => Ok(Checkpointing::None),
                "auto" => Ok(Checkpointing::Auto),
                // `--set memory.checkpointing=every:2`
                other => match other
                    .strip_prefix("every")
                    .map(|r| r.trim_start_matches([':', ' ']))
                {
                    Some(k) if k.parse::<usize>().is_ok() => every(k.parse().unwrap_or(0)),
                    _ => Err(format!("`{other}`: expected `none`, `auto` or `every: k`")),
                },
            },
        }
    }
}

impl From<Checkpointing> for CheckpointingRepr {
    fn from(c: Checkpointing) -> Self {
        match c {
            Checkpointing::None => CheckpointingRepr::Text("none".into()),
            Checkpointing::Auto => CheckpointingRepr::Text("auto".into()),
            Checkpointing::Every(k) => CheckpointingRepr::Every { every: k },
        }
    }
}

/// `logging`: what a run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Write TensorBoard event files to `<run dir>/tensorboard/`. Default true.
    pub tensorboard: bool,
    /// Log train scalars every N steps. Default 10.
    pub log_every: usize,
    /// Weight histograms every N steps (0: never). Default 100.
    pub histograms_every: usize,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            tensorboard: true,
            log_every: 10,
            histograms_every: 100,
        }
    }
}

/// True for a positive number; false for zero, negatives and NaN.
fn is_positive(x: f64) -> bool {
    x > 0.0
}

impl Config {
    /// `finetune.objective` and its settings: preference tuning starts from a pretrained model,
    /// reads pairs unpacked, and takes TRL's ranges.
    fn check_objective(&self) -> Result<(), (String, String)> {
        let f = &self.finetune;
        if !f.objective.is_preference() {
            return Ok(());
        }
        let field = || "finetune.objective".to_string();
        if self.model.pretrained.is_none() {
            return Err((
                field(),
                format!(
                    "{} tunes a pretrained model on preference pairs: set model.pretrained",
                    f.objective.name()
                ),
            ));
        }
        if self.data.pack {
            return Err((
                "data.pack".into(),
                "preference pairs are not packed: set data.pack: false".into(),
            ));
        }
        if self.data.format != DataFormat::Auto {
            return Err((
                "data.format".into(),
                "preference records ({\"prompt\", \"chosen\", \"rejected\"}) are read as they \
                 are: leave data.format at auto"
                    .into(),
            ));
        }
        if f.objective == Objective::Dpo {
            if !is_positive(f.dpo.beta) {
                return Err(("finetune.dpo.beta".into(), "must be positive".into()));
            }
            let ls = f.dpo.label_smoothing;
            if !(0.0..0.5).contains(&ls) {
                return Err((
                    "finetune.dpo.label_smoothing".into(),
                    "must be in [0, 0.5)".into(),
                ));
            }
            if ls > 0.0 && f.dpo.loss != DpoLoss::Robust {
                return Err((
                    "finetune.dpo.label_smoothing".into(),
                    "is the label-flip probability of loss: robust (TRL's sigmoid and ipo \
                     losses do not use it): set finetune.dpo.loss: robust"
                        .into(),
                ));
            }
        }
        if f.objective == Objective::Orpo && !is_positive(f.orpo.beta) {
            return Err(("finetune.orpo.beta".into(), "must be positive".into()));
        }
        Ok(())
    }

    /// Checks values that types alone cannot: returns the dotted field and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        use crate::limits::*;
        let m = &self.model;
        bounded("model.hidden_size", m.hidden_size, MAX_WIDTH)?;
        bounded("model.num_hidden_layers", m.num_hidden_layers, MAX_LAYERS)?;
        bounded(
            "model.num_attention_heads",
            m.num_attention_heads,
            MAX_HEADS,
        )?;
        if let Some(kv) = m.num_key_value_heads {
            bounded("model.num_key_value_heads", kv, MAX_HEADS)?;
        }
        bounded("model.intermediate_size", m.intermediate_size, MAX_WIDTH)?;
        bounded(
            "model.max_position_embeddings",
            m.max_position_embeddings,
            MAX_POSITIONS,
        )?;
        if let Some(v) = m.vocab_size {
            bounded("model.vocab_size", v, MAX_VOCAB)?;
        }
        bounded(
            "model.hidden_size / num_attention_heads",
            m.head_dim(),
            MAX_HEAD_DIM,
        )?;
        if !m.hidden_size.is_multiple_of(m.num_attention_heads) {
            return Err((
                "model.hidden_size".into(),
                format!(
                    "{} is not divisible by num_attention_heads = {}",
                    m.hidden_size, m.num_attention_heads
                ),
            ));
        }
        if !m.head_dim().is_multiple_of(2) {
            return Err((
                "model.hidden_size".into(),
                format!("head dimension {} must be even for RoPE", m.head_dim()),
            ));
        }
        let kv = m.kv_heads();
        if kv == 0 || !m.num_attention_heads.is_multiple_of(kv) {
            return Err((
                "model.num_key_value_heads".into(),
                format!(
                    "{kv} must divide num_attention_heads = {}",
                    m.num_attention_heads
                ),
            ));
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return Err(("model.dropout".into(), "must be in [0, 1)".into()));
        }
        if m.rms_norm_eps <= 0.0 || m.rope_theta <= 0.0 || m.initializer_range <= 0.0 {
            return Err((
                "model".into(),
                "rms_norm_eps, rope_theta and initializer_range must be positive".into(),
            ));
        }
        let d = &self.data;
        bounded("data.seq_len", d.seq_len, MAX_POSITIONS)?;
        if m.pretrained.is_none() && d.seq_len > m.max_position_embeddings {
            return Err((
                "data.seq_len".into(),
                format!(
                    "{} exceeds model.max_position_embeddings = {}",
                    d.seq_len, m.max_position_embeddings
                ),
            ));
        }
        if d.valid.is_none() && !(is_positive(d.val_fraction) && d.val_fraction < 1.0) {
            return Err((
                "data.val_fraction".into(),
                "must be in (0, 1) when data.valid is not given".into(),
            ));
        }
        at_most(
            "data.tokenizer.vocab_size",
            d.tokenizer.vocab_size,
            MAX_VOCAB,
        )?;
        match d.tokenizer.kind {
            TokenizerKind::Bpe if d.tokenizer.vocab_size < 257 => {
                return Err((
                    "data.tokenizer.vocab_size".into(),
                    "byte-level BPE needs at least 257 tokens (256 bytes + 1 merge)".into(),
                ));
            }
            TokenizerKind::File if d.tokenizer.path.is_none() => {
                return Err((
                    "data.tokenizer.path".into(),
                    "required when data.tokenizer.kind is `file`".into(),
                ));
            }
            _ => {}
        }
        let o = &self.optim;
        if !is_positive(o.lr) {
            return Err(("optim.lr".into(), "must be positive".into()));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(("optim.betas".into(), "each beta must be in [0, 1)".into()));
        }
        if !is_positive(o.eps) || o.weight_decay < 0.0 {
            return Err((
                "optim".into(),
                "eps must be positive and weight_decay non-negative".into(),
            ));
        }
        if o.schedule.min_lr < 0.0 || o.schedule.min_lr > o.lr {
            return Err((
                "optim.schedule.min_lr".into(),
                format!("must be in [0, optim.lr = {}]", o.lr),
            ));
        }
        if let Some(c) = o.grad_clip
            && c < 0.0
        {
            return Err(("optim.grad_clip".into(), "must be non-negative".into()));
        }
        let t = &self.train;
        bounded("train.batch_size", t.batch_size.get(), MAX_BATCH)?;
        bounded(
            "train.effective_batch_size",
            t.effective_batch_size,
            MAX_BATCH,
        )?;
        if t.batch_size == BatchSize::Auto && t.grad_accum != 1 {
            return Err((
                "train.grad_accum".into(),
                "with train.batch_size: auto the planner sets the accumulation; give                  train.effective_batch_size instead"
                    .into(),
            ));
        }
        bounded("train.grad_accum", t.grad_accum, MAX_BATCH)?;
        bounded(
            "train.batch_size × train.grad_accum",
            t.batch_size.get() * t.grad_accum,
            MAX_BATCH,
        )?;
        bounded("train.eval_batches", t.eval_batches, MAX_EVAL_BATCHES)?;
        bounded(
            "train.max_nonfinite_steps",
            t.max_nonfinite_steps,
            MAX_STEPS,
        )?;
        at_most("train.eval_every", t.eval_every, MAX_STEPS)?;
        at_most("train.save_every", t.save_every, MAX_STEPS)?;
        at_most("train.keep_last", t.keep_last, MAX_STEPS)?;
        at_most(
            "optim.schedule.warmup_steps",
            o.schedule.warmup_steps,
            MAX_STEPS,
        )?;
        at_most("memory.loss_chunk", self.memory.loss_chunk, MAX_POSITIONS)?;
        at_most(
            "logging.histograms_every",
            self.logging.histograms_every,
            MAX_STEPS,
        )?;
        match t.epochs {
            Some(e) if !is_positive(e) || e > MAX_STEPS as f64 => {
                return Err((
                    "train.epochs".into(),
                    format!("must be positive and at most {MAX_STEPS}"),
                ));
            }
            None => bounded("train.max_steps", t.max_steps, MAX_STEPS)?,
            _ => {}
        }
        bounded("logging.log_every", self.logging.log_every, MAX_STEPS)?;
        if self.finetune.base_quant != BaseQuantConfig::None {
            let Some(base) = &self.model.pretrained else {
                return Err((
                    "finetune.base_quant".into(),
                    "holds a pretrained base quantized: set model.pretrained".into(),
                ));
            };
            if self.finetune.base_quant == BaseQuantConfig::Keep && base.is_dir() {
                return Err((
                    "finetune.base_quant".into(),
                    format!(
                        "keep holds a GGUF file's own blocks, and {} is a Hugging Face \
                         directory: quantize it as it loads with q8_0, q4_0 or q4_k",
                        base.display()
                    ),
                ));
            }
            if self.finetune.method == FinetuneMethod::Full {
                return Err((
                    "finetune.base_quant".into(),
                    "a quantized base is frozen: use it with finetune.method: lora (or dora), \
                     not full"
                        .into(),
                ));
            }
        }
        self.check_objective()?;
        let l = &self.finetune.lora;
        bounded("finetune.lora.rank", l.rank, MAX_LORA_RANK)?;
        if l.dora && l.mlx_export {
            return Err((
                "finetune.lora.mlx_export".into(),
                "kiln writes DoRA adapters in PEFT's layout only (not mlx-lm's)".into(),
            ));
        }
        if let Some(n) = l.num_layers {
            bounded("finetune.lora.num_layers", n, MAX_LAYERS)?;
        }
        if let Some(bad) = l.layers.iter().flatten().find(|&&i| i >= MAX_LAYERS) {
            return Err((
                "finetune.lora.layers".into(),
                format!("block {bad} is beyond any model ({MAX_LAYERS} blocks at most)"),
            ));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(("finetune.lora.dropout".into(), "must be in [0, 1)".into()));
        }
        // Which names exist is the model's to say (setup checks them against its modules);
        // here only their form.
        let targets = l.targets();
        if targets.is_empty() {
            return Err((
                "finetune.lora.target_modules".into(),
                "names no module".into(),
            ));
        }
        if let Some(bad) = targets.iter().find(|t| {
            t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                || (t.as_str() == ALL_LINEAR && !l.all_linear())
        }) {
            return Err((
                "finetune.lora.target_modules".into(),
                format!(
                    "`{bad}` is not a module name (expected {ALL_LINEAR} or module names like q_proj)"
                ),
            ));
        }
        let name = self.run.name.as_str();
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err((
                "run.name".into(),
                format!(
                    "`{name}` is not a directory name (it must be non-empty, not `.` or `..`, \
                     and without path separators)"
                ),
            ));
        }
        if self.run.output_dir.as_os_str().is_empty() {
            return Err((
                "run.output_dir".into(),
                "is empty; give a directory (`.` for the current one)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, String> {
        Config::from_yaml_str(yaml, "t.yaml").map_err(|e| e.to_string())
    }

    #[test]
    fn memory_budget_and_checkpointing_forms() {
        let c = parse("memory:\n  budget: 12GiB\n  checkpointing: {every: 2}\n").unwrap();
        assert_eq!(c.memory.budget, Budget::Bytes(12 << 30));
        assert_eq!(c.memory.checkpointing, Checkpointing::Every(2));
        let c = parse("memory:\n  budget: 0.8\n  checkpointing:\n    every: 3\n").unwrap();
        assert_eq!(c.memory.budget, Budget::Fraction(0.8));
        assert_eq!(c.memory.checkpointing, Checkpointing::Every(3));
        let c = parse("memory:\n  budget: 800MB\n  checkpointing: auto\n").unwrap();
        assert_eq!(c.memory.budget, Budget::Bytes(800_000_000));
        assert_eq!(c.memory.checkpointing, Checkpointing::Auto);
        assert_eq!(Config::default().memory.budget, Budget::Auto);
        assert_eq!(Config::default().memory.checkpointing, Checkpointing::Auto);
        // The resolved config writes back to YAML that reads the same.
        let c = parse("memory:\n  budget: 1.5GiB\n  checkpointing: {every: 4}\n").unwrap();
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
        let c = c
            .with_overrides(&[
                "memory.checkpointing=every:1".into(),
                "memory.budget=2GiB".into(),
            ])
            .unwrap();
        assert_eq!(c.memory.checkpointing, Checkpointing::Every(1));
        assert_eq!(c.memory.budget, Budget::Bytes(2 << 30));
    }

    #[test]
    fn bad_memory_values_name_line_and_field() {
        for (yaml, needle) in [
            ("memory:\n  budget: 12 parsecs\n", "unknown size unit"),
            ("memory:\n  budget: 3.5\n", "not a fraction"),
            ("memory:\n  checkpointing: {every: 0}\n", "at least 1"),
            ("memory:\n  checkpointing: sometimes\n", "expected `none`"),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains("t.yaml:2"), "{yaml}: {e}");
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }

    #[test]
    fn batch_size_auto() {
        let c = parse("train:\n  batch_size: auto\n  effective_batch_size: 32\n").unwrap();
        assert_eq!(c.train.batch_size, BatchSize::Auto);
        assert_eq!(parse(&c.to_yaml()).unwrap(), c);
        assert_eq!(
            parse("train:\n  batch_size: 6\n").unwrap().train.batch_size,
            BatchSize::Fixed(6)
        );
        let e = parse("train:\n  batch_size: auto\n  grad_accum: 4\n").unwrap_err();
        assert!(
            e.contains("train.grad_accum") && e.contains("effective_batch_size"),
            "{e}"
        );
        let e = parse("train:\n  batch_size: lots\n").unwrap_err();
        assert!(e.contains("t.yaml:2") && e.contains("`auto`"), "{e}");
    }

    /// Every float leaf of the config (defaults, plus `train.epochs`), replaced by NaN and by
    /// infinity in turn, is refused, naming its line; a float field added without
    /// `crate::finite` fails here.
    #[test]
    fn every_float_field_refuses_nan_and_infinity() {
        fn float_paths(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, child) in m {
                        path.push(k.clone());
                        float_paths(child, path, out);
                        path.pop();
                    }
                }
                serde_json::Value::Array(a) => {
                    for (i, child) in a.iter().enumerate() {
                        path.push(i.to_string());
                        float_paths(child, path, out);
                        path.pop();
                    }
                }
                serde_json::Value::Number(n) if n.is_f64() => out.push(path.clone()),
                _ => {}
            }
        }
        let mut config = Config::default();
        config.train.epochs = Some(1.0);
        let tree = serde_json::to_value(&config).unwrap();
        let mut paths = Vec::new();
        float_paths(&tree, &mut Vec::new(), &mut paths);
        assert!(paths.len() >= 14, "{paths:?}");
        for path in paths {
            for bad in [".nan", ".inf", "-.inf"] {
                let mut t = tree.clone();
                let mut leaf = &mut t;
                for k in &path {
                    leaf = match k.parse::<usize>() {
                        Ok(i) if leaf.is_array() => &mut leaf[i],
                        _ => &mut leaf[k.as_str()],
                    };
                }
                *leaf = serde_json::Value::String("NOT_FINITE".into());
                let yaml = serde_saphyr::to_string(&t)
                    .unwrap()
                    .replace("NOT_FINITE", bad);
                let e = parse(&yaml).unwrap_err();
                assert!(
                    e.contains("not a finite number") && e.contains("t.yaml:"),
                    "{}={bad}: {e}",
                    path.join(".")
                );
            }
        }
    }

    #[test]
    fn sizes_and_counts_are_bounded() {
        for (set, field) in [
            ("model.hidden_size=2147483648", "model.hidden_size"),
            ("model.hidden_size=4294967296", "model.hidden_size"),
            ("model.vocab_size=100000000000", "model.vocab_size"),
            (
                "data.tokenizer.vocab_size=1000000000",
                "data.tokenizer.vocab_size",
            ),
            ("train.eval_batches=10000000000000", "train.eval_batches"),
            ("train.grad_accum=100000000000000", "train.grad_accum"),
            ("train.batch_size=1000000000000", "train.batch_size"),
            ("finetune.lora.rank=1000000000", "finetune.lora.rank"),
            (
                "finetune.lora.layers=[0,1099511627776]",
                "finetune.lora.layers",
            ),
            ("train.epochs=1e300", "train.epochs"),
            ("run.name=.", "run.name"),
            ("run.output_dir=", "run.output_dir"),
        ] {
            let overrides = [set.to_string(), "data.tokenizer.kind=bpe".to_string()];
            let e = Config::default()
                .with_overrides(&overrides)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{set}: {e}");
        }
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2 TB").unwrap(), 2_000_000_000_000);
        assert!(parse_size("-1GiB").is_err());
        assert_eq!(format_size(12 << 30), "12GiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
        assert_eq!(format_size(512), "512B");
    }
}
