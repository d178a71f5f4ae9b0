//! The step loop: micro-batches with gradient accumulation, global-norm clipping, AdamW under a
//! schedule, validation, TensorBoard, progress, checkpoints, and exact resume.

use crate::checkpoint::{self, TrainerState};
use crate::data::TrainData;
use crate::device::{self, SelectedDevice};
use crate::memory;
use crate::optim::{AdamW, GradAccumulator, learning_rate};
use crate::plan::{self, Plan};
use crate::preference::{self, Preference, Reference};
use crate::progress::{Progress, StepReport};
use crate::ranks::{Ranks, StepCounts, Traffic};
use crate::setup;
use crate::shape::Method;
use crate::sinks::{Console, Events, SinkFailure};
use crate::step::{self, StepShape};
use crate::{TrainError, inference};
use burn::prelude::*;
use burn::tensor::FloatDType;
use kiln_config::Config;
use kiln_data::Rng;
use kiln_models::Dropout;
use kiln_models::lora;
use kiln_models::safetensors_io;
use kiln_models::{Model, ParamKind, ParamVisitor};
use std::path::{Path, PathBuf};
use std::time::Instant;

const DROPOUT_PURPOSE: u64 = 3;

/// How to run, beyond the config itself.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in the run directory.
    pub resume: bool,
    /// No progress output (library use, tests).
    pub quiet: bool,
    /// Stop after this optimizer step (the schedule still spans the configured run); for tests and
    /// for splitting a run into sessions.
    pub stop_after: Option<usize>,
    /// The processes training together (`mpirun`); one by default.
    pub ranks: Ranks,
}

static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Marks the start of the program, from which the time to the first completed step is counted
/// (the CLI calls it first thing; otherwise the count starts when [`train`] is called).
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

/// Seconds since [`mark_process_start`], if it was called.
pub fn since_process_start() -> Option<f64> {
    PROCESS_START.get().map(|t| t.elapsed().as_secs_f64())
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub last_checkpoint: Option<PathBuf>,
    pub device: String,
    pub steps: usize,
    pub total_steps: usize,
    pub trainable_params: usize,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub tokens_per_s: f64,
    /// Seconds a step, over this session's steps (evaluations and checkpoints included).
    pub secs_per_step: f64,
    pub peak_memory_bytes: Option<u64>,
    /// The planner's estimate of that peak.
    pub estimated_peak_bytes: u64,
    pub event_file: Option<PathBuf>,
    /// The signal that stopped the run early (after a checkpoint), if one did.
    pub interrupted_by: Option<i32>,
    /// Seconds from the program's start (see [`mark_process_start`]) to the end of the first
    /// step of this session: device setup, loading, planning and the first kernels included.
    pub first_step_secs: Option<f64>,
    /// Several ranks: the gradient bytes a rank received from the others, and the seconds it
    /// spent in the collectives, a step (means over this session's steps).
    pub communication: Option<(u64, f64)>,
    /// Steps replayed from the captured step (GPU backends, `backend.capture`) rather than
    /// issued one operation at a time.
    pub replayed_steps: usize,
}

