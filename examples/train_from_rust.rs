//! Training from Rust in a few lines: load a config, adjust it, train, sample from the result.
//!
//!     cargo run --example train_from_rust
use kiln::config::Config;
use kiln::train::{TrainOptions, checkpoint, inference};

fn main() -> anyhow::Result<()> {
    let config = Config::load(
        "configs/shakespeare-char.yaml".as_ref(),
        &["run.name=from-rust".into(), "train.max_steps=200".into()],
    )?;
    let summary = kiln::train::train(&config, &TrainOptions::default())?;
    println!("validation loss {:?}", summary.final_val_loss);

    let dir = summary
        .last_checkpoint
        .expect("the last step is always saved");
    let model = checkpoint::load_model(&dir, &burn::tensor::Device::flex())?;
    let tokenizer = kiln::data::Tokenizer::load_dir(&dir)?;
    let options = inference::SampleOptions {
        max_tokens: 200,
        temperature: 0.8,
        top_p: 0.95,
        seed: 0,
        stop_ids: vec![],
    };
    let ids = inference::generate(&model, &tokenizer.encode("HAMLET:\n")?, &options, |_| {});
    println!("HAMLET:\n{}", tokenizer.decode(&ids)?);
    Ok(())
}
