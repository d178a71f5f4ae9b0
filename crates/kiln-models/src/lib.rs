//! Decoder-only transformers for kiln, their parameters named exactly as Hugging Face names them,
//! so that a safetensors key maps to a field by rule and checkpoints load in `transformers`.

pub use kiln_formats::{fsutil, safetensors_io};
pub mod fused;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod lora;
pub mod params;
pub mod pretrained;

pub use llama::{LlamaConfig, LlamaModel};
pub use params::{ParamKind, ParamMapper, ParamVisitor};

pub use kiln_formats::ModelError;
