//! AdamW (PyTorch's formulation), learning-rate schedules and global gradient-norm clipping.
//!
//! Optimizer state is keyed by the parameter's Hugging Face name, not by a runtime id, so it can be
//! saved to safetensors and restored into a freshly built model for exact resume.

use crate::ranks::{Ranks, Traffic, gather_chunk};
use burn::prelude::*;
use burn::tensor::FloatDType;
use kiln_config::{OptimConfig, ScheduleKind};
use kiln_models::dtype::to_dtype;
use kiln_models::fused::{self, AdamWStep};
use kiln_models::safetensors_io::HostTensor;
use kiln_models::{Model, ParamKind, ParamMapper, ParamVisitor};
use std::collections::{BTreeMap, HashMap};

/// Learning rate at optimizer step `step` (1-based) of `total`.
pub fn learning_rate(config: &OptimConfig, step: usize, total: usize) -> f64 {
    let s = &config.schedule;
    let peak = config.lr;
    if s.warmup_steps > 0 && step <= s.warmup_steps {
        return peak * step as f64 / s.warmup_steps as f64;
    }
    let decay_steps = total.saturating_sub(s.warmup_steps).max(1);
    let progress = ((step - s.warmup_steps.min(step)) as f64 / decay_steps as f64).clamp(0.0, 1.0);
    match s.kind {
        ScheduleKind::Constant => peak,
        ScheduleKind::Linear => peak + (s.min_lr - peak) * progress,
        ScheduleKind::Cosine => {
            s.min_lr + 0.5 * (peak - s.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Gradients of one optimizer step, summed over micro-batches, flattened, keyed by name.
#[derive(Default)]
pub struct GradAccumulator {
    grads: HashMap<String, Tensor<1>>,
}

impl GradAccumulator {
    /// Adds `scale ×` the gradients of `model`'s parameters found in `grads`.
    pub fn add(&mut self, model: &Model, grads: &burn::tensor::Gradients, scale: f64) {
        struct Collect<'a> {
            acc: &'a mut HashMap<String, Tensor<1>>,
            grads: &'a burn::tensor::Gradients,
            scale: f64,
        }
        impl ParamVisitor for Collect<'_> {
            fn visit<const D: usize>(&mut self, name: &str, _: ParamKind, p: &Tensor<D>) {
                let Some(g) = p.grad(self.grads) else { return };
                let n = g.shape().num_elements();
                let g = crate::step::scaled(g.reshape([n]), self.scale);
                let sum = match self.acc.remove(name) {
                    Some(prev) => prev + g,
                    None => g,
                };
                self.acc.insert(name.to_string(), sum);
            }
        }
        model.visit_params(&mut Collect {
            acc: &mut self.grads,
            grads,
            scale,
        });
    }

    /// Every accumulated gradient, flattened, read to the host (for tests and diagnostics).
    pub fn to_host(&self) -> BTreeMap<String, Vec<f32>> {
        self.grads
            .iter()
            .map(|(name, g)| {
                let v = g.clone().into_data().convert::<f32>().try_into_vec::<f32>();
                (name.clone(), v.unwrap_or_default())
            })
            .collect()
    }

    /// Sums every rank's gradients, and `extras` (the step's loss and metrics, on every rank
    /// alike), in rank order: afterwards each rank holds the same sums, bit for bit. Tensors go
    /// in groups of about [`gather_chunk`] values (a large one alone), each one host read, one
    /// gather and one upload, so a full fine-tune's gradients are never all copied at once.
    /// Returns what the gathers moved.
    pub fn sum_across<const N: usize>(
        &mut self,
        ranks: &Ranks,
        extras: [&mut Option<Tensor<1>>; N],
    ) -> Traffic {
        // Every rank lists the same tensors in the same order: gradients by name, then extras.
        let mut named: Vec<(&String, &mut Tensor<1>)> = self.grads.iter_mut().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let slots: Vec<&mut Tensor<1>> = named
            .into_iter()
            .map(|(_, t)| t)
            .chain(extras.into_iter().filter_map(|e| e.as_mut()))
            .collect();
        let mut traffic = Traffic::default();
        let mut group: Vec<&mut Tensor<1>> = Vec::new();
        let mut values = 0;
        for slot in slots {
            values += slot.shape().num_elements();
            group.push(slot);
            if values >= gather_chunk() {
                traffic.add(sum_group(ranks, std::mem::take(&mut group)));
                values = 0;
            }
        }
        traffic.add(sum_group(ranks, group));
        traffic
    }

    /// The global L2 norm of all gradients, as a one-element device tensor (no host read).
    pub fn global_norm(&self) -> Option<Tensor<1>> {
        let mut names: Vec<&String> = self.grads.keys().collect();
        names.sort();
        fused::global_norm(names.into_iter().map(|n| self.grads[n].clone()).collect())
    }
}

/// Replaces each tensor of `group` with its sum over the ranks (see
/// [`GradAccumulator::sum_across`]): one host read of them all, one gather, one upload.
fn sum_group(ranks: &Ranks, group: Vec<&mut Tensor<1>>) -> Traffic {
    let Some(device) = group.first().map(|t| t.device()) else {
        return Traffic::default();
    };
    let parts: Vec<Tensor<1>> = group
        .iter()
        .map(|t| to_dtype((*t).clone(), FloatDType::F32))
        .collect();
    let mut host = Tensor::cat(parts, 0)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    let traffic = ranks.sum_in_rank_order(&mut host);
    let n = host.len();
    let summed = Tensor::<1>::from_data(TensorData::new(host, [n]), &device);
    let mut at = 0;
    for slot in group {
        let len = slot.shape().num_elements();
        let dtype = FloatDType::from(slot.dtype());
        *slot = to_dtype(summed.clone().slice(at..at + len), dtype);
        at += len;
    }
    traffic
}

/// AdamW with decoupled weight decay: `p ← p(1 − lr·wd) − lr · m̂ / (√v̂ + ε)`.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Completed updates (bias-correction exponent).
    pub t: u64,
    /// First and second moments, flattened, keyed by parameter name.
    pub state: BTreeMap<String, (Tensor<1>, Tensor<1>)>,
    /// This step's rates on the device (`fused::adamw_rates`), for parameters without and with
    /// weight decay, and a one to scale unclipped gradients by: written by
    /// [`AdamW::set_rates`] into the same buffers every step, which a captured step reads.
    rates: Option<StepRates>,
}

/// What [`AdamW::set_rates`] leaves for [`AdamW::update`].
struct StepRates {
    lr: f64,
    plain: Tensor<1>,
    decaying: Tensor<1>,
    one: Tensor<1>,
}

impl AdamW {
    pub fn new(config: &OptimConfig) -> Self {
        Self {
            beta1: config.betas[0],
            beta2: config.betas[1],
            eps: config.eps,
            weight_decay: config.weight_decay,
            t: 0,
            state: BTreeMap::new(),
            rates: None,
        }
    }

    /// Applies one update with learning rate `lr` and returns the model with new parameter leaves:
    /// [`AdamW::set_rates`] then [`AdamW::update`].
    pub fn step(
        &mut self,
        model: Model,
        grads: GradAccumulator,
        lr: f64,
        clip_coef: Option<Tensor<1>>,
        apply: Tensor<1, Bool>,
    ) -> Model {
        self.set_rates(lr, &model.device().without_autodiff());
        self.update(model, grads, clip_coef, apply)
    }

    /// The host-side half of a step: advances the bias-correction count and writes the step's
    /// learning rate, decay and bias corrections to the device, into the buffers the last step
    /// used (in place on the GPU), so that a captured [`AdamW::update`] reads them.
    pub fn set_rates(&mut self, lr: f64, device: &Device) {
        self.t += 1;
        let plain = fused::adamw_rates(&self.hyper(lr, false));
        let decaying = fused::adamw_rates(&self.hyper(lr, true));
        self.rates = Some(match self.rates.take() {
            Some(r) => StepRates {
                lr,
                plain: fused::overwrite(r.plain, plain),
                decaying: fused::overwrite(r.decaying, decaying),
                one: r.one,
            },
            None => StepRates {
                lr,
                plain: Tensor::from_data(plain, device),
                decaying: Tensor::from_data(decaying, device),
                one: Tensor::ones([1], device),
            },
        });
    }

    /// The step's constants for a parameter that `decays` or not, at the current `t`.
    fn hyper(&self, lr: f64, decays: bool) -> AdamWStep {
        let decay = if decays && self.weight_decay > 0.0 {
            1.0 - lr * self.weight_decay
        } else {
            1.0
        };
        AdamWStep {
            lr: lr as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            decay: decay as f32,
            bc1: (1.0 - self.beta1.powi(self.t as i32)) as f32,
            bc2: (1.0 - self.beta2.powi(self.t as i32)) as f32,
        }
    }

    /// The device-side half of a step, at the rates [`AdamW::set_rates`] wrote: gradients are
    /// multiplied by `clip_coef` (a one-element tensor) first when given. Reads nothing from
    /// the host and uploads nothing, so it can run inside a captured step. Crate-private:
    /// every caller ([`AdamW::step`], `trainer::apply_update`) has called `set_rates` first.
    ///
    /// `apply` (a one-element bool tensor) decides on the device whether the update happens:
    /// where it is false, parameters and moments keep their values (a step whose loss or gradient
    /// norm is not finite), without the host having to read anything. The bias-correction count
    /// `t` advances either way.
    pub(crate) fn update(
        &mut self,
        model: Model,
        grads: GradAccumulator,
        clip_coef: Option<Tensor<1>>,
        apply: Tensor<1, Bool>,
    ) -> Model {
        struct Update<'a> {
            opt: &'a mut AdamW,
            grads: HashMap<String, Tensor<1>>,
            /// The gradients' factor (1 without clipping).
            clip: Tensor<1>,
            apply: Tensor<1, Bool>,
            lr: f64,
            plain: Tensor<1>,
            decaying: Tensor<1>,
        }
        impl ParamMapper for Update<'_> {
            fn map<const D: usize>(
                &mut self,
                name: &str,
                kind: ParamKind,
                p: Tensor<D>,
            ) -> Tensor<D> {
                let Some(g) = self.grads.remove(name) else {
                    return p;
                };
                let shape = p.shape();
                let autodiff = p.is_autodiff();
                let n = shape.num_elements();
                let flat = p.detach().without_autodiff().reshape([n]);
                let o = &mut *self.opt;
                let (m, v) = match o.state.remove(name) {
                    Some(mv) => mv,
                    None => (g.zeros_like(), g.zeros_like()),
                };
                let decays = kind.decays();
                let hyper = o.hyper(self.lr, decays);
                let rates = if decays {
                    self.decaying.clone()
                } else {
                    self.plain.clone()
                };
                // One fused pass; a skipped update leaves all three as they were.
                let (updated, m, v) = fused::adamw(
                    flat,
                    (m, v),
                    g,
                    self.clip.clone(),
                    self.apply.clone(),
                    rates,
                    hyper,
                );
                o.state.insert(name.to_string(), (m, v));
                let p = updated.reshape(shape);
                if autodiff {
                    p.autodiff().require_grad()
                } else {
                    p
                }
            }
        }
        let rates = self
            .rates
            .as_ref()
            .expect("AdamW::set_rates runs before AdamW::update");
        let (lr, plain, decaying, one) = (
            rates.lr,
            rates.plain.clone(),
            rates.decaying.clone(),
            rates.one.clone(),
        );
        let mut update = Update {
            opt: self,
            grads: grads.grads,
            clip: clip_coef.unwrap_or(one),
            apply,
            lr,
            plain,
            decaying,
        };
        model.map_params(&mut update)
    }

    /// Moments as host tensors named `<param>.exp_avg` / `<param>.exp_avg_sq` (PyTorch's names).
    pub fn state_to_host(&self) -> BTreeMap<String, HostTensor> {
        let host = |t: &Tensor<1>| HostTensor {
            shape: t.dims().to_vec(),
            data: t
                .clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default(),
        };
        let mut out = BTreeMap::new();
        for (name, (m, v)) in &self.state {
            out.insert(format!("{name}.exp_avg"), host(m));
            out.insert(format!("{name}.exp_avg_sq"), host(v));
        }
        out
    }

    /// Restores moments written by [`AdamW::state_to_host`].
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, HostTensor>,
        t: u64,
        device: &Device,
    ) -> Result<(), String> {
        self.state.clear();
        self.t = t;
        let load = |t: &HostTensor| {
            Tensor::<1>::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device)
        };
        for (key, m) in tensors {
            let Some(name) = key.strip_suffix(".exp_avg") else {
                continue;
            };
            let v = tensors
                .get(&format!("{name}.exp_avg_sq"))
                .ok_or_else(|| format!("`{name}.exp_avg_sq` missing"))?;
            if v.data.len() != m.data.len() {
                return Err(format!("`{name}` moments differ in size"));
            }
            self.state.insert(name.to_string(), (load(m), load(v)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_config::ScheduleConfig;

    #[test]
    fn schedules_warm_up_and_decay_to_min() {
        let mut c = OptimConfig {
            lr: 1.0,
            schedule: ScheduleConfig {
                kind: ScheduleKind::Cosine,
                warmup_steps: 10,
                min_lr: 0.1,
            },
            ..OptimConfig::default()
        };
        assert!((learning_rate(&c, 5, 110) - 0.5).abs() < 1e-12);
        assert!((learning_rate(&c, 10, 110) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&c, 60, 110) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&c, 110, 110) - 0.1).abs() < 1e-12);
        c.schedule.kind = ScheduleKind::Linear;
        assert!((learning_rate(&c, 60, 110) - 0.55).abs() < 1e-12);
        c.schedule.kind = ScheduleKind::Constant;
        assert_eq!(learning_rate(&c, 100, 110), 1.0);
    }
}
