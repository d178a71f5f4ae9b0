//! Training, in the order a run goes: the device and its memory budget; the model's declaration
//! and the memory plan sized from it, made once before any weight exists; the model and the data;
//! the step loop (forward, recompute, backward, AdamW); the sinks (progress, TensorBoard, the
//! checkpoints, which are also what resume reads and what export writes). No module imports one
//! of a later group below.

// What can go wrong, for every module.
mod error;

// Where a run computes, and in how much memory.
pub mod device;
pub mod memory;
pub mod ranks;
pub mod threads;

// What the model is before any weight exists, and the plan that makes it fit.
pub mod data;
pub mod plan;
pub mod shape;

// The checkpoint format (resume reads it, the sinks write it).
pub mod checkpoint;

// The model and data of a run.
pub mod setup;

// The step loop.
pub mod inference;
pub mod optim;
pub mod preference;
pub mod replay;
pub mod step;

// Running it: the loop with its sinks and signals, and the benchmark.
pub mod bench;
mod lock;
mod progress;
pub mod signals;
pub mod sinks;
pub mod trainer;

pub use error::TrainError;
pub use trainer::{RunSummary, TrainOptions, train};
