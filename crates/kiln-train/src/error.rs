use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] kiln_config::ConfigError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
    #[error(transparent)]
    TensorBoard(#[from] kiln_tensorboard::Error),
    #[error("device: {0}")]
    Device(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A checkpoint file could not be written or read: the I/O error stays the source, so the
    /// user sees why (`No space left on device`).
    #[error("checkpoint {path}")]
    CheckpointIo {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Writing the checkpoint of `step` failed; `kept` is the newest complete one.
    #[error("step {step}: checkpoint failed; the last complete checkpoint is {kept}")]
    SaveFailed {
        step: usize,
        kept: String,
        source: Box<TrainError>,
    },
    #[error("output directory {path}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A config field the model refuses (a LoRA target it lacks): a mistake in the arguments.
    #[error("{field}: {message}")]
    Field { field: String, message: String },
    /// The ranks of a distributed run disagree (config, data, version): every rank returns the
    /// same error at the same point, so they can end together.
    #[error("{0}")]
    Ranks(String),
    #[error("{0}")]
    Other(String),
}

/// An error and its causes, `outer: inner: innermost`, for messages that are strings (a warning,
/// a log line) rather than errors returned to the caller.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let part = c.to_string();
        // `#[error(transparent)]` wrappers repeat their source's message.
        if !text.ends_with(&part) {
            text = format!("{text}: {part}");
        }
        cause = c.source();
    }
    text
}
