//! Preference objectives on a micro-batch of pairs, at TRL's numbers: DPO as `DPOTrainer`
//! computes it (`sigmoid`, `ipo`, `robust`) and ORPO as `ORPOTrainer` does.
//!
//! A micro-batch holds the chosen sequences and then the rejected ones, so both go through the
//! model in one batch. The loss is a function of each sequence's log-probability of its
//! completion, and those need every position's log-probability first, so the head runs twice
//! over the last hidden state: once off the tape to read the log-probabilities (and, for DPO,
//! the reference's from a tape-free forward of its own), and once taped, chunk by chunk, with
//! each position weighed by the derivative of the loss with respect to its log-probability
//! (taken by autodiff on the small graph from the per-sequence values to the loss). The body's
//! backward is then that of the next-token loss: recompute, chunked heads, half precision and
//! gradient accumulation work as they do for SFT.

use crate::inference::inference_view;
use crate::optim::GradAccumulator;
use crate::step::{self, HeadLoss, StepBatch, StepShape, compute_view, weighted_nll_of};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use kiln_config::{DpoLoss, FinetuneConfig, Objective};
use kiln_data::Batch;
use kiln_models::{Dropout, Model};

/// A preference objective and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preference {
    Dpo {
        beta: f64,
        loss: DpoLoss,
        label_smoothing: f64,
    },
    Orpo {
        beta: f64,
    },
}

impl Preference {
    /// The objective `finetune` asks for, if it is a preference one.
    pub fn from_config(f: &FinetuneConfig) -> Option<Self> {
        match f.objective {
            Objective::Sft => None,
            Objective::Dpo => Some(Self::Dpo {
                beta: f.dpo.beta,
                loss: f.dpo.loss,
                label_smoothing: f.dpo.label_smoothing,
            }),
            Objective::Orpo => Some(Self::Orpo { beta: f.orpo.beta }),
        }
    }

    /// Whether the loss compares against a reference model (DPO; ORPO has none).
    pub fn needs_reference(&self) -> bool {
        matches!(self, Self::Dpo { .. })
    }

    /// The metrics this objective reports, as TRL names them: a prefix of [`METRICS`].
    pub fn metrics(&self) -> &'static [&'static str] {
        match self {
            Self::Dpo { .. } => &METRICS[..6],
            Self::Orpo { .. } => &METRICS[..],
        }
    }
}

/// The metrics TRL logs, in the order of a metrics tensor: means over the pairs. DPO's rewards
/// are `β · (log π − log π_ref)` of the summed completion log-probabilities; ORPO's are
/// `β · log π` of the per-token mean ones, and it adds its NLL term and odds-ratio terms.
pub const METRICS: [&str; 9] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
];

/// Where DPO's reference log-probabilities come from.
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    /// The policy with its adapters switched off (LoRA: no second copy).
    Base,
    /// A frozen copy of the starting model (full fine-tuning), on the plain device.
    Frozen(&'a Model),
    /// None (ORPO).
    None,
}

/// The per-position masks and counts of a pair batch, on the plain device.
struct PairMasks {
    rows: usize,
    seq: usize,
    /// `[rows × seq]`: 1 at completion targets.
    completion: Tensor<1>,
    /// `[rows]`: completion targets per sequence (at least 1).
    counts: Tensor<1>,
    /// ORPO's NLL weights `[rows × seq]`: `1 / N` at the chosen sequences' real targets, `N`
    /// their number (TRL averages the chosen sequences' cross-entropy, prompt included).
    nll: Tensor<1>,
}

