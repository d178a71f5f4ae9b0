//! The memory planner: what a run will hold at its peak, estimated from the model's shape before
//! anything is allocated, and the checkpointing that makes it fit the device's budget.
//!
//! The estimate adds, in f32 bytes: weights; gradients of the trainable parameters (the running
//! sum and one backward's worth); AdamW's two moments; the activations the autodiff tape keeps
//! (per block a term linear in tokens × widths and one in batch × heads × sequence²; with
//! recompute, one input per span plus one span's activations); the output projection's logits
//! (one loss chunk); and a fixed per-backend overhead. The per-element counts were measured
//! once on Burn's Flex backend (docs/PERFORMANCE.md) and are what kiln's forward keeps.

use kiln_config::{BatchSize, Budget, Checkpointing, Config};
use kiln_models::Architecture;
use kiln_models::plan::BlockProfile;
use serde::Serialize;

/// The shape of what one step computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    pub batch: usize,
    pub seq: usize,
    /// Parameters that get gradients and optimizer state.
    pub trainable: u64,
    /// All parameters (adapters included).
    pub total: u64,
    /// Dropout on (its masks are kept for backward).
    pub dropout: bool,
    /// Dropout on the attention probabilities (`model.dropout`): attention then materialises
    /// and keeps its scores; otherwise it runs in tiles and keeps one number per head and token.
    pub attention_dropout: bool,
    /// Positions per loss chunk.
    pub loss_chunk: usize,
    /// Half-precision compute (`train.dtype: bf16 | f16`).
    pub half: bool,
    /// Frozen matrices held quantized (`finetune.base_quant`), counted at their own bytes.
    pub held: kiln_models::quant::Held,
    /// Sequences per example: 2 for preference pairs (chosen and rejected in one batch), else 1.
    pub sequences_per_example: usize,
    /// Parameters of a frozen reference copy (DPO under full fine-tuning), held in the compute
    /// type; 0 when there is none (LoRA's reference is the base with its adapters off).
    pub reference: u64,
}

impl Workload {
    /// Sequences in a micro-batch.
    pub fn rows(&self) -> usize {
        self.batch * self.sequences_per_example.max(1)
    }
}

/// Bytes of each part of a run's peak.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub logits: u64,
    pub overhead: u64,
    pub total: u64,
}

/// Logit-sized f32 buffers alive at once in a loss chunk: the logits, whose gradient the fused
/// cross-entropy writes in place, and the output projection's transients.
const PER_LOGIT: f64 = 1.5;
/// Bytes per taped element in half precision (see [`block_activation_bytes`]): per token element,
/// and per attention score (the softmax runs in f32; its output is kept in f32 and in the half
/// type). Fitted on Flex in bf16: the small and the 12-block shapes of `bench/memory.sh` came to
/// -2.2% and -1.3% of their measured peaks (LoRA on SmolLM2-135M in bf16: -11%, see
/// docs/PERFORMANCE.md).
const HALF_TOKEN_BYTES: f64 = 2.0;
const HALF_SCORE_BYTES: f64 = 5.0;
/// f32 elements tiled attention keeps per head and token: the row's log-sum-exp.
const PER_HEAD_LSE: f64 = 1.0;
/// What a process holds besides tensors: the program, its libraries, the allocator's slack.
pub const CPU_OVERHEAD: u64 = 32 << 20;
/// On GPUs the measure is the memory pool's reserved bytes: page slack over the tensors came to
/// 9-13 MiB on lavapipe (default config, with and without recompute); not yet measured on a
/// hardware GPU, where the 10% margin covers the driver's own allocations.
pub const GPU_OVERHEAD: u64 = 16 << 20;

/// Bytes the tape keeps for one block, from its family's profile (`kiln_models::plan`).
pub fn block_activation_bytes(b: &BlockProfile, w: &Workload) -> u64 {
    let tokens = (w.rows() * w.seq) as f64;
    let per_token = if w.dropout {
        b.per_token_dropout
    } else {
        b.per_token
    };
    // Attention in tiles keeps each row's log-sum-exp (f32) and no scores: memory linear in the
    // sequence. Dropout on the probabilities needs them, so that case keeps rows × heads × seq².
    let (scores, per_score) = if w.attention_dropout {
        let scores = (w.rows() * b.heads) as f64 * (w.seq * w.seq) as f64;
        (scores, b.per_score + b.per_score_dropout)
    } else {
        (0.0, 0.0)
    };
    let lse = 4.0 * tokens * (b.heads as f64 * PER_HEAD_LSE);
    lse as u64
        + if w.half {
            (HALF_TOKEN_BYTES * tokens * per_token + HALF_SCORE_BYTES * scores * per_score) as u64
        } else {
            (4.0 * (tokens * per_token + scores * per_score)) as u64
        }
}