fn output_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Output {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the run directory and takes its lock before any work starts. Creating the lock file
/// is the check that the directory is writable (a shared probe file would race with a second
/// run starting beside this one).
fn open_run_dir(dir: &Path) -> Result<crate::lock::RunLock, TrainError> {
    std::fs::create_dir_all(dir).map_err(output_err(dir))?;
    crate::lock::RunLock::acquire(dir)
}

/// True when every trained weight of `model` is finite (frozen ones never change): one
/// reduction per parameter (`sum(w · 0)` is NaN exactly when some element is NaN or infinite),
/// one host read in all.
pub fn weights_are_finite(model: &Model) -> bool {
    struct Probe(Option<Tensor<1>>);
    impl ParamVisitor for Probe {
        fn visit<const D: usize>(&mut self, _: &str, _: ParamKind, p: &Tensor<D>) {
            if !p.is_require_grad() {
                return;
            }
            let w = kiln_models::dtype::to_dtype(p.clone().detach(), FloatDType::F32);
            let zero = (w * 0.0).sum();
            self.0 = Some(match self.0.take() {
                Some(acc) => acc + zero,
                None => zero,
            });
        }
    }
    let mut probe = Probe(None);
    model.visit_params(&mut probe);
    probe.0.is_none_or(|t| t.into_scalar::<f32>().is_finite())
}

/// The progress line's part for a preference run: reward accuracy and margin.
fn reward_summary(metrics: &[(&str, f32)]) -> Option<String> {
    let get = |name: &str| metrics.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    Some(format!(
        "reward acc {:.2} margin {:.3}",
        get("rewards/accuracies")?,
        get("rewards/margins")?
    ))
}

/// Total optimizer steps the config asks for, trained by `ranks` processes (each step takes
/// `train.grad_accum` micro-batches on each).
pub fn total_steps(config: &Config, data: &TrainData, ranks: usize) -> usize {
    let t = &config.train;
    let accum = t.grad_accum * ranks.max(1);
    match t.epochs {
        Some(epochs) => {
            // A pass is counted in records where a micro-batch holds a number of them (pairs),
            // else in tokens at `seq_len` a sequence.
            let (per_pass, per_step) = match data.records_per_epoch() {
                Some(records) => (records, t.batch_size.get() * accum),
                None => (
                    data.train_tokens(),
                    t.batch_size.get() * accum * config.data.seq_len,
                ),
            };
            ((epochs * per_pass as f64) / per_step as f64)
                .ceil()
                .clamp(1.0, kiln_config::limits::MAX_STEPS as f64) as usize
        }
        None => t.max_steps,
    }
}

/// (trainable, total) parameter counts.
pub fn count_params(model: &Model) -> (usize, usize) {
    struct Count(usize, usize);
    impl ParamVisitor for Count {
        fn visit<const D: usize>(&mut self, _: &str, _: ParamKind, p: &Tensor<D>) {
            let n = p.shape().num_elements();
            self.1 += n;
            if p.is_require_grad() {
                self.0 += n;
            }
        }
    }
    let mut c = Count(0, 0);
    model.visit_params(&mut c);
    (c.0, c.1 + model.quantized_numel().0)
}

fn memory_now(device: &Device) -> Option<u64> {
    device::device_memory_in_use(device).or_else(memory::current_rss)
}

/// What one optimizer step leaves on the device (read only at log intervals).
pub struct StepOutput {
    /// Mean loss over the step's micro-batches.
    pub loss: Tensor<1>,
    /// Global gradient norm before clipping.
    pub grad_norm: Option<Tensor<1>>,
    /// Token positions computed (padding included), over all micro-batches.
    pub tokens: usize,
    /// Whether the loss and gradient norm were finite, so the update was applied (a one-element
    /// device tensor: deciding this needs no host read; see [`SkipCounter`]).
    pub applied: Tensor<1, Bool>,
    /// Preference runs: the step's mean metrics (`preference::METRICS`), on the device.
    pub metrics: Option<Tensor<1>>,
    /// A signal that asked the run to stop, as every rank agreed on it (several ranks); `None`
    /// when the ranks' collectives did not run (one process reads its own signals).
    pub signal: Option<i32>,
    /// What the step's collectives moved (several ranks).
    pub traffic: Traffic,
}

/// The preference objective of `config` with its reference (`frozen`: DPO's copy under full
/// fine-tuning), or `None` for the next-token loss.
pub fn preference_of<'a>(
    config: &Config,
    frozen: Option<&'a Model>,
) -> Option<(Preference, Reference<'a>)> {
    let p = Preference::from_config(&config.finetune)?;
    let reference = match (p.needs_reference(), frozen) {
        (false, _) => Reference::None,
        (true, Some(m)) => Reference::Frozen(m),
        (true, None) => Reference::Base,
    };
    Some((p, reference))
}

/// Counts skipped updates on the device; read only when the trainer reads the loss anyway
/// (every log interval, checkpoint and evaluation, and every `train.max_nonfinite_steps`).
pub struct SkipCounter {
    /// Skipped updates in a row, ending at the last step.
    run: Tensor<1>,
    /// Skipped updates in all.
    total: Tensor<1>,
}

impl SkipCounter {
    pub fn new(device: &Device) -> Self {
        Self {
            run: Tensor::zeros([1], device),
            total: Tensor::zeros([1], device),
        }
    }

    pub fn add(&mut self, applied: Tensor<1, Bool>) {
        let skipped = applied.bool_not().float();
        self.total = self.total.clone() + skipped.clone();
        self.run = (self.run.clone() + skipped.clone()) * skipped;
    }

    /// (in a row, in all), read to the host.
    pub fn read(&self) -> (usize, usize) {
        let v = Tensor::cat(vec![self.run.clone(), self.total.clone()], 0)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        (
            v.first().copied().unwrap_or(0.0) as usize,
            v.get(1).copied().unwrap_or(0.0) as usize,
        )
    }
}

/// How micro-batches are computed under a memory plan.
pub fn step_shape(config: &Config, model: &Model, plan: &Plan) -> StepShape {
    StepShape {
        dtype: device::compute_dtype(config.train.dtype),
        ..StepShape::new(
            plan.recompute_every,
            config.memory.loss_chunk,
            model.config().vocab_size,
        )
    }
}

/// The next micro-batch, built while the previous one was computed.
#[derive(Default)]
pub struct Prefetched(Option<(u64, kiln_data::Batch)>);

impl Prefetched {
    /// Keeps `batch` (micro-batch `index`) for the next [`Prefetched::take`].
    pub(crate) fn put_back(&mut self, index: u64, batch: Option<kiln_data::Batch>) {
        self.0 = batch.map(|b| (index, b));
    }

    /// Micro-batch `index`: the one built ahead if it is that one, else built now.
    pub(crate) fn take(
        &mut self,
        data: &TrainData,
        seed: u64,
        index: u64,
        bs: usize,
        seq: usize,
    ) -> kiln_data::Batch {
        match self.0.take() {
            Some((i, batch)) if i == index => batch,
            _ => data.train_batch(seed, index, bs, seq),
        }
    }
}

