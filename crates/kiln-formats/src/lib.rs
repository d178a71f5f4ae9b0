//! kiln's readers and writers of model files, kept free of any tensor library so that they can be
//! fuzzed (`fuzz/`) and tested quickly: safetensors, Hugging Face model directories
//! (`model.safetensors.index.json`), GGUF containers. Every size or count read from a file is checked against
//! the file's length before anything is allocated.

pub mod fsutil;
pub mod fuzz;
pub mod ggml_quantize;
pub mod ggml_repack;
pub mod ggml_types;
pub mod gguf;
pub mod gguf_pre_tokenizers;
pub mod gguf_tokenizer;
pub mod gguf_vocab;
pub mod gguf_write;
pub mod hf;
pub mod safetensors_io;

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
