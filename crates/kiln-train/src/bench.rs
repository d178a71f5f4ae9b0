//! Throughput measurement: the training step of a config, timed step by step after a warmup.
//! Not a test: it prints figures (see `kiln bench` and docs/PERFORMANCE.md).

use crate::TrainError;
use crate::device;
use crate::memory;
use crate::optim::{AdamW, learning_rate};
use crate::trainer::{next_step, total_steps};
use kiln_config::Config;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub threads: usize,
    pub parameters: usize,
    /// Mean token positions per step (padding included).
    pub tokens_per_step: usize,
    /// Seconds from the program's start (or the call, in library use) to the end of the first
    /// optimizer step: device setup, loading, first kernels.
    pub first_step_secs: f64,
    /// Seconds of each measured step (after warmup). On the CPU each is ended by a host read of
    /// the loss (Flex computes eagerly, so the read costs nothing); on a GPU the measured steps
    /// run as training runs them, queued without a host read, and are timed as one window, so
    /// every entry is the window's mean.
    pub step_secs: Vec<f64>,
    /// Median seconds the host took to issue a measured step (the step call, which on a GPU
    /// returns before the device is done): the host's share of the step.
    pub median_issue_secs: f64,
    /// Median CPU seconds of the calling thread in that call (Burn's, autodiff's and the fusion
    /// recorder's work; not the device threads').
    pub median_issue_cpu_secs: f64,
    /// Measured steps replayed from the captured step (`backend.capture`, GPU backends).
    pub replayed_steps: usize,
    pub median_tokens_per_s: f64,
    pub min_tokens_per_s: f64,
    pub max_tokens_per_s: f64,
    /// Peak RSS of the whole process (loading included).
    pub peak_rss_bytes: Option<u64>,
    /// Peak RSS while stepping (from just before the first step).
    pub peak_steps_bytes: Option<u64>,
    pub peak_device_bytes: Option<u64>,
    /// RSS after setup, before the first step (weights, data, runtime).
    pub rss_before_steps: Option<u64>,
    /// The planner's choice and estimate for this config.
    pub recompute_every: Option<usize>,
    pub estimate: crate::plan::Estimate,
}

