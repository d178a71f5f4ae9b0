//! A decoder with its weights: the family's [`Architecture`] plus one tensor per declared
//! parameter. The forward pass is the same code for every family; what differs is declared.

use crate::arch::Architecture;
use crate::config::ModelConfig;
use crate::dtype::{float_dtype, to_dtype};
use crate::family::Family;
use crate::fused;
use crate::layers::{Dropout, ForwardConsts, LayerCache, Linear, Lora, Positions};
use crate::params::{
    P1, P2, ParamInfo, ParamKind, ParamMapper, ParamSource, ParamTensor, ParamVisitor, QuantHeld,
    Weights, name_hash, transpose_host,
};
use crate::quant::QuantMatrix;
use crate::safetensors_io::HostTensor;
use burn::prelude::*;
use burn::tensor::FloatDType;
use kiln_data::{Batch, Rng};
use kiln_formats::ggml_repack::PackedMatrix;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A parameter's values as a file gives them, in HF's layout: float, or a frozen matrix held
/// quantized.
#[derive(Debug, Clone)]
pub enum HostParam {
    Dense(HostTensor),
    Packed(PackedMatrix),
}

impl HostParam {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            HostParam::Dense(t) => t.shape.clone(),
            HostParam::Packed(p) => vec![p.rows, p.cols],
        }
    }
}

/// The attention keys and values of the tokens seen so far, per layer.
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Tokens cached.
    pub len: usize,
}

#[derive(Debug, Clone)]
pub struct Model {
    arch: Arc<Architecture>,
    weights: Weights,
}

const INIT_PURPOSE: u64 = 0x1417;

impl Model {
    /// Builds every declared parameter by asking `make(name, kind, shape)` for its values, in
    /// kiln's layout (linear weights `[in, out]`).
    pub fn build(arch: Architecture, device: &Device, make: &mut ParamSource<'_>) -> Self {
        let weights = arch
            .params
            .iter()
            .map(|p| {
                let values = make(&p.name, p.kind, &p.shape);
                float_param(values, &p.shape, device)
            })
            .collect();
        Self {
            arch: Arc::new(arch),
            weights: Weights(weights),
        }
    }

