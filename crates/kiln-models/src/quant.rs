//! Frozen matrices held quantized on the device (QLoRA): a GGUF file's own blocks, or an f32
//! matrix quantized as it loads, laid out as `kiln_kernels::quant` describes. Only linear
//! weights and embeddings are held this way; adapters, norms and biases stay in float.
//!
//! The tensors are constants: they live on the device without autodiff, are never visited as
//! parameters (nothing trains them, nothing saves them), and the fused products take them as
//! they are ([`crate::fused::qmatmul`] keeps only them for backward).

use burn::prelude::*;
use burn::tensor::{DType, TensorCreationOptions};
use kiln_formats::ggml_repack::{self, PackedMatrix};
use kiln_formats::ggml_types;
pub use kiln_kernels::quant::{QuantLayout, SCRATCH_ELEMENTS};

/// How to hold a base model's frozen matrices (`finetune.base_quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseQuant {
    /// In float (`train.dtype`).
    None,
    /// A GGUF base's matrices in their own blocks.
    Keep,
    /// Each matrix quantized to this GGML type as it loads.
    To(u32),
}

/// The type a row of `cols` elements is quantized to when `wanted` asks for it: a K-quant needs
/// whole 256-element super-blocks; other rows take a 32-element type of the same bits held:
/// Q4_K → Q4_1 (4-bit affine, the same 0.75 bytes an element held; llama.cpp's writer takes
/// Q5_0, which kiln would hold in 8-bit codes), Q5_K → Q5_1, Q6_K → Q8_0.
pub fn type_for_row(wanted: u32, cols: usize) -> u32 {
    let whole = ggml_types::block_layout(wanted).is_some_and(|(b, _)| cols.is_multiple_of(b));
    if whole {
        return wanted;
    }
    match wanted {
        ggml_types::Q4_K => ggml_types::Q4_1,
        ggml_types::Q5_K => ggml_types::Q5_1,
        ggml_types::Q6_K => ggml_types::Q8_0,
        other => other,
    }
}

/// `rows × cols` f32 values (row-major, HF layout) quantized to `ggml_type` (after the
/// fallback of [`type_for_row`]) and laid out to be held: the same blocks a GGUF file of that
/// type would hold. `None` when the rows are not whole blocks of any fallback.
pub fn quantize(values: &[f32], rows: usize, cols: usize, ggml_type: u32) -> Option<PackedMatrix> {
    let ty = type_for_row(ggml_type, cols);
    kiln_formats::ggml_quantize::encoded_len(ty, cols)?;
    let (bytes, _) = kiln_formats::ggml_quantize::quantize_rows(ty, cols, values);
    ggml_repack::repack(ty, &bytes, rows, cols).ok()
}

/// A quantized matrix `[rows, cols]` (HF's `[out, in]`) on a device.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    pub ggml_type: u32,
    pub layout: QuantLayout,
    pub rows: usize,
    pub cols: usize,
    /// `[rows, words per row]`, 32-bit words held as i32.
    pub codes: Tensor<2, Int>,
    /// `[rows, groups per row]`, f32.
    pub scale: Tensor<2>,
    pub bias: Option<Tensor<2>>,
}

/// The shape a fused quantized operation needs besides the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantShape {
    pub layout: QuantLayout,
    pub cols: usize,
}

impl QuantMatrix {
    /// `packed` on `device` (its autodiff-free view).
    pub fn from_packed(packed: PackedMatrix, device: &Device) -> Self {
        let device = device.clone().without_autodiff();
        let (rows, cols, l) = (packed.rows, packed.cols, packed.layout);
        let (words, groups) = (l.words_per_row(cols), l.groups_per_row(cols));
        let codes: Vec<i32> = packed.codes.iter().map(|&w| w as i32).collect();
        let codes = Tensor::<2, Int>::from_data(
            TensorData::new(codes, [rows, words]),
            TensorCreationOptions::new(device.clone()).with_dtype(DType::I32),
        );
        let float = |v: Vec<f32>| {
            Tensor::<2>::from_data(
                TensorData::new(v, [rows, groups]),
                TensorCreationOptions::new(device.clone()).with_dtype(DType::F32),
            )
        };
        Self {
            ggml_type: packed.ggml_type,
            layout: l,
            rows,
            cols,
            codes,
            scale: float(packed.scale),
            bias: packed.bias.map(float),
        }
    }

