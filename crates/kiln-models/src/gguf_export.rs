//! A model written as a GGUF file that llama.cpp, Ollama and LM Studio load: the family's
//! header (`Family::gguf_export`), the tokenizer's (`kiln_formats::gguf_vocab`), llama.cpp's
//! tensor names and layouts, and each tensor encoded as `llama-quantize` would choose for the
//! requested file type (`tensor_type`, a port of `llama_tensor_get_type` for these types).
//!
//! The tensors are read from the model, converted and encoded one at a time, so the peak stays
//! near the model plus one tensor; the file appears atomically (`kiln_formats::gguf_write`).

use crate::ggml_types::{BF16, F16, F32, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, block_layout};
use crate::pretrained::Pretrained;
use crate::{Model, ModelError};
use kiln_formats::ggml_quantize::{Reconstruction, quantize_rows};
use kiln_formats::gguf_vocab::{SpecialTokens, VocabSource};
use kiln_formats::gguf_write::{GgufWriter, Meta, PlannedTensor};
use std::path::Path;

/// The file types `kiln fuse --quant` writes, named as llama.cpp names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4KM,
    Q5KM,
    Q6K,
}

impl GgufQuant {
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k";

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            "q4_k_m" => Self::Q4KM,
            "q5_k_m" => Self::Q5KM,
            "q6_k" => Self::Q6K,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4KM => "q4_k_m",
            Self::Q5KM => "q5_k_m",
            Self::Q6K => "q6_k",
        }
    }

    /// `general.file_type`: llama.cpp's `llama_ftype`.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Q6K => 18,
            Self::BF16 => 32,
        }
    }

    /// The type of most weights (`llama_ftype_get_default_type`).
    fn default_type(self) -> u32 {
        match self {
            Self::F32 => F32,
            Self::F16 => F16,
            Self::BF16 => BF16,
            Self::Q8_0 => Q8_0,
            Self::Q4KM => Q4_K,
            Self::Q5KM => Q5_K,
            Self::Q6K => Q6_K,
        }
    }
}

/// What `tensor_type` needs to know of the model.
#[derive(Debug, Clone, Copy)]
pub struct MixContext {
    pub n_layer: usize,
    /// No `output.weight`: the embedding is also the output, and is quantized as the output is.
    pub tied: bool,
    /// llama.cpp's `LLM_TYPE_70B` (it sizes attn_v up).
    pub is_70b: bool,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third
/// between them get more bits in the `_M` mixes.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

/// The type `llama-quantize` gives tensor `name` (GGUF dims `dims`) in a `quant` file, without
/// an importance matrix: `llama_tensor_get_type` and `tensor_type_fallback` for these types.
pub fn tensor_type(quant: GgufQuant, name: &str, dims: &[u64], mix: MixContext) -> u32 {
    // Only 2-D weights are quantized; norms, biases and 1-D tensors stay f32.
    if dims.len() < 2 || !name.ends_with("weight") || name.contains("_norm.weight") {
        return F32;
    }
    let default = quant.default_type();
    if !matches!(default, Q8_0 | Q4_K | Q5_K | Q6_K) {
        return default;
    }
    let row = dims[0];
    let blocks_fit = |ty: u32| block_layout(ty).is_some_and(|(b, _)| row.is_multiple_of(b as u64));
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(0);
    let is_output = name == "output.weight" || (mix.tied && name == "token_embd.weight");
    let mut ty = default;
    let m_mix = matches!(quant, GgufQuant::Q4KM | GgufQuant::Q5KM);
    if is_output {
        if !blocks_fit(ty) {
            ty = Q8_0;
        } else if ty != Q8_0 {
            ty = Q6_K;
        }
    } else if name.contains("attn_v.weight") || name.contains("attn_qkv.weight") {
        // llama.cpp's `category_is_attn_v` takes fused QKV down this branch too (its own QKV
        // branch after it is never reached).
        if m_mix && use_more_bits(layer, mix.n_layer) {
            ty = Q6_K;
        }
        // What llama.cpp calls a 70B (80 layers of grouped-query attention: Llama 2/3 70B,
        // Qwen2 72B): attn_v is 8× smaller than attn_q, more bits cost little.
        if mix.is_70b && ty == Q4_K {
            ty = Q5_K;
        }
    } else if name.contains("ffn_down") && m_mix && use_more_bits(layer, mix.n_layer) {
        ty = Q6_K;
    }
    // Rows that are not whole super-blocks fall back to a 32-block type, then to f16.
    if !blocks_fit(ty) {
        ty = match ty {
            Q4_K => Q5_0,
            Q5_K => Q5_1,
            Q6_K => Q8_0,
            other => other,
        };
        if !blocks_fit(ty) {
            ty = F16;
        }
    }
    ty
}

/// How one tensor was written.
#[derive(Debug, Clone)]
pub struct TensorReport {
    pub name: String,
    pub ggml_type: u32,
    pub elements: u64,
    pub error: Reconstruction,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct GgufReport {
    pub tensors: Vec<TensorReport>,
    pub bytes: u64,
}

/// llama.cpp's tensor order (`weight_name_comparer`): tensors outside the blocks first, then by
/// layer, by name within each.
fn llama_cpp_order(a: &str, b: &str) -> std::cmp::Ordering {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse().ok())
            .unwrap_or(-1)
    };
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

fn file_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// What both writers take from the model's family: the GGUF header it gives and its names.
struct Header<'a> {
    config: &'a crate::ModelConfig,
    family: &'static dyn crate::Family,
    export: crate::family::GgufExport,
    names: crate::family::GgufNames,
}

