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
}

impl ParamKind {
    /// Matrices decay; norms and biases do not (as in nanoGPT, mlx-lm and torchtune).
    pub fn decays(self) -> bool {
        matches!(
            self,
            ParamKind::LinearWeight | ParamKind::Embedding | ParamKind::LoraA | ParamKind::LoraB
        )
    }

    /// Held transposed relative to the PyTorch layout of HF and PEFT files.
    pub fn transposed(self) -> bool {
        matches!(
            self,
            ParamKind::LinearWeight | ParamKind::LoraA | ParamKind::LoraB
        )
    }
}

/// Visits every trainable tensor with its Hugging Face name.
pub trait ParamVisitor {
    fn visit<const D: usize>(&mut self, name: &str, kind: ParamKind, param: &Tensor<D>);
}

/// Rebuilds every trainable tensor, given its Hugging Face name.
pub trait ParamMapper {
    fn map<const D: usize>(&mut self, name: &str, kind: ParamKind, param: Tensor<D>) -> Tensor<D>;
}

/// The names of every parameter of `model`.
pub fn names(model: &crate::LlamaModel) -> Vec<String> {
    struct Names(Vec<String>);
    impl ParamVisitor for Names {
        fn visit<const D: usize>(&mut self, name: &str, _: ParamKind, _: &Tensor<D>) {
            self.0.push(name.to_string());
        }
    }
    let mut n = Names(Vec::new());
    model.visit_params(&mut n);
    n.0
}
