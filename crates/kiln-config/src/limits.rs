//! The bounds on every size and count that a config, a `config.json`, GGUF metadata or a
//! checkpoint's `trainer_state.json` can state, in one place.
//!
//! Each bound is far beyond any real model or run (the largest open models have widths near 2^15
//! and vocabularies near 2^18), so a value past one is a mistake or a hostile file, refused by
//! name before anything is sized from it. They are chosen so that the products kiln forms from
//! them stay inside 64 bits: a product of two widths fits in 44 bits, a parameter count in 42,
//! and a step's token count (sequences × positions) in 50.

/// Widths: `hidden_size`, `intermediate_size`, a vocabulary.
pub const MAX_WIDTH: usize = 1 << 22;
/// Vocabulary size: of a model, or the target of a BPE tokenizer trained by kiln.
pub const MAX_VOCAB: usize = MAX_WIDTH;
/// Transformer blocks.
pub const MAX_LAYERS: usize = 1 << 12;
/// Attention (and key/value) heads.
pub const MAX_HEADS: usize = 1 << 12;
/// Per-head width.
pub const MAX_HEAD_DIM: usize = 1 << 12;
/// Parameters of one model (4.4 trillion).
pub const MAX_PARAMS: usize = 1 << 42;
/// Positions: `max_position_embeddings`, a training window, a chunk of the loss.
pub const MAX_POSITIONS: usize = 1 << 30;
/// Sequences in a micro-batch or an optimizer step; micro-batches in a step.
pub const MAX_BATCH: usize = 1 << 20;
/// Validation batches per evaluation.
pub const MAX_EVAL_BATCHES: usize = 1 << 20;
/// Optimizer steps of a run (and any step interval).
pub const MAX_STEPS: usize = 1 << 40;
/// A LoRA adapter's rank.
pub const MAX_LORA_RANK: usize = 1 << 16;

/// `Err((field, why))` unless `1 <= value <= max`.
pub fn bounded(field: &str, value: usize, max: usize) -> Result<(), (String, String)> {
    if value == 0 || value > max {
        Err((field.to_string(), format!("{value} is outside 1..={max}")))
    } else {
        Ok(())
    }
}

/// `Err((field, why))` unless `value <= max` (for counts where 0 means "off").
pub fn at_most(field: &str, value: usize, max: usize) -> Result<(), (String, String)> {
    if value > max {
        Err((field.to_string(), format!("{value} is above {max}")))
    } else {
        Ok(())
    }
}