impl PairMasks {
    fn new(batch: &Batch, device: &Device) -> Self {
        let pairs = batch
            .pairs
            .as_ref()
            .expect("a preference step takes a batch of pairs");
        let (rows, seq) = (batch.batch_size, batch.seq_len);
        let completion = batch
            .loss_mask
            .clone()
            .unwrap_or_else(|| vec![1.0; rows * seq]);
        let counts: Vec<f32> = completion
            .chunks(seq.max(1))
            .map(|r| r.iter().sum::<f32>().max(1.0))
            .collect();
        let chosen = pairs.count * seq;
        let n = pairs.sequence_mask[..chosen].iter().sum::<f32>().max(1.0);
        let nll: Vec<f32> = pairs
            .sequence_mask
            .iter()
            .enumerate()
            .map(|(i, &m)| if i < chosen { m / n } else { 0.0 })
            .collect();
        let tensor = |v: Vec<f32>| {
            let len = v.len();
            Tensor::<1>::from_data(TensorData::new(v, [len]), device)
        };
        Self {
            rows,
            seq,
            completion: tensor(completion),
            counts: tensor(counts),
            nll: tensor(nll),
        }
    }

    /// Each sequence's summed completion log-probability `[rows]` from per-position NLL.
    fn completion_logps(&self, nll: Tensor<1>) -> Tensor<1> {
        (nll * self.completion.clone())
            .reshape([self.rows, self.seq])
            .sum_dim(1)
            .reshape([self.rows])
            .neg()
    }
}

/// Per-position NLL `[rows × seq]` of `batch`'s targets from the last hidden state `h`, off the
/// tape, the head run `chunk` positions at a time.
fn token_nll(model: &Model, h: Tensor<2>, targets: &[u32], chunk: usize) -> Tensor<1> {
    let [rows, _] = h.dims();
    let device = h.device();
    let chunk = chunk.clamp(1, rows.max(1));
    let parts: Vec<Tensor<1>> = (0..rows)
        .step_by(chunk)
        .map(|start| {
            let end = (start + chunk).min(rows);
            let logits = model.head(h.clone().slice(start..end));
            let ones = Tensor::<1>::ones([end - start], &device);
            weighted_nll_of(logits, &targets[start..end], ones)
        })
        .collect();
    Tensor::cat(parts, 0)
}

/// The reference's summed completion log-probabilities `[rows]`: a tape-free forward of
/// `reference` (plain device, compute type).
fn reference_logps(reference: &Model, batch: &Batch, masks: &PairMasks, chunk: usize) -> Tensor<1> {
    let consts = reference.consts_for(batch);
    let mut h = reference.embed(&batch.inputs);
    for i in 0..reference.num_layers() {
        h = reference.block(i, h, &consts, &mut None, None);
    }
    masks.completion_logps(token_nll(reference, h, &batch.targets, chunk))
}

/// `log(1 − exp(x))` for `x < 0`, accurate at both ends (TRL's `log1mexp`): `log1p(−eˣ)` below
/// −ln 2, and `log(−expm1(x))` above, with `−expm1(x) = −2t / (1 − t)`, `t = tanh(x/2)`.
fn log1mexp(x: Tensor<1>) -> Tensor<1> {
    let far = x.clone().exp().neg().log1p();
    let t = (x.clone() / 2.0).tanh();
    let near = (t.clone() * -2.0 / (t.neg() + 1.0)).log();
    let is_far = x.lower_elem(-std::f64::consts::LN_2);
    near.mask_where(is_far, far)
}

/// The metrics tensor (see [`METRICS`], detached): the means over pairs of the rewards, their
/// accuracy and margin, and of the log-probabilities, then ORPO's three terms (`[1]` each).
fn pair_metrics(
    (reward_c, reward_r): (Tensor<1>, Tensor<1>),
    (logps_c, logps_r): (Tensor<1>, Tensor<1>),
    orpo_terms: [Tensor<1>; 3],
) -> Tensor<1> {
    let (reward_c, reward_r) = (reward_c.detach(), reward_r.detach());
    let won = reward_c.clone().greater(reward_r.clone()).float();
    let mut parts = vec![
        reward_c.clone().mean(),
        reward_r.clone().mean(),
        won.mean(),
        (reward_c - reward_r).mean(),
        logps_c.detach().mean(),
        logps_r.detach().mean(),
    ];
    parts.extend(orpo_terms.map(|t| t.detach()));
    Tensor::cat(parts, 0)
}