/// Bytes of scores the blocks' attention would keep if it materialised them (with the dropout
/// masks when that is why it does), all blocks together, no recompute.
pub fn materialised_scores_bytes(m: &Architecture, w: &Workload) -> u64 {
    let per_seq = (w.rows() * w.seq * w.seq) as f64;
    m.memory_profile()
        .iter()
        .map(|b| {
            let bytes = if w.half { HALF_SCORE_BYTES } else { 4.0 };
            let dropout = if w.attention_dropout {
                b.per_score_dropout
            } else {
                0.0
            };
            (bytes * per_seq * b.heads as f64 * (b.per_score + dropout)) as u64
        })
        .sum()
}

/// The estimate for a model, a workload and a checkpointing choice (`every`: recompute spans).
pub fn estimate(m: &Architecture, w: &Workload, every: Option<usize>, overhead: u64) -> Estimate {
    let layers = m.blocks.len() as u64;
    let elem = if w.half { 2 } else { 4 };
    let hidden_state = elem * (w.rows() * w.seq * m.config.hidden_size) as u64;
    let profiles = m.memory_profile();
    let blocks: Vec<u64> = profiles
        .iter()
        .map(|b| block_activation_bytes(b, w))
        .collect();
    // A recomputed span is as large as its largest blocks (they differ where layers do).
    let block = blocks.iter().copied().max().unwrap_or(0);
    // One block's backward at a time holds its transients.
    let tokens = (w.rows() * w.seq) as f64;
    let transient = profiles
        .iter()
        .map(|b| (elem as f64 * tokens * b.backward_per_token) as u64)
        .max()
        .unwrap_or(0);
    let activations = transient
        + match every {
            None => blocks.iter().sum::<u64>() + hidden_state,
            Some(k) => {
                let k = (k.max(1) as u64).min(layers.max(1));
                // Span inputs kept through the step, one span taped in backward, and the gradient
                // of the hidden state passed between spans.
                layers.div_ceil(k) * hidden_state + k * block + 2 * hidden_state
            }
        };
    let rows = (w.rows() * w.seq).min(w.loss_chunk.max(1)) as f64;
    let vocab = m.config.vocab_size;
    let mut logits = (4.0 * PER_LOGIT * rows * vocab as f64) as u64;
    if w.half {
        // The half-type logits beside their f32 copy, and the output projection's weight widened
        // to f32 for the matmul where the backend multiplies half precision through f32 (Flex):
        // without these a LoRA run in bf16 measured 18% over the estimate. A quantized head
        // is de-quantised a tile at a time instead (counted below).
        logits += (2.0 * rows * vocab as f64) as u64;
        if !w.held.head {
            logits += 4 * (vocab * m.config.hidden_size) as u64;
        }
    }
    // In half precision each step casts the f32 trainable weights (a half-size copy during the
    // step), and frozen weights (a LoRA base model) are held in the half type.
    let frozen = w.total.saturating_sub(w.trainable);
    let float_frozen = frozen.saturating_sub(w.held.numel);
    // A product of a quantized weight holds one de-quantised tile (and on the GPU its cast).
    let scratch = if w.held.numel > 0 {
        2 * 4 * kiln_models::quant::SCRATCH_ELEMENTS as u64
    } else {
        0
    };
    let weights = w.held.bytes
        + scratch
        + elem * w.reference
        + if w.half {
            6 * w.trainable + 2 * float_frozen
        } else {
            4 * (w.trainable + float_frozen)
        };
    let gradients = 2 * 4 * w.trainable;
    let optimizer = 2 * 4 * w.trainable;
    Estimate {
        weights,
        gradients,
        optimizer,
        activations,
        logits,
        overhead,
        total: weights + gradients + optimizer + activations + logits + overhead,
    }
}

/// Logit elements one loss chunk may hold when `memory.loss_chunk` is 0 (32 Mi: 128 MiB in f32).
pub const AUTO_CHUNK_ELEMENTS: usize = 1 << 25;

/// Positions per chunk of the output projection and loss: `memory.loss_chunk`, or for 0 as many
/// as keep a chunk's logits within [`AUTO_CHUNK_ELEMENTS`].
pub fn loss_chunk(configured: usize, vocab: usize) -> usize {
    match configured {
        0 => (AUTO_CHUNK_ELEMENTS / vocab.max(1)).max(1),
        n => n,
    }
}

/// Share of the budget a plan leaves free for what the estimate misses.
pub const SAFETY_MARGIN: f64 = 0.10;