impl<'a> Header<'a> {
    fn of(model: &'a Model, path: &Path) -> Result<Self, ModelError> {
        let config = model.config();
        let family = model.family();
        let export = family.gguf_export(config).map_err(|m| file_err(path, m))?;
        Ok(Header {
            config,
            family,
            export,
            names: family.gguf_names(),
        })
    }
}

/// The llama.cpp name of HF tensor `hf`, or an error naming it.
fn gguf_name(
    names: &crate::family::GgufNames,
    export: &crate::family::GgufExport,
    hf: &str,
    path: &Path,
) -> Result<String, ModelError> {
    names.to_gguf(hf).ok_or_else(|| ModelError::Tensor {
        path: path.to_path_buf(),
        name: hf.to_string(),
        message: format!(
            "has no llama.cpp name in the {} architecture",
            export.architecture
        ),
    })
}

/// A GGUF base whose encoding a fused model keeps (`kiln fuse --quant keep`): each tensor in
/// its base type, the blocks of the tensors no adapter changed copied as they are (no second
/// rounding), the changed ones quantized again to their type.
pub struct KeepBase<'a> {
    pub file: &'a crate::gguf::GgufFile,
    /// HF names of the weights an adapter was fused into.
    pub changed: std::collections::BTreeSet<String>,
}

impl KeepBase<'_> {
    fn info(&self, gguf_name: &str) -> Option<&crate::gguf::TensorInfo> {
        self.file.tensors.iter().find(|t| t.name == gguf_name)
    }

    /// The base's own bytes for a tensor no adapter changed (of the dims it is written with).
    fn raw(&self, gguf_name: &str, hf_name: Option<&str>, dims: &[u64]) -> Option<&[u8]> {
        if hf_name.is_some_and(|n| self.changed.contains(n)) {
            return None;
        }
        let info = self.info(gguf_name)?;
        (info.dims == dims).then(|| self.file.tensor_bytes(info))
    }

    /// The type a tensor is written in: the base's, copied or (changed) quantized again to it; a
    /// changed tensor of a type kiln does not write (Q2_K, Q3_K, IQ4) is written as Q8_0 (F16
    /// where rows are not whole blocks), a tensor the base lacks (computed) as F32.
    fn tensor_type(&self, gguf_name: &str, hf_name: Option<&str>, dims: &[u64]) -> u32 {
        let Some(info) = self.info(gguf_name) else {
            return F32;
        };
        let copied = self.raw(gguf_name, hf_name, dims).is_some();
        if copied || kiln_formats::ggml_quantize::writable(info.ggml_type) {
            return info.ggml_type;
        }
        match block_layout(Q8_0) {
            Some((b, _)) if dims[0].is_multiple_of(b as u64) => Q8_0,
            _ => F16,
        }
    }
}

