//! Decoder-only transformers for kiln, family by family, their parameters named exactly as
//! Hugging Face names them, so that a safetensors key maps to a parameter by rule and
//! checkpoints load in `transformers`.
//!
//! The flow: a family ([`family::Family`], one folder under `families/`, listed in
//! [`registry`]) reads a config and declares an [`arch::Architecture`] from the shared
//! [`layers`]; a [`Model`] is that declaration with its weights.

pub use kiln_formats::{fsutil, ggml_quantize, ggml_repack, ggml_types, safetensors_io};
mod adamw_cube;
pub mod arch;
mod attention_cube;
pub mod config;
mod cross_entropy_cube;
mod cube_op;
mod cube_rows;
pub mod dtype;
pub mod families;
pub mod family;
pub mod fused;
mod fused_cube;
pub mod fuzz;
pub mod gguf;
pub mod gguf_export;
mod grad_norm_cube;
pub mod hf;
pub mod layers;
pub mod lora;
pub mod model;
mod overwrite_cube;
pub mod params;
pub mod plan;
pub mod pretrained;
pub mod quant;
pub mod registry;
mod rms_norm_cube;
mod rope_cube;
mod softmax_cube;
mod swiglu_cube;

pub use arch::Architecture;
pub use config::ModelConfig;
pub use family::Family;
pub use layers::Dropout;
pub use model::{KvCache, Model};
pub use params::{ParamKind, ParamMapper, ParamVisitor};

pub use kiln_formats::ModelError;

/// Counts of the GPU updates and uploads that could not write in place, which a captured
/// training step must not have (`kiln_train::replay` checks them around its capture).
pub mod in_place {
    /// AdamW updates that wrote new buffers.
    pub fn adamw_misses() -> u64 {
        crate::adamw_cube::out_of_place()
    }

    /// Overwrites (`fused::overwrite`) that made new buffers.
    pub fn overwrite_misses() -> u64 {
        crate::overwrite_cube::misses()
    }
}
