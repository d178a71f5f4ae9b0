//! The model-level halves of the `hf_json` and `gguf` fuzz targets (`fuzz/`): what the families
//! make of a hostile `config.json` or GGUF file. The container halves are in
//! `kiln_formats::fuzz`; tests/kiln.rs replays the kept inputs through both.

use crate::family::config_from_hf;
use crate::gguf::{self, GgufFile};
use serde_json::{Map, Value};
use std::path::Path;

/// A run's YAML config: besides the round trip (`kiln_formats::fuzz::config_yaml`), an accepted
/// config holds no NaN or infinity, its per-step token count fits, and its `model` section is
/// either refused by the family with an error or declares a model whose size can be counted.
pub fn config_yaml(data: &[u8]) {
    kiln_formats::fuzz::config_yaml(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = kiln_config::Config::from_yaml_str(text, "fuzz.yaml") else {
        return;
    };
    for line in config.to_yaml().lines() {
        let value = line.rsplit([':', '-']).next().unwrap_or("").trim();
        assert!(
            !matches!(value, ".nan" | ".inf" | ".NaN" | ".Inf"),
            "an accepted config holds a non-finite number: {line}"
        );
    }
    let t = &config.train;
    t.batch_size
        .get()
        .checked_mul(t.grad_accum)
        .and_then(|n| n.checked_mul(config.data.seq_len))
        .expect("an accepted config's tokens per step overflow");
    let vocab = match config.data.tokenizer.kind {
        kiln_config::TokenizerKind::Bpe => config.data.tokenizer.vocab_size,
        _ => 256,
    };
    if let Ok(model) = crate::family::config_from_scratch(&config.model, vocab) {
        let arch = model
            .declare()
            .unwrap_or_else(|e| panic!("an accepted model section does not declare: {e:?}"));
        let _ = arch.num_params();
        let _ = arch.memory_profile();
    }
}

/// A `config.json`: whatever a family accepts must declare, count its parameters, and write back
/// a `config.json` that reads back to the same config (checkpoints and fused models rely on it).
pub fn hf_json(data: &[u8]) {
    kiln_formats::fuzz::hf_json(data);
    let Ok(hf) = serde_json::from_slice::<Map<String, Value>>(data) else {
        return;
    };
    let Ok(config) = config_from_hf(&hf) else {
        return;
    };
    let arch = config
        .declare()
        .unwrap_or_else(|e| panic!("an accepted config does not declare: {e:?}"));
    let _ = arch.num_params();
    let _ = arch.memory_profile();
    for rope in &arch.ropes {
        let _ = rope.inv_freq(config.max_position_embeddings);
    }
    let written = match config.to_hf_json() {
        Value::Object(m) => m,
        other => panic!("config.json written as {other}"),
    };
    let again = config_from_hf(&written)
        .unwrap_or_else(|e| panic!("kiln's own config.json does not read back: {e:?}"));
    let text = serde_json::to_string(&Value::Object(written.clone())).expect("serialisable");
    let reparsed: Map<String, Value> = serde_json::from_str(&text).expect("kiln's own JSON");
    let again_text = config_from_hf(&reparsed)
        .unwrap_or_else(|e| panic!("kiln's own config.json text does not read back: {e:?}"));
    // kiln writes the shortest exact decimal (ryu); serde_json's default float parser may land
    // one ulp off for exponents beyond its exact fast path (e.g. 1e-45; found by this target).
    let ulp_close = |a: f64, b: f64| a == b || (a - b).abs() <= a.abs().max(b.abs()) * 4e-16;
    assert!(ulp_close(again_text.rms_norm_eps, config.rms_norm_eps));
    let shape = |c: &crate::ModelConfig| {
        (
            c.family.clone(),
            c.model_type.clone(),
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.tie_word_embeddings,
        )
    };
    assert_eq!(
        shape(&again),
        shape(&config),
        "config changed on a round trip"
    );
    assert_eq!(
        shape(&again_text),
        shape(&config),
        "config changed on a round trip"
    );
    assert_eq!(
        again.declare().map(|a| a.params).ok(),
        Some(arch.params),
        "the parameters changed on a config round trip"
    );
}

/// A GGUF file: the container checks, then the family's config and every tensor renamed and
/// de-quantised.
pub fn gguf(data: &[u8]) {
    kiln_formats::fuzz::gguf(data);
    let Ok(file) = GgufFile::parse(data.to_vec(), Path::new("fuzz.gguf")) else {
        return;
    };
    if let Ok((family, config)) = gguf::read_config(&file)
        && let Ok(tensors) = gguf::hf_tensors(&file, family, &config)
    {
        for (name, t) in &tensors {
            let n: usize = t.shape.iter().product();
            assert_eq!(n, t.data.len(), "tensor {name}: shape and data disagree");
        }
    }
}