/// Writes `model` (adapters fused or absent) to `path` as a `quant` GGUF file, with the
/// `tokenizer.*` metadata `vocab` and `general.name` `model_name`.
pub fn write_gguf(
    path: &Path,
    model: &Model,
    vocab: Vec<(String, Meta)>,
    model_name: &str,
    quant: GgufQuant,
) -> Result<GgufReport, ModelError> {
    write_gguf_as(path, model, vocab, model_name, Encoding::Quant(quant))
}

/// Writes `model` to `path` in the encoding of the GGUF file it was fused from (see
/// [`KeepBase`]).
pub fn write_gguf_keeping(
    path: &Path,
    model: &Model,
    vocab: Vec<(String, Meta)>,
    model_name: &str,
    base: &KeepBase<'_>,
) -> Result<GgufReport, ModelError> {
    write_gguf_as(path, model, vocab, model_name, Encoding::Keep(base))
}

/// How [`write_gguf_as`] chooses each tensor's type.
enum Encoding<'a> {
    Quant(GgufQuant),
    Keep(&'a KeepBase<'a>),
}

fn write_gguf_as(
    path: &Path,
    model: &Model,
    vocab: Vec<(String, Meta)>,
    model_name: &str,
    encoding: Encoding<'_>,
) -> Result<GgufReport, ModelError> {
    let Header {
        config,
        family,
        export,
        names,
    } = Header::of(model, path)?;
    let arch = model.arch();
    if let Some(p) = arch.params.iter().find(|p| p.kind.is_lora()) {
        return Err(file_err(
            path,
            format!("`{}` is an adapter: fuse it into the model first", p.name),
        ));
    }

    // (GGUF name, HF name or None for a computed tensor, GGUF dims)
    let mut tensors: Vec<(String, Option<String>, Vec<u64>)> = Vec::new();
    for p in &arch.params {
        let gguf = gguf_name(&names, &export, &p.name, path)?;
        let dims = p.hf_shape().iter().rev().map(|&d| d as u64).collect();
        tensors.push((gguf, Some(p.name.clone()), dims));
    }
    for (name, _, dims) in &export.extra_tensors {
        tensors.push((name.clone(), None, dims.clone()));
    }
    tensors.sort_by(|a, b| llama_cpp_order(&a.0, &b.0));
    let mix = MixContext {
        n_layer: config.num_hidden_layers,
        tied: !tensors.iter().any(|t| t.0 == "output.weight"),
        is_70b: matches!(export.architecture, "llama" | "qwen2")
            && config.num_hidden_layers == 80
            && config.num_key_value_heads != config.num_attention_heads,
    };
    let plan: Vec<PlannedTensor> = tensors
        .iter()
        .map(|(name, hf, dims)| PlannedTensor {
            name: name.clone(),
            dims: dims.clone(),
            ggml_type: match &encoding {
                Encoding::Quant(quant) => tensor_type(*quant, name, dims, mix),
                Encoding::Keep(base) => base.tensor_type(name, hf.as_deref(), dims),
            },
        })
        .collect();

    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Meta::str(export.architecture),
        ),
        ("general.type".to_string(), Meta::str("model")),
        ("general.name".to_string(), Meta::str(model_name)),
    ];
    let (file_type, quantized) = match &encoding {
        Encoding::Quant(quant) => (
            quant.file_type(),
            matches!(quant.default_type(), Q8_0 | Q4_K | Q5_K | Q6_K),
        ),
        Encoding::Keep(base) => {
            let meta = |key: &str| base.file.metadata.get(key).and_then(|v| v.as_u64());
            let quantized = plan
                .iter()
                .any(|t| !matches!(t.ggml_type, F32 | F16 | BF16));
            (meta("general.file_type").unwrap_or(1) as u32, quantized)
        }
    };
    metadata.push(("general.file_type".to_string(), Meta::U32(file_type)));
    if quantized {
        metadata.push(("general.quantization_version".into(), Meta::U32(2)));
    }
    metadata.extend(export.metadata);
    metadata.extend(vocab);

    let io = |e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut writer = GgufWriter::create(path, &metadata, plan.clone()).map_err(io)?;
    let mut reports = Vec::with_capacity(plan.len());
    for ((name, hf_name, dims), planned) in tensors.iter().zip(&plan) {
        let kept = match &encoding {
            Encoding::Keep(base) => base.raw(name, hf_name.as_deref(), dims),
            Encoding::Quant(_) => None,
        };
        // A copied tensor was planned in its base type (`KeepBase::tensor_type`).
        if let Some(raw) = kept {
            writer.write_tensor(name, raw).map_err(io)?;
            reports.push(TensorReport {
                name: name.clone(),
                ggml_type: planned.ggml_type,
                elements: planned.elements(),
                error: Reconstruction::default(),
            });
            continue;
        }
        let values = match hf_name {
            Some(hf) => {
                let mut t = model.hf_tensor(hf).ok_or_else(|| ModelError::Tensor {
                    path: path.to_path_buf(),
                    name: hf.clone(),
                    message: "is declared but has no values".into(),
                })?;
                family.hf_values_to_gguf(config, hf, &mut t);
                t.data
            }
            None => export
                .extra_tensors
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, v, _)| v.clone())
                .unwrap_or_default(),
        };
        let (bytes, error) = quantize_rows(planned.ggml_type, dims[0] as usize, &values);
        drop(values);
        writer.write_tensor(name, &bytes).map_err(io)?;
        reports.push(TensorReport {
            name: name.clone(),
            ggml_type: planned.ggml_type,
            elements: planned.elements(),
            error,
        });
    }
    let bytes = writer.finish().map_err(io)?;
    Ok(GgufReport {
        tensors: reports,
        bytes,
    })
}

