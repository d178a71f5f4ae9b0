//! A model's parameters: one flat list of named tensors, declared once by the family
//! ([`crate::arch::ArchBuilder`]). Layers hold handles into the list, so visiting, mapping,
//! loading, saving and counting are loops over it, the same for every family.

use crate::quant::QuantMatrix;
use burn::Tensor;

/// What a parameter is, which decides its Hugging Face layout and whether weight decay applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A linear layer's weight, held as `[in, out]` here and stored as `[out, in]` in HF files.
    LinearWeight,
    /// Token embedding `[vocab, hidden]`, same layout in HF files.
    Embedding,
    /// A norm's scale vector.
    Norm,
    /// A linear layer's bias.
    Bias,
    /// LoRA down-projection, `[in, r]` here, `lora_A.weight` `[r, in]` in PEFT files.
    LoraA,
    /// LoRA up-projection, `[r, out]` here, `lora_B.weight` `[out, r]` in PEFT files.
    LoraB,
    /// DoRA's magnitude, one per output, `lora_magnitude_vector` `[out]` in PEFT files.
    LoraMagnitude,
}

impl ParamKind {
    /// Matrices decay; norms and biases do not (as in nanoGPT, mlx-lm and torchtune).
    pub fn decays(self) -> bool {
        matches!(
            self,
            ParamKind::LinearWeight
                | ParamKind::Embedding
                | ParamKind::LoraA
                | ParamKind::LoraB
                | ParamKind::LoraMagnitude
        )
    }

    /// Held transposed relative to the PyTorch layout of HF and PEFT files.
    pub fn transposed(self) -> bool {
        matches!(
            self,
            ParamKind::LinearWeight | ParamKind::LoraA | ParamKind::LoraB
        )
    }

    /// An adapter's parameter (LoRA's matrices, DoRA's magnitude): what a LoRA run trains and
    /// saves, and what fusing folds into the weights.
    pub fn is_lora(self) -> bool {
        matches!(
            self,
            ParamKind::LoraA | ParamKind::LoraB | ParamKind::LoraMagnitude
        )
    }
}

/// One declared parameter: its Hugging Face name, kind, and shape in kiln's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub kind: ParamKind,
    pub shape: Vec<usize>,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The shape in HF/PEFT files (matrices transposed).
    pub fn hf_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        if self.kind.transposed() {
            s.reverse();
        }
        s
    }
}

/// Handle of a vector parameter (norm scale, bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P1(pub(crate) usize);

/// Handle of a matrix parameter (linear weight, embedding, LoRA matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2(pub(crate) usize);

/// A parameter's tensor: vectors and matrices are the only ranks a decoder has. A frozen
/// matrix may be held quantized (QLoRA); it is then a constant, not visited as a parameter.
#[derive(Debug, Clone)]
pub enum ParamTensor {
    Vector(Tensor<1>),
    Matrix(Tensor<2>),
    Quantized(Box<QuantHeld>),
}

/// A quantized matrix with the layout kiln's matrix of it has.
#[derive(Debug, Clone)]
pub struct QuantHeld {
    /// In HF's layout `[out, in]` (the rows quantized), whatever the parameter's.
    pub matrix: QuantMatrix,
    /// kiln holds the parameter as the transpose (linear weights, `[in, out]`).
    pub transposed: bool,
}

/// Visits every trainable tensor with its Hugging Face name.
pub trait ParamVisitor {
    fn visit<const D: usize>(&mut self, name: &str, kind: ParamKind, param: &Tensor<D>);
}

/// Rebuilds every trainable tensor, given its Hugging Face name.
pub trait ParamMapper {
    fn map<const D: usize>(&mut self, name: &str, kind: ParamKind, param: Tensor<D>) -> Tensor<D>;
}

/// Gives a parameter's values from its name, kind and shape (kiln's layout).
pub type ParamSource<'a> = dyn FnMut(&str, ParamKind, &[usize]) -> Vec<f32> + 'a;

/// FNV-1a: a stable per-parameter stream index from its name.
pub fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Row-major `[rows, cols]` to row-major `[cols, rows]`.
pub fn transpose_host(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// The tensors of a model, in the order of its declared [`ParamInfo`]s.
#[derive(Debug, Clone, Default)]
pub struct Weights(pub Vec<ParamTensor>);

impl Weights {
    /// The float matrix behind `p`. Callers that may meet a quantized one ask
    /// [`Weights::quantized`] first, or take [`Weights::dense`].
    pub fn matrix(&self, p: P2) -> Tensor<2> {
        match &self.0[p.0] {
            ParamTensor::Matrix(t) => t.clone(),
            ParamTensor::Quantized(_) => unreachable!("a quantized matrix read as a float one"),
            ParamTensor::Vector(_) => unreachable!("a matrix handle points at a vector"),
        }
    }

    /// The quantized matrix behind `p`, if it is held quantized.
    pub fn quantized(&self, p: P2) -> Option<&QuantMatrix> {
        match &self.0[p.0] {
            ParamTensor::Quantized(q) => Some(&q.matrix),
            _ => None,
        }
    }

    /// The matrix behind `p` in float and in kiln's layout, de-quantised when it is held
    /// quantized (a weight-sized tensor: for fusing and DoRA's norms, not for products).
    pub fn dense(&self, p: P2) -> Tensor<2> {
        match &self.0[p.0] {
            ParamTensor::Quantized(q) if q.transposed => q.matrix.dequantize().transpose(),
            ParamTensor::Quantized(q) => q.matrix.dequantize(),
            _ => self.matrix(p),
        }
    }

    /// The vector behind `p`.
    pub fn vector(&self, p: P1) -> Tensor<1> {
        match &self.0[p.0] {
            ParamTensor::Vector(t) => t.clone(),
            _ => unreachable!("a vector handle points at a matrix"),
        }
    }
}