/// One optimizer step: `grad_accum` micro-batches starting at micro-batch `first_micro`,
/// gradients averaged, clipped to the global norm, one AdamW update at `lr`.
///
/// Under several ranks the step takes `ranks × grad_accum` micro-batches: rank `r` computes
/// those at `first_micro + r`, `+ r + ranks`, …, and the ranks sum their gradients, losses and
/// metrics in rank order before the update, which every rank then applies alike. The result is
/// one process's with `grad_accum` that many times larger.
///
/// Each micro-batch's forward and backward runs while the next micro-batch (of this step or the
/// next) is built beside it on the thread pool, kept in `prefetch`: data preparation is off the
/// critical path. Batches are a function of their index, so this changes no result.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: Model,
    optimizer: &mut AdamW,
    data: &TrainData,
    config: &Config,
    first_micro: u64,
    lr: f64,
    shape: StepShape,
    prefetch: &mut Prefetched,
    preference: Option<(Preference, Reference<'_>)>,
    ranks: &Ranks,
) -> (Model, StepOutput) {
    let (bs, seq, local_accum) = (
        config.train.batch_size.get(),
        config.data.seq_len,
        config.train.grad_accum,
    );
    let (rank, size) = (ranks.rank() as u64, ranks.size() as u64);
    // Every micro-batch of the step counts alike, whichever rank computes it.
    let accum = local_accum * ranks.size();
    let seed = config.run.seed;
    let dropout_p = config.model.dropout;
    let lora_p = match config.model.pretrained {
        Some(_) if config.finetune.method == kiln_config::FinetuneMethod::Lora => {
            config.finetune.lora.dropout
        }
        _ => 0.0,
    };
    let mut grads = GradAccumulator::default();
    let mut loss_sum: Option<Tensor<1>> = None;
    let mut metrics_sum: Option<Tensor<1>> = None;
    let mut tokens = 0;
    for j in 0..local_accum as u64 {
        let index = first_micro + j * size + rank;
        let batch = prefetch.take(data, seed, index, bs, seq);
        tokens += batch.batch_size * batch.seq_len;
        let mut dropout = (dropout_p > 0.0 || lora_p > 0.0).then(|| Dropout {
            p: dropout_p,
            lora_p,
            rng: Rng::stream(seed, DROPOUT_PURPOSE, index),
        });
        let ((l, metrics), next) = rayon::join(
            || match preference {
                Some((p, reference)) => {
                    let (l, m) = preference::forward_backward(
                        &model,
                        reference,
                        &batch,
                        &mut dropout,
                        shape,
                        &mut grads,
                        1.0 / accum as f64,
                        p,
                    );
                    (l, Some(m))
                }
                None => (
                    step::forward_backward(
                        &model,
                        &batch,
                        &mut dropout,
                        shape,
                        &mut grads,
                        1.0 / accum as f64,
                    ),
                    None,
                ),
            },
            || data.train_batch(seed, index + size, bs, seq),
        );
        prefetch.0 = Some((index + size, next));
        if let Some(m) = metrics {
            metrics_sum = Some(match metrics_sum {
                Some(s) => s + m,
                None => m,
            });
        }
        loss_sum = Some(match loss_sum {
            Some(s) => s + l,
            None => l,
        });
    }
    let (mut signal, mut traffic) = (None, Traffic::default());
    if ranks.is_distributed() {
        let counts = ranks.agree_counts(StepCounts {
            tokens,
            signal: crate::signals::requested(),
        });
        (tokens, signal) = (counts.tokens, counts.signal);
        traffic = grads.sum_across(ranks, [&mut loss_sum, &mut metrics_sum]);
    }
    optimizer.set_rates(lr, &model.device().without_autodiff());
    let loss_sum =
        loss_sum.unwrap_or_else(|| Tensor::<1>::zeros([1], &model.device().without_autodiff()));
    let (model, update) = apply_update(model, optimizer, grads, loss_sum, accum, config);
    (
        model,
        StepOutput {
            loss: update.loss,
            grad_norm: update.grad_norm,
            tokens,
            applied: update.applied,
            metrics: metrics_sum.map(|m| m / accum as f64),
            signal,
            traffic,
        },
    )
}

