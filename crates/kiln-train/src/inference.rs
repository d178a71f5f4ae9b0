//! Using a model without a tape: validation loss, whole-file evaluation, sampling.

use burn::prelude::*;
use kiln_data::{Batch, Rng, sequential_windows};
use kiln_models::KvCache;
use kiln_models::{Model, ParamKind, ParamMapper};

/// The same weights without autodiff: no tape is recorded, nothing is retained for backward.
pub fn inference_view(model: &Model) -> Model {
    struct Plain;
    impl ParamMapper for Plain {
        fn map<const D: usize>(&mut self, _: &str, _: ParamKind, p: Tensor<D>) -> Tensor<D> {
            p.detach().without_autodiff()
        }
    }
    model.clone().map_params(&mut Plain)
}

/// Mean loss over batches, weighting each by its token count.
pub fn mean_loss(model: &Model, batches: impl Iterator<Item = Batch>) -> f64 {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for b in batches {
        let n = match &b.loss_mask {
            Some(m) => m.iter().filter(|&&w| w > 0.0).count(),
            None => b.targets.len(),
        };
        if n == 0 {
            continue;
        }
        let loss = model.loss(&b, &mut None).into_scalar::<f32>() as f64;
        sum += loss * n as f64;
        count += n;
    }
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// Loss over a whole token stream in consecutive windows of `seq_len`: (mean loss, tokens scored).
pub fn evaluate_tokens(model: &Model, tokens: &[u32], seq_len: usize) -> (f64, usize) {
    let windows = sequential_windows(tokens, seq_len);
    let scored = windows.iter().map(|w| w.targets.len()).sum();
    (mean_loss(model, windows.into_iter()), scored)
}

/// Sampling settings for [`generate`].
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling threshold in (0, 1]; 1 disables it.
    pub top_p: f64,
    pub seed: u64,
    /// Stop when one of these ids is produced.
    pub stop_ids: Vec<u32>,
}

/// Picks the next token from `logits` (one row of the vocabulary).
pub fn sample(logits: &[f32], options: &SampleOptions, rng: &mut Rng) -> u32 {
    if options.temperature <= 0.0 {
        return logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / options.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    if options.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p.1;
            if cumulative >= options.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let kept: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= kept);
    }
    let mut u = rng.next_f64();
    for (id, p) in &probs {
        if u < *p {
            return *id;
        }
        u -= p;
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

/// Continues `prompt` token by token; calls `on_token` with each new id as it is produced.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    options: &SampleOptions,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    let mut rng = Rng::new(options.seed);
    let mut tokens = prompt.to_vec();
    let window = model.config().max_position_embeddings;
    let vocab = model.config().vocab_size;
    let mut cache = KvCache::default();
    // Feed the prompt (or the tail of it that fits), then one token at a time from the cache.
    let mut pending: Vec<u32> = tokens[tokens.len().saturating_sub(window)..].to_vec();
    if pending.is_empty() {
        return Vec::new();
    }
    for _ in 0..options.max_tokens {
        if cache.len + pending.len() > window {
            // Context full: start again from the newest half window.
            cache = KvCache::default();
            pending = tokens[tokens.len().saturating_sub(window / 2)..].to_vec();
        }
        let n = pending.len();
        let logits = model.forward_cached(&pending, &mut cache);
        let last = logits.slice([n - 1..n, 0..vocab]).into_data();
        let row = last
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let next = sample(&row, options, &mut rng);
        tokens.push(next);
        on_token(next);
        if options.stop_ids.contains(&next) {
            break;
        }
        pending = vec![next];
    }
    tokens[prompt.len()..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_p_pick_the_likely_token() {
        let logits = [0.0f32, 5.0, 1.0];
        let mut opts = SampleOptions {
            max_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: vec![],
        };
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, &opts, &mut rng), 1);
        opts.temperature = 1.0;
        opts.top_p = 0.5;
        assert!((0..50).all(|_| sample(&logits, &opts, &mut rng) == 1));
    }
}