/// The `tokenizer.*` metadata for a GGUF of `p`: a GGUF source's own, as it was; otherwise
/// made from its `tokenizer.json`, with the special tokens `tokenizer_config.json` (or the
/// chat template, or `config.json`) names and whether the tokenizer adds BOS/EOS itself.
pub fn vocab_metadata(p: &Pretrained) -> Result<Vec<(String, Meta)>, ModelError> {
    if let Some(meta) = &p.gguf_tokenizer {
        return Ok(meta
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), Meta::from_read(v)?)))
            .collect());
    }
    let json = p.tokenizer.hf_json().ok_or_else(|| {
        file_err(
            &p.path,
            "a character tokenizer has no GGUF form: llama.cpp reads BPE and SentencePiece \
             vocabularies (train with `tokenizer: {kind: bpe}` or fine-tune a pretrained model)",
        )
    })?;
    let dir = p.path.is_dir().then_some(p.path.as_path());
    let read_json = |name: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(dir?.join(name)).ok()?;
        serde_json::from_str(&text).ok()
    };
    let tc = read_json("tokenizer_config.json").unwrap_or_default();
    let hf = &p.model.config().hf;
    let token = |key: &str, fallback: Option<&str>| -> Option<u32> {
        let text = match tc.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()),
            _ => fallback,
        };
        text.filter(|t| !t.is_empty())
            .and_then(|t| p.tokenizer.token_id(t))
            .or_else(|| match hf.get(&format!("{key}_id")) {
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
                Some(serde_json::Value::Array(a)) => a.first()?.as_u64().map(|v| v as u32),
                _ => None,
            })
    };
    let template = p.chat_template.as_ref();
    let bos = token("bos_token", template.map(|t| t.bos_token.as_str()));
    let eos = token("eos_token", template.map(|t| t.eos_token.as_str()));
    // Whether the tokenizer adds BOS/EOS itself, as transformers' encode() does: llama.cpp's
    // defaults differ by pre-tokenizer, so the file says.
    let probe = p
        .tokenizer
        .encode_with_special_tokens("a")
        .map_err(|e| file_err(&p.path, e.to_string()))?;
    let flag = |key: &str, id: Option<u32>, at: Option<&u32>| {
        tc.get(key)
            .and_then(serde_json::Value::as_bool)
            .or_else(|| id.map(|id| at == Some(&id)))
    };
    let special = SpecialTokens {
        bos,
        eos,
        unk: token("unk_token", None),
        pad: token("pad_token", None),
        add_bos: flag("add_bos_token", bos, probe.first()),
        add_eos: flag("add_eos_token", eos, probe.last()).map(|f| f && probe.len() > 1),
    };
    let encode = |text: &str| {
        p.tokenizer
            .encode_with_special_tokens(text)
            .map_err(|e| e.to_string())
    };
    let source = VocabSource {
        tokenizer_json: &json,
        encode_with_special: &encode,
        vocab_size: p.model.config().vocab_size,
        special,
        chat_template: template.map(|t| t.source.as_str()),
    };
    kiln_formats::gguf_vocab::vocab_metadata(&source).map_err(|m| file_err(&p.path, m))
}