/// The loss `[1]` and the metrics `[9]` (see [`METRICS`]; detached) of a pair batch from the
/// policy's summed completion log-probabilities `logps` `[2B]` (chosen, then rejected), the
/// reference's (DPO), the completion token counts, and ORPO's NLL term. All on one device.
fn objective(
    p: Preference,
    logps: Tensor<1>,
    reference: Option<Tensor<1>>,
    counts: Tensor<1>,
    nll: Option<Tensor<1>>,
) -> (Tensor<1>, Tensor<1>) {
    let [rows] = logps.dims();
    let b = rows / 2;
    let halves = |t: Tensor<1>| (t.clone().slice(0..b), t.slice(b..rows));
    let mean = |t: Tensor<1>| t.mean();
    let device = logps.device();
    let zero = || Tensor::<1>::zeros([1], &device);
    match p {
        Preference::Dpo {
            beta,
            loss,
            label_smoothing: ls,
        } => {
            let reference = reference.expect("DPO compares against its reference");
            let (chosen, rejected) = halves(logps);
            let (ref_c, ref_r) = halves(reference);
            let chosen_ratio = chosen.clone() - ref_c;
            let rejected_ratio = rejected.clone() - ref_r;
            let delta = chosen_ratio.clone() - rejected_ratio.clone();
            let per_pair = match loss {
                DpoLoss::Sigmoid => log_sigmoid(delta * beta).neg(),
                DpoLoss::Ipo => {
                    let (n_c, n_r) = halves(counts);
                    let d = chosen_ratio.clone() / n_c - rejected_ratio.clone() / n_r;
                    (d - 1.0 / (2.0 * beta)).powi_scalar(2)
                }
                DpoLoss::Robust => {
                    let clean = log_sigmoid(delta.clone() * beta) * -(1.0 - ls);
                    let flipped = log_sigmoid(delta.neg() * beta) * ls;
                    (clean + flipped) / (1.0 - 2.0 * ls)
                }
            };
            let rewards = (chosen_ratio * beta, rejected_ratio * beta);
            let metrics = pair_metrics(rewards, (chosen, rejected), [zero(), zero(), zero()]);
            (mean(per_pair), metrics)
        }
        Preference::Orpo { beta } => {
            let nll = nll.expect("ORPO's NLL term");
            // ORPO compares the per-token mean log-probabilities.
            let (chosen, rejected) = halves(logps / counts);
            let log_odds = (chosen.clone() - rejected.clone())
                - (log1mexp(chosen.clone()) - log1mexp(rejected.clone()));
            let ratio = log_sigmoid(log_odds.clone());
            let loss = nll.clone() - mean(ratio.clone() * beta);
            let rewards = (chosen.clone() * beta, rejected.clone() * beta);
            let orpo_terms = [nll, mean(ratio), mean(log_odds)];
            let metrics = pair_metrics(rewards, (chosen, rejected), orpo_terms);
            (loss, metrics)
        }
    }
}

