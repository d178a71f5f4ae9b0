use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("character {ch:?} is not in the tokenizer's vocabulary")]
    UnknownChar { ch: char },
    #[error("{path}: {message}")]
    Corpus { path: PathBuf, message: String },
    #[error("{0}")]
    Other(String),
}