    /// A freshly initialised model: normal(0, std) matrices with the residual projections scaled
    /// by 1/sqrt(2 × layers) (as GPT-2 does), unit norms (zero for 1+w norms), zero biases. Drawn
    /// on the host from the run seed (one stream per parameter name), so every backend starts
    /// from the same weights.
    pub fn init(arch: Architecture, std: f64, seed: u64, device: &Device) -> Self {
        let residual_std = std / (2.0 * arch.blocks.len().max(1) as f64).sqrt();
        let one_plus = arch.norm.one_plus;
        Self::build(arch, device, &mut |name, kind, shape| {
            let n: usize = shape.iter().product();
            match kind {
                ParamKind::Norm => vec![if one_plus { 0.0 } else { 1.0 }; n],
                ParamKind::Bias
                | ParamKind::LoraA
                | ParamKind::LoraB
                | ParamKind::LoraMagnitude => vec![0.0; n],
                ParamKind::LinearWeight | ParamKind::Embedding => {
                    let std =
                        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                            residual_std
                        } else {
                            std
                        };
                    let mut rng = Rng::stream(seed, INIT_PURPOSE, name_hash(name));
                    (0..n).map(|_| (rng.normal() * std) as f32).collect()
                }
            }
        })
    }

    /// A model whose every parameter comes from HF-layout host tensors (linear weights `[out, in]`).
    /// Names and shapes must all match; the first mismatch is returned as (name, what is wrong).
    pub fn from_hf_tensors(
        arch: Architecture,
        tensors: BTreeMap<String, HostTensor>,
        device: &Device,
    ) -> Result<Self, (String, String)> {
        let params = tensors
            .into_iter()
            .map(|(k, t)| (k, HostParam::Dense(t)))
            .collect();
        Self::from_host_params(arch, params, device)
    }

    /// A model whose parameters come from HF-layout host values, float or (frozen matrices)
    /// quantized. Names and shapes must all match; the first mismatch is returned as (name,
    /// what is wrong). Each host value is dropped once it is on the device, so loading holds
    /// the host copy and the model together only one tensor at a time.
    pub fn from_host_params(
        arch: Architecture,
        mut tensors: BTreeMap<String, HostParam>,
        device: &Device,
    ) -> Result<Self, (String, String)> {
        for p in &arch.params {
            match tensors.get(&p.name) {
                None => return Err((p.name.clone(), "missing from the weights".into())),
                Some(t) if t.shape() != p.hf_shape() => {
                    return Err((
                        p.name.clone(),
                        format!(
                            "shape {:?}, expected {:?} from config.json",
                            t.shape(),
                            p.hf_shape()
                        ),
                    ));
                }
                Some(HostParam::Packed(_))
                    if !matches!(p.kind, ParamKind::LinearWeight | ParamKind::Embedding) =>
                {
                    return Err((p.name.clone(), "only matrices are held quantized".into()));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = tensors
            .keys()
            .find(|k| !arch.params.iter().any(|p| &p.name == *k))
        {
            return Err((
                extra.clone(),
                "not used by the architecture config.json describes".into(),
            ));
        }
        let weights = arch
            .params
            .iter()
            .map(|p| {
                let t = tensors
                    .remove(&p.name)
                    .expect("checked above: every parameter is present");
                let t = match t {
                    HostParam::Packed(packed) => {
                        return ParamTensor::Quantized(Box::new(QuantHeld {
                            matrix: QuantMatrix::from_packed(packed, device),
                            transposed: p.kind.transposed(),
                        }));
                    }
                    HostParam::Dense(t) => t,
                };
                // Transposed on the host so that the weight is contiguous in kiln's layout, as
                // a trained one is: the same memory layout gives bit-identical matmuls on resume.
                let values = if p.kind.transposed() {
                    transpose_host(&t.data, p.shape[1], p.shape[0])
                } else {
                    t.data
                };
                float_param(values, &p.shape, device)
            })
            .collect();
        Ok(Self {
            arch: Arc::new(arch),
            weights: Weights(weights),
        })
    }

    pub fn arch(&self) -> &Architecture {
        &self.arch
    }

    pub fn config(&self) -> &ModelConfig {
        &self.arch.config
    }

    pub fn family(&self) -> &'static dyn Family {
        self.arch.config.family()
    }

    pub fn num_layers(&self) -> usize {
        self.arch.blocks.len()
    }

    /// The device of the float parameters (the final norm's, which is never quantized).
    pub fn device(&self) -> Device {
        self.weights.vector(self.arch.norm.weight).device()
    }

    /// The float type the model computes in (its final norm's, cast with every frozen float
    /// parameter).
    pub fn dtype(&self) -> FloatDType {
        float_dtype(&self.weights.vector(self.arch.norm.weight))
    }

    fn consts_with(&self, at: Positions<'_>) -> ForwardConsts {
        let device = self.device().without_autodiff();
        ForwardConsts::new(
            &self.arch.ropes,
            &self.arch.windows(),
            at,
            self.dtype(),
            &device,
        )
    }

    /// Rotary tables and causal masks for `batch` rows of `seq` positions.
    pub fn consts(&self, batch: usize, seq: usize) -> ForwardConsts {
        self.consts_with(Positions::Plain { batch, seq })
    }

    /// Rotary tables for positions `offset..offset + n` and the masks of those `n` queries over
    /// the keys a [`KvCache`] holds plus their own.
    pub fn consts_at(&self, offset: usize, n: usize) -> ForwardConsts {
        self.consts_with(Positions::Cached { offset, n })
    }

    /// Rotary tables and masks for packed rows: positions restart at each segment and attention
    /// stays inside it. `segments` is row-major `[batch, seq]`.
    pub fn consts_packed(&self, batch: usize, seq: usize, segments: &[u32]) -> ForwardConsts {
        self.consts_with(Positions::Packed {
            batch,
            seq,
            segments,
        })
    }

    /// Rotary tables and masks for a batch's shape (packed rows included).
    pub fn consts_for(&self, batch: &Batch) -> ForwardConsts {
        self.consts_in(batch, self.dtype())
    }

    /// [`Model::consts_for`] with tables in `dtype`: for a forward in another compute type than
    /// the model's own (`train.dtype`).
    pub fn consts_in(&self, batch: &Batch, dtype: FloatDType) -> ForwardConsts {
        let device = self.device().without_autodiff();
        ForwardConsts::new(
            &self.arch.ropes,
            &self.arch.windows(),
            Positions::of(batch),
            dtype,
            &device,
        )
    }

    /// `consts` (built for a batch of `batch`'s shape and packing) rewritten for `batch`, in
    /// the same device buffers: see [`ForwardConsts::refill`].
    pub fn refill_consts(&self, consts: ForwardConsts, batch: &Batch) -> ForwardConsts {
        consts.refill(&self.arch.ropes, Positions::of(batch))
    }

    /// Token embeddings for `[batch, seq]` ids, as `[batch × seq, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Tensor<2> {
        let device = self.device().without_autodiff();
        self.embed_ids(Tensor::from_data(Self::ids_data(ids), &device))
    }

    /// `ids` as the data of the index tensor [`Model::embed_ids`] takes.
    pub fn ids_data(ids: &[u32]) -> TensorData {
        let idx: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        TensorData::new(idx, [ids.len()])
    }

    /// Token embeddings for ids already on the (plain) device, as `[ids, hidden]`.
    pub fn embed_ids(&self, idx: Tensor<1, Int>) -> Tensor<2> {
        let x = match self.weights.quantized(self.arch.embed_tokens) {
            // Only the rows looked up are de-quantised, in the compute type, on the model's
            // side of autodiff (an untracked constant).
            Some(q) => {
                let rows = to_dtype(fused::gather_rows(q, idx), self.dtype());
                if self.device().is_autodiff() {
                    rows.autodiff()
                } else {
                    rows
                }
            }
            None => self.weights.matrix(self.arch.embed_tokens).select(0, idx),
        };
        match self.arch.embed_scale {
            // The scale is rounded to the weights' type first, as transformers does.
            Some(s) => x * s,
            None => x,
        }
    }

    /// One decoder block on `[batch × seq, hidden]` activations.
    pub fn block(
        &self,
        index: usize,
        x: Tensor<2>,
        consts: &ForwardConsts,
        dropout: &mut Option<Dropout>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<2> {
        self.arch.blocks[index].forward(&self.weights, x, consts, dropout, cache)
    }

    /// Final norm and output projection: `[n, hidden]` to `[n, vocab]` logits.
    pub fn head(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.arch.norm.forward(&self.weights, x);
        let logits = match &self.arch.lm_head {
            Some(head) => head.forward(&self.weights, x, &mut None),
            None => match self.weights.quantized(self.arch.embed_tokens) {
                Some(q) => fused::qmatmul(x, q),
                None => x.matmul(self.weights.matrix(self.arch.embed_tokens).transpose()),
            },
        };
        match self.arch.final_softcap {
            Some(c) => (logits / c).tanh() * c,
            None => logits,
        }
    }

    /// Logits `[batch × seq, vocab]` for row-major `[batch, seq]` token ids.
    pub fn forward(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        dropout: &mut Option<Dropout>,
    ) -> Tensor<2> {
        let consts = self.consts(batch, seq);
        let mut x = self.embed(ids);
        for i in 0..self.num_layers() {
            x = self.block(i, x, &consts, dropout, None);
        }
        self.head(x)
    }

    /// Logits `[n, vocab]` for `n` new tokens of one sequence, attending to (and extending) the
    /// keys and values `cache` holds: generation without recomputing the prefix.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Tensor<2> {
        let n = ids.len();
        let consts = self.consts_at(cache.len, n);
        if cache.layers.len() != self.num_layers() {
            cache.layers = vec![None; self.num_layers()];
        }
        let mut x = self.embed(ids);
        for i in 0..self.num_layers() {
            x = self.block(i, x, &consts, &mut None, Some(&mut cache.layers[i]));
        }
        cache.len += n;
        self.head(x)
    }

    /// Logits `[batch × seq, vocab]` of a batch (packed rows included).
    pub fn forward_batch(&self, batch: &Batch, dropout: &mut Option<Dropout>) -> Tensor<2> {
        let consts = self.consts_for(batch);
        let mut x = self.embed(&batch.inputs);
        for i in 0..self.num_layers() {
            x = self.block(i, x, &consts, dropout, None);
        }
        self.head(x)
    }

    /// Mean loss of a batch.
    pub fn loss(&self, batch: &Batch, dropout: &mut Option<Dropout>) -> Tensor<1> {
        let logits = self.forward_batch(batch, dropout);
        Self::cross_entropy(logits, &batch.targets, batch.loss_mask.as_deref())
    }

    /// Mean next-token cross-entropy of `logits` `[n, vocab]` against `targets` (length n),
    /// over the positions where `mask` is 1 (all positions without a mask).
    pub fn cross_entropy(logits: Tensor<2>, targets: &[u32], mask: Option<&[f32]>) -> Tensor<1> {
        let count = mask.map_or(targets.len() as f32, |m| m.iter().sum());
        Self::cross_entropy_sum(logits, targets, mask).neg() / count.max(1.0) as f64
    }

    /// Sum over positions of `mask ×` the log-probability of the target: the cross-entropy
    /// numerator of a chunk of positions, before the sign and the division by the batch's count.
    /// Masked-out positions cost nothing (the fused kernel skips their rows).
    pub fn cross_entropy_sum(
        logits: Tensor<2>,
        targets: &[u32],
        mask: Option<&[f32]>,
    ) -> Tensor<1> {
        let device = logits.device().without_autodiff();
        let n = targets.len();
        let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device);
        let weights = mask.map_or_else(|| vec![1.0; n], <[f32]>::to_vec);
        let weights = Tensor::<1>::from_data(TensorData::new(weights, [n]), &device);
        // The loss in f32 whatever the compute type.
        let logits = to_dtype(logits, FloatDType::F32);
        fused::cross_entropy(logits, idx, weights).sum().neg()
    }

    /// Visits every float parameter, in declaration order (quantized matrices are constants:
    /// see [`Model::quantized_numel`]).
    pub fn visit_params(&self, v: &mut impl ParamVisitor) {
        for (info, t) in self.arch.params.iter().zip(&self.weights.0) {
            match t {
                ParamTensor::Vector(t) => v.visit(&info.name, info.kind, t),
                ParamTensor::Matrix(t) => v.visit(&info.name, info.kind, t),
                ParamTensor::Quantized(_) => {}
            }
        }
    }

    /// Elements and device bytes of the matrices held quantized.
    pub fn quantized_numel(&self) -> (usize, usize) {
        self.weights
            .0
            .iter()
            .filter_map(|t| match t {
                ParamTensor::Quantized(q) => {
                    Some((q.matrix.rows * q.matrix.cols, q.matrix.bytes()))
                }
                _ => None,
            })
            .fold((0, 0), |(n, b), (dn, db)| (n + dn, b + db))
    }

    /// The quantized matrix held for the parameter `name`, if it is one.
    pub fn quantized_param(&self, name: &str) -> Option<&crate::quant::QuantMatrix> {
        self.arch
            .params
            .iter()
            .zip(&self.weights.0)
            .find(|(info, _)| info.name == name)
            .and_then(|(_, t)| match t {
                ParamTensor::Quantized(q) => Some(&q.matrix),
                _ => None,
            })
    }

    /// Rebuilds every parameter through `m`; the architecture is shared, not copied.
    pub fn map_params(self, m: &mut impl ParamMapper) -> Self {
        let weights = self
            .arch
            .params
            .iter()
            .zip(self.weights.0)
            .map(|(info, t)| match t {
                ParamTensor::Vector(t) => ParamTensor::Vector(m.map(&info.name, info.kind, t)),
                ParamTensor::Matrix(t) => ParamTensor::Matrix(m.map(&info.name, info.kind, t)),
                held @ ParamTensor::Quantized(_) => held,
            })
            .collect();
        Self {
            arch: self.arch,
            weights: Weights(weights),
        }
    }

    /// All parameters in Hugging Face layout (linear weights as `[out, in]`), read to the host.
    pub fn to_hf_tensors(&self) -> BTreeMap<String, HostTensor> {
        self.hf_tensors_where(|_| true)
    }

    /// The parameters whose kind passes `keep`, in HF/PEFT layout, read to the host.
    pub fn hf_tensors_where(&self, keep: fn(ParamKind) -> bool) -> BTreeMap<String, HostTensor> {
        struct Export(BTreeMap<String, HostTensor>, fn(ParamKind) -> bool);
        impl ParamVisitor for Export {
            fn visit<const D: usize>(&mut self, name: &str, kind: ParamKind, p: &Tensor<D>) {
                if (self.1)(kind) {
                    self.0.insert(name.to_string(), read_hf(kind, p));
                }
            }
        }
        let mut e = Export(BTreeMap::new(), keep);
        self.visit_params(&mut e);
        for info in self.arch.params.iter().filter(|i| keep(i.kind)) {
            if let Some(q) = self.quantized_param(&info.name) {
                e.0.insert(info.name.clone(), dequantized_hf(q));
            }
        }
        e.0
    }

    /// One parameter in HF/PEFT layout, read to the host: writers that stream a model tensor by
    /// tensor hold one copy at a time.
    pub fn hf_tensor(&self, name: &str) -> Option<HostTensor> {
        struct One<'a>(&'a str, Option<HostTensor>);
        impl ParamVisitor for One<'_> {
            fn visit<const D: usize>(&mut self, name: &str, kind: ParamKind, p: &Tensor<D>) {
                if name == self.0 {
                    self.1 = Some(read_hf(kind, p));
                }
            }
        }
        if let Some(q) = self.quantized_param(name) {
            return Some(dequantized_hf(q));
        }
        let mut one = One(name, None);
        self.visit_params(&mut one);
        one.1
    }

    /// Adds a LoRA adapter with matrices `a` `[in, r]` and `b` `[r, out]` to the linear at
    /// `path`, declaring `<path>.lora_A.weight` and `<path>.lora_B.weight`; with a `magnitude`
    /// `[out]` it is DoRA's, declaring `<path>.lora_magnitude_vector` too (PEFT's names).
    pub fn add_lora(
        &mut self,
        path: &str,
        a: Tensor<2>,
        b: Tensor<2>,
        scale: f64,
        magnitude: Option<Tensor<1>>,
    ) -> bool {
        let arch = Arc::make_mut(&mut self.arch);
        let index = arch.params.len();
        let Some(linear) = linear_mut(arch, path) else {
            return false;
        };
        let rank = a.dims()[1];
        linear.lora = Some(Lora {
            a: P2(index),
            b: P2(index + 1),
            rank,
            scale,
            magnitude: magnitude.as_ref().map(|_| P1(index + 2)),
        });
        for (suffix, kind, t) in [
            ("lora_A", ParamKind::LoraA, &a),
            ("lora_B", ParamKind::LoraB, &b),
        ] {
            arch.params.push(ParamInfo {
                name: format!("{path}.{suffix}.weight"),
                kind,
                shape: t.dims().to_vec(),
            });
        }
        self.weights.0.push(ParamTensor::Matrix(a));
        self.weights.0.push(ParamTensor::Matrix(b));
        if let Some(m) = magnitude {
            arch.params.push(ParamInfo {
                name: format!("{path}.lora_magnitude_vector"),
                kind: ParamKind::LoraMagnitude,
                shape: m.dims().to_vec(),
            });
            self.weights.0.push(ParamTensor::Vector(m));
        }
        true
    }

    /// The base model alone: every adapter switched off, its parameters kept but unused, as
    /// PEFT's `disable_adapter()` computes. DPO's reference under LoRA, with no second copy.
    pub fn without_adapters(&self) -> Self {
        let mut arch = (*self.arch).clone();
        for linear in linears_mut(&mut arch) {
            linear.lora = None;
        }
        Self {
            arch: Arc::new(arch),
            weights: self.weights.clone(),
        }
    }

    /// Merges every adapter into its weight, `W += s · A B` (PEFT's `W += s · B A` in its
    /// layout; DoRA's then rescaled per output, `W ← m / ‖W‖ · W`), and drops the adapters: a
    /// plain model that computes what base + adapter did.
    pub fn fuse_lora(self) -> Self {
        let mut arch = (*self.arch).clone();
        let mut weights = self.weights;
        let mut lora_params = Vec::new();
        for linear in linears_mut(&mut arch) {
            if let Some(l) = linear.lora.take() {
                let factor = l.dora_factor(&weights, linear.weight);
                let delta = weights.matrix(l.a).matmul(weights.matrix(l.b)) * l.scale;
                let mut merged = weights.dense(linear.weight) + delta;
                if let Some(g) = factor {
                    merged = merged * g;
                }
                weights.0[linear.weight.0] = ParamTensor::Matrix(merged);
                lora_params.extend([l.a.0, l.b.0]);
                lora_params.extend(l.magnitude.map(|m| m.0));
            }
        }
        // Adapters are declared after the base's parameters, so dropping them from the end keeps
        // every other handle valid.
        lora_params.sort_unstable();
        for &i in lora_params.iter().rev() {
            debug_assert!(arch.params[i].kind.is_lora());
            arch.params.remove(i);
            weights.0.remove(i);
        }
        Self {
            arch: Arc::new(arch),
            weights,
        }
    }
}