/// Forward and backward of a pair batch under `p`: adds `scale ×` the gradients into `grads`;
/// returns the loss and the metrics (both detached, on the plain device).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    master: &Model,
    reference: Reference<'_>,
    batch: &Batch,
    dropout: &mut Option<Dropout>,
    shape: StepShape,
    grads: &mut GradAccumulator,
    scale: f64,
    p: Preference,
) -> (Tensor<1>, Tensor<1>) {
    let device = master.device().without_autodiff();
    let masks = PairMasks::new(batch, &device);
    let reference_logps = p.needs_reference().then(|| match reference {
        Reference::Base => {
            let base = inference_view(&compute_view(master, shape.dtype)).without_adapters();
            reference_logps(&base, batch, &masks, shape.loss_chunk)
        }
        Reference::Frozen(m) => reference_logps(m, batch, &masks, shape.loss_chunk),
        Reference::None => panic!("DPO needs a reference model"),
    });
    let mut out = None;
    step::forward_backward_with(
        master,
        &StepBatch::upload(master, batch, shape.dtype),
        dropout,
        shape,
        grads,
        scale,
        &mut |model, h| {
            let nll = token_nll(
                &inference_view(model),
                h.clone(),
                &batch.targets,
                shape.loss_chunk,
            );
            let logps = masks.completion_logps(nll.clone());
            let orpo_nll = matches!(p, Preference::Orpo { .. })
                .then(|| (nll * masks.nll.clone()).sum().autodiff());
            // The derivative of the loss with respect to each sequence's log-probability.
            let leaf = logps.autodiff().require_grad();
            let (loss, metrics) = objective(
                p,
                leaf.clone(),
                reference_logps.clone().map(|r| r.autodiff()),
                masks.counts.clone().autodiff(),
                orpo_nll,
            );
            let g = loss.backward();
            let d = leaf
                .grad(&g)
                .unwrap_or_else(|| Tensor::zeros([masks.rows], &device));
            // log π(seq) = −Σ completion · nll_t, so ∂loss/∂nll_t = −∂loss/∂log π at its positions.
            let per_position = d
                .reshape([masks.rows, 1])
                .expand([masks.rows, masks.seq])
                .reshape([masks.rows * masks.seq]);
            let mut weights = (per_position * masks.completion.clone()).neg();
            if matches!(p, Preference::Orpo { .. }) {
                weights = weights + masks.nll.clone();
            }
            out = Some((loss.detach().without_autodiff(), metrics.without_autodiff()));
            HeadLoss {
                weights,
                divisor: Tensor::ones([1], &device),
            }
        },
    );
    out.expect("the head ran")
}

/// Mean loss and metrics of `model` (plain, compute type) over pair `batches`, weighing each
/// batch by its pairs: validation.
pub fn evaluate(
    model: &Model,
    reference: Reference<'_>,
    batches: impl Iterator<Item = Batch>,
    p: Preference,
    chunk: usize,
) -> (f64, Vec<f64>) {
    let (mut loss_sum, mut metric_sums, mut pairs) = (0.0, vec![0.0; METRICS.len()], 0usize);
    let base = match reference {
        Reference::Base if p.needs_reference() => Some(model.without_adapters()),
        _ => None,
    };
    for batch in batches {
        let device = model.device();
        let masks = PairMasks::new(&batch, &device);
        let n = batch.pairs.as_ref().map_or(0, |q| q.count);
        let consts = model.consts_for(&batch);
        let mut h = model.embed(&batch.inputs);
        for i in 0..model.num_layers() {
            h = model.block(i, h, &consts, &mut None, None);
        }
        let nll = token_nll(model, h, &batch.targets, chunk);
        let logps = masks.completion_logps(nll.clone());
        let reference_logps = match (reference, &base) {
            (Reference::Frozen(m), _) if p.needs_reference() => {
                Some(reference_logps(m, &batch, &masks, chunk))
            }
            (_, Some(b)) => Some(reference_logps(b, &batch, &masks, chunk)),
            _ => None,
        };
        let orpo_nll =
            matches!(p, Preference::Orpo { .. }).then(|| (nll * masks.nll.clone()).sum());
        let (loss, metrics) = objective(p, logps, reference_logps, masks.counts.clone(), orpo_nll);
        let values = Tensor::cat(vec![loss, metrics], 0)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        if let Some((l, m)) = values.split_first() {
            loss_sum += *l as f64 * n as f64;
            for (s, v) in metric_sums.iter_mut().zip(m) {
                *s += *v as f64 * n as f64;
            }
            pairs += n;
        }
    }
    let n = pairs.max(1) as f64;
    (
        if pairs == 0 { f64::NAN } else { loss_sum / n },
        metric_sums.into_iter().map(|s| s / n).collect(),
    )
}
