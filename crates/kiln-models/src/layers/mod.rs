//! The layers every family is built from, each once: linear (with LoRA), RMSNorm (plain and
//! 1+w), RoPE (default, linear, Llama 3, LongRoPE, partial, none), attention (GQA, q/k norms,
//! sliding window, soft-cap, KV cache), the gated MLP (SiLU, GELU), dropout, and the block.

pub mod attention;
pub mod block;
pub mod consts;
pub mod dropout;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use attention::{Attention, LayerCache, QkvProjection};
pub use block::Block;
pub use consts::{ForwardConsts, Positions};
pub use dropout::Dropout;
pub use linear::{Linear, Lora};
pub use mlp::{Activation, GateUpProjection, Mlp};
pub use norm::RmsNorm;
pub use rope::{Rope, RopeScaling};
