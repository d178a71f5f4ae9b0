//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz), here so that `cargo test` replays the
//! kept inputs (`fuzz/regressions/<target>/`, `fuzz/seeds/<target>/`) through the same code on
//! stable Rust. Each takes the bytes of one hostile file, runs it through the reader kiln uses for
//! that file and on through what kiln does next with the result, and checks what must hold of
//! anything a reader accepts. Errors are fine; a panic, an abort or an allocation the input's
//! size does not justify is a finding.

use crate::{gguf::GgufFile, hf, safetensors_io};
use kiln_data::jsonl::{self, Encoding};
use kiln_data::{ChatTemplate, Message, Tokenizer};
use std::path::Path;

/// A target's body: the bytes of one file.
pub type Target = fn(&[u8]);

/// The targets, by the names of their directories under `fuzz/`.
pub const TARGETS: [(&str, Target); 6] = [
    ("config_yaml", config_yaml),
    ("safetensors", safetensors),
    ("hf_json", hf_json),
    ("gguf", gguf),
    ("jsonl", jsonl),
    ("tokenizer_json", tokenizer_json),
];

/// A run's YAML config. Whatever parses and validates must write back to YAML that parses to the
/// same config (kiln writes the resolved config into every run directory and resumes from it).
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = kiln_config::Config::from_yaml_str(text, "fuzz.yaml") else {
        return;
    };
    let yaml = config.to_yaml();
    let again = kiln_config::Config::from_yaml_str(&yaml, "written.yaml")
        .unwrap_or_else(|e| panic!("kiln's own YAML does not read back: {e}\n{yaml}"));
    assert_eq!(
        again.to_yaml(),
        yaml,
        "the config changed on a write/read round trip"
    );
}

/// A safetensors file (weights, checkpoints, PEFT adapters).
pub fn safetensors(data: &[u8]) {
    let Ok(tensors) = safetensors_io::parse(data, Path::new("fuzz.safetensors")) else {
        return;
    };
    for (name, t) in &tensors {
        let n: usize = t.shape.iter().product();
        assert_eq!(n, t.data.len(), "tensor {name}: shape and data disagree");
    }
}

/// `model.safetensors.index.json` of a Hugging Face model directory (what `config.json` means is
/// the model families', fuzzed through `kiln_models::fuzz::hf_json`).
pub fn hf_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(files) = hf::parse_index(text, Path::new("model.safetensors.index.json")) {
        for f in files {
            assert!(
                !f.is_empty() && !f.contains('/') && !f.contains('\\') && !f.starts_with('.'),
                "index names a file outside the directory: {f}"
            );
        }
    }
}

/// A GGUF file: header, metadata, tensor infos, then what loading does with them: every tensor
/// de-quantised, the tokenizer rebuilt and used, the chat template rendered.
pub fn gguf(data: &[u8]) {
    let Ok(file) = GgufFile::parse(data.to_vec(), Path::new("fuzz.gguf")) else {
        return;
    };
    for t in &file.tensors {
        assert!(
            t.offset + t.n_bytes <= data.len(),
            "tensor {} lies past the end",
            t.name
        );
        let elements: u64 = t.dims.iter().product();
        assert_eq!(
            file.dequantize(t).len() as u64,
            elements,
            "tensor {} de-quantises to the wrong length",
            t.name
        );
    }
    if let Ok(json) = file.tokenizer_json()
        && let Ok(tok) = Tokenizer::from_hf_json(&json.to_string(), Path::new("fuzz.gguf"))
    {
        use_tokenizer(&tok);
    }
    if let Some(source) = file.chat_template() {
        let template = ChatTemplate {
            source,
            bos_token: String::new(),
            eos_token: String::new(),
            kwargs: Default::default(),
        };
        let _ = template.render(&[Message::new("user", "Hi")], true);
    }
}

const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A JSONL data file (text, prompt/completion or chat records), tokenized with a chat template,
/// truncated, masked, then batched both padded and packed.
pub fn jsonl(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Every character of the input is in the vocabulary, so records fail only on their structure.
    let mut alphabet: String = text.chars().collect();
    alphabet.push_str(SMOL_TEMPLATE);
    alphabet.push_str("0123456789");
    let tokenizer = Tokenizer::Char(kiln_data::CharTokenizer::from_text(&alphabet));
    let template = ChatTemplate {
        source: SMOL_TEMPLATE.into(),
        bos_token: "<|im_start|>".into(),
        eos_token: "<|im_end|>".into(),
        kwargs: Default::default(),
    };
    for (mask_prompt, chat_template) in [(true, Some(&template)), (false, None)] {
        let enc = Encoding {
            tokenizer: &tokenizer,
            chat_template,
            eos_id: Some(0),
            mask_prompt,
            max_seq_len: 64,
        };
        let Ok((_, split)) = jsonl::parse_split(text, Path::new("fuzz.jsonl"), None, &enc) else {
            continue;
        };
        for e in &split.examples {
            assert_eq!(e.ids.len(), e.trained.len());
            assert!(e.ids.len() >= 2 && e.ids.len() <= enc.max_seq_len + 1);
        }
        if split.examples.is_empty() {
            continue;
        }
        for b in jsonl::sequential_batches(&split, 3, 0) {
            assert_eq!(b.inputs.len(), b.batch_size * b.seq_len);
        }
        let b = jsonl::train_batch(&split, 7, 2, 3, 0);
        assert_eq!(b.inputs.len(), 3 * b.seq_len);
        let b = jsonl::packed_train_batch(&split, 7, 2, 2, 16, 0);
        assert_eq!(b.inputs.len(), 2 * 16);
    }
}

/// A Hugging Face `tokenizer.json`, then used to encode and decode.
pub fn tokenizer_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tok) = Tokenizer::from_hf_json(text, Path::new("tokenizer.json")) {
        use_tokenizer(&tok);
    }
}