/// The chosen way to run, with its estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// `None`: keep every activation; `Some(k)`: recompute spans of k blocks.
    pub recompute_every: Option<usize>,
    pub estimate: Estimate,
    /// The budget the run must fit (bytes), and the usable part after the safety margin.
    pub budget: u64,
    pub usable: u64,
    pub budget_source: String,
    /// Sequences per micro-batch and micro-batches per step (`train.batch_size: auto` resolved).
    pub micro_batch: usize,
    pub grad_accum: usize,
}

/// Nothing fits: the breakdown of the leanest option and the smallest budget that would do.
#[derive(Debug, Clone, PartialEq)]
pub struct NothingFits {
    /// The estimate of what the config asked for, when that is not the leanest option.
    pub asked: Option<Box<(Option<usize>, Estimate)>>,
    pub leanest: Estimate,
    pub leanest_every: Option<usize>,
    pub budget: u64,
    pub needed_budget: u64,
}

impl std::fmt::Display for NothingFits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = &self.leanest;
        let h = crate::memory::human_bytes;
        if let Some((every, asked)) = self.asked.as_deref()
            && e.total as f64 <= self.budget as f64 * (1.0 - SAFETY_MARGIN)
        {
            return write!(
                f,
                "the run does not fit the memory budget of {} with {} (about {}: weights {}, \
                 activations {}, logits {}); {} would fit in about {}: set \
                 memory.checkpointing: auto (or lower train.batch_size or data.seq_len)",
                h(self.budget),
                describe(*every),
                h(asked.total),
                h(asked.weights),
                h(asked.activations),
                h(asked.logits),
                describe(self.leanest_every),
                h(e.total)
            );
        }
        write!(
            f,
            "the run does not fit the memory budget of {}: at its leanest ({}) it needs about \
             {} (weights {}, gradients {}, optimizer {}, activations {}, logits {}, overhead {}); \
             the smallest budget that fits is {} (with the {:.0}% safety margin). Lower \
             train.batch_size or data.seq_len, train fewer parameters (LoRA), set \
             memory.checkpointing: auto, or raise memory.budget",
            h(self.budget),
            describe(self.leanest_every),
            h(e.total),
            h(e.weights),
            h(e.gradients),
            h(e.optimizer),
            h(e.activations),
            h(e.logits),
            h(e.overhead),
            h(self.needed_budget),
            SAFETY_MARGIN * 100.0
        )
    }
}

/// `checkpointing: none` or `every: k` in words.
pub fn describe(every: Option<usize>) -> String {
    match every {
        None => "no recompute".into(),
        Some(k) => format!("recompute every {k} block{}", if k == 1 { "" } else { "s" }),
    }
}

/// The budget `memory.budget` asks for, given the detected one.
pub fn resolve_budget(
    wanted: Budget,
    detected: Option<&crate::device::Budget>,
) -> Option<(u64, String)> {
    match (wanted, detected) {
        (Budget::Bytes(n), _) => Some((n, "memory.budget".into())),
        (Budget::Auto, Some(d)) => Some((d.bytes, d.source.clone())),
        (Budget::Fraction(f), Some(d)) => {
            Some(((d.bytes as f64 * f) as u64, format!("{f} × {}", d.source)))
        }
        (_, None) => None,
    }
}

/// Picks the checkpointing for `checkpointing` within `budget`: `none` and `every: k` are taken
/// as asked (and refused when they cannot fit); `auto` keeps every activation when that fits, else
/// recomputes, with the span length that needs the least memory.
pub fn choose(
    m: &Architecture,
    w: &Workload,
    checkpointing: Checkpointing,
    budget: (u64, String),
    overhead: u64,
) -> Result<Plan, NothingFits> {
    let usable = (budget.0 as f64 * (1.0 - SAFETY_MARGIN)) as u64;
    let layers = m.blocks.len().max(1);
    let candidates: Vec<Option<usize>> = match checkpointing {
        Checkpointing::None => vec![None],
        Checkpointing::Every(k) => vec![Some(k)],
        Checkpointing::Auto => {
            let mut spans: Vec<Option<usize>> = (1..=layers).map(Some).collect();
            // Least memory first among the recompute options.
            spans.sort_by_key(|k| estimate(m, w, *k, overhead).total);
            std::iter::once(None).chain(spans).collect()
        }
    };
    for every in &candidates {
        let e = estimate(m, w, *every, overhead);
        if e.total <= usable {
            return Ok(Plan {
                recompute_every: *every,
                estimate: e,
                budget: budget.0,
                usable,
                budget_source: budget.1,
                micro_batch: w.batch,
                grad_accum: 1,
            });
        }
    }
    // The hint covers every option, not only the one the config fixed.
    let (leanest_every, leanest) = std::iter::once(None)
        .chain((1..=layers).map(Some))
        .map(|k| (k, estimate(m, w, k, overhead)))
        .min_by_key(|(_, e)| e.total)
        .expect("at least one option");
    let asked = (candidates.len() == 1)
        .then(|| Box::new((candidates[0], estimate(m, w, candidates[0], overhead))));
    Err(NothingFits {
        asked,
        leanest,
        leanest_every,
        budget: budget.0,
        needed_budget: (leanest.total as f64 / (1.0 - SAFETY_MARGIN)).ceil() as u64,
    })
}