/// Writes the LoRA adapters attached to `model` as llama.cpp's adapter GGUF, the file
/// `convert_lora_to_gguf.py` writes and `llama-cli --lora` and Ollama's `ADAPTER` take:
/// `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and for each adapted
/// weight `<GGUF name>.lora_a` (dims `[in, r]`) and `.lora_b` (`[r, out]`), in f32.
///
/// llama.cpp scales every adapter by `alpha / r`; PEFT's scale (rsLoRA's `alpha / √r`, or ranks
/// and alphas that differ by layer) is folded in: `alpha` is chosen so the first adapter's
/// scale is exact, and any other adapter's `B` absorbs the ratio of its scale to that.
pub fn write_adapter_gguf(
    path: &Path,
    model: &Model,
    model_name: &str,
) -> Result<GgufReport, ModelError> {
    let Header {
        config,
        family,
        export,
        names,
    } = Header::of(model, path)?;
    let arch = model.arch();
    let adapted: Vec<_> = arch
        .linears()
        .into_iter()
        .filter_map(|l| l.lora.as_ref().map(|lora| (l, lora)))
        .collect();
    let Some((_, first)) = adapted.first() else {
        return Err(file_err(path, "the model has no LoRA adapter to write"));
    };
    if let Some((linear, _)) = adapted.iter().find(|(_, l)| l.magnitude.is_some()) {
        return Err(file_err(
            path,
            format!(
                "`{}` is a DoRA adapter: llama.cpp's adapters are LoRA only (fuse it instead: \
                 kiln fuse --adapter DIR --gguf OUT.gguf)",
                linear.path
            ),
        ));
    }
    let alpha = first.scale * first.rank as f64;
    let mut plan = Vec::new();
    let mut sources = Vec::new();
    for (linear, lora) in &adapted {
        let weight = format!("{}.weight", linear.path);
        let gguf = gguf_name(&names, &export, &weight, path)?;
        let r = lora.rank as u64;
        for (suffix, dims) in [
            ("lora_a", vec![linear.d_in as u64, r]),
            ("lora_b", vec![r, linear.d_out as u64]),
        ] {
            plan.push(PlannedTensor {
                name: format!("{gguf}.{suffix}"),
                dims,
                ggml_type: F32,
            });
        }
        // The factor B takes so that llama.cpp's alpha / r gives this adapter's own scale.
        let b_factor = lora.scale * lora.rank as f64 / alpha;
        sources.push((linear.path.clone(), weight, b_factor));
    }
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Meta::str(export.architecture),
        ),
        ("general.type".to_string(), Meta::str("adapter")),
        ("general.name".to_string(), Meta::str(model_name)),
        ("adapter.type".to_string(), Meta::str("lora")),
        ("adapter.lora.alpha".to_string(), Meta::F32(alpha as f32)),
    ];
    let io = |e: std::io::Error| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut writer = GgufWriter::create(path, &metadata, plan.clone()).map_err(io)?;
    let mut reports = Vec::with_capacity(plan.len());
    let mut planned = plan.iter();
    for (module, weight, b_factor) in &sources {
        for matrix in ["lora_A", "lora_B"] {
            let name = format!("{module}.{matrix}.weight");
            let mut t = model.hf_tensor(&name).ok_or_else(|| ModelError::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                message: "is declared but has no values".into(),
            })?;
            if matrix == "lora_B" {
                // B's rows are the weight's output rows: they take the weight's reordering
                // (llama.cpp's Q/K permutation), A's columns are its untouched input.
                t.data
                    .iter_mut()
                    .for_each(|v| *v = (*v as f64 * b_factor) as f32);
                family.hf_values_to_gguf(config, weight, &mut t);
            }
            let p = planned.next().expect("two planned tensors per adapter");
            let (bytes, error) = quantize_rows(F32, p.dims[0] as usize, &t.data);
            writer.write_tensor(&p.name, &bytes).map_err(io)?;
            reports.push(TensorReport {
                name: p.name.clone(),
                ggml_type: F32,
                elements: p.elements(),
                error,
            });
        }
    }
    let bytes = writer.finish().map_err(io)?;
    Ok(GgufReport {
        tensors: reports,
        bytes,
    })
}
