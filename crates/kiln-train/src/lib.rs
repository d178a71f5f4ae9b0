//! Training: device selection, memory figures, AdamW with schedules and global-norm clipping,
//! the step loop, checkpoints and resume, and the sinks (TensorBoard, progress).

pub mod bench;
pub mod checkpoint;
pub mod device;
mod error;
pub mod inference;
mod lock;
pub mod memory;
pub mod optim;
pub mod plan;
mod progress;
pub mod setup;
pub mod signals;
pub mod step;
pub mod threads;
pub mod trainer;

pub use error::TrainError;
pub use trainer::{RunSummary, TrainOptions, train};
