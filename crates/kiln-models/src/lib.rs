//! Decoder-only transformers for kiln, their parameters named exactly as Hugging Face names them,
//! so that a safetensors key maps to a field by rule and checkpoints load in `transformers`.

pub mod fsutil;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod lora;
pub mod params;
pub mod pretrained;
pub mod safetensors_io;

pub use llama::{LlamaConfig, LlamaModel};
pub use params::{ParamKind, ParamMapper, ParamVisitor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    File {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("tensor `{name}` in {path}: {message}")]
    Tensor {
        path: std::path::PathBuf,
        name: String,
        message: String,
    },
    #[error("I/O on {path}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
