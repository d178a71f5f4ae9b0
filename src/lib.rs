//! kiln: on-device training and fine-tuning of small language models, on Burn.
//!
//! The library is split by the flow of data: [`config`] (YAML schema), [`data`] (tokenizers and
//! batches), [`models`] (the decoder, named as Hugging Face names it), [`train`] (devices, the step
//! loop, checkpoints) and [`tensorboard`] (event files). The `kiln` binary is a thin shell over it.
//!
//! ```no_run
//! let config = kiln::config::Config::load("configs/shakespeare-char.yaml".as_ref(), &[]).unwrap();
//! let summary = kiln::train::train(&config, &Default::default()).unwrap();
//! println!("val loss {:?}", summary.final_val_loss);
//! ```

pub use kiln_config as config;
pub use kiln_data as data;
pub use kiln_models as models;
pub use kiln_tensorboard as tensorboard;
pub use kiln_train as train;
