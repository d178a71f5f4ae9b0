//! Text in, token windows out: tokenizers (char-level, byte-level BPE trained here, or a Hugging Face
//! `tokenizer.json`), corpora split into train and validation, and reproducible random windows.

mod chat;
mod corpus;
mod error;
pub mod jsonl;
pub mod preference;
mod rng;
mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use corpus::{Batch, Corpus, Pairs, sequential_windows, tokenize_file};
pub use error::DataError;
pub use rng::Rng;
pub use tokenizer::{CharTokenizer, Tokenizer};