fn use_tokenizer(tok: &Tokenizer) {
    for sample in [
        "Hello, world! 1987",
        "<|im_start|>user\nHi<|im_end|>",
        "",
        " \u{e9}\u{1F600}",
    ] {
        if let Ok(ids) = tok.encode(sample) {
            let _ = tok.decode(&ids);
        }
    }
    let n = tok.vocab_size() as u32;
    let _ = tok.decode(&[0, n.saturating_sub(1), n, n.saturating_add(7), u32::MAX]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The package directory: cargo's at run time (a build cache shared between checkouts may
    /// hold a binary compiled elsewhere), the compile-time one otherwise.
    fn package_dir() -> PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
    }

    fn seed(target: &str, name: &str) -> Vec<u8> {
        let path = package_dir()
            .join("../../fuzz/seeds")
            .join(target)
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The seeds are valid files, so the fuzzer starts past the readers' first checks.
    #[test]
    fn seeds_are_accepted_by_the_readers() {
        let g = GgufFile::parse(seed("gguf", "tokenizer.gguf"), Path::new("t.gguf")).unwrap();
        assert_eq!(g.tensors.len(), 11);
        let json = g.tokenizer_json().unwrap().to_string();
        let tok = Tokenizer::from_hf_json(&json, Path::new("t.gguf")).unwrap();
        assert_eq!(tok.encode("Hi").unwrap(), vec![5]);
        assert!(g.chat_template().is_some());
        // SentencePiece: a space in front of the text and after a special token; bytes for
        // what no piece covers.
        let g = GgufFile::parse(seed("gguf", "spm-tokenizer.gguf"), Path::new("s.gguf")).unwrap();
        let json = g.tokenizer_json().unwrap().to_string();
        let tok = Tokenizer::from_hf_json(&json, Path::new("s.gguf")).unwrap();
        assert_eq!(tok.encode("Hi").unwrap(), vec![8]);
        assert_eq!(tok.encode("<|user|>Hi\n").unwrap(), vec![9, 8, 3]);
        assert_eq!(tok.decode(&[8, 3]).unwrap(), "Hi\n");
        let st = safetensors_io::parse(&seed("safetensors", "f32.safetensors"), Path::new("s"));
        assert_eq!(st.unwrap()["a"].shape, vec![2, 3]);
        let text = String::from_utf8(seed("hf_json", "index.json")).unwrap();
        assert_eq!(hf::parse_index(&text, Path::new("i")).unwrap().len(), 3);
        let text = String::from_utf8(seed("tokenizer_json", "bpe.json")).unwrap();
        assert!(Tokenizer::from_hf_json(&text, Path::new("t")).is_ok());
        for name in ["shakespeare-char.yaml", "smollm2-lora.yaml", "minimal.yaml"] {
            let text = String::from_utf8(seed("config_yaml", name)).unwrap();
            kiln_config::Config::from_yaml_str(&text, name).unwrap();
        }
    }

    /// The pre-tokenizers of Qwen2/Qwen3 (`qwen2`: digits one by one) and Llama 3 (`llama-bpe`:
    /// up to three together) rebuilt from GGUF metadata split as their tokenizer.json does.
    #[test]
    fn gguf_qwen2_and_llama3_pre_tokenizers_split_digits_as_their_tokenizers_do() {
        use crate::gguf::Value;
        let mut g = GgufFile::parse(seed("gguf", "tokenizer.gguf"), Path::new("t.gguf")).unwrap();
        let strings =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::Str(s.to_string())).collect());
        let tokens = [
            "<|im_start|>",
            "<|im_end|>",
            "H",
            "i",
            "Ġ",
            "Hi",
            "1",
            "9",
            "19",
        ];
        g.metadata
            .insert("tokenizer.ggml.tokens".into(), strings(&tokens));
        g.metadata.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array([3, 3, 1, 1, 1, 1, 1, 1, 1].map(Value::U64).to_vec()),
        );
        g.metadata
            .insert("tokenizer.ggml.merges".into(), strings(&["H i", "1 9"]));
        let encode = |g: &GgufFile, pre: &str, text: &str| {
            let mut g2 =
                GgufFile::parse(seed("gguf", "tokenizer.gguf"), Path::new("t.gguf")).unwrap();
            g2.metadata = g.metadata.clone();
            g2.metadata
                .insert("tokenizer.ggml.pre".into(), Value::Str(pre.into()));
            let json = g2.tokenizer_json().unwrap().to_string();
            Tokenizer::from_hf_json(&json, Path::new("t.gguf"))
                .unwrap()
                .encode(text)
                .unwrap()
        };
        assert_eq!(encode(&g, "qwen2", "Hi 19"), vec![5, 4, 6, 7]);
        assert_eq!(encode(&g, "llama-bpe", "Hi 19"), vec![5, 4, 8]);
        assert_eq!(encode(&g, "qwen2", " Hi"), vec![4, 5]);
    }

    /// Replays every kept input (crashes found and fixed, and the seed corpora) through its target.
    #[test]
    fn fuzz_inputs_replay_without_panics() {
        let root = package_dir().join("../../fuzz");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            for kind in ["regressions", "seeds"] {
                let dir = root.join(kind).join(name);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let bytes = std::fs::read(entry.path()).unwrap();
                    let path = entry.path();
                    let outcome = std::panic::catch_unwind(|| target(&bytes));
                    assert!(
                        outcome.is_ok(),
                        "{} panics in target {name}",
                        path.display()
                    );
                    replayed += 1;
                }
            }
        }
        assert!(
            replayed > 0,
            "no fuzz inputs found under {}",
            root.display()
        );
    }
}
