//! The training step captured once on the GPU and replayed on every later step.
//!
//! An eager step on wgpu spends most of its time on the host: Burn's autodiff, the fusion
//! recorder and wgpu's command encoding, for some 500 kernel launches (docs/PERFORMANCE.md).
//! The device waits. A capture records the launches of one step, with their buffers and
//! pipelines, and a replay issues them again without any of that host work (CubeCL's
//! `Server::begin_capture` / `replay`, through Burn's `graph_*` backend calls).
//!
//! A replay reads and writes the buffers the capture saw, so everything that changes from step
//! to step is written into fixed buffers first and the step writes its results back into them:
//! - the micro-batches are [`StepBatch`]es refilled in place;
//! - the learning rate and the bias corrections (AdamW's step count) are device tensors that
//!   [`AdamW::set_rates`] overwrites, since a capture freezes host scalars;
//! - AdamW updates parameters and moments in place (`fused::adamw`), which the capture
//!   checks (`kiln_models::in_place`): an update that had to allocate would leave the next
//!   replay reading stale buffers.
//!
//! The sequence: one eager step (it creates the moments and compiles the kernels), then
//! [`WARM_STEPS`] eager steps with the device's allocations routed to the pool a capture may
//! use, then the capture. The capture only records, so the captured step is replayed at once.
//! Every later step refills the inputs and replays (packed rows: their rotary tables and key
//! runs too). Steps the graph cannot serve (a micro-batch of another shape) run eagerly in
//! between: they update the same buffers in place, so the graph stays valid.
//!
//! Used on the GPU backends for the next-token objective of one process without dropout
//! (`backend.capture: false` turns it off); everything else runs [`train_step`] as before.
//! Replayed steps equal eager steps bit for bit (tested on lavapipe).

use crate::TrainError;
use crate::optim::{AdamW, GradAccumulator};
use crate::step::{self, StepBatch, StepShape};
use crate::trainer::{Prefetched, StepOutput, Update, apply_update};
use burn::backend::{Backend, BackendGraph, Dispatch};
use burn::prelude::*;
use kiln_config::{BackendKind, Config};
use kiln_models::{Model, in_place};

/// Eager steps in the capture's allocation pool before the capture (Burn's `capture` warms up
/// three times: the fusion compiler takes another path on a program's first run).
pub const WARM_STEPS: usize = 3;

/// Where a run's capture stands.
enum Phase {
    /// No step yet (or the graph was dropped): the next runs eagerly, then warms up.
    Cold,
    /// Eager steps in the capture pool so far.
    Warm(usize),
    /// Replaying a captured step.
    Replaying(Box<Captured>),
    /// The step can't be replayed (it does not update in place): eager on the fixed inputs.
    Off,
}

/// A captured step: its graph, the outputs the graph writes, and the in-place misses when it
/// was captured.
struct Captured {
    graph: BackendGraph<Dispatch>,
    outputs: Update,
    misses: (u64, u64),
}

/// The in-place misses so far (see `kiln_models::in_place`).
fn misses() -> (u64, u64) {
    (in_place::adamw_misses(), in_place::overwrite_misses())
}

/// The capture and replay of one run's training step (see the module's documentation).
pub struct Replay {
    device: Device,
    /// The step's micro-batches, in their fixed buffers (once the first step uploaded them).
    inputs: Vec<StepBatch>,
    phase: Phase,
    /// How many steps were replayed.
    pub replayed: usize,
}

impl Replay {
    /// The replay for a run of `config` on `kind`'s `device`, when its step can be captured:
    /// a GPU backend, `backend.capture`, one process, the next-token loss, no dropout.
    pub fn for_run(
        config: &Config,
        kind: BackendKind,
        device: &Device,
        preference: bool,
        ranks: usize,
    ) -> Option<Self> {
        let lora_dropout = config.model.pretrained.is_some()
            && config.finetune.method == kiln_config::FinetuneMethod::Lora
            && config.finetune.lora.dropout > 0.0;
        let capturable = kind != BackendKind::Cpu
            && config.backend.capture
            && !preference
            && ranks == 1
            && config.model.dropout == 0.0
            && !lora_dropout;
        capturable.then(|| Self {
            device: device.clone().without_autodiff(),
            inputs: Vec::new(),
            phase: Phase::Cold,
            replayed: 0,
        })
    }