/// One optimizer step: replayed from the captured step where `replay` serves it
/// ([`Replay::step`](crate::replay::Replay::step)), else [`train_step`]. Arguments as there.
#[allow(clippy::too_many_arguments)]
pub fn next_step(
    model: Model,
    replay: Option<&mut crate::replay::Replay>,
    optimizer: &mut AdamW,
    data: &TrainData,
    config: &Config,
    first_micro: u64,
    lr: f64,
    shape: StepShape,
    prefetch: &mut Prefetched,
    preference: Option<(Preference, Reference<'_>)>,
    ranks: &Ranks,
) -> Result<(Model, StepOutput), TrainError> {
    let model = match replay {
        Some(r) => match r.step(
            model,
            optimizer,
            data,
            config,
            first_micro,
            lr,
            shape,
            prefetch,
        )? {
            Ok(stepped) => return Ok(stepped),
            Err(model) => model,
        },
        None => model,
    };
    Ok(train_step(
        model,
        optimizer,
        data,
        config,
        first_micro,
        lr,
        shape,
        prefetch,
        preference,
        ranks,
    ))
}

/// What [`apply_update`] leaves on the device.
#[derive(Clone)]
pub(crate) struct Update {
    /// The step's mean loss.
    pub loss: Tensor<1>,
    /// The global gradient norm before clipping.
    pub grad_norm: Option<Tensor<1>>,
    /// Whether the update was applied (see [`StepOutput::applied`]).
    pub applied: Tensor<1, Bool>,
}

/// The end of a step, after its gradients are summed: the norm, clipping, the finite check and
/// AdamW at the rates [`AdamW::set_rates`] wrote. Reads nothing from the host and uploads
/// nothing, so a captured step (`crate::replay`) runs it too.
pub(crate) fn apply_update(
    model: Model,
    optimizer: &mut AdamW,
    grads: GradAccumulator,
    loss_sum: Tensor<1>,
    accum: usize,
    config: &Config,
) -> (Model, Update) {
    let norm = grads.global_norm();
    let clip = match (config.optim.grad_clip, &norm) {
        (Some(max), Some(n)) if max > 0.0 => {
            Some((n.clone() + 1e-6).recip().mul_scalar(max).clamp_max(1.0))
        }
        _ => None,
    };
    // The mean over micro-batches (one kernel less on a GPU for a single one).
    let loss = if accum == 1 {
        loss_sum
    } else {
        loss_sum / accum as f64
    };
    // A non-finite loss or gradient norm must not reach the weights: decided on the device, so
    // the step needs no host read (the host would otherwise wait for the GPU every step).
    let probe = match &norm {
        Some(n) => loss.clone() + n.clone(),
        None => loss.clone(),
    };
    let applied = probe.is_finite();
    let model = optimizer.update(model, grads, clip, applied.clone());
    (
        model,
        Update {
            loss,
            grad_norm: norm,
            applied,
        },
    )
}

/// A run ready for its first step: the model on the training device, its setup and plan, the
/// config as the plan resolved it, and the optimizer and trainer state (fresh, or a checkpoint's).
struct Loaded {
    model: Model,
    setup: setup::Setup,
    plan: Plan,
    config: Config,
    total: usize,
    optimizer: AdamW,
    state: TrainerState,
}

fn load_run(
    config: &Config,
    selected: &SelectedDevice,
    resume_from: Option<&Path>,
    ranks: &Ranks,
) -> Result<Loaded, TrainError> {
    let device = selected.device.clone();
    let train_device = device.clone().autodiff();
    // A resumed run keeps the micro-batch and recompute it started with (the data order and the
    // float rounding depend on them).
    let saved = resume_from.map(checkpoint::read_state).transpose()?;
    let resumed = match &saved {
        Some(s) => plan::Resumed {
            micro_batch: s.micro_batch,
            recompute_every: s.recompute_every,
        },
        None => plan::Resumed::default(),
    };
    let (base, setup) = setup::setup(
        config,
        &device,
        resume_from,
        &plan::planner(config, selected, resumed),
    )?;
    let mut setup = setup;
    let compute = device::compute_dtype(config.train.dtype);
    setup.reference = setup.reference.take().map(|m| step::frozen_to(m, compute));
    let lora_only = matches!(setup.method, Method::Lora { .. });
    let mut model = lora::set_trainable(base, &train_device, lora_only);
    if lora_only {
        model = step::frozen_to(model, device::compute_dtype(config.train.dtype));
    }
    let plan = setup.plan.clone();
    let config = plan::resolve(config, &plan);
    let total = total_steps(&config, &setup.data, ranks.size());
    let mut optimizer = AdamW::new(&config.optim);
    let state = match (resume_from, saved) {
        (Some(dir), Some(state)) => {
            let opt_tensors = safetensors_io::read_all(&dir.join(checkpoint::OPTIMIZER_FILE))?;
            optimizer
                .load_state(&opt_tensors, state.optimizer_t, &device)
                .map_err(|message| TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    message,
                })?;
            state
        }
        _ => TrainerState {
            step: 0,
            total_steps: total,
            micro_batches: 0,
            micro_batch: Some(config.train.batch_size.get()),
            recompute_every: Some(plan.recompute_every.unwrap_or(0)),
            optimizer_t: 0,
            tokens_seen: 0,
            seed: config.run.seed,
            learning_rate: 0.0,
            last_train_loss: None,
            last_val_loss: None,
            best_val_loss: None,
            best_step: None,
            elapsed_secs: 0.0,
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            ranks: None,
        },
    };
    Ok(Loaded {
        model,
        setup,
        plan,
        config,
        total,
        optimizer,
        state,
    })
}

