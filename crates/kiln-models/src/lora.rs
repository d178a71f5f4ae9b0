//! LoRA over a family's linear layers: which modules get adapters (by the family's own module
//! names, PEFT's `target_modules`), how they start (PEFT's init: A kaiming-uniform with a = √5,
//! i.e. uniform ±1/√in, B zeros), which parameters train, and the merge back into the weights.

use crate::arch::Architecture;
use crate::model::Model;
use crate::params::{ParamKind, ParamMapper, name_hash};
use burn::prelude::*;
use kiln_data::Rng;

const LORA_PURPOSE: u64 = 0x10fa;

/// Which linears get adapters, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// DoRA: each adapted output also learns its magnitude (PEFT's `use_dora`).
    pub dora: bool,
    /// The family's module names (`q_proj`, `qkv_proj`, ...).
    pub targets: Vec<String>,
    /// Layer indices to adapt.
    pub layers: Vec<usize>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// The paths (`model.layers.3.self_attn.q_proj`) and widths `(in, out)` of the linears this
    /// spec adapts in `arch`.
    pub fn selected(&self, arch: &Architecture) -> Vec<(String, usize, usize)> {
        arch.blocks
            .iter()
            .flat_map(|b| b.linears())
            .filter(|l| {
                l.layer().is_some_and(|i| self.layers.contains(&i))
                    && self.targets.iter().any(|t| t == l.module())
            })
            .map(|l| (l.path.clone(), l.d_in, l.d_out))
            .collect()
    }

    /// Adapter parameters in `arch`.
    pub fn num_params(&self, arch: &Architecture) -> usize {
        self.selected(arch)
            .iter()
            .map(|(_, din, dout)| self.rank * (din + dout) + if self.dora { *dout } else { 0 })
            .sum()
    }

    /// The first target that names no linear module of `arch`'s blocks, with the names it has.
    pub fn unknown_target(&self, arch: &Architecture) -> Option<(String, Vec<String>)> {
        let modules = arch.block_modules();
        self.targets
            .iter()
            .find(|t| !modules.contains(t))
            .map(|t| (t.clone(), modules))
    }
}

/// Adds fresh adapters (seeded by name) to the linears `spec` selects; DoRA's magnitudes start
/// at the weights' own column norms, as PEFT's do (B = 0, so `‖W + s·AB‖ = ‖W‖`), and the model
/// computes what the base does.
pub fn attach(model: Model, spec: &LoraSpec, seed: u64) -> Model {
    let device = model.device();
    let mut model = model;
    for (path, din, dout) in spec.selected(model.arch()) {
        let name = format!("{path}.lora_A.weight");
        let mut rng = Rng::stream(seed, LORA_PURPOSE, name_hash(&name));
        let bound = 1.0 / (din as f64).sqrt();
        let a: Vec<f32> = (0..din * spec.rank)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = Tensor::from_data(TensorData::new(a, [din, spec.rank]), &device);
        let b = Tensor::zeros([spec.rank, dout], &device);
        let magnitude = spec
            .dora
            .then(|| model.hf_tensor(&format!("{path}.weight")))
            .flatten()
            .map(|w| {
                // HF layout [out, in]: one norm per output row.
                let norms: Vec<f32> = w
                    .data
                    .chunks(din)
                    .map(|row| row.iter().map(|v| v * v).sum::<f32>().sqrt())
                    .collect();
                Tensor::from_data(TensorData::new(norms, [dout]), &device)
            });
        model.add_lora(&path, a, b, spec.scale(), magnitude);
    }
    model
}

/// Marks only LoRA matrices as trainable (`lora: true`) or every parameter (`lora: false`),
/// on `device` (the autodiff view for training).
pub fn set_trainable(model: Model, device: &Device, lora_only: bool) -> Model {
    struct Mark<'a>(&'a Device, bool);
    impl ParamMapper for Mark<'_> {
        fn map<const D: usize>(&mut self, _: &str, kind: ParamKind, p: Tensor<D>) -> Tensor<D> {
            let p = p.detach().to_device(self.0);
            let p = if self.0.is_autodiff() {
                p.autodiff()
            } else {
                p.without_autodiff()
            };
            let trainable = !self.1 || kind.is_lora();
            if trainable && self.0.is_autodiff() {
                p.require_grad()
            } else {
                p
            }
        }
    }
    model.map_params(&mut Mark(device, lora_only))
}

/// The HF names of the weights `model`'s adapters change (`<path>.weight` of each adapted
/// linear): what fusing rewrites.
pub fn adapted_weights(model: &Model) -> std::collections::BTreeSet<String> {
    let arch = model.arch();
    arch.blocks
        .iter()
        .flat_map(|b| b.linears())
        .chain(arch.lm_head.iter())
        .filter(|l| l.lora.is_some())
        .map(|l| format!("{}.weight", l.path))
        .collect()
}

/// Merges every adapter into its weight: a plain model that computes what base + adapter did.
pub fn fuse(model: Model) -> Model {
    model.fuse_lora()
}