pub fn bench(config: &Config, steps: usize, warmup: usize) -> Result<BenchReport, TrainError> {
    let start = Instant::now();
    let selected = device::select(&config.backend)?;
    device::check_dtype(&selected, config.train.dtype)?;
    let (base, setup) = crate::setup::setup(
        config,
        &selected.device,
        None,
        &crate::plan::planner(config, &selected, Default::default()),
    )?;
    let parameters = base.config().num_params().unwrap_or(0);
    let lora_only = matches!(setup.method, crate::setup::Method::Lora { .. });
    let mut model =
        kiln_models::lora::set_trainable(base, &selected.device.clone().autodiff(), lora_only);
    if lora_only {
        model = crate::step::frozen_to(model, crate::device::compute_dtype(config.train.dtype));
    }
    let plan = setup.plan.clone();
    let resolved = crate::plan::resolve(config, &plan);
    let config = &resolved;
    let shape = crate::trainer::step_shape(config, &model, &plan);
    let mut optimizer = AdamW::new(&config.optim);
    let mut prefetch = crate::trainer::Prefetched::default();
    memory::release_free_memory();
    let rss_before_steps = memory::current_rss();
    let peak_setup = memory::peak_rss();
    memory::reset_peak();
    let total = total_steps(config, &setup.data, 1).max(steps + warmup);
    let accum = config.train.grad_accum as u64;
    let mut first_step_secs = 0.0;
    let mut step_secs = Vec::with_capacity(steps);
    let mut step_tokens = Vec::with_capacity(steps);
    let mut peak_device = None;
    let eager = selected.kind == kiln_config::BackendKind::Cpu;
    let mut window: Option<(Instant, usize)> = None;
    let mut last_loss = None;
    let mut issue_secs = Vec::with_capacity(steps);
    let mut issue_cpu_secs = Vec::with_capacity(steps);
    let objective = crate::trainer::preference_of(config, setup.reference.as_ref());
    let mut replay = crate::replay::Replay::for_run(
        config,
        selected.kind,
        &selected.device,
        objective.is_some(),
        1,
    );
    for step in 0..steps + warmup.max(1) {
        let measured = step >= warmup.max(1);
        if measured && window.is_none() {
            window = Some((Instant::now(), step));
        }
        let t = Instant::now();
        let cpu = crate::threads::thread_cpu_secs();
        let lr = learning_rate(&config.optim, step + 1, total);
        let (next, out) = next_step(
            model,
            replay.as_mut(),
            &mut optimizer,
            &setup.data,
            config,
            step as u64 * accum,
            lr,
            shape,
            &mut prefetch,
            objective,
            &crate::ranks::Ranks::single(),
        )?;
        if measured {
            // The host's part: the call returns once the step is issued (no read on a GPU).
            issue_secs.push(t.elapsed().as_secs_f64());
            if let (Some(a), Some(b)) = (cpu, crate::threads::thread_cpu_secs()) {
                issue_cpu_secs.push(b - a);
            }
        }
        model = next;
        let tokens = out.tokens;
        if eager || !measured {
            check_loss(out.loss.clone(), step)?;
        }
        if step == 0 {
            first_step_secs = crate::trainer::since_process_start()
                .unwrap_or_else(|| start.elapsed().as_secs_f64());
        }
        if (eager || !measured)
            && let Some(m) = device::device_memory_reserved(&selected.device)
        {
            peak_device = Some(peak_device.unwrap_or(0).max(m));
        }
        if measured {
            step_secs.push(t.elapsed().as_secs_f64());
            step_tokens.push(tokens);
        }
        last_loss = Some(out.loss);
    }
    if !eager && let (Some((t0, first)), Some(loss)) = (window, last_loss) {
        check_loss(loss, steps + warmup.max(1) - 1)?;
        let mean = t0.elapsed().as_secs_f64() / (steps + warmup.max(1) - first) as f64;
        step_secs.iter_mut().for_each(|s| *s = mean);
        if let Some(m) = device::device_memory_reserved(&selected.device) {
            peak_device = Some(peak_device.unwrap_or(0).max(m));
        }
    }
    let peak_steps = memory::peak_rss_window();
    // Tokens per step vary with padding on example data: use the mean, and per-step rates.
    let tokens_per_step = step_tokens.iter().sum::<usize>() / step_tokens.len().max(1);
    let mut rates: Vec<f64> = step_secs
        .iter()
        .zip(&step_tokens)
        .map(|(s, &t)| t as f64 / s)
        .collect();
    rates.sort_by(f64::total_cmp);
    let median_rate = rates.get(rates.len() / 2).copied().unwrap_or(f64::NAN);
    let median_issue_secs = median(&mut issue_secs);
    let median_issue_cpu_secs = median(&mut issue_cpu_secs);
    let replayed_steps = replay.as_ref().map_or(0, |r| r.replayed.min(steps));
    Ok(BenchReport {
        device: selected.description,
        threads: crate::threads::count(),
        parameters,
        tokens_per_step,
        first_step_secs,
        step_secs,
        median_issue_secs,
        median_issue_cpu_secs,
        replayed_steps,
        median_tokens_per_s: median_rate,
        min_tokens_per_s: rates.first().copied().unwrap_or(f64::NAN),
        max_tokens_per_s: rates.last().copied().unwrap_or(f64::NAN),
        peak_steps_bytes: peak_steps,
        peak_rss_bytes: peak_steps.max(peak_setup),
        peak_device_bytes: peak_device,
        rss_before_steps,
        recompute_every: plan.recompute_every,
        estimate: plan.estimate,
    })
}

/// The median of `v` (NaN when empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn check_loss(loss: burn::prelude::Tensor<1>, step: usize) -> Result<(), TrainError> {
    let loss = loss.into_scalar::<f32>();
    if loss.is_finite() {
        Ok(())
    } else {
        Err(TrainError::Other(format!(
            "loss became {loss} at bench step {step}"
        )))
    }
}