/// Trains a model as `config` describes. Returns when the run ends (or at `stop_after`).
pub fn train(config: &Config, options: &TrainOptions) -> Result<RunSummary, TrainError> {
    mark_process_start();
    let ranks = &options.ranks;
    // Rank 0 alone writes the run directory (on one machine the ranks share it).
    let root = ranks.is_root();
    let run_dir = config.run.output_dir.join(&config.run.name);
    let _lock = root.then(|| open_run_dir(&run_dir)).transpose()?;
    if root
        && !options.resume
        && let Some((_, existing)) = checkpoint::list(&run_dir).pop()
    {
        // Any step directory counts here (no need to checksum it): never write over a run.
        return Err(TrainError::Other(format!(
            "{} already holds checkpoints (newest: {}); pass --resume to continue it, or choose \
             another run.name",
            run_dir.display(),
            existing.display()
        )));
    }

    let selected: SelectedDevice = device::select_for_rank(
        &config.backend,
        ranks.is_distributed().then(|| ranks.local_rank()),
    )?;
    device::check_dtype(&selected, config.train.dtype)?;
    let sink_failure = SinkFailure::default();
    let console = if ranks.is_distributed() && root && !options.quiet {
        Console::detached(&sink_failure)
    } else {
        Console::new(options.quiet || !root, &sink_failure)
    };
    let say = |line: &str| console.line(line);
    say(&format!("device: {}", selected.description));

    // Resume from the newest checkpoint that verifies and loads; each newer one is passed over
    // with the reason (a damaged file, a state or weights that do not load).
    let (resume_from, loaded) = if options.resume && !root {
        // The checkpoint rank 0 chose, from rank 0: a rank on another machine has none.
        let dir = std::env::temp_dir().join(format!(
            "kiln-rank{}-{}-resume",
            ranks.rank(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        checkpoint::unpack(&ranks.broadcast_bytes(Vec::new()), &dir)?;
        let loaded = load_run(config, &selected, Some(&dir), ranks);
        let _ = std::fs::remove_dir_all(&dir);
        (Some(dir), loaded?)
    } else if options.resume {
        let mut passed_over = 0;
        let mut found = None;
        for (_, dir) in checkpoint::list(&run_dir).into_iter().rev() {
            let why = match checkpoint::verify(&dir) {
                Err(why) => why,
                Ok(()) => match load_run(config, &selected, Some(&dir), ranks) {
                    Ok(loaded) => {
                        found = Some((Some(dir), loaded));
                        break;
                    }
                    // Only a failure in the checkpoint's own files moves on to an older one.
                    Err(e) if crate::error::chain(&e).contains(&dir.display().to_string()) => {
                        crate::error::chain(&e)
                    }
                    Err(e) => return Err(e),
                },
            };
            passed_over += 1;
            crate::sinks::warn(&format!(
                "not resuming from {}: {why}; trying the previous checkpoint",
                dir.display()
            ));
        }
        found.ok_or_else(|| {
            TrainError::Other(format!(
                "--resume: no complete checkpoint in {} to resume from{}",
                run_dir.display(),
                match passed_over {
                    0 => String::new(),
                    n => format!(" ({n} passed over, each with its reason above)"),
                }
            ))
        })?
    } else {
        (None, load_run(config, &selected, None, ranks)?)
    };
    if root
        && options.resume
        && ranks.is_distributed()
        && let Some(dir) = &resume_from
    {
        ranks.broadcast_bytes(checkpoint::pack(dir)?);
    }
    let Loaded {
        mut model,
        setup,
        plan,
        config: resolved,
        total,
        mut optimizer,
        mut state,
    } = loaded;
    let config = &resolved;
    if ranks.is_distributed() {
        crate::ranks::check_same_run(ranks, config, setup.data.fingerprint(), state.step)?;
    }
    let device = selected.device.clone();
    let seed = config.run.seed;
    if let Some(dir) = &resume_from {
        say(&format!(
            "resuming from {} (step {})",
            dir.display(),
            state.step
        ));
    }
    if ranks.is_distributed() {
        say(&format!(
            "ranks: {} processes (MPI); a step takes {} micro-batches of {} on each, summed in \
             rank order",
            ranks.size(),
            config.train.grad_accum,
            config.train.batch_size.get()
        ));
        if let Some(hint) = crate::ranks::interrupt_hint() {
            say(&hint);
        }
        let before = state.ranks.unwrap_or(1);
        if root && resume_from.is_some() && before != ranks.size() {
            crate::sinks::warn(&format!(
                "the checkpoint was trained by {before} process(es), this run has {}: a step now \
                 takes {} micro-batches, so the run goes on but is not bit-identical to one \
                 that kept {before}",
                ranks.size(),
                ranks.size() * config.train.grad_accum
            ));
        }
        state.ranks = Some(ranks.size());
    }
    let (n_trainable, n_total) = count_params(&model);
    let mc = model.config();
    let what = match &setup.method {
        Method::Scratch => "from scratch".to_string(),
        Method::Full { base } => format!("full fine-tune of {}", base.display()),
        Method::Lora { base, spec } => format!(
            "LoRA r={} alpha={} on {} of {} in {} blocks of {}",
            spec.rank,
            spec.alpha,
            spec.targets.join(","),
            base.display(),
            spec.layers.len(),
            mc.num_hidden_layers
        ),
    };
    say(&format!(
        "model: {} {} layers, width {}, {} heads ({} kv), vocab {}; {what}",
        mc.model_type,
        mc.num_hidden_layers,
        mc.hidden_size,
        mc.num_attention_heads,
        mc.num_key_value_heads,
        mc.vocab_size,
    ));
    say(&format!(
        "parameters: {:.3}M trainable of {:.3}M ({:.2}%)",
        n_trainable as f64 / 1e6,
        n_total as f64 / 1e6,
        100.0 * n_trainable as f64 / n_total.max(1) as f64
    ));
    if let Some(p) = Preference::from_config(&config.finetune) {
        say(&format!(
            "objective: {}",
            match p {
                Preference::Dpo {
                    beta,
                    loss,
                    label_smoothing,
                } => format!(
                    "DPO ({} loss, beta {beta}{}) against {}",
                    loss.name(),
                    if label_smoothing > 0.0 {
                        format!(", label smoothing {label_smoothing}")
                    } else {
                        String::new()
                    },
                    if setup.reference.is_some() {
                        "a frozen copy of the pretrained model"
                    } else {
                        "the base model with the adapters off"
                    }
                ),
                Preference::Orpo { beta } => format!("ORPO (beta {beta}), no reference"),
            }
        ));
    }
    let (held, held_bytes) = model.quantized_numel();
    if held > 0 {
        say(&format!(
            "base: {:.3}M frozen weights held quantized (finetune.base_quant: {}) in {}",
            held as f64 / 1e6,
            config.finetune.base_quant.name(),
            crate::memory::human_bytes(held_bytes as u64)
        ));
    }
    say(&format!(
        "data: {}; {} steps of {} × {}{} × ≤{} tokens",
        setup.data.describe(),
        total,
        config.train.batch_size.get(),
        config.train.grad_accum,
        if ranks.is_distributed() {
            format!(" × {} ranks", ranks.size())
        } else {
            String::new()
        },
        config.data.seq_len
    ));
    let n_params = n_trainable;
    let shape = step_shape(config, &model, &plan);
    say(&format!(
        "memory: estimated peak {} of budget {} ({}); micro-batch {} x {}; {}{}",
        memory::human_bytes(plan.estimate.total),
        if plan.budget == u64::MAX {
            "unknown".to_string()
        } else {
            memory::human_bytes(plan.budget)
        },
        plan.budget_source,
        plan.micro_batch,
        plan.grad_accum,
        plan::describe(plan.recompute_every),
        if shape.loss_chunk < config.train.batch_size.get() * config.data.seq_len {
            format!(", loss in chunks of {} positions", shape.loss_chunk)
        } else {
            String::new()
        }
    ));

    let resolved = config.to_yaml();
    if root {
        kiln_models::fsutil::atomic_write(
            &run_dir.join(checkpoint::KILN_CONFIG_FILE),
            resolved.as_bytes(),
        )
        .map_err(output_err(&run_dir))?;
    }
    let mut events = Events::create(
        &run_dir.join("tensorboard"),
        config.logging.tensorboard && root,
        &sink_failure,
    );
    events.text("config", &format!("```yaml\n{resolved}\n```"), state.step);
    events.flush();
    // A sink that fails before the first step stops the run at once (nothing to save yet),
    // unless the run is to go on without it.
    if let Some(why) = sink_failure.get()
        && config.train.on_save_error == kiln_config::OnSaveError::Stop
    {
        return Err(TrainError::Other(format!(
            "{why}; stopping before the first step (set train.on_save_error: continue to train \
             without that output)"
        )));
    }

    let (bs, seq, accum) = (
        config.train.batch_size.get(),
        config.data.seq_len,
        config.train.grad_accum * ranks.size(),
    );
    let last_step = options.stop_after.unwrap_or(total).min(total);
    let progress = Progress::new(state.step, total, &console);
    let started = Instant::now();
    let elapsed_before = state.elapsed_secs;
    let mut interval_start = Instant::now();
    let mut interval_tokens = 0u64;
    let mut last_checkpoint = None;
    let mut peak_device: Option<u64> = None;
    let mut run_tokens = 0u64;
    // What the ranks' collectives moved and took, per log interval and over the run.
    let (mut interval_traffic, mut run_traffic) = (Traffic::default(), Traffic::default());
    let mut interval_first = state.step;
    let mut stopped_by = None;

    let first_step = state.step;
    // The measured peak covers training (steps, evaluation, checkpoints), not loading.
    memory::release_free_memory();
    memory::reset_peak();
    let mut first_step_secs = None;
    let mut skips = SkipCounter::new(&device);
    let mut prefetch = Prefetched::default();
    let (mut skips_reported, mut checked_through) = (0usize, state.step);
    // A sink that failed (see `crate::sinks`), once acted on: stop after a checkpoint, or go on.
    let mut sink_stop: Option<String> = None;
    let mut sink_reported = false;
    let objective = preference_of(config, setup.reference.as_ref());
    let mut replay = crate::replay::Replay::for_run(
        config,
        selected.kind,
        &device,
        objective.is_some(),
        ranks.size(),
    );
    // From here a signal asks for a checkpoint; before, it ended the process at once.
    crate::signals::loading_done();
    while state.step < last_step {
        let step = state.step + 1;
        let lr = learning_rate(&config.optim, step, total);
        if !lr.is_finite() {
            progress.finish();
            return Err(TrainError::Other(format!(
                "step {step}: the learning rate is {lr}; check optim.lr and optim.schedule"
            )));
        }
        let (next, out) = next_step(
            model,
            replay.as_mut(),
            &mut optimizer,
            &setup.data,
            config,
            state.micro_batches,
            lr,
            shape,
            &mut prefetch,
            objective,
            ranks,
        )
        .inspect_err(|_| progress.finish())?;
        model = next;
        state.micro_batches += accum as u64;
        interval_traffic.add(out.traffic);
        run_traffic.add(out.traffic);
        skips.add(out.applied.clone());
        if first_step_secs.is_none() {
            // One host read, at the first step only: it is complete when its loss is known.
            let _ = out.loss.clone().into_scalar::<f32>();
            let secs = since_process_start().unwrap_or(0.0);
            first_step_secs = Some(secs);
            progress.println(&format!(
                "step {step} done {secs:.2} s after start (device, loading, first kernels)"
            ));
            events.scalar("system/first_step_secs", secs as f32, step);
        }
        state.step = step;
        state.optimizer_t = optimizer.t;
        state.learning_rate = lr;
        state.tokens_seen += out.tokens as u64;
        run_tokens += out.tokens as u64;
        interval_tokens += out.tokens as u64;
        progress.step(step);

        // The ranks stop after the same step: the signal one of them got, agreed in the step.
        let interrupted = if ranks.is_distributed() {
            out.signal
        } else {
            crate::signals::requested()
        };
        let at_end = step == last_step || interrupted.is_some();
        let log_due = step % config.logging.log_every == 0 || at_end;
        // Skipped updates are counted on the device and read with the loss, at most
        // `max_nonfinite_steps` apart, and before anything is evaluated or saved.
        let (save_every, eval_every) = (config.train.save_every, config.train.eval_every);
        let check_due = log_due
            || step % config.train.max_nonfinite_steps == 0
            || (save_every > 0 && step % save_every == 0)
            || (eval_every > 0 && step % eval_every == 0);
        if check_due {
            let (run, all) = skips.read();
            if all > skips_reported {
                let first = checked_through + 1;
                progress.println(&format!(
                    "step{}: loss or gradient norm is not finite; {} of {} updates skipped ({run} in a row)",
                    if first == step {
                        format!(" {step}")
                    } else {
                        format!("s {first}-{step}")
                    },
                    all - skips_reported,
                    step - checked_through,
                ));
                events.scalar("optim/skipped_steps", all as f32, step);
                skips_reported = all;
            }
            checked_through = step;
            if run >= config.train.max_nonfinite_steps {
                progress.finish();
                return Err(TrainError::Other(format!(
                    "stopping at step {step}: {run} steps in a row had a non-finite loss or \
                     gradient norm (train.max_nonfinite_steps = {}); the last good checkpoint is {}",
                    config.train.max_nonfinite_steps,
                    last_checkpoint
                        .as_ref()
                        .or(resume_from.as_ref())
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none (no checkpoint was written yet)".into())
                )));
            }
        }

        if log_due {
            // The only host read of the step: loss and gradient norm, once per log interval.
            let loss = out.loss.into_scalar::<f32>() as f64;
            let grad_norm = out
                .grad_norm
                .map(|n| n.into_scalar::<f32>() as f64)
                .unwrap_or(0.0);
            let secs = interval_start.elapsed().as_secs_f64().max(1e-9);
            let tps = interval_tokens as f64 / secs;
            interval_start = Instant::now();
            interval_tokens = 0;
            let mem = memory_now(&device);
            if let Some(m) = device::device_memory_reserved(&device) {
                peak_device = Some(peak_device.unwrap_or(0).max(m));
            }
            state.last_train_loss = Some(loss);
            // Preference runs: TRL's metrics, read with the loss.
            let metrics = match (&out.metrics, objective) {
                (Some(m), Some((p, _))) => {
                    let values = m
                        .clone()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap_or_default();
                    p.metrics().iter().copied().zip(values).collect::<Vec<_>>()
                }
                _ => Vec::new(),
            };
            let steps_left = (last_step - step) as f64;
            progress.report(&StepReport {
                step,
                total,
                loss,
                lr,
                tokens_per_s: tps,
                memory: mem.map(memory::human_bytes).unwrap_or_else(|| "?".into()),
                eta_secs: steps_left * started.elapsed().as_secs_f64()
                    / (step - first_step).max(1) as f64,
                extra: reward_summary(&metrics),
            });
            for (name, v) in &metrics {
                events.scalar(&format!("train/{name}"), *v, step);
            }
            events.scalar("loss/train", loss as f32, step);
            events.scalar("optim/lr", lr as f32, step);
            events.scalar("optim/grad_norm", grad_norm as f32, step);
            events.scalar("system/tokens_per_s", tps as f32, step);
            if ranks.is_distributed() {
                let steps = (step - interval_first).max(1) as f64;
                events.scalar(
                    "system/allreduce_bytes",
                    (interval_traffic.bytes as f64 / steps) as f32,
                    step,
                );
                events.scalar(
                    "system/allreduce_ms",
                    (1e3 * interval_traffic.secs / steps) as f32,
                    step,
                );
                interval_traffic = Traffic::default();
            }
            interval_first = step;
            if let Some(m) = mem {
                events.scalar("system/memory_bytes", m as f32, step);
            }
            if let Some(p) = memory::peak_rss() {
                events.scalar("system/peak_rss_bytes", p as f32, step);
            }
            events.flush();
        }

        let hist_every = config.logging.histograms_every;
        if events.active() && hist_every > 0 && (step % hist_every == 0 || at_end) {
            for (name, t) in model.hf_tensors_where(|_| true) {
                events.histogram(&format!("weights/{name}"), &t.data, step);
            }
            events.flush();
        }

        // Rank 0 evaluates (the others go on to the next step and wait for it there).
        let eval_due = ((config.train.eval_every > 0 && step % config.train.eval_every == 0)
            || at_end)
            && interrupted.is_none()
            && root;
        let mut new_best = false;
        if eval_due {
            // In the compute type: a LoRA base model may be held in it.
            let view = step::compute_view(&inference::inference_view(&model), shape.dtype);
            let batches = setup
                .data
                .valid_batches(seed, config.train.eval_batches, bs, seq);
            let val = match objective {
                Some((p, reference)) => {
                    let (val, metrics) =
                        preference::evaluate(&view, reference, batches, p, shape.loss_chunk);
                    let named: Vec<(&str, f32)> = p
                        .metrics()
                        .iter()
                        .copied()
                        .zip(metrics.iter().map(|&v| v as f32))
                        .collect();
                    for (name, v) in &named {
                        events.scalar(&format!("eval/{name}"), *v, step);
                    }
                    if let Some(summary) = reward_summary(&named) {
                        progress.println(&format!("step {step}: validation {summary}"));
                    }
                    val
                }
                None => inference::mean_loss(&view, batches),
            };
            state.last_val_loss = Some(val);
            if state.best_val_loss.is_none_or(|b| val < b) {
                state.best_val_loss = Some(val);
                state.best_step = Some(step);
                new_best = true;
            }
            progress.println(&format!(
                "step {step}: val loss {val:.4} (best {:.4} at step {})",
                state.best_val_loss.unwrap_or(val),
                state.best_step.unwrap_or(step)
            ));
            events.scalar("loss/val", val as f32, step);
            events.scalar("loss/val_perplexity", val.exp() as f32, step);
            events.flush();
        }

        // A failed sink (a closed stdout, a full disk under the event file) warned once when it
        // failed; here the run acts on it as for a failed checkpoint.
        if let Some(why) = sink_failure.get()
            && !sink_reported
        {
            sink_reported = true;
            if config.train.on_save_error == kiln_config::OnSaveError::Continue {
                crate::sinks::warn(&format!(
                    "step {step}: training goes on without that output (train.on_save_error: continue)"
                ));
            } else {
                crate::sinks::warn(&format!(
                    "step {step}: writing a checkpoint and stopping (train.on_save_error: stop)"
                ));
                sink_stop = Some(why);
            }
        }

        let save_due = ((config.train.save_every > 0 && step % config.train.save_every == 0)
            || at_end
            || sink_stop.is_some()
            || (new_best && config.train.keep_best))
            && root;
        if save_due {
            state.elapsed_secs = elapsed_before + started.elapsed().as_secs_f64();
            let kept = || {
                last_checkpoint
                    .as_ref()
                    .or(resume_from.as_ref())
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none (no checkpoint was written yet)".into())
            };
            // Weights that are no longer finite (an update overflowed) are never saved: they
            // cannot train on, and a checkpoint of them would pass for a good one.
            if !weights_are_finite(&model) {
                progress.finish();
                return Err(TrainError::Other(format!(
                    "stopping at step {step}: the weights are not finite (an update overflowed: \
                     lower optim.lr or set optim.grad_clip); not saving them; the last good \
                     checkpoint is {}",
                    kept()
                )));
            }
            let saved = checkpoint::save(
                &run_dir,
                config,
                &model,
                &optimizer.state_to_host(),
                &state,
                &setup.contents(),
            );
            let dir = match saved {
                Ok(dir) => dir,
                Err(e) => {
                    // The half-written temp directory goes; complete checkpoints were never touched.
                    let _ = std::fs::remove_dir_all(
                        run_dir.join(format!(".{}.tmp", checkpoint::step_dir_name(step))),
                    );
                    if config.train.on_save_error == kiln_config::OnSaveError::Continue
                        && !at_end
                        && sink_stop.is_none()
                    {
                        progress.println(&format!(
                            "step {step}: checkpoint failed ({}); training goes on, last checkpoint {}",
                            crate::error::chain(&e),
                            kept()
                        ));
                        continue;
                    }
                    progress.finish();
                    return Err(TrainError::SaveFailed {
                        step,
                        kept: kept(),
                        source: Box::new(e),
                    });
                }
            };
            if new_best && config.train.keep_best {
                checkpoint::point(&run_dir, "best", &dir)?;
            }
            checkpoint::prune(
                &run_dir,
                config.train.keep_last,
                state.best_step.filter(|_| config.train.keep_best),
            )?;
            progress.println(&format!("step {step}: saved {}", dir.display()));
            last_checkpoint = Some(dir);
        }
        if interrupted.is_some() {
            stopped_by = interrupted;
            break;
        }
        if let Some(why) = sink_stop {
            progress.finish();
            return Err(TrainError::Other(format!(
                "{why}; stopped at step {step} with checkpoint {} (continue with --resume, or set \
                 train.on_save_error: continue to train on without that output)",
                last_checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            )));
        }
    }
    progress.finish();

    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let peak_device = match (peak_device, device::device_memory_reserved(&device)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let peak = peak_device.or_else(memory::peak_rss_window);
    if let Some(p) = peak {
        events.scalar(
            "system/estimated_peak_bytes",
            plan.estimate.total as f32,
            state.step,
        );
        events.scalar("system/measured_peak_bytes", p as f32, state.step);
        events.flush();
    }
    let summary = RunSummary {
        run_dir,
        last_checkpoint,
        device: selected.description,
        steps: state.step,
        total_steps: total,
        trainable_params: n_params,
        final_train_loss: state.last_train_loss,
        final_val_loss: state.last_val_loss,
        best_val_loss: state.best_val_loss,
        tokens_per_s: run_tokens as f64 / secs,
        secs_per_step: secs / (state.step - first_step).max(1) as f64,
        peak_memory_bytes: peak,
        estimated_peak_bytes: plan.estimate.total,
        event_file: events.path().map(Path::to_path_buf),
        interrupted_by: if ranks.is_distributed() {
            stopped_by
        } else {
            crate::signals::requested()
        },
        first_step_secs,
        replayed_steps: replay.as_ref().map_or(0, |r| r.replayed),
        communication: (ranks.is_distributed() && state.step > first_step).then(|| {
            let steps = (state.step - first_step) as f64;
            (
                (run_traffic.bytes as f64 / steps) as u64,
                run_traffic.secs / steps,
            )
        }),
    };
    Ok(summary)
}