    pub fn shape(&self) -> QuantShape {
        QuantShape {
            layout: self.layout,
            cols: self.cols,
        }
    }

    /// The biases, or (for a layout without) the scales standing in for them: the fused
    /// operations take a tensor either way and read it only when the layout has a bias.
    pub fn bias_or_scale(&self) -> Tensor<2> {
        self.bias.clone().unwrap_or_else(|| self.scale.clone())
    }

    /// Read back to the host.
    pub fn to_packed(&self) -> PackedMatrix {
        let read = |t: &Tensor<2>| {
            t.clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default()
        };
        let codes = self
            .codes
            .clone()
            .into_data()
            .convert::<i32>()
            .try_into_vec::<i32>()
            .unwrap_or_default();
        PackedMatrix {
            ggml_type: self.ggml_type,
            layout: self.layout,
            rows: self.rows,
            cols: self.cols,
            codes: codes.into_iter().map(|w| w as u32).collect(),
            scale: read(&self.scale),
            bias: self.bias.as_ref().map(read),
        }
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        let l = self.layout;
        let per_group = if l.has_bias { 8 } else { 4 };
        self.rows * (4 * l.words_per_row(self.cols) + per_group * l.groups_per_row(self.cols))
    }

    /// The whole matrix in f32 `[rows, cols]`, on the device without autodiff.
    pub fn dequantize(&self) -> Tensor<2> {
        crate::fused::dequantize(self)
    }
}

/// Whether a parameter of `kind` may be held quantized (linear weights and embeddings).
pub fn holdable(kind: crate::params::ParamKind) -> bool {
    matches!(
        kind,
        crate::params::ParamKind::LinearWeight | crate::params::ParamKind::Embedding
    )
}

/// A float matrix (HF layout) as `quant` asks it held when it loads: quantized to the type of
/// `BaseQuant::To`, else (or when its rows are not whole blocks) as it is.
pub fn hold_dense(
    t: crate::safetensors_io::HostTensor,
    quant: BaseQuant,
) -> crate::model::HostParam {
    use crate::model::HostParam;
    match (quant, &t.shape[..]) {
        (BaseQuant::To(ty), &[rows, cols]) => match quantize(&t.data, rows, cols, ty) {
            Some(p) => HostParam::Packed(p),
            None => HostParam::Dense(t),
        },
        _ => HostParam::Dense(t),
    }
}

/// What a run's frozen matrices cost held quantized: the elements held so, and their bytes on
/// the device (the planner counts these instead of 4 or 2 bytes an element).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    pub numel: u64,
    pub bytes: u64,
    /// The output projection (or the embedding it is tied to) is among them: its products
    /// de-quantise tile by tile, never widening the whole weight.
    pub head: bool,
}

/// [`Held`] for a model declared as `arch` loaded with `quant`; `keep_types` gives a GGUF
/// base's type per parameter (HF names; see `gguf::matrix_types`) for `Keep`.
pub fn held_for(
    arch: &crate::Architecture,
    quant: BaseQuant,
    keep_types: Option<&std::collections::BTreeMap<String, u32>>,
) -> Held {
    let mut held = Held::default();
    let head = match &arch.lm_head {
        Some(l) => format!("{}.weight", l.path),
        None => "model.embed_tokens.weight".to_string(),
    };
    for p in arch.params.iter().filter(|p| holdable(p.kind)) {
        let cols = p.hf_shape().get(1).copied().unwrap_or(0);
        let ty = match quant {
            BaseQuant::None => None,
            BaseQuant::To(t) => Some(type_for_row(t, cols)),
            BaseQuant::Keep => keep_types.and_then(|m| m.get(&p.name).copied()),
        };
        let layout = ty.and_then(|t| {
            let (block, _) = ggml_types::block_layout(t)?;
            let l = ggml_repack::layout(t)?;
            (cols.is_multiple_of(block) && l.fits(cols)).then_some(l)
        });
        if let Some(l) = layout {
            held.head |= p.name == head;
            held.numel += p.numel() as u64;
            held.bytes += (l.bytes_per_element() * p.numel() as f64).ceil() as u64;
        }
    }
    held
}
