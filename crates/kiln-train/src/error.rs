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
    #[error("output directory {path}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}
