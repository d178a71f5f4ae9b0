//! The gated MLP: `down(act(gate(x)) · up(x))` with SiLU (Llama, Qwen, Phi-3, SmolLM3) or
//! tanh-approximated GELU (Gemma); gate and up as two linears or one whose rows are `[gate | up]`.

use crate::fused;
use crate::layers::dropout::Dropout;
use crate::layers::linear::Linear;
use crate::params::Weights;
use burn::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, PyTorch's `gelu(approximate="tanh")`.
    GeluTanh,
}

// Declared once per block and never moved on a hot path: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum GateUpProjection {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    pub gate_up: GateUpProjection,
    pub down_proj: Linear,
    pub activation: Activation,
    /// Inner width.
    pub width: usize,
}

fn gelu_tanh(x: Tensor<2>) -> Tensor<2> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * c;
    x * (inner.tanh() + 1.0) * 0.5
}

impl Mlp {
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = match &self.gate_up {
            GateUpProjection::Separate { gate, up } => vec![gate, up],
            GateUpProjection::Fused(l) => vec![l],
        };
        v.push(&self.down_proj);
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = match &mut self.gate_up {
            GateUpProjection::Separate { gate, up } => vec![gate, up],
            GateUpProjection::Fused(l) => vec![l],
        };
        v.push(&mut self.down_proj);
        v
    }

    pub fn forward(&self, w: &Weights, x: Tensor<2>, dropout: &mut Option<Dropout>) -> Tensor<2> {
        let (gate, up) = match &self.gate_up {
            GateUpProjection::Separate { gate, up } => (
                gate.forward(w, x.clone(), dropout),
                up.forward(w, x, dropout),
            ),
            GateUpProjection::Fused(l) => {
                let y = l.forward(w, x, dropout);
                (
                    y.clone().narrow(1, 0, self.width),
                    y.narrow(1, self.width, self.width),
                )
            }
        };
        let gated = match self.activation {
            Activation::Silu => fused::swiglu(gate, up),
            Activation::GeluTanh => gelu_tanh(gate) * up,
        };
        self.down_proj.forward(w, gated, dropout)
    }
}