/// [`choose`] with `train.batch_size` taken into account: a fixed micro-batch is planned as is;
/// `auto` tries the micro-batches that divide `effective` from the largest down, first without
/// recompute (when `checkpointing` allows it), then with, and accumulates over the rest.
#[allow(clippy::too_many_arguments)]
pub fn choose_run(
    m: &Architecture,
    w: &Workload,
    batch: BatchSize,
    effective: usize,
    grad_accum: usize,
    checkpointing: Checkpointing,
    budget: (u64, String),
    overhead: u64,
) -> Result<Plan, NothingFits> {
    let with_batch = |b: usize| Workload { batch: b, ..*w };
    match batch {
        BatchSize::Fixed(b) => choose(m, &with_batch(b), checkpointing, budget, overhead)
            .map(|p| Plan { grad_accum, ..p }),
        BatchSize::Auto => {
            let effective = effective.max(1);
            let sizes: Vec<usize> = (1..=effective)
                .rev()
                .filter(|b| effective.is_multiple_of(*b))
                .collect();
            let stages = match checkpointing {
                Checkpointing::Auto => vec![Checkpointing::None, Checkpointing::Auto],
                other => vec![other],
            };
            for stage in stages {
                for &b in &sizes {
                    if let Ok(p) = choose(m, &with_batch(b), stage, budget.clone(), overhead) {
                        return Ok(Plan {
                            grad_accum: effective / b,
                            ..p
                        });
                    }
                }
            }
            choose(m, &with_batch(1), checkpointing, budget, overhead)
        }
    }
}

/// `config` with `train.batch_size` and `train.grad_accum` as `plan` resolved them.
pub fn resolve(config: &Config, plan: &Plan) -> Config {
    let mut c = config.clone();
    c.train.batch_size = BatchSize::Fixed(plan.micro_batch);
    c.train.grad_accum = plan.grad_accum;
    c
}

/// The workload a config describes, for a model of shape `m` with these parameter counts.
pub fn workload(
    config: &Config,
    m: &Architecture,
    (trainable, total): (u64, u64),
    held: kiln_models::quant::Held,
) -> Workload {
    let lora = config.model.pretrained.is_some()
        && config.finetune.method == kiln_config::FinetuneMethod::Lora;
    Workload {
        batch: config.train.batch_size.get(),
        seq: config.data.seq_len,
        trainable,
        total,
        dropout: config.model.dropout > 0.0 || (lora && config.finetune.lora.dropout > 0.0),
        attention_dropout: config.model.dropout > 0.0,
        loss_chunk: loss_chunk(config.memory.loss_chunk, m.config.vocab_size),
        half: config.train.dtype != kiln_config::ComputeDtype::F32,
        held,
        sequences_per_example: if config.finetune.objective.is_preference() {
            2
        } else {
            1
        },
        reference: if config.finetune.objective == kiln_config::Objective::Dpo && !lora {
            total
        } else {
            0
        },
    }
}

/// The per-backend overhead the estimate adds.
fn overhead(selected: &crate::device::SelectedDevice) -> u64 {
    if selected.kind == kiln_config::BackendKind::Cpu {
        CPU_OVERHEAD
    } else {
        GPU_OVERHEAD
    }
}

/// What was planned when a resumed run started: its micro-batch and recompute (`Some(0)`: none).
/// A resumed run keeps both when the config says `auto`, since they decide the data order and
/// the float rounding.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resumed {
    pub micro_batch: Option<usize>,
    pub recompute_every: Option<usize>,
}