/// A float parameter of `shape` (a vector or a matrix) on `device`.
fn float_param(values: Vec<f32>, shape: &[usize], device: &Device) -> ParamTensor {
    match *shape {
        [n] => ParamTensor::Vector(Tensor::from_data(TensorData::new(values, [n]), device)),
        [r, c] => ParamTensor::Matrix(Tensor::from_data(TensorData::new(values, [r, c]), device)),
        _ => unreachable!("parameters are vectors or matrices"),
    }
}

/// A quantized matrix de-quantised to the host, in HF's layout (the one it is held in).
fn dequantized_hf(q: &crate::quant::QuantMatrix) -> HostTensor {
    HostTensor {
        shape: vec![q.rows, q.cols],
        data: q.to_packed().dequantize(),
    }
}

/// A parameter in f32 on the host, linear weights transposed to HF's `[out, in]`.
fn read_hf<const D: usize>(kind: ParamKind, p: &Tensor<D>) -> HostTensor {
    let data = p.clone().detach().into_data();
    let mut shape = data.shape().to_vec();
    let mut values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    if kind.transposed() {
        values = transpose_host(&values, shape[0], shape[1]);
        shape.reverse();
    }
    HostTensor {
        shape,
        data: values,
    }
}

fn linears_mut(arch: &mut Architecture) -> Vec<&mut Linear> {
    let mut v: Vec<&mut Linear> = arch
        .blocks
        .iter_mut()
        .flat_map(|b| b.linears_mut())
        .collect();
    v.extend(arch.lm_head.as_mut());
    v
}

fn linear_mut<'a>(arch: &'a mut Architecture, path: &str) -> Option<&'a mut Linear> {
    linears_mut(arch).into_iter().find(|l| l.path == path)
}
