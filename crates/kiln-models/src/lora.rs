//! LoRA: a frozen linear `x W` plus a trainable low-rank path `s · (dropout(x) A) B`, computed as
//! two thin matmuls, so no weight-sized delta is formed per forward. `A` is `[in, r]` here
//! (PEFT stores `lora_A.weight` as `[r, in]`), `B` is `[r, out]` (PEFT: `[out, r]`).
//! Init as PEFT: A kaiming-uniform with a = √5 (uniform ±1/√in), B zeros.

use crate::llama::LlamaModel;
use crate::params::{ParamKind, ParamMapper};
use burn::prelude::*;
use kiln_data::Rng;

const LORA_PURPOSE: u64 = 0x10fa;

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Tensor<2>,
    pub b: Tensor<2>,
    /// `alpha / r`, or `alpha / √r` for rsLoRA.
    pub scale: f64,
}

/// Which linears get adapters, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// HF module names (`q_proj`, `v_proj`, ...).
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

    /// All seven projections of a Llama block.
    pub const ALL_LINEAR: [&'static str; 7] = kiln_config::ALL_LINEAR_MODULES;
}

/// The module name (`q_proj`) and layer of a parameter path like
/// `model.layers.3.self_attn.q_proj.weight`.
pub fn module_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let module = rest.split('.').nth(1)?;
    Some((layer.parse().ok()?, module))
}

/// Adds fresh adapters (seeded by name) to the linears `spec` selects.
pub fn attach(model: LlamaModel, spec: &LoraSpec, seed: u64) -> LlamaModel {
    let device = model.device();
    let mut model = model;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        if !spec.layers.contains(&i) {
            continue;
        }
        let linears = [
            ("self_attn.q_proj", &mut layer.self_attn.q_proj),
            ("self_attn.k_proj", &mut layer.self_attn.k_proj),
            ("self_attn.v_proj", &mut layer.self_attn.v_proj),
            ("self_attn.o_proj", &mut layer.self_attn.o_proj),
            ("mlp.gate_proj", &mut layer.mlp.gate_proj),
            ("mlp.up_proj", &mut layer.mlp.up_proj),
            ("mlp.down_proj", &mut layer.mlp.down_proj),
        ];
        for (path, linear) in linears {
            let module = path.rsplit('.').next().unwrap_or(path);
            if !spec.targets.iter().any(|t| t == module) {
                continue;
            }
            let [din, dout] = linear.weight.dims();
            let name = format!("model.layers.{i}.{path}.lora_A.weight");
            let mut rng = Rng::stream(seed, LORA_PURPOSE, crate::llama::name_hash(&name));
            let bound = 1.0 / (din as f64).sqrt();
            let a: Vec<f32> = (0..din * spec.rank)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            linear.lora = Some(LoraAdapter {
                a: Tensor::from_data(TensorData::new(a, [din, spec.rank]), &device),
                b: Tensor::zeros([spec.rank, dout], &device),
                scale: spec.scale(),
            });
        }
    }
    model
}

/// Marks only LoRA matrices as trainable (`lora: true`) or every parameter (`lora: false`),
/// on `device` (the autodiff view for training).
pub fn set_trainable(model: LlamaModel, device: &Device, lora_only: bool) -> LlamaModel {
    struct Mark<'a>(&'a Device, bool);
    impl ParamMapper for Mark<'_> {
        fn map<const D: usize>(&mut self, _: &str, kind: ParamKind, p: Tensor<D>) -> Tensor<D> {
            let p = p.detach().to_device(self.0);
            let p = if self.0.is_autodiff() {
                p.autodiff()
            } else {
                p.without_autodiff()
            };
            let trainable = !self.1 || matches!(kind, ParamKind::LoraA | ParamKind::LoraB);
            if trainable && self.0.is_autodiff() {
                p.require_grad()
            } else {
                p
            }
        }
    }
    model.map_params(&mut Mark(device, lora_only))
}

/// Merges every adapter into its weight, `W += s · A B` (PEFT's `W += s · B A` in its layout),
/// and drops the adapters: a plain model that computes what base + adapter computed.
pub fn fuse(model: LlamaModel) -> LlamaModel {
    let mut model = model;
    for layer in model.layers.iter_mut() {
        let linears = [
            &mut layer.self_attn.q_proj,
            &mut layer.self_attn.k_proj,
            &mut layer.self_attn.v_proj,
            &mut layer.self_attn.o_proj,
            &mut layer.mlp.gate_proj,
            &mut layer.mlp.up_proj,
            &mut layer.mlp.down_proj,
        ];
        for linear in linears {
            if let Some(l) = linear.lora.take() {
                let delta = l.a.matmul(l.b) * l.scale;
                linear.weight = linear.weight.clone() + delta;
            }
        }
    }
    model
}