/// The plan for `config` on `selected` for a model of shape `m` with these parameter counts.
/// With no detectable budget and no `memory.budget` size, `auto` keeps every activation.
fn plan_shape(
    config: &Config,
    m: &Architecture,
    counts: (u64, u64),
    held: kiln_models::quant::Held,
    resumed: Resumed,
    budget: Option<(u64, String)>,
    overhead: u64,
) -> Result<Plan, NothingFits> {
    let w = workload(config, m, counts, held);
    let budget = budget.unwrap_or((u64::MAX, "unknown (no limit applied)".into()));
    let t = &config.train;
    let checkpointing = match (config.memory.checkpointing, resumed.recompute_every) {
        (Checkpointing::Auto, Some(0)) => Checkpointing::None,
        (Checkpointing::Auto, Some(k)) => Checkpointing::Every(k),
        (c, _) => c,
    };
    let (batch, accum) = match (t.batch_size, resumed.micro_batch) {
        (BatchSize::Auto, Some(b)) if b > 0 && t.effective_batch_size.is_multiple_of(b) => {
            (BatchSize::Fixed(b), t.effective_batch_size / b)
        }
        (b, _) => (b, t.grad_accum),
    };
    choose_run(
        m,
        &w,
        batch,
        t.effective_batch_size,
        accum,
        checkpointing,
        budget,
        overhead,
    )
}

/// The planner `setup` runs once a model is declared and before its weights are built or
/// loaded, given its (trainable, total) parameter counts: the run's one plan, or why nothing fits.
/// A resumed run passes what it planned when it started.
pub fn planner(
    config: &Config,
    selected: &crate::device::SelectedDevice,
    resumed: Resumed,
) -> impl Fn(&Architecture, u64, u64, kiln_models::quant::Held) -> Result<Plan, crate::TrainError> {
    let budget = resolve_budget(config.memory.budget, selected.budget.as_ref());
    let overhead = overhead(selected);
    move |m, trainable, total, held| {
        plan_shape(
            config,
            m,
            (trainable, total),
            held,
            resumed,
            budget.clone(),
            overhead,
        )
        .map_err(|e| crate::TrainError::Other(e.to_string()))
    }
}

/// What `kiln plan` shows: the plan, and the estimate of every checkpointing option.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub device: String,
    pub model: String,
    pub trainable_params: u64,
    pub total_params: u64,
    pub batch_size: BatchSize,
    pub seq_len: usize,
    pub budget: Option<u64>,
    pub budget_source: String,
    /// `Ok`: the chosen plan; `Err`: why nothing fits.
    pub plan: Result<Plan, String>,
    /// (`none` or `every: k`, estimate) for each option.
    pub options: Vec<(String, Estimate)>,
    /// Whether attention runs in tiles (no scores kept; false under dropout on the attention
    /// probabilities).
    pub attention_tiled: bool,
    /// Bytes of attention scores all blocks together would keep if they were materialised (at
    /// the chosen micro-batch): what tiling saves, or what dropout on them costs.
    pub attention_scores: u64,
}