    /// One optimizer step, as [`train_step`](crate::trainer::train_step) computes it, from
    /// the replayed graph where it can (`Err(model)` hands a step it can't take back, for
    /// `train_step`). Micro-batch indices and the learning rate as there.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        model: Model,
        optimizer: &mut AdamW,
        data: &crate::data::TrainData,
        config: &Config,
        first_micro: u64,
        lr: f64,
        shape: StepShape,
        prefetch: &mut Prefetched,
    ) -> Result<Result<(Model, StepOutput), Model>, TrainError> {
        let (bs, seq, accum) = (
            config.train.batch_size.get(),
            config.data.seq_len,
            config.train.grad_accum,
        );
        let seed = config.run.seed;
        let batches: Vec<kiln_data::Batch> = (0..accum as u64)
            .map(|j| prefetch.take(data, seed, first_micro + j, bs, seq))
            .collect();
        let fits = self.inputs.is_empty()
            || (self.inputs.len() == batches.len()
                && self.inputs.iter().zip(&batches).all(|(i, b)| i.fits(b)));
        if !fits {
            // Another shape: an eager step (in place, so the graph stays valid).
            prefetch.put_back(first_micro, batches.into_iter().next());
            return Ok(Err(model));
        }
        let tokens = batches.iter().map(|b| b.batch_size * b.seq_len).sum();
        self.inputs = if self.inputs.is_empty() {
            batches
                .iter()
                .map(|b| StepBatch::upload(&model, b, shape.dtype))
                .collect()
        } else {
            std::mem::take(&mut self.inputs)
                .into_iter()
                .zip(&batches)
                .map(|(i, b)| i.refill(&model, b))
                .collect()
        };
        optimizer.set_rates(lr, &self.device);
        if let Phase::Replaying(captured) = &self.phase
            && misses() != captured.misses
        {
            // An eager step in between wrote some state to new buffers: the graph would read
            // the old ones. Capture again.
            self.phase = Phase::Cold;
        }
        let (model, outputs) = match std::mem::replace(&mut self.phase, Phase::Off) {
            Phase::Cold => {
                let stepped = self.eager(model, optimizer, config, shape);
                self.phase = match Dispatch::graph_prepare(self.dispatch()) {
                    Ok(()) => Phase::Warm(0),
                    Err(e) => {
                        // A device that can't capture: every step eager, as before.
                        not_replayed(&format!("the device can't prepare a capture ({e})"));
                        Phase::Off
                    }
                };
                stepped
            }
            Phase::Warm(n) if n < WARM_STEPS => {
                self.phase = Phase::Warm(n + 1);
                self.eager(model, optimizer, config, shape)
            }
            Phase::Warm(_) => self.capture(model, optimizer, config, shape)?,
            Phase::Replaying(captured) => {
                // SAFETY: every buffer the graph touches is held: the model and the
                // optimizer's moments (updated in place), `self.inputs` and the rates
                // (refilled in place), the outputs (in `self.phase`); intermediate buffers
                // are guarded by the graph itself. Refills and replays are issued from this
                // thread, on the stream the capture recorded.
                unsafe { Dispatch::graph_replay(self.dispatch(), &captured.graph) }
                    .map_err(|e| graph_error("replay", e))?;
                self.replayed += 1;
                let out = captured.outputs.clone();
                self.phase = Phase::Replaying(captured);
                (model, out)
            }
            Phase::Off => self.eager(model, optimizer, config, shape),
        };
        // The next step's first micro-batch, built while the device computes this one.
        let next = first_micro + accum as u64;
        prefetch.put_back(next, Some(data.train_batch(seed, next, bs, seq)));
        Ok(Ok((
            model,
            StepOutput {
                loss: outputs.loss,
                grad_norm: outputs.grad_norm,
                tokens,
                applied: outputs.applied,
                metrics: None,
                signal: None,
                traffic: Default::default(),
            },
        )))
    }

    fn dispatch(&self) -> &burn::backend::DispatchDevice {
        self.device.as_dispatch()
    }

    /// The step's device work on the inputs in their buffers: forward and backward of each
    /// micro-batch, then [`apply_update`]. What the capture records.
    fn eager(
        &self,
        model: Model,
        optimizer: &mut AdamW,
        config: &Config,
        shape: StepShape,
    ) -> (Model, Update) {
        let accum = self.inputs.len();
        let mut grads = GradAccumulator::default();
        let mut loss_sum: Option<Tensor<1>> = None;
        for batch in &self.inputs {
            let l = step::forward_backward_on(
                &model,
                batch,
                &mut None,
                shape,
                &mut grads,
                1.0 / accum as f64,
            );
            loss_sum = Some(match loss_sum {
                Some(s) => s + l,
                None => l,
            });
        }
        // As in `train_step` (no micro-batches only in a config built by hand with
        // `grad_accum: 0`, which parsing refuses).
        let loss_sum = loss_sum.unwrap_or_else(|| Tensor::zeros([1], &self.device));
        apply_update(model, optimizer, grads, loss_sum, accum, config)
    }

    /// Records the step into a graph and replays it once (the recording itself runs nothing).
    fn capture(
        &mut self,
        model: Model,
        optimizer: &mut AdamW,
        config: &Config,
        shape: StepShape,
    ) -> Result<(Model, Update), TrainError> {
        let before = misses();
        if let Err(e) = Dispatch::graph_start_capture(self.dispatch()) {
            // Nothing was recorded: close the prepared capture and take this step eagerly.
            let _ = Dispatch::graph_stop_capture(self.dispatch());
            not_replayed(&format!("the device refused to start a capture ({e})"));
            self.phase = Phase::Off;
            return Ok(self.eager(model, optimizer, config, shape));
        }
        let (model, outputs) = self.eager(model, optimizer, config, shape);
        let graph =
            Dispatch::graph_stop_capture(self.dispatch()).map_err(|e| graph_error("capture", e))?;
        // SAFETY: as for every replay (see `step`); this one computes the captured step.
        unsafe { Dispatch::graph_replay(self.dispatch(), &graph) }
            .map_err(|e| graph_error("replay", e))?;
        self.replayed += 1;
        let after = misses();
        if after != before {
            // The step wrote some state to new buffers: the graph computed this step, but a
            // second replay would read the old ones. Stay eager (correct, just slower).
            not_replayed("it could not update every parameter in place");
            self.phase = Phase::Off;
            return Ok((model, outputs));
        }
        self.phase = Phase::Replaying(Box::new(Captured {
            graph,
            outputs: outputs.clone(),
            misses: after,
        }));
        Ok((model, outputs))
    }
}

fn graph_error(what: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Other(format!(
        "could not {what} the training step on the GPU: {e}; `--set backend.capture=false` \
         runs every step eagerly (the last checkpoint resumes)"
    ))
}

/// Says once why the run's steps are not replayed (they run eagerly: correct, slower).
fn not_replayed(why: &str) {
    crate::sinks::warn(&format!(
        "the training step is not replayed: {why}; every step runs eagerly"
    ));
}