/// The plan for `config` without loading weights or allocating tensors.
pub fn plan_config(config: &Config) -> Result<PlanReport, crate::TrainError> {
    let selected = crate::device::select(&config.backend)?;
    let (m, trainable, total, held) = crate::shape::model_shape(config)?;
    let w = workload(config, &m, (trainable, total), held);
    let overhead = overhead(&selected);
    let budget = resolve_budget(config.memory.budget, selected.budget.as_ref());
    let plan = plan_shape(
        config,
        &m,
        (trainable, total),
        held,
        Resumed::default(),
        budget.clone(),
        overhead,
    )
    .map_err(|e| e.to_string());
    let w = Workload {
        batch: plan.as_ref().map_or(w.batch, |p| p.micro_batch),
        ..w
    };
    let mut options = vec![("none".to_string(), estimate(&m, &w, None, overhead))];
    let chosen = plan.as_ref().ok().and_then(|p| p.recompute_every);
    for k in 1..=m.blocks.len() {
        if [1, 2, 3, 4, 6, 8, 12, 16].contains(&k) || Some(k) == chosen {
            options.push((format!("every: {k}"), estimate(&m, &w, Some(k), overhead)));
        }
    }
    Ok(PlanReport {
        device: selected.description,
        model: format!(
            "{} {} layers, width {}, {} heads ({} kv), FFN {}, vocab {}",
            m.config.model_type,
            m.blocks.len(),
            m.config.hidden_size,
            m.config.num_attention_heads,
            m.config.num_key_value_heads,
            m.config.intermediate_size,
            m.config.vocab_size
        ),
        trainable_params: trainable,
        total_params: total,
        batch_size: config.train.batch_size,
        seq_len: config.data.seq_len,
        budget: budget.as_ref().map(|b| b.0),
        budget_source: budget
            .map(|b| b.1)
            .unwrap_or_else(|| "not detected; set memory.budget".into()),
        plan,
        options,
        attention_tiled: !w.attention_dropout,
        attention_scores: materialised_scores_bytes(&m, &w),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Llama-family declaration from `config.json` fields.
    fn llama(fields: serde_json::Value) -> Architecture {
        let mut hf =
            serde_json::json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"]});
        for (k, v) in fields.as_object().unwrap() {
            hf[k] = v.clone();
        }
        kiln_models::family::config_from_hf(hf.as_object().unwrap())
            .unwrap()
            .declare()
            .unwrap()
    }

    fn llama3_8b() -> Architecture {
        llama(serde_json::json!({
            "vocab_size": 128_256, "hidden_size": 4096, "intermediate_size": 14_336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 500_000.0, "tie_word_embeddings": false,
        }))
    }

    fn smollm2_135m() -> Architecture {
        llama(serde_json::json!({
            "vocab_size": 49_152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 100_000.0, "tie_word_embeddings": true,
        }))
    }

    /// LoRA r = 16 on all seven projections of every block.
    fn lora_workload(m: &Architecture, batch: usize, seq: usize) -> Workload {
        let spec = kiln_models::lora::LoraSpec {
            rank: 16,
            alpha: 32.0,
            rslora: false,
            dora: false,
            targets: m.block_modules(),
            layers: (0..m.blocks.len()).collect(),
        };
        let trainable = spec.num_params(m) as u64;
        Workload {
            batch,
            seq,
            trainable,
            total: m.num_params() as u64 + trainable,
            dropout: false,
            attention_dropout: false,
            loss_chunk: loss_chunk(0, m.config.vocab_size),
            half: false,
            held: Default::default(),
            sequences_per_example: 1,
            reference: 0,
        }
    }

    /// Metal's recommendedMaxWorkingSetSize as observed on Macs of 8, 32, 96 and 128 GB (FACTS.md).
    const METAL_WORKING_SETS: [(u64, u64); 4] = [
        (8, 5461 << 20),
        (32, 21_845_000_000),
        (96, 73_728_000_000),
        (128, 103_079_000_000),
    ];

    fn metal(bytes: u64) -> (u64, String) {
        let detected = crate::device::Budget {
            bytes,
            source: "Metal working set".into(),
        };
        resolve_budget(Budget::Auto, Some(&detected)).unwrap()
    }

    #[test]
    fn plans_across_the_metal_working_set_table() {
        // Llama-3-8B shape, LoRA, batch 1 × 2048 (mlx-lm's defaults), f32 weights (32 GB).
        let m = llama3_8b();
        let w = lora_workload(&m, 1, 2048);
        let plans: Vec<_> = METAL_WORKING_SETS
            .iter()
            .map(|&(gb, bytes)| {
                (
                    gb,
                    choose(&m, &w, Checkpointing::Auto, metal(bytes), GPU_OVERHEAD),
                )
            })
            .collect();
        for (gb, p) in &plans[..2] {
            let e = p.as_ref().unwrap_err();
            assert!(e.needed_budget > METAL_WORKING_SETS[1].1, "{gb} GB: {e}");
            assert!(e.leanest.weights > 30 << 30, "{gb} GB: {e}");
        }
        // With attention in tiles the 96 and 128 GB Macs keep every activation at 2048 (about
        // 19 GB of them).
        for (gb, p) in &plans[2..] {
            let p = p.as_ref().unwrap_or_else(|e| panic!("{gb} GB: {e}"));
            assert_eq!(p.recompute_every, None, "{gb} GB: {p:?}");
            assert!(p.estimate.total <= p.usable);
        }
        // At 4096, keeping them (about 39 GB, 72 GB in all) does not fit the 96 GB Mac's usable
        // 66 GB; recompute does. The 128 GB Mac keeps them all.
        let long = lora_workload(&m, 1, 4096);
        let on = |i: usize, c| choose(&m, &long, c, metal(METAL_WORKING_SETS[i].1), GPU_OVERHEAD);
        let p96 = on(2, Checkpointing::Auto).unwrap_or_else(|e| panic!("96 GB: {e}"));
        assert!(p96.recompute_every.is_some(), "96 GB: {p96:?}");
        assert!(p96.estimate.total <= p96.usable);
        assert!(estimate(&m, &long, None, GPU_OVERHEAD).total > p96.usable);
        let p128 = on(3, Checkpointing::Auto).unwrap_or_else(|e| panic!("128 GB: {e}"));
        assert_eq!(p128.recompute_every, None, "128 GB: {p128:?}");
        assert!(p128.estimate.total <= p128.usable);
        // Asked for no recompute, the same run is refused on the 96 GB Mac, and the message
        // names the budget that would fit and the breakdown.
        let e = choose(
            &m,
            &long,
            Checkpointing::None,
            metal(METAL_WORKING_SETS[2].1),
            GPU_OVERHEAD,
        )
        .unwrap_err();
        let text = e.to_string();
        for part in [
            "does not fit",
            "with no recompute",
            "weights",
            "activations",
            "would fit",
            "memory.checkpointing: auto",
        ] {
            assert!(text.contains(part), "{text}");
        }
        // At 32 GB nothing fits at all: the message gives the smallest budget that would.
        let text = plans[1].1.as_ref().unwrap_err().to_string();
        for part in [
            "does not fit",
            "at its leanest",
            "smallest budget",
            "weights",
        ] {
            assert!(text.contains(part), "{text}");
        }

        // SmolLM2-135M LoRA: batch 4 × 256 fits an 8 GB Mac whole; batch 16 needs recompute
        // there and fits a 32 GB Mac whole.
        let s = smollm2_135m();
        let on_mac = |w: &Workload, bytes: u64| {
            choose(&s, w, Checkpointing::Auto, metal(bytes), GPU_OVERHEAD).unwrap()
        };
        let small = lora_workload(&s, 4, 256);
        assert_eq!(on_mac(&small, 5461 << 20).recompute_every, None);
        let big = lora_workload(&s, 16, 256);
        let p = on_mac(&big, 5461 << 20);
        assert!(p.recompute_every.is_some(), "{p:?}");
        let p = on_mac(&big, 21_845_000_000);
        assert_eq!(p.recompute_every, None);
    }

    #[test]
    fn auto_batch_lowers_the_micro_batch_before_recomputing() {
        let s = smollm2_135m();
        let w = lora_workload(&s, 1, 256);
        let budget = |gib: u64| (gib << 30, "test".to_string());
        let run = |gib, c| choose_run(&s, &w, BatchSize::Auto, 16, 1, c, budget(gib), GPU_OVERHEAD);
        // Room for 16 at once: one micro-batch of 16.
        let p = run(64, Checkpointing::Auto).unwrap();
        assert_eq!(
            (p.micro_batch, p.grad_accum, p.recompute_every),
            (16, 1, None)
        );
        // Less room: a smaller micro-batch, more accumulation, still no recompute.
        let p = run(4, Checkpointing::Auto).unwrap();
        assert!(
            p.micro_batch < 16 && p.micro_batch * p.grad_accum == 16,
            "{p:?}"
        );
        assert_eq!(p.recompute_every, None);
        // Not even one sequence fits without recompute: recompute, micro-batch as large as fits.
        let one = lora_workload(&s, 1, 256);
        let none_one = estimate(&s, &one, None, GPU_OVERHEAD).total;
        let every_one = estimate(&s, &one, Some(1), GPU_OVERHEAD).total;
        let between = ((none_one + every_one) as f64 / 2.0 / (1.0 - SAFETY_MARGIN)) as u64;
        let p = choose_run(
            &s,
            &w,
            BatchSize::Auto,
            16,
            1,
            Checkpointing::Auto,
            (between, "test".into()),
            GPU_OVERHEAD,
        )
        .unwrap();
        assert!(p.recompute_every.is_some(), "{p:?}");
        assert_eq!(p.micro_batch * p.grad_accum, 16);
        assert!(p.estimate.total <= p.usable);
        // A fixed micro-batch keeps its accumulation.
        let p = choose_run(
            &s,
            &w,
            BatchSize::Fixed(4),
            16,
            3,
            Checkpointing::None,
            budget(64),
            GPU_OVERHEAD,
        )
        .unwrap();
        assert_eq!((p.micro_batch, p.grad_accum), (4, 3));
    }

    /// Attention in tiles keeps a number per head and token, so a block's activations grow
    /// with the sequence, not its square; dropout on the attention probabilities materialises
    /// the scores again and is counted so.
    #[test]
    fn tiled_attention_activations_grow_linearly_with_the_sequence() {
        let m = smollm2_135m();
        let at = |seq: usize, attention_dropout: bool| {
            let w = Workload {
                attention_dropout,
                dropout: attention_dropout,
                ..lora_workload(&m, 1, seq)
            };
            m.memory_profile()
                .iter()
                .map(|b| block_activation_bytes(b, &w))
                .sum::<u64>() as f64
        };
        let (a2k, a8k) = (at(2048, false), at(8192, false));
        assert!((a8k / a2k - 4.0).abs() < 1e-9, "{a2k} → {a8k}");
        // Materialised, the 9 heads' scores at 8192 are 9 × 8192² × 4 bytes a block.
        let scores = at(8192, true) - at(8192, false);
        let per_block = 9.0 * 8192.0 * 8192.0 * 4.0;
        assert!(scores >= 30.0 * per_block, "{scores} < 30 × {per_block}");
        let w = lora_workload(&m, 1, 8192);
        assert_eq!(materialised_scores_bytes(&m, &w) as f64, 30.0 * per_block);
    }

    /// A 16 GB Mac's Metal working set: 2/3 of its RAM (FACTS.md), about 10.7 GiB.
    const MAC_16GB: u64 = (16 << 30) / 3 * 2;

    /// QLoRA: a Llama-3-8B-shaped model with LoRA at sequence 2048 fits a 16 GB Mac with its
    /// base held as Q4_K (recompute as needed), in f32 or half compute; held in f16 it does not
    /// (16 GB of weights alone).
    /// A preference pair is two sequences, so a micro-batch of 4 pairs holds the activations of
    /// 8 sequences; DPO under full fine-tuning adds a frozen copy of every weight.
    #[test]
    fn preference_pairs_count_two_sequences_and_full_dpo_a_reference_copy() {
        let m = smollm2_135m();
        let sft = lora_workload(&m, 4, 256);
        let pairs = Workload {
            sequences_per_example: 2,
            ..sft
        };
        let eight = lora_workload(&m, 8, 256);
        let (e_pairs, e_eight) = (estimate(&m, &pairs, None, 0), estimate(&m, &eight, None, 0));
        assert_eq!(e_pairs.activations, e_eight.activations);
        assert_eq!(e_pairs.logits, e_eight.logits);
        let full = Workload {
            trainable: sft.total,
            ..sft
        };
        let dpo = Workload {
            reference: full.total,
            ..full
        };
        let (e_full, e_dpo) = (estimate(&m, &full, None, 0), estimate(&m, &dpo, None, 0));
        assert_eq!(e_dpo.weights - e_full.weights, 4 * full.total);
    }

    #[test]
    fn a_q4_k_8b_base_fits_a_16_gb_mac_and_an_f16_one_does_not() {
        use kiln_models::ggml_types::{Q4_K, Q8_0};
        use kiln_models::quant::{BaseQuant, held_for};
        let m = llama3_8b();
        let w = lora_workload(&m, 1, 2048);
        let on_mac =
            |w: &Workload| choose(&m, w, Checkpointing::Auto, metal(MAC_16GB), GPU_OVERHEAD);
        let f16 = Workload { half: true, ..w };
        let e = on_mac(&f16).unwrap_err();
        assert!(e.leanest.weights > 15 << 30, "{e}");
        let held = held_for(&m, BaseQuant::To(Q4_K), None);
        // Every linear weight and both embeddings (4096 and 14336 are whole super-blocks).
        assert_eq!(held.numel, m.num_params() as u64 - (2 * 32 + 1) * 4096);
        // Q4_K held: 4 bits a code and an f32 scale and bias per 32 elements.
        assert_eq!(held.bytes, held.numel * 3 / 4);
        for half in [false, true] {
            let q = Workload { held, half, ..w };
            let p = on_mac(&q).unwrap_or_else(|e| panic!("half {half}: {e}"));
            assert!(p.estimate.total <= p.usable, "{p:?}");
            assert!(p.estimate.weights < 6 << 30, "{:?}", p.estimate);
        }
        // q8_0 holds 1.125 bytes an element: it needs recompute-level room but not f16's.
        let q8 = held_for(&m, BaseQuant::To(Q8_0), None);
        assert_eq!(q8.bytes, q8.numel * 9 / 8);
        // SmolLM2-135M's 576-wide rows are not whole super-blocks: q4_k holds them as Q4_1,
        // the same bytes, and its 1536-wide rows (down_proj) as Q4_K.
        let s = smollm2_135m();
        let held = held_for(&s, BaseQuant::To(Q4_K), None);
        assert_eq!(held.numel, s.num_params() as u64 - 61 * 576);
        assert_eq!(held.bytes, held.numel * 3 / 4);
    }

    #[test]
    fn recompute_needs_less_and_budgets_resolve() {
        let s = smollm2_135m();
        let w = lora_workload(&s, 4, 256);
        let none = estimate(&s, &w, None, 0);
        let every1 = estimate(&s, &w, Some(1), 0);
        assert!(every1.activations * 5 < none.activations);
        assert_eq!(none.weights, every1.weights);
        let detected = crate::device::Budget {
            bytes: 10 << 30,
            source: "MemAvailable".into(),
        };
        assert_eq!(
            resolve_budget(Budget::Fraction(0.5), Some(&detected))
                .unwrap()
                .0,
            5 << 30
        );
        assert_eq!(
            resolve_budget(Budget::Bytes(123), None).unwrap(),
            (123, "memory.budget".to_string())
        );
        assert!(resolve_budget(Budget::Auto, None).is_none());
    }
}
