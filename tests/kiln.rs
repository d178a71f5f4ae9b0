//! End-to-end tests of kiln, in one test binary (each test binary links all of Burn).
//! Models are tiny so the suite stays fast on two cores.

use kiln::config::Config;
use kiln::models::layers::rope::{Rope, RopeScaling};
use kiln::train::{TrainOptions, train};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository: cargo's package directory at run time (a build cache shared between
/// checkouts may hold a binary compiled in another), the compile-time one otherwise.
fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A scratch directory with a small slice of the shipped corpus in it.
fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("kiln-{name}-"))
        .tempdir()
        .unwrap();
    let text = std::fs::read_to_string(repo().join("datasets/shakespeare/input.txt")).unwrap();
    let cut = text
        .char_indices()
        .nth(40_000)
        .map(|(i, _)| i)
        .unwrap_or(text.len());
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, &text[..cut]).unwrap();
    (dir, corpus)
}

/// A tiny Llama (2 layers, width 32, grouped-query attention) on a char corpus.
fn tiny_yaml(out: &Path, corpus: &Path, name: &str, extra: &str) -> String {
    format!(
        r#"
run: {{ name: {name}, seed: 7, output_dir: "{out}" }}
backend: {{ kind: cpu }}
model:
  hidden_size: 32
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  intermediate_size: 64
  max_position_embeddings: 32
data:
  train: "{corpus}"
  seq_len: 16
optim:
  lr: 3.0e-3
  schedule: {{ kind: cosine, warmup_steps: 5, min_lr: 1.0e-4 }}
train:
  max_steps: 40
  batch_size: 8
  eval_every: 20
  eval_batches: 4
  save_every: 20
logging:
  log_every: 5
  histograms_every: 20
{extra}
"#,
        out = out.display(),
        corpus = corpus.display()
    )
}

fn tiny_config(out: &Path, corpus: &Path, name: &str, overrides: &[&str]) -> Config {
    let yaml = tiny_yaml(out, corpus, name, "");
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_yaml_str(&yaml, "tiny.yaml")
        .unwrap()
        .with_overrides(&overrides)
        .unwrap()
}

/// Writes the tiny config with `overrides` applied to `<dir>/<name>.yaml` (for CLI runs).
fn write_tiny_config(
    dir: &Path,
    out: &Path,
    corpus: &Path,
    name: &str,
    overrides: &[&str],
) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, tiny_config(out, corpus, name, overrides).to_yaml()).unwrap();
    path
}

// `mpirun` runs: built with `--features mpi` (scripts/test does where MPI is installed).
#[cfg(feature = "mpi")]
#[path = "kiln/mpi.rs"]
mod mpi;

fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        ..Default::default()
    }
}

/// A command's stdout then stderr, for assertion messages.
fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

#[test]
fn config_mistakes_name_file_line_column_and_field_exit_2_and_write_nothing() {
    let (dir, corpus) = scratch("config");
    let out = dir.path().join("runs");
    let good = tiny_yaml(&out, &corpus, "bad", "");
    // (what, the line that replaces a good one, the line it replaces, what the error must name)
    let cases: Vec<(&str, &str, &str, Vec<&str>)> = vec![
        (
            "unknown key",
            "  batch_sise: 8",
            "  batch_size: 8",
            vec!["batch_sise", "train.batch_sise"],
        ),
        ("wrong type", "  lr: fast", "  lr: 3.0e-3", vec!["optim.lr"]),
        (
            "bad enum value",
            "  schedule: { kind: cosin, warmup_steps: 5, min_lr: 1.0e-4 }",
            "  schedule: { kind: cosine, warmup_steps: 5, min_lr: 1.0e-4 }",
            vec!["cosin", "optim.schedule.kind"],
        ),
    ];
    for (what, bad_line, good_line, needles) in cases {
        assert!(good.contains(good_line));
        let yaml = good.replace(good_line, bad_line);
        let path = dir.path().join(format!("{}.yaml", what.replace(' ', "-")));
        std::fs::write(&path, &yaml).unwrap();
        let r = kiln(&["train", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{what}: {err}");
        let line = yaml.lines().position(|l| l == bad_line).unwrap() + 1;
        let loc = format!("{}:{line}:", path.display());
        assert!(err.contains(&loc), "{what}: expected `{loc}` in: {err}");
        for n in needles {
            assert!(err.contains(n), "{what}: expected `{n}` in: {err}");
        }
        assert!(!out.exists(), "{what}: a failed config must write nothing");
    }
    // A missing config file, and a missing data file named by the config.
    let r = kiln(&["train", "no/such/config.yaml"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("no/such/config.yaml"));
    let path = dir.path().join("missing-data.yaml");
    std::fs::write(
        &path,
        good.replace(corpus.to_str().unwrap(), "/no/such/corpus.txt"),
    )
    .unwrap();
    let r = kiln(&["train", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("data.train") && err.contains("/no/such/corpus.txt"),
        "{err}"
    );
    // A bad --set names the override.
    std::fs::write(&path, &good).unwrap();
    let r = kiln(&["train", path.to_str().unwrap(), "--set", "optim.nope=1"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("optim.nope"), "{err}");
    assert!(!out.exists());
}

#[test]
fn cli_trains_on_cpu_then_generates_and_evaluates() {
    let (dir, corpus) = scratch("cli");
    let out = dir.path().join("runs");
    let path = dir.path().join("tiny.yaml");
    std::fs::write(&path, tiny_yaml(&out, &corpus, "cli", "")).unwrap();
    let r = kiln(&[
        "train",
        path.to_str().unwrap(),
        "--set",
        "train.max_steps=300",
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(stdout.contains("device: cpu"), "{stdout}");

    let run = out.join("cli");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("latest/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 300);
    let val = state["last_val_loss"].as_f64().unwrap();
    // A uniform guess over ~60 characters costs ln(60) ≈ 4.1 nats; 300 steps must learn more than letter frequencies (≈ 2.9 nats).
    assert!(val < 2.7, "validation loss {val} did not fall");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.json",
        "char_tokenizer.json",
        "kiln.yaml",
    ] {
        assert!(run.join("latest").join(f).is_file(), "missing {f}");
    }
    assert!(run.join("best").join("model.safetensors").is_file());
    // keep_last = 2: steps 280 and 300 remain, and the best if it is older.
    let steps: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert!(
        steps.len() <= 3 && steps.contains(&"step-0000300".to_string()),
        "{steps:?}"
    );

    let r = kiln(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        "ROMEO:\n",
        "--max-tokens",
        "80",
        "--seed",
        "3",
        "--backend",
        "cpu",
    ]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        text.starts_with("ROMEO:\n") && text.chars().count() >= 80,
        "{text}"
    );

    let r = kiln(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        corpus.to_str().unwrap(),
        "--json",
        "--backend",
        "cpu",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
    assert_eq!(v["tokens"].as_u64().unwrap(), 40_000 - 1);
    assert!(loss < 2.7, "{loss}");

    // Training into a run directory that has checkpoints, without --resume, is refused as an
    // argument mistake (exit 2); so is --stop-after at a step the run has passed.
    let r = kiln(&["train", path.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--resume"));
    let r = kiln(&[
        "train",
        path.to_str().unwrap(),
        "--set",
        "train.max_steps=300",
        "--resume",
        "--stop-after",
        "1",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("is already at step 300"), "{err}");
}

#[test]
fn resume_reproduces_an_uninterrupted_run_bit_for_bit_on_cpu() {
    let (dir, corpus) = scratch("resume");
    let out = dir.path().join("runs");
    // Every family, from scratch: its config.json, parameters and optimizer state round-trip.
    for arch in ["llama", "qwen3", "gemma3", "phi3", "smollm3"] {
        let architecture = format!("model.architecture={arch}");
        // Dropout and accumulation on, so both must replay exactly.
        let common = [
            "model.dropout=0.1",
            "train.grad_accum=2",
            "train.max_steps=12",
            "train.save_every=0",
            architecture.as_str(),
        ];
        let (full_name, split_name) = (format!("full-{arch}"), format!("split-{arch}"));
        let full = tiny_config(&out, &corpus, &full_name, &common);
        let a = train(&full, &quiet()).unwrap();
        assert_eq!(a.steps, 12);

        let split = tiny_config(&out, &corpus, &split_name, &common);
        let first = train(
            &split,
            &TrainOptions {
                stop_after: Some(5),
                ..quiet()
            },
        )
        .unwrap();
        assert_eq!(first.steps, 5);
        let b = train(
            &split,
            &TrainOptions {
                resume: true,
                ..quiet()
            },
        )
        .unwrap_or_else(|e| panic!("{arch}: resume: {e}"));
        assert_eq!(b.steps, 12);

        let bytes = |run: &str, file: &str| {
            std::fs::read(out.join(run).join("step-0000012").join(file)).unwrap()
        };
        assert!(
            bytes(&full_name, "model.safetensors") == bytes(&split_name, "model.safetensors"),
            "{arch}: weights after resume differ from the uninterrupted run"
        );
        assert!(
            bytes(&full_name, "optimizer.safetensors")
                == bytes(&split_name, "optimizer.safetensors")
        );
        assert_eq!(a.final_val_loss, b.final_val_loss, "{arch}");
    }
}

#[test]
fn tensorboard_reader_finds_every_logged_scalar() {
    let (dir, corpus) = scratch("tb");
    let out = dir.path().join("runs");
    let config = tiny_config(
        &out,
        &corpus,
        "tb",
        &[
            // A byte-level BPE trained on the corpus, so that path runs end to end too.
            "data.tokenizer.kind=bpe",
            "data.tokenizer.vocab_size=300",
            "train.max_steps=12",
            "logging.log_every=4",
            "train.eval_every=6",
            "logging.histograms_every=6",
        ],
    );
    let summary = train(&config, &quiet()).unwrap();
    let logdir = summary.event_file.unwrap().parent().unwrap().to_path_buf();
    let r = Command::new("python3")
        .arg(repo().join("tests/read_events.py"))
        .arg(&logdir)
        .output()
        .expect("python3 is needed to read event files with TensorBoard");
    assert!(
        r.status.success(),
        "TensorBoard's reader failed (pip install tensorboard): {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let steps = |kind: &str, tag: &str| -> Vec<u64> {
        v[kind][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {kind} `{tag}` in {v}"))
            .iter()
            .map(|e| {
                if e.is_array() {
                    e[0].as_u64().unwrap()
                } else {
                    e.as_u64().unwrap()
                }
            })
            .collect()
    };
    for tag in [
        "loss/train",
        "optim/lr",
        "optim/grad_norm",
        "system/tokens_per_s",
        "system/memory_bytes",
    ] {
        assert_eq!(steps("scalars", tag), vec![4, 8, 12], "{tag}");
    }
    assert_eq!(steps("scalars", "loss/val"), vec![6, 12]);
    assert_eq!(
        steps(
            "histograms",
            "weights/model.layers.0.self_attn.q_proj.weight"
        ),
        vec![6, 12]
    );
    // TensorBoard sorts the groups (the tags' prefixes) by name: the losses come first.
    let groups: std::collections::BTreeSet<&str> = v["scalars"]
        .as_object()
        .unwrap()
        .keys()
        .filter_map(|t| t.split('/').next())
        .collect();
    assert_eq!(
        groups.into_iter().collect::<Vec<_>>(),
        ["loss", "optim", "system"]
    );
    let losses = v["scalars"]["loss/train"].as_array().unwrap();
    assert!(losses.iter().all(|e| e[1].as_f64().unwrap().is_finite()));
    let text = v["text"]["config"][0].as_str().unwrap();
    assert!(text.contains("hidden_size: 32"), "{text}");
    let ckpt = summary.last_checkpoint.unwrap();
    let tokenizer = kiln::data::Tokenizer::load_dir(&ckpt).unwrap();
    assert!(ckpt.join("tokenizer.json").is_file() && tokenizer.vocab_size() <= 300);
}

/// Whether a software Vulkan adapter (lavapipe) is present; prints why `what` is skipped if not.
fn software_vulkan(what: &str) -> bool {
    let found = kiln::train::device::list_adapters()
        .into_iter()
        .any(|a| a.software);
    if !found {
        eprintln!(
            "SKIPPED {what}: no software Vulkan adapter (apt-get install mesa-vulkan-drivers)"
        );
    }
    found
}

/// The wgpu device on the software Vulkan adapter.
fn lavapipe() -> burn::tensor::Device {
    kiln::train::device::select(&kiln::config::BackendConfig {
        kind: kiln::config::BackendKind::Wgpu,
        adapter: kiln::config::AdapterChoice::Software,
        ..Default::default()
    })
    .unwrap()
    .device
}

#[test]
fn wgpu_on_lavapipe_matches_cpu() {
    if !software_vulkan("wgpu_on_lavapipe_matches_cpu") {
        return;
    }
    let (dir, corpus) = scratch("wgpu");
    let out = dir.path().join("runs");
    let small = [
        "model.num_hidden_layers=1",
        "train.max_steps=3",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.save_every=0",
        "logging.log_every=1",
        "logging.histograms_every=0",
    ];
    let cpu = train(&tiny_config(&out, &corpus, "cpu", &small), &quiet()).unwrap();
    let mut gpu_overrides = small.to_vec();
    gpu_overrides.extend(["backend.kind=wgpu", "backend.adapter=software"]);
    let gpu = train(&tiny_config(&out, &corpus, "gpu", &gpu_overrides), &quiet()).unwrap();
    // The run's device line names the compiler its kernels go through.
    assert!(
        gpu.device.starts_with("wgpu:") && gpu.device.ends_with("compiler: wgsl"),
        "{}",
        gpu.device
    );
    let (c, g) = (cpu.final_train_loss.unwrap(), gpu.final_train_loss.unwrap());
    // f32 on both; summation order differs between kernels, so allow 1e-3 relative after 3 steps.
    assert!(
        (c - g).abs() <= 1e-3 * c.abs(),
        "cpu loss {c} vs wgpu loss {g}"
    );
    let (c, g) = (cpu.final_val_loss.unwrap(), gpu.final_val_loss.unwrap());
    assert!(
        (c - g).abs() <= 1e-3 * c.abs(),
        "cpu val {c} vs wgpu val {g}"
    );
    // Block recompute with dropout, and with LoRA, on the wgpu backend.
    check_recompute_gradients(&lavapipe(), &[(Some(2), 7)], &[false]);
}

/// On the GPU backends the training step is captured once and replayed (`kiln_train::replay`):
/// replayed steps equal eager steps bit for bit over 20 steps, weights and AdamW's moments,
/// from scratch (two micro-batches a step, gradient clipping) and with LoRA on a pretrained
/// directory, on plain and on packed rows, with a shape change (evaluation) in between.
#[test]
fn replayed_steps_equal_eager_steps_on_lavapipe() {
    if !software_vulkan("replayed_steps_equal_eager_steps_on_lavapipe") {
        return;
    }
    let (dir, corpus) = scratch("replay");
    let out = dir.path().join("runs");
    let base = train(
        &tiny_config(&out, &corpus, "base", &["train.max_steps=2"]),
        &quiet(),
    )
    .unwrap();
    let pretrained = format!(
        "model.pretrained={}",
        base.last_checkpoint.unwrap().display()
    );
    let common = [
        "backend.kind=wgpu",
        "backend.adapter=software",
        "train.max_steps=20",
        "train.eval_every=10",
        "train.eval_batches=1",
        "train.save_every=0",
        "logging.log_every=7",
        "logging.histograms_every=0",
        "optim.grad_clip=0.5",
    ];
    // Short examples packed into rows: each step's rotary tables and key runs differ, and are
    // refilled in place too.
    let examples = dir.path().join("examples");
    std::fs::create_dir_all(&examples).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&corpus)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(600)
        .map(|l| serde_json::json!({ "text": l }).to_string())
        .collect();
    let (train_lines, valid_lines) = lines.split_at(500);
    std::fs::write(examples.join("train.jsonl"), train_lines.join("\n")).unwrap();
    std::fs::write(examples.join("valid.jsonl"), valid_lines.join("\n")).unwrap();
    let packed = format!("data.train={}", examples.display());
    let lora = [
        pretrained.as_str(),
        "finetune.lora.rank=4",
        "finetune.lora.dropout=0.0",
    ];
    for (what, extra) in [
        ("scratch", vec!["train.grad_accum=2"]),
        ("lora", lora.to_vec()),
        (
            "packed-lora",
            [&lora[..], &[packed.as_str(), "data.pack=true"]].concat(),
        ),
    ] {
        let run = |capture: bool| {
            let mut o: Vec<&str> = common
                .iter()
                .copied()
                .chain(extra.iter().copied())
                .collect();
            let flag = format!("backend.capture={capture}");
            o.push(&flag);
            let name = format!("{what}-{capture}");
            train(&tiny_config(&out, &corpus, &name, &o), &quiet()).unwrap()
        };
        let (eager, replayed) = (run(false), run(true));
        assert_eq!(eager.replayed_steps, 0, "{what}");
        // One eager step, three warm ones, then the capture: 16 of 20 replayed.
        assert_eq!(replayed.replayed_steps, 16, "{what}");
        let (e, r) = (
            eager.last_checkpoint.unwrap(),
            replayed.last_checkpoint.unwrap(),
        );
        let mut compared = 0;
        for entry in std::fs::read_dir(&e).unwrap() {
            let name = entry.unwrap().file_name();
            if !name.to_string_lossy().ends_with(".safetensors") {
                continue;
            }
            let a = std::fs::read(e.join(&name)).unwrap();
            let b = std::fs::read(r.join(&name)).unwrap();
            assert!(
                a == b,
                "{what}: {name:?} differs between eager and replayed steps"
            );
            compared += 1;
        }
        // The weights (or adapter) and the optimizer's moments.
        assert!(
            compared >= 2,
            "{what}: compared {compared} files in {}",
            e.display()
        );
        assert_eq!(eager.final_train_loss, replayed.final_train_loss, "{what}");
        assert_eq!(eager.final_val_loss, replayed.final_val_loss, "{what}");
    }
}

/// Values of `n` pseudo-random floats in [-scale, scale).
fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = kiln::data::Rng::stream(seed, 23, 0);
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * scale)
        .collect()
}

/// Each fused operation against the same formula composed of Burn's tensor operations, on
/// `device`: the output, and the gradients of `sum(output × r)` for a random `r` with respect to
/// every input that takes one.
fn check_fused_ops(device: &burn::tensor::Device, what: &str) {
    use burn::prelude::*;
    use kiln::models::fused::{self, reference};
    let dev = device.clone().autodiff();
    let leaf = |dims: &[usize], seed: u64, scale: f32| {
        let n = dims.iter().product();
        Tensor::<1>::from_data(TensorData::new(noise(n, seed, scale), [n]), &dev)
    };
    // Within `tol` of the larger of 1 and the reference's largest magnitude (`relative`: of that
    // magnitude alone).
    let close_within = |tol: f32, relative: bool, name: &str, a: Tensor<1>, b: Tensor<1>| {
        let (a, b) = (
            a.into_data().try_to_vec::<f32>().unwrap(),
            b.into_data().try_to_vec::<f32>().unwrap(),
        );
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let scale = if relative { scale } else { scale.max(1.0) };
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err <= tol * scale,
            "{what} {name}: max difference {err} (scale {scale})"
        );
    };
    let close = |name: &str, a: Tensor<1>, b: Tensor<1>| close_within(2e-5, false, name, a, b);
    // Runs `f` on fresh leaves built from `inputs` (dims, seed, scale), returns the output and the
    // gradient of each input.
    let run = |inputs: &[(&[usize], u64, f32)], f: &dyn Fn(Vec<Tensor<1>>) -> Tensor<1>| {
        let leaves: Vec<Tensor<1>> = inputs
            .iter()
            .map(|(d, s, k)| leaf(d, *s, *k).require_grad())
            .collect();
        let out = f(leaves.clone());
        let r = Tensor::<1>::from_data(
            TensorData::new(noise(out.dims()[0], 99, 1.0), [out.dims()[0]]),
            &dev,
        );
        let grads = (out.clone() * r).sum().backward();
        let g: Vec<Tensor<1>> = leaves
            .iter()
            .map(|l| Tensor::from_inner(l.grad(&grads).expect("a gradient")))
            .collect();
        (out.detach(), g)
    };
    let compare_within = |tol: Option<f32>,
                          name: &str,
                          inputs: &[(&[usize], u64, f32)],
                          fused: &dyn Fn(Vec<Tensor<1>>) -> Tensor<1>,
                          composed: &dyn Fn(Vec<Tensor<1>>) -> Tensor<1>| {
        let (a, ga) = run(inputs, fused);
        let (b, gb) = run(inputs, composed);
        let close = |name: &str, a, b| match tol {
            Some(tol) => close_within(tol, true, name, a, b),
            None => close(name, a, b),
        };
        close(name, a, b);
        for (i, (x, y)) in ga.into_iter().zip(gb).enumerate() {
            close(&format!("{name} gradient {i}"), x, y);
        }
    };
    let compare = |name: &str,
                   inputs: &[(&[usize], u64, f32)],
                   fused: &dyn Fn(Vec<Tensor<1>>) -> Tensor<1>,
                   composed: &dyn Fn(Vec<Tensor<1>>) -> Tensor<1>| {
        compare_within(None, name, inputs, fused, composed)
    };
    let (n, d) = (37, 40);
    let nd: &[usize] = &[n, d];
    let flat = |t: Tensor<2>| t.reshape([n * d]);
    compare(
        "rms_norm",
        &[(nd, 1, 2.0), (&[d], 2, 1.0)],
        &|v| {
            flat(fused::rms_norm(
                v[0].clone().reshape([n, d]),
                v[1].clone(),
                1e-5,
            ))
        },
        &|v| {
            flat(reference::rms_norm(
                v[0].clone().reshape([n, d]),
                v[1].clone(),
                1e-5,
            ))
        },
    );
    compare(
        "swiglu",
        &[(nd, 3, 6.0), (nd, 4, 2.0)],
        &|v| {
            flat(fused::swiglu(
                v[0].clone().reshape([n, d]),
                v[1].clone().reshape([n, d]),
            ))
        },
        &|v| {
            flat(reference::swiglu(
                v[0].clone().reshape([n, d]),
                v[1].clone().reshape([n, d]),
            ))
        },
    );
    // Attention: per-sequence masks (packed rows) and one shared mask.
    let (b, h, s) = (2, 3, 9);
    for bias_batch in [1, b] {
        let mask: Vec<f32> = (0..bias_batch * s * s)
            .map(|i| {
                let (q, k) = ((i / s) % s, i % s);
                if k > q || (i / (s * s) == 1 && k + 3 < q) {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [bias_batch, 1, s, s]), &dev);
        let m2 = mask.clone();
        compare(
            &format!("softmax_bias ({bias_batch} masks)"),
            &[(&[b, h, s, s], 5, 4.0)],
            &move |v| {
                fused::softmax_bias(v[0].clone().reshape([b, h, s, s]), mask.clone())
                    .reshape([b * h * s * s])
            },
            &move |v| {
                reference::softmax_bias(v[0].clone().reshape([b, h, s, s]), m2.clone())
                    .reshape([b * h * s * s])
            },
        );
    }
    let hd = 8;
    for table_batch in [1, b] {
        let angles: Vec<f32> = (0..table_batch * s * hd)
            .map(|i| ((i / hd) % s + i / (s * hd) * 2) as f32 / (1 + i % (hd / 2)) as f32)
            .collect();
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = angles.iter().map(|a| f(*a)).collect();
            Tensor::<3>::from_data(TensorData::new(v, [table_batch, s, hd]), &dev)
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let (c2, s2) = (cos.clone(), sin.clone());
        compare(
            &format!("rope ({table_batch} tables)"),
            &[(&[b, s, h, hd], 6, 1.0)],
            &move |v| {
                fused::rope(
                    v[0].clone().reshape([b, s, h, hd]),
                    cos.clone(),
                    sin.clone(),
                )
                .reshape([b * s * h * hd])
            },
            &move |v| {
                reference::rope(v[0].clone().reshape([b, s, h, hd]), c2.clone(), s2.clone())
                    .reshape([b * s * h * hd])
            },
        );
    }
    let (rows, vocab) = (11, 53);
    let targets: Vec<i64> = (0..rows).map(|r| ((r * 17 + 3) % vocab) as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [rows]), &device.clone());
    let weights: Vec<f32> = (0..rows)
        .map(|r| if r % 4 == 2 { 0.0 } else { 1.0 })
        .collect();
    let weights = Tensor::<1>::from_data(TensorData::new(weights, [rows]), &device.clone());
    let (t2, w2) = (targets.clone(), weights.clone());
    compare(
        "cross_entropy",
        &[(&[rows, vocab], 7, 8.0)],
        &move |v| {
            fused::cross_entropy(
                v[0].clone().reshape([rows, vocab]),
                targets.clone(),
                weights.clone(),
            )
        },
        &move |v| {
            reference::cross_entropy(v[0].clone().reshape([rows, vocab]), t2.clone(), w2.clone())
        },
    );
    // AdamW, applied and skipped (a non-finite step keeps parameter and moments).
    let n = 1000;
    let t1 = |seed: u64, scale: f32| {
        Tensor::<1>::from_data(TensorData::new(noise(n, seed, scale), [n]), &device.clone())
    };
    let (p, m, g) = (t1(20, 1.0), t1(21, 0.1), t1(22, 1.0));
    let v = t1(23, 0.01).abs();
    // The global gradient norm (a kernel a gradient on the GPU): sizes below, at and past one
    // cube's chunk of 2048 values.
    let grads: Vec<Tensor<1>> = [(7, 1.0), (2048, 0.5), (5000, 2.0), (1, 3.0)]
        .into_iter()
        .enumerate()
        .map(|(i, (len, scale))| {
            Tensor::<1>::from_data(
                TensorData::new(noise(len, 40 + i as u64, scale), [len]),
                &device.clone(),
            )
        })
        .collect();
    let want = grads
        .iter()
        .map(|g| g.clone().square().sum())
        .reduce(|a, b| a + b)
        .unwrap()
        .sqrt();
    close_within(
        1e-5,
        true,
        "global_norm",
        fused::global_norm(grads).unwrap(),
        want,
    );
    let clip = Tensor::<1>::from_data(TensorData::new(vec![0.5f32], [1]), &device.clone());
    // Attention in tiles against attention over materialised scores (kiln's path under
    // attention dropout), values and gradients within 1e-5 relative: causal, GQA 9/3 and 4/1,
    // packed rows, a sliding window, a soft-cap, odd lengths over several 64-row tiles, and
    // new queries after cached keys.
    {
        use kiln::models::layers::attention::materialised;
        use kiln::models::layers::{ForwardConsts, Positions};
        let segments: Vec<u32> = (0..2 * 131u32)
            .map(|i| match (i / 131, i % 131) {
                (0, p) => (p >= 40) as u32 + (p >= 100) as u32,
                (_, p) => 10 + (p >= 7) as u32,
            })
            .collect();
        // (name, batch, heads, kv heads, queries, cached keys, window, packed, soft-cap)
        type Case<'a> = (
            &'a str,
            usize,
            usize,
            usize,
            usize,
            usize,
            Option<usize>,
            bool,
            Option<f64>,
        );
        let cases: [Case; 6] = [
            ("causal 9/3", 1, 9, 3, 131, 0, None, false, None),
            ("causal 4/1, batch 2", 2, 4, 1, 70, 0, None, false, None),
            ("packed 9/3", 2, 9, 3, 131, 0, None, true, None),
            (
                "sliding window 33, 4/1",
                1,
                4,
                1,
                131,
                0,
                Some(33),
                false,
                None,
            ),
            ("soft-cap 0.8", 1, 2, 2, 67, 0, None, false, Some(0.8)),
            (
                "after 50 cached keys, window 20",
                1,
                4,
                2,
                9,
                50,
                Some(20),
                false,
                None,
            ),
        ];
        for (name, batch, heads, kv, s, cached, window, packed, softcap) in cases {
            let hd = 16;
            let at = match (packed, cached) {
                (true, _) => Positions::Packed {
                    batch,
                    seq: s,
                    segments: &segments,
                },
                (false, 0) => Positions::Plain { batch, seq: s },
                (false, offset) => Positions::Cached { offset, n: s },
            };
            let consts =
                ForwardConsts::new(&[], &[window], at, burn::tensor::FloatDType::F32, &dev);
            let runs = consts.runs(window);
            let t = runs.first.dims()[1] + cached.min(window.map_or(cached, |w| w - 1));
            let p = fused::AttentionParams {
                scale: 0.7 / (hd as f64).sqrt(),
                softcap,
            };
            let inputs: [(&[usize], u64, f32); 3] = [
                (&[batch, s, heads, hd], 11, 2.0),
                (&[batch, t, kv, hd], 12, 2.0),
                (&[batch, t, kv, hd], 13, 1.0),
            ];
            let shaped = |v: &[Tensor<1>]| {
                (
                    v[0].clone().reshape([batch, s, heads, hd]),
                    v[1].clone().reshape([batch, t, kv, hd]),
                    v[2].clone().reshape([batch, t, kv, hd]),
                )
            };
            let n = batch * s * heads * hd;
            compare_within(
                Some(1e-5),
                &format!("attention, {name}"),
                &inputs,
                &|v| {
                    let (q, k, v) = shaped(&v);
                    fused::attention(q, k, v, runs.first.clone(), p).reshape([n])
                },
                &|v| {
                    let (q, k, v) = shaped(&v);
                    let bias = runs.bias(&dev);
                    materialised(q, k, v, bias, (p.scale, p.softcap), None).reshape([n])
                },
            );
        }
    }
    let h = fused::AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay: 0.9999,
        bc1: 1.0 - 0.9f32.powi(3),
        bc2: 1.0 - 0.95f32.powi(3),
    };
    let flag =
        |b: bool| Tensor::<1, Bool>::from_data(TensorData::new(vec![b], [1]), &device.clone());
    let rates = || Tensor::<1>::from_data(fused::adamw_rates(&h), &device.clone());
    let (p1, m1, v1) = fused::adamw(
        p.clone(),
        (m.clone(), v.clone()),
        g.clone(),
        clip.clone(),
        flag(true),
        rates(),
        h,
    );
    // Tensors nothing else holds: the GPU backends update them in their own buffers.
    let (p3, m3, v3) = fused::adamw(
        p.clone() * 1.0,
        (m.clone() * 1.0, v.clone() * 1.0),
        g.clone(),
        clip.clone(),
        flag(true),
        rates(),
        h,
    );
    let gc = g * clip.clone();
    let wm = m.clone() * 0.9 + gc.clone() * 0.1;
    let wv = v.clone() * 0.95 + gc.square() * 0.05;
    let wp = p.clone() * 0.9999
        - (wm.clone() / h.bc1 as f64) / ((wv.clone() / h.bc2 as f64).sqrt() + 1e-8) * 1e-3;
    close("adamw p", p1, wp.clone());
    close("adamw m", m1, wm.clone());
    close("adamw v", v1, wv.clone());
    close("adamw in place p", p3, wp);
    close("adamw in place m", m3, wm);
    close("adamw in place v", v3, wv);
    let (p2, m2, v2) = fused::adamw(
        p.clone(),
        (m.clone(), v.clone()),
        t1(24, f32::NAN),
        clip,
        flag(false),
        rates(),
        h,
    );
    for (name, a, b) in [("p", p2, p), ("m", m2, m), ("v", v2, v)] {
        assert_eq!(
            a.into_data(),
            b.into_data(),
            "{what} skipped adamw changed {name}"
        );
    }
}

/// The key runs attention takes equal the masks written from the rules themselves: causal,
/// within the window, and for packed rows within the same run of a segment id; plain, packed
/// (rows differing) and after cached keys (a windowed cache holds the last window - 1).
#[test]
fn key_runs_are_the_causal_packed_and_windowed_masks() {
    use kiln::models::layers::{ForwardConsts, Positions};
    let device = burn::tensor::Device::flex();
    let sees = |q: usize, k: usize, window: Option<usize>, segments: Option<&[u32]>| {
        k <= q
            && window.is_none_or(|w| q - k < w)
            && segments.is_none_or(|s| s[k..=q].iter().all(|&x| x == s[q]))
    };
    let mask_of = |at: Positions<'_>, window: Option<usize>| -> Vec<bool> {
        let consts = ForwardConsts::new(&[], &[window], at, burn::tensor::FloatDType::F32, &device);
        let bias = consts.runs(window).bias(&device);
        let values: Vec<f32> = bias.into_data().try_to_vec().unwrap();
        values.iter().map(|&b| b == 0.0).collect()
    };
    let segments: Vec<u32> = vec![0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 5, 5, 5, 6, 6, 6, 6, 6];
    let (batch, seq) = (2, 9);
    for window in [None, Some(3), Some(1)] {
        let want: Vec<bool> = (0..seq)
            .flat_map(|q| (0..seq).map(move |k| sees(q, k, window, None)))
            .collect();
        assert_eq!(
            mask_of(Positions::Plain { batch, seq }, window),
            want,
            "plain, window {window:?}"
        );
        let at = Positions::Packed {
            batch,
            seq,
            segments: &segments,
        };
        let want: Vec<bool> = (0..batch)
            .flat_map(|b| {
                let s = &segments[b * seq..(b + 1) * seq];
                (0..seq).flat_map(move |q| (0..seq).map(move |k| sees(q, k, window, Some(s))))
            })
            .collect();
        assert_eq!(mask_of(at, window), want, "packed, window {window:?}");
        let (offset, n) = (7, 3);
        let start = window.map_or(0, |w| offset - offset.min(w - 1));
        let keys = offset + n - start;
        let want: Vec<bool> = (0..n)
            .flat_map(|q| (0..keys).map(move |k| sees(offset + q, start + k, window, None)))
            .collect();
        assert_eq!(
            mask_of(Positions::Cached { offset, n }, window),
            want,
            "cached, window {window:?}"
        );
    }
}

#[test]
fn fused_ops_match_burn_compositions_in_values_and_gradients() {
    check_fused_ops(&burn::tensor::Device::flex(), "cpu");
    if !software_vulkan("the wgpu half") {
        return;
    }
    check_fused_ops(&lavapipe(), "wgpu");
}

/// Training in bf16 and f16 (f32 master weights) follows f32 training closely, writes f32
/// checkpoints, and a device without the type refuses it by name (bf16 in WGSL); f16 trains on
/// lavapipe too.
#[test]
fn half_precision_training_follows_f32_with_f32_master_weights() {
    let (dir, corpus) = scratch("dtype");
    let out = dir.path().join("runs");
    let run = |name: &str, extra: &[&str]| {
        let mut o = vec![
            "train.max_steps=6",
            "train.eval_every=0",
            "train.save_every=0",
            "logging.histograms_every=0",
        ];
        o.extend_from_slice(extra);
        train(&tiny_config(&out, &corpus, name, &o), &quiet())
    };
    // Every family: its norms, softmax and loss stay in f32 (Gemma's 1+w norms included).
    for arch in ["llama", "qwen3", "gemma3", "phi3", "smollm3"] {
        let architecture = format!("model.architecture={arch}");
        let f32_run = run(&format!("f32-{arch}"), &[&architecture]).unwrap();
        let reference = f32_run.final_train_loss.unwrap();
        for dtype in ["bf16", "f16"] {
            let r = run(
                &format!("{dtype}-{arch}"),
                &[&format!("train.dtype={dtype}"), &architecture],
            )
            .unwrap();
            let loss = r.final_train_loss.unwrap();
            assert!(
                (loss - reference).abs() <= 0.02 * reference,
                "{arch} {dtype}: loss {loss} against f32 {reference}"
            );
            let weights = r.last_checkpoint.unwrap().join("model.safetensors");
            let bytes = std::fs::read(&weights).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            for (name, t) in header.as_object().unwrap() {
                if name != "__metadata__" {
                    assert_eq!(
                        t["dtype"],
                        "F32",
                        "{dtype}: {name} in {}",
                        weights.display()
                    );
                }
            }
        }
    }
    if !software_vulkan("the wgpu half") {
        return;
    }
    let wgpu = ["backend.kind=wgpu", "backend.adapter=software"];
    let err = run("bf16-wgpu", &[wgpu[0], wgpu[1], "train.dtype=bf16"]).unwrap_err();
    assert!(err.to_string().contains("train.dtype: bf16"), "{err}");
    let r = run(
        "f16-wgpu",
        &[wgpu[0], wgpu[1], "train.dtype=f16", "train.max_steps=2"],
    )
    .unwrap();
    assert!(r.final_train_loss.unwrap().is_finite());
}

/// Loss and gradients of one micro-batch computed with `shape` (plain, chunked loss, block
/// recompute), with dropout `p` on blocks and `lora_p` on LoRA inputs.
fn grads_with(
    model: &kiln::models::Model,
    batch: &kiln::data::Batch,
    p: f64,
    lora_p: f64,
    shape: kiln::train::step::StepShape,
) -> (f32, std::collections::BTreeMap<String, Vec<f32>>) {
    let mut dropout = Some(kiln::models::Dropout {
        p,
        lora_p,
        rng: kiln::data::Rng::stream(3, 11, 0),
    });
    let mut grads = kiln::train::optim::GradAccumulator::default();
    let loss =
        kiln::train::step::forward_backward(model, batch, &mut dropout, shape, &mut grads, 0.5);
    (loss.into_scalar::<f32>(), grads.to_host())
}

/// A batch of random ids, with a loss mask that drops some positions, optionally packed.
fn random_batch(vocab: usize, batch: usize, seq: usize, packed: bool) -> kiln::data::Batch {
    let mut rng = kiln::data::Rng::stream(5, 1, 0);
    let mut ids = || {
        (0..batch * seq)
            .map(|_| rng.below(vocab as u64) as u32)
            .collect::<Vec<_>>()
    };
    let (inputs, targets) = (ids(), ids());
    kiln::data::Batch {
        batch_size: batch,
        seq_len: seq,
        inputs,
        targets,
        loss_mask: Some(
            (0..batch * seq)
                .map(|i| (i % 5 != 1) as u8 as f32)
                .collect(),
        ),
        segments: packed.then(|| (0..batch * seq).map(|i| ((i % seq) / 5) as u32).collect()),
        pairs: None,
    }
}

/// Compares every gradient of `b` with `a`: max |difference| relative to the largest |gradient|.
fn assert_grads_close(
    what: &str,
    a: &(f32, std::collections::BTreeMap<String, Vec<f32>>),
    b: &(f32, std::collections::BTreeMap<String, Vec<f32>>),
    tol: f32,
) {
    assert!(
        (a.0 - b.0).abs() <= tol * a.0.abs(),
        "{what}: loss {} vs {}",
        a.0,
        b.0
    );
    assert_eq!(
        a.1.keys().collect::<Vec<_>>(),
        b.1.keys().collect::<Vec<_>>(),
        "{what}: gradient sets differ"
    );
    for (name, ga) in &a.1 {
        let gb = &b.1[name];
        let scale = ga.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ga
            .iter()
            .zip(gb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.0, "{what}: {name} has a zero gradient");
        assert!(
            diff <= tol * scale,
            "{what}: {name} differs by {diff} (scale {scale})"
        );
    }
}

/// Block recompute and the chunked loss give the gradients of a plain backward on `device`:
/// from scratch with dropout (uneven spans; packed rows where `packed`), and LoRA with LoRA
/// dropout on a loaded model. `shapes`: (recompute every, loss chunk) pairs to compare.
fn check_recompute_gradients(
    device: &burn::tensor::Device,
    shapes: &[(Option<usize>, usize)],
    packed_rows: &[bool],
) {
    use kiln::train::step::StepShape;
    let device = device.clone().autodiff();
    let config = kiln::models::family::config_from_hf(
        serde_json::json!({
            "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": true,
        })
        .as_object()
        .unwrap(),
    )
    .unwrap()
    .declare()
    .unwrap();
    let model = kiln::models::Model::init(config, 0.02, 1, &device);
    let model = kiln::models::lora::set_trainable(model, &device, false);
    let plain = StepShape {
        recompute_every: None,
        loss_chunk: usize::MAX,
        dtype: burn::tensor::FloatDType::F32,
    };
    for &packed in packed_rows {
        let batch = random_batch(61, 3, 12, packed);
        let reference = grads_with(&model, &batch, 0.1, 0.0, plain);
        for &(every, chunk) in shapes {
            let shape = StepShape {
                recompute_every: every,
                loss_chunk: chunk,
                dtype: burn::tensor::FloatDType::F32,
            };
            let got = grads_with(&model, &batch, 0.1, 0.0, shape);
            assert_grads_close(
                &format!("{shape:?} packed={packed}"),
                &reference,
                &got,
                1e-5,
            );
        }
    }

    // LoRA on every linear of a loaded model, B non-zero so that A gets gradients too.
    let dir = repo().join("tests/fixtures/parity/llama-gqa-tied");
    let base = kiln::models::hf::load_model(&dir, &device.clone().without_autodiff()).unwrap();
    let vocab = base.config().vocab_size;
    // DoRA, so that its magnitudes and the dropout branch of its forward are checked too.
    let spec = kiln::models::lora::LoraSpec {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        dora: true,
        targets: base.arch().block_modules(),
        layers: (0..base.config().num_hidden_layers).collect(),
    };
    let model = kiln::models::lora::attach(base, &spec, 9);
    struct NonZeroB;
    impl kiln::models::ParamMapper for NonZeroB {
        fn map<const D: usize>(
            &mut self,
            _: &str,
            kind: kiln::models::ParamKind,
            p: burn::Tensor<D>,
        ) -> burn::Tensor<D> {
            match kind {
                kiln::models::ParamKind::LoraB => p.ones_like().mul_scalar(0.01),
                _ => p,
            }
        }
    }
    let model = model.map_params(&mut NonZeroB);
    let model = kiln::models::lora::set_trainable(model, &device, true);
    let batch = random_batch(vocab, 2, 10, false);
    let reference = grads_with(&model, &batch, 0.1, 0.1, plain);
    assert!(
        reference.1.keys().all(|k| k.contains("lora_")),
        "only adapters train"
    );
    for &(every, chunk) in shapes {
        let shape = StepShape {
            recompute_every: every,
            loss_chunk: chunk,
            dtype: burn::tensor::FloatDType::F32,
        };
        let got = grads_with(&model, &batch, 0.1, 0.1, shape);
        assert_grads_close(&format!("LoRA {shape:?}"), &reference, &got, 1e-5);
    }
    // Half precision (f16 with its loss scale; bf16 where the device has it), the base model
    // held in it, the adapters and their gradients f32: close to the f32 gradients, as close as
    // each type's precision allows: 11 significant bits for f16, which checks the mechanics
    // (casts, frozen base, loss scale) closely; 8 for bf16, whose rounding of the attention
    // scores alone moves this tiny random model's key gradients by about 12%.
    use burn::tensor::{DType, FloatDType};
    for (half, tolerance) in [(FloatDType::F16, 2e-2), (FloatDType::BF16, 2e-1)] {
        if !device.supports_dtype(DType::from(half)) {
            continue;
        }
        let frozen = kiln::train::step::frozen_to(model.clone(), half);
        assert_ne!(
            frozen.dtype(),
            FloatDType::F32,
            "the base is held in {half:?}"
        );
        let shape = StepShape {
            dtype: half,
            ..plain
        };
        let got = grads_with(&frozen, &batch, 0.1, 0.1, shape);
        assert_grads_close(&format!("LoRA in {half:?}"), &reference, &got, tolerance);
    }
}

#[test]
fn recompute_and_chunked_loss_match_plain_gradients_on_cpu() {
    check_recompute_gradients(
        &burn::tensor::Device::flex(),
        &[
            (None, 7),
            (Some(1), usize::MAX),
            (Some(2), 5),
            (Some(3), 36),
        ],
        &[false, true],
    );
}

/// Bytes from a size kiln prints (`85.3 MiB`).
/// Every family trains as Llama does: full-model gradients with block recompute, chunked loss
/// and packed rows equal a plain backward (dropout masks replayed), and LoRA on all of the
/// family's linear modules (Phi-3's fused ones included) gets gradients on the adapters only.
#[test]
fn every_family_recomputes_packs_and_adapts_like_a_plain_backward() {
    use kiln::train::step::StepShape;
    let device = burn::tensor::Device::flex().autodiff();
    let plain = StepShape {
        recompute_every: None,
        loss_chunk: usize::MAX,
        dtype: burn::tensor::FloatDType::F32,
    };
    for family in ["qwen3", "gemma3", "phi3", "smollm3"] {
        let dir = repo().join("tests/fixtures/families").join(family);
        let base = kiln::models::hf::load_model(&dir, &device.clone().without_autodiff()).unwrap();
        let vocab = base.config().vocab_size;
        let full = kiln::models::lora::set_trainable(base.clone(), &device, false);
        let batch = random_batch(vocab, 2, 12, true);
        let reference = grads_with(&full, &batch, 0.1, 0.0, plain);
        let shape = StepShape {
            recompute_every: Some(1),
            loss_chunk: 5,
            dtype: burn::tensor::FloatDType::F32,
        };
        let got = grads_with(&full, &batch, 0.1, 0.0, shape);
        assert_grads_close(&format!("{family} recompute"), &reference, &got, 1e-5);

        let spec = kiln::models::lora::LoraSpec {
            rank: 2,
            alpha: 4.0,
            rslora: false,
            dora: false,
            targets: base.arch().block_modules(),
            layers: (0..base.num_layers()).collect(),
        };
        let adapted = kiln::models::lora::attach(base, &spec, 3);
        let adapted = kiln::models::lora::set_trainable(adapted, &device, true);
        let (_, grads) = grads_with(&adapted, &batch, 0.0, 0.1, plain);
        let expected = 2 * spec.selected(adapted.arch()).len();
        assert_eq!(grads.len(), expected, "{family}: adapter gradients");
        assert!(
            grads.keys().all(|k| k.contains("lora_")),
            "{family}: only adapters train"
        );
    }
}

fn parse_printed_size(text: &str) -> f64 {
    let mut parts = text.split_whitespace();
    let value: f64 = parts.next().unwrap().parse().unwrap();
    let unit = match parts.next().unwrap() {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unit {other}"),
    };
    value * unit
}

/// A budget below what keeping every activation needs: `auto` plans block recompute, the run
/// completes, and its measured peak (RSS while training, in its own process) stays under it.
#[test]
fn auto_checkpointing_fits_a_budget_below_the_no_recompute_need() {
    let (dir, corpus) = scratch("budget");
    let out = dir.path().join("runs");
    let budget = 120u64 << 20;
    let overrides = [
        "model.hidden_size=128",
        "model.num_hidden_layers=6",
        "model.max_position_embeddings=256",
        "data.seq_len=256",
        // Attention keeps no seq² scores: a batch this large is what overfills the budget.
        "train.batch_size=12",
        "train.max_steps=3",
        "train.eval_every=0",
        "train.save_every=0",
        "logging.log_every=1",
        "memory.checkpointing=auto",
        "memory.budget=120MiB",
    ];
    let config = write_tiny_config(dir.path(), &out, &corpus, "budget", &overrides);
    let plan = kiln(&[
        "plan",
        config.to_str().unwrap(),
        "--json",
        "--set",
        "memory.checkpointing=none",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert!(
        !plan.status.success(),
        "no recompute must not fit: {report}"
    );
    let none_total = report["options"][0][1]["total"].as_u64().unwrap();
    assert!(none_total > budget, "{report}");
    // Attention runs in tiles and the plan says what its scores would take; dropout on the
    // probabilities materialises them, and the plan says so and counts them.
    assert_eq!(report["attention_tiled"], true, "{report}");
    let text = kiln(&["plan", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("attention: in tiles, no scores kept"),
        "{text}"
    );
    let plan_json = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["plan", config.to_str().unwrap(), "--json"];
        args.extend(extra.iter().flat_map(|s| ["--set", s]));
        serde_json::from_slice(&kiln(&args).stdout).unwrap()
    };
    let materialised = plan_json(&["memory.checkpointing=none", "model.dropout=0.1"]);
    assert_eq!(materialised["attention_tiled"], false, "{materialised}");
    let activations = |r: &serde_json::Value| r["options"][0][1]["activations"].as_u64().unwrap();
    let scores = report["attention_scores"].as_u64().unwrap();
    assert!(
        activations(&materialised) > activations(&report) + scores,
        "{materialised}"
    );

    let r = kiln(&["train", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}
{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(stdout.contains("recompute every"), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("peak memory")).unwrap();
    let measured = parse_printed_size(
        line.split("peak memory")
            .nth(1)
            .unwrap()
            .split('(')
            .next()
            .unwrap(),
    );
    assert!(measured < budget as f64, "{line}");
}

/// The inputs a parity fixture recorded: row-major ids, batch, seq.
fn parity_inputs(dir: &Path) -> (Vec<u32>, usize, usize) {
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let rows = inputs["input_ids"].as_array().unwrap();
    let (batch, seq) = (rows.len(), rows[0].as_array().unwrap().len());
    let ids = rows
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
        })
        .collect();
    (ids, batch, seq)
}

/// The largest |kiln − transformers| over the logits of `dir`'s inputs, against `expected`
/// (a file of `dir`, or a path of its own).
fn logit_difference(model: &kiln::models::Model, dir: &Path, expected: impl AsRef<Path>) -> f32 {
    let (ids, batch, seq) = parity_inputs(dir);
    let logits = model
        .forward(&ids, batch, seq, &mut None)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    let expected = kiln::models::safetensors_io::read_all(&dir.join(expected)).unwrap();
    let expected = &expected["logits"];
    assert_eq!(expected.shape, vec![batch, seq, model.config().vocab_size]);
    logits
        .iter()
        .zip(&expected.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

/// Logits of tiny random models that `transformers` built and recorded
/// (tests/fixtures/make_parity.py): Llama with GQA and tied embeddings; Llama 3 RoPE scaling,
/// untied, bf16 in shards; Mistral without sliding window; Qwen2 with q/k/v biases in f16.
#[test]
fn hf_models_match_transformers_logits() {
    for name in [
        "llama-gqa-tied",
        "llama3-untied-bf16-sharded",
        "mistral-untied",
        "qwen2-f16",
    ] {
        let dir = repo().join("tests/fixtures/parity").join(name);
        let model = kiln::models::hf::load_model(&dir, &burn::tensor::Device::flex())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let max_diff = logit_difference(&model, &dir, "expected.safetensors");
        eprintln!("{name}: max |kiln - transformers| = {max_diff:.2e}");
        assert!(max_diff <= 1e-4, "{name}: logits differ by {max_diff}");
    }
}

/// Qwen3, Gemma 3, Phi-3 and SmolLM3, each from its Hugging Face directory and from GGUF
/// (tests/fixtures/make_families.py: tiny random models built by transformers, the GGUF under
/// llama.cpp's names and conventions with f16 matrices), against transformers' logits.
#[test]
fn model_families_match_transformers_logits_from_hf_and_gguf() {
    let device = burn::tensor::Device::flex();
    for name in ["qwen3", "gemma3", "phi3", "smollm3", "llama3"] {
        let dir = repo().join("tests/fixtures/families").join(name);
        let hf = kiln::models::hf::load_model(&dir, &device)
            .unwrap_or_else(|e| panic!("{name} (HF): {e}"));
        let hf_diff = logit_difference(&hf, &dir, "expected.safetensors");
        let file = kiln::models::gguf::GgufFile::read(&dir.join("model.gguf")).unwrap();
        let gguf = kiln::models::gguf::load_model(&file, &device)
            .unwrap_or_else(|e| panic!("{name} (GGUF): {e}"));
        assert_eq!(gguf.config().family, hf.config().family);
        let gguf_diff = logit_difference(&gguf, &dir, "expected-gguf.safetensors");
        eprintln!("{name}: max |kiln - transformers| = {hf_diff:.2e} (HF), {gguf_diff:.2e} (GGUF)");
        assert!(hf_diff <= 1e-4, "{name}: HF logits differ by {hf_diff}");
        assert!(
            gguf_diff <= 1e-4,
            "{name}: GGUF logits differ by {gguf_diff}"
        );
    }
}

/// The SmolLM2 GGUF that scripts/fetch-smollm2 brings (scripts/test sets KILN_SMOLLM2_GGUF).
fn smollm2() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("KILN_SMOLLM2_GGUF")?);
    p.is_file().then_some(p)
}

#[test]
fn smollm2_gguf_answers_and_scores_english() {
    let Some(gguf) = smollm2() else {
        panic!(
            "KILN_SMOLLM2_GGUF is not set: run the tests through scripts/test (it fetches SmolLM2)"
        );
    };
    let r = kiln(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "30",
        "--backend",
        "cpu",
    ]);
    let answer = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(answer.contains("Paris"), "{answer}");

    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("english.txt");
    std::fs::write(
        &text,
        "The sun rose over the quiet village, and the children ran down to the river to play. \
         Their mother called them back for breakfast, but they did not hear her.\n",
    )
    .unwrap();
    let r = kiln(&[
        "eval",
        "--model",
        gguf.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--json",
        "--backend",
        "cpu",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    eprintln!(
        "SmolLM2 GGUF perplexity on plain English: {ppl:.2} over {} tokens",
        v["tokens"]
    );
    assert!((2.0..40.0).contains(&ppl), "perplexity {ppl}");
}

/// A multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`: the text config nested in
/// `text_config`, the decoder's tensors under `model.language_model.`, a vision tower beside it)
/// loads as its text model, with the text model's logits.
#[test]
fn gemma3_multimodal_checkpoints_load_their_language_model() {
    let src = repo().join("tests/fixtures/families/gemma3");
    let dir = tempfile::tempdir().unwrap();
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let config = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"hidden_size": 8},
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in kiln::models::safetensors_io::read_all(&src.join("model.safetensors")).unwrap()
    {
        let name = match name.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => name,
        };
        tensors.insert(name, t);
    }
    tensors.insert(
        "model.vision_tower.vision_model.embeddings.patch_embedding.weight".into(),
        kiln::models::safetensors_io::HostTensor {
            shape: vec![2, 2],
            data: vec![0.0; 4],
        },
    );
    kiln::models::safetensors_io::write_f32(&dir.path().join("model.safetensors"), &tensors, &[])
        .unwrap();
    for f in ["inputs.json", "expected.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let model = kiln::models::hf::load_model(dir.path(), &burn::tensor::Device::flex()).unwrap();
    assert_eq!(model.config().model_type, "gemma3_text");
    let diff = logit_difference(&model, dir.path(), "expected.safetensors");
    assert!(diff <= 1e-4, "logits differ by {diff}");
}

/// Decoding with the KV cache gives the logits of a full forward: Llama 3, and the families with
/// sliding windows (Gemma 3's window of 5 keeps a trimmed cache), partial RoPE and NoPE layers.
/// 16 positions stay within Phi-3's original context (LongRoPE switches factors past it, in
/// transformers as here).
#[test]
fn kv_cache_generation_matches_full_forward() {
    for dir in [
        "parity/llama3-untied-bf16-sharded",
        "families/qwen3",
        "families/gemma3",
        "families/phi3",
        "families/smollm3",
    ] {
        let dir = repo().join("tests/fixtures").join(dir);
        let model = kiln::models::hf::load_model(&dir, &burn::tensor::Device::flex()).unwrap();
        let ids: Vec<u32> = (0..16).map(|i| (i * 7 % 96) as u32).collect();
        let rows = |t: burn::tensor::Tensor<2>| {
            t.into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap()
        };
        let full = rows(model.forward(&ids, 1, ids.len(), &mut None));
        let mut cache = kiln::models::KvCache::default();
        let mut cached = rows(model.forward_cached(&ids[..9], &mut cache));
        for &id in &ids[9..] {
            cached.extend(rows(model.forward_cached(&[id], &mut cache)));
        }
        let diff = full
            .iter()
            .zip(&cached)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(full.len(), cached.len());
        assert!(
            diff < 1e-5,
            "{}: cached logits differ by {diff}",
            dir.display()
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Runs kiln and expects a clean failure: non-zero exit, no panic, stderr naming every needle.
fn fails_naming(args: &[&str], needles: &[&str]) {
    let r = kiln(args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        matches!(r.status.code(), Some(1) | Some(2)),
        "{args:?}: exit {:?}: {err}",
        r.status.code()
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected `{n}` in: {err}");
    }
}

#[test]
fn bad_models_and_data_fail_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fixture = repo().join("tests/fixtures/parity/llama-gqa-tied");
    let text = d.join("t.txt");
    std::fs::write(&text, "hello world").unwrap();
    let t = text.to_str().unwrap();
    let eval_fails = |model: &Path, needles: &[&str]| {
        fails_naming(
            &[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--data",
                t,
                "--backend",
                "cpu",
            ],
            needles,
        )
    };

    // No tokenizer in the model directory.
    eval_fails(&fixture, &["tokenizer.json", "llama-gqa-tied"]);

    // An architecture kiln does not implement.
    let gpt2 = d.join("gpt2");
    copy_dir(&fixture, &gpt2);
    let cfg = std::fs::read_to_string(gpt2.join("config.json")).unwrap();
    std::fs::write(
        gpt2.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    // ... names itself and what kiln reads instead.
    eval_fails(
        &gpt2,
        &[
            "config.json",
            "GPT2LMHeadModel",
            "Qwen3ForCausalLM",
            "Gemma3ForCausalLM",
        ],
    );

    // GGUF files whose metadata lacks a key, or names an architecture kiln does not read
    // (bytes patched in place: same lengths, so the file stays well-formed).
    let gguf_fixture =
        std::fs::read(repo().join("tests/fixtures/families/qwen3/model.gguf")).unwrap();
    let patched = |from: &str, to: &str, name: &str| {
        let (from, to) = (from.as_bytes(), to.as_bytes());
        let at = gguf_fixture
            .windows(from.len())
            .position(|w| w == from)
            .unwrap_or_else(|| panic!("{} not in the fixture", String::from_utf8_lossy(from)));
        let mut bytes = gguf_fixture.clone();
        bytes[at..at + to.len()].copy_from_slice(to);
        let path = d.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    eval_fails(
        &patched("qwen3.block_count", "qwen3.block_cxunt", "no-blocks.gguf"),
        &["no-blocks.gguf", "qwen3.block_count"],
    );
    eval_fails(
        &patched(
            "\x05\0\0\0\0\0\0\0qwen3",
            "\x05\0\0\0\0\0\0\0qwxn3",
            "unknown-arch.gguf",
        ),
        &["unknown-arch.gguf", "qwxn3", "gemma3", "phi3"],
    );

    // A config that disagrees with the weights' shapes.
    let wide = d.join("wide");
    copy_dir(&fixture, &wide);
    std::fs::write(
        wide.join("config.json"),
        cfg.replace("\"intermediate_size\": 96", "\"intermediate_size\": 100"),
    )
    .unwrap();
    eval_fails(&wide, &["mlp.gate_proj.weight", "shape"]);

    // A truncated safetensors file.
    let cut = d.join("cut");
    copy_dir(&fixture, &cut);
    let bytes = std::fs::read(cut.join("model.safetensors")).unwrap();
    std::fs::write(cut.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    eval_fails(&cut, &["model.safetensors"]);

    // A truncated GGUF file.
    if let Some(gguf) = smollm2() {
        let bytes = std::fs::read(&gguf).unwrap();
        let short = d.join("short.gguf");
        std::fs::write(&short, &bytes[..bytes.len() / 3]).unwrap();
        fails_naming(
            &[
                "eval",
                "--model",
                short.to_str().unwrap(),
                "--data",
                t,
                "--backend",
                "cpu",
            ],
            &["short.gguf", "beyond the end of the file"],
        );
        // A malformed JSONL line and a chat message with an unknown role, named by file and line.
        let data = d.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
        std::fs::write(data.join("valid.jsonl"), format!("{good}\n")).unwrap();
        std::fs::write(
            data.join("train.jsonl"),
            format!("{good}\n{{\"messages\": [\n"),
        )
        .unwrap();
        let g = gguf.to_str().unwrap();
        let data_arg = data.to_str().unwrap();
        fails_naming(
            &[
                "finetune",
                "--model",
                g,
                "--data",
                data_arg,
                "--backend",
                "cpu",
                "--output-dir",
                d.to_str().unwrap(),
            ],
            &["train.jsonl", "line 2"],
        );
        std::fs::write(
            data.join("train.jsonl"),
            format!(
                "{good}\n{}\n",
                good.replace("\"assistant\"", "\"narrator\"")
            ),
        )
        .unwrap();
        fails_naming(
            &[
                "finetune",
                "--model",
                g,
                "--data",
                data_arg,
                "--backend",
                "cpu",
                "--output-dir",
                d.to_str().unwrap(),
            ],
            &["train.jsonl", "line 2", "narrator"],
        );
    } else {
        panic!("KILN_SMOLLM2_GGUF is not set: run the tests through scripts/test");
    }
}

#[test]
fn lora_finetune_of_smollm2_learns_and_writes_a_peft_adapter() {
    let gguf = smollm2().expect("KILN_SMOLLM2_GGUF: run the tests through scripts/test");
    let dir = tempfile::tempdir().unwrap();
    let data = repo().join("datasets/roman-numerals");
    let base_eval = kiln(&[
        "eval",
        "--model",
        gguf.to_str().unwrap(),
        "--data",
        data.join("valid.jsonl").to_str().unwrap(),
        "--mask-prompt",
        "--json",
        "--backend",
        "cpu",
    ]);
    assert!(
        base_eval.status.success(),
        "{}",
        String::from_utf8_lossy(&base_eval.stderr)
    );
    let before: serde_json::Value = serde_json::from_slice(&base_eval.stdout).unwrap();
    let r = kiln(&[
        "finetune",
        "--model",
        gguf.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--targets",
        "q_proj,v_proj",
        "--num-layers",
        "4",
        "--rank",
        "8",
        "--iters",
        "12",
        "--lr",
        "2e-3",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--mask-prompt",
        "--eval-every",
        "12",
        "--save-every",
        "12",
        "--name",
        "roman",
        "--output-dir",
        dir.path().to_str().unwrap(),
        "--backend",
        "cpu",
        "--set",
        "train.eval_batches=25",
        "--set",
        "finetune.lora.dropout=0.0",
        "--set",
        "finetune.lora.mlx_export=true",
    ]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        out.contains("trainable of 134.") || out.contains("trainable of 13"),
        "{out}"
    );
    let ckpt = dir.path().join("roman/latest");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    let (b, a) = (
        before["loss"].as_f64().unwrap(),
        state["last_val_loss"].as_f64().unwrap(),
    );
    eprintln!(
        "Roman numerals validation loss on the answers: {b:.3} before, {a:.3} after 12 LoRA steps"
    );
    assert!(
        a < b - 0.3,
        "validation loss {b} -> {a} did not fall clearly"
    );
    // PEFT's layout: 2 matrices x 2 modules x 4 layers, [r, in] and [out, r], under base_model.model.
    let adapter =
        kiln::models::safetensors_io::read_all(&ckpt.join("adapter_model.safetensors")).unwrap();
    assert_eq!(adapter.len(), 16);
    let a_q = &adapter["base_model.model.model.layers.29.self_attn.q_proj.lora_A.weight"];
    let b_v = &adapter["base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight"];
    assert_eq!(
        (a_q.shape.clone(), b_v.shape.clone()),
        (vec![8, 576], vec![192, 8])
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(
        cfg["layers_to_transform"],
        serde_json::json!([26, 27, 28, 29])
    );
    // mlx-lm's layout beside it: lora_a [in, r] = PEFT's A transposed, absolute scale = alpha / r.
    let mlx =
        kiln::models::safetensors_io::read_all(&ckpt.join("mlx/adapters.safetensors")).unwrap();
    let m_a = &mlx["model.layers.29.self_attn.q_proj.lora_a"];
    assert_eq!(m_a.shape, vec![576, 8]);
    assert_eq!(m_a.data[3 * 8 + 5], a_q.data[5 * 576 + 3]);
    let mcfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("mlx/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(mcfg["num_layers"], 4);
    assert_eq!(mcfg["lora_parameters"]["scale"], 2.0);
    assert_eq!(
        mcfg["lora_parameters"]["keys"],
        serde_json::json!(["self_attn.q_proj", "self_attn.v_proj"])
    );
    // The adapter loads back into kiln and changes the model's answers' loss the same way.
    let with = kiln(&[
        "eval",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        ckpt.to_str().unwrap(),
        "--data",
        data.join("valid.jsonl").to_str().unwrap(),
        "--mask-prompt",
        "--json",
        "--backend",
        "cpu",
    ]);
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let after: serde_json::Value = serde_json::from_slice(&with.stdout).unwrap();
    assert!(
        (after["loss"].as_f64().unwrap() - a).abs() < 1e-3,
        "{after} vs {a}"
    );
    // The run directory alone stands for its base with the adapter applied, and its run's
    // `data.mask_prompt` is eval's default: the same loss over the same answer tokens.
    let run_dir = dir.path().join("roman");
    let run_eval = kiln(&[
        "eval",
        "--model",
        run_dir.to_str().unwrap(),
        "--data",
        data.join("valid.jsonl").to_str().unwrap(),
        "--json",
        "--backend",
        "cpu",
    ]);
    let text = output_text;
    assert!(run_eval.status.success(), "{}", text(&run_eval));
    let by_run: serde_json::Value = serde_json::from_slice(&run_eval.stdout).unwrap();
    assert_eq!(by_run["tokens"], after["tokens"], "{by_run} vs {after}");
    assert!((by_run["loss"].as_f64().unwrap() - after["loss"].as_f64().unwrap()).abs() < 1e-6);
    // mlx-lm's spellings: --adapter-path, and a dataset directory scored on its test.jsonl.
    let test_eval = kiln(&[
        "eval",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter-path",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        "--backend",
        "cpu",
    ]);
    assert!(test_eval.status.success(), "{}", text(&test_eval));
    let on_test: serde_json::Value = serde_json::from_slice(&test_eval.stdout).unwrap();
    let explicit = kiln(&[
        "eval",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        ckpt.to_str().unwrap(),
        "--data",
        data.join("test.jsonl").to_str().unwrap(),
        "--mask-prompt",
        "--json",
        "--backend",
        "cpu",
    ]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&explicit.stdout).unwrap(),
        on_test
    );
    // generate from the run directory with the prompt on stdin and mlx-lm's --temp, against
    // base + --adapter with the prompt as a flag.
    let prompt = "Write 14 in Roman numerals.";
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", "--model", run_dir.to_str().unwrap(), "--chat"])
        .args([
            "--prompt",
            "-",
            "--temp",
            "0",
            "--max-tokens",
            "8",
            "--backend",
            "cpu",
        ])
        .current_dir(repo())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), prompt.as_bytes()).unwrap();
    let from_run = child.wait_with_output().unwrap();
    assert!(from_run.status.success(), "{}", text(&from_run));
    let flagged = kiln(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        ckpt.to_str().unwrap(),
        "--chat",
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--backend",
        "cpu",
    ]);
    assert_eq!(from_run.stdout, flagged.stdout, "{}", text(&flagged));
    // fuse without --model: the run names its base.
    let fused = dir.path().join("fused");
    let f = kiln(&[
        "fuse",
        "--adapter",
        run_dir.to_str().unwrap(),
        "--out",
        fused.to_str().unwrap(),
    ]);
    assert!(f.status.success(), "{}", text(&f));
    assert!(fused.join("config.json").is_file() && fused.join("model.safetensors").is_file());
    // transformers' generate() stops at the end of the turn: the stop token is in
    // generation_config.json and config.json (the GGUF base had neither file).
    let json = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fused.join(name)).unwrap()).unwrap()
    };
    let im_end = kiln::data::Tokenizer::load_dir(&fused)
        .unwrap()
        .token_id("<|im_end|>")
        .unwrap();
    assert_eq!(json("generation_config.json")["eos_token_id"], im_end);
    assert_eq!(json("config.json")["eos_token_id"], im_end);
    // A run given as the model and another adapter: refused, exit 2.
    let both = kiln(&[
        "eval",
        "--model",
        run_dir.to_str().unwrap(),
        "--adapter",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_eq!(both.status.code(), Some(2), "{}", text(&both));
    assert!(text(&both).contains("is a LoRA adapter"), "{}", text(&both));
}

#[test]
fn packed_rows_compute_each_example_as_if_alone() {
    let dir = repo().join("tests/fixtures/parity/qwen2-f16");
    let model = kiln::models::hf::load_model(&dir, &burn::tensor::Device::flex()).unwrap();
    let a: Vec<u32> = (0..7).map(|i| (i * 5 + 1) % 96).collect();
    let b: Vec<u32> = (0..9).map(|i| (i * 11 + 3) % 96).collect();
    let rows = |t: burn::tensor::Tensor<2>| {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let mut alone = rows(model.forward(&a, 1, a.len(), &mut None));
    alone.extend(rows(model.forward(&b, 1, b.len(), &mut None)));
    let packed = kiln::data::Batch {
        batch_size: 1,
        seq_len: 16,
        inputs: a.iter().chain(&b).copied().collect(),
        targets: vec![0; 16],
        loss_mask: None,
        segments: Some([vec![0; 7], vec![1; 9]].concat()),
        pairs: None,
    };
    let together = rows(model.forward_batch(&packed, &mut None));
    let diff = alone
        .iter()
        .zip(&together)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-5,
        "packed logits differ from separate ones by {diff}"
    );
}

#[test]
fn full_finetune_continues_from_a_pretrained_directory() {
    let (dir, corpus) = scratch("full");
    let out = dir.path().join("runs");
    let base = train(
        &tiny_config(&out, &corpus, "base", &["train.max_steps=30"]),
        &quiet(),
    )
    .unwrap();
    let base_dir = base.last_checkpoint.unwrap();
    // A kiln checkpoint is a Hugging Face directory: fine-tune all of its weights further.
    let pretrained = format!("model.pretrained={}", base_dir.display());
    let tuned = train(
        &tiny_config(
            &out,
            &corpus,
            "tuned",
            &[&pretrained, "finetune.method=full", "train.max_steps=30"],
        ),
        &quiet(),
    )
    .unwrap();
    assert_eq!(tuned.trainable_params, base.trainable_params);
    let (b, t) = (base.final_val_loss.unwrap(), tuned.final_val_loss.unwrap());
    assert!(t < b, "validation loss {b} -> {t} after 30 more steps");
    let ckpt = tuned.last_checkpoint.unwrap();
    assert!(ckpt.join("model.safetensors").is_file() && ckpt.join("char_tokenizer.json").is_file());
    // LoRA on the same base trains only the adapters.
    let lora = train(
        &tiny_config(
            &out,
            &corpus,
            "lora",
            &[&pretrained, "finetune.lora.rank=4", "train.max_steps=5"],
        ),
        &quiet(),
    )
    .unwrap();
    // q_proj 32→32 and v_proj 32→16 (2 KV heads × 8) in 2 blocks, rank 4: A [in, 4] + B [4, out].
    assert_eq!(
        lora.trainable_params,
        2 * ((32 * 4 + 4 * 32) + (32 * 4 + 4 * 16))
    );
}

/// Chat templates render exactly as transformers renders them (tests/fixtures/make_chat.py).
#[test]
fn chat_templates_render_like_transformers() {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/chat_templates.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 44);
    for c in cases {
        let t = kiln::data::ChatTemplate {
            source: c["template"].as_str().unwrap().into(),
            bos_token: c["bos_token"].as_str().unwrap().into(),
            eos_token: c["eos_token"].as_str().unwrap().into(),
            kwargs: c["kwargs"].as_object().cloned().unwrap_or_default(),
        };
        let messages: Vec<kiln::data::Message> =
            serde_json::from_value(c["messages"].clone()).unwrap();
        let got = t
            .render(&messages, c["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(got, c["expected"].as_str().unwrap(), "{}", c["name"]);
    }
}

/// A GGUF with every supported tensor type (F32, F16, BF16, Q8_0, Q4_0, Q4_1) and llama.cpp's Q/K
/// row permutation, written by llama.cpp's `gguf` package (tests/fixtures/make_gguf.py): kiln's
/// logits equal those transformers computes from the de-quantized weights.
#[test]
fn gguf_quant_types_dequantize_like_llama_cpp() {
    let gguf =
        kiln::models::gguf::GgufFile::read(&repo().join("tests/fixtures/gguf/tiny-llama.gguf"))
            .unwrap();
    let types: std::collections::BTreeSet<u32> = gguf.tensors.iter().map(|t| t.ggml_type).collect();
    assert_eq!(types, [0, 1, 2, 3, 8, 30].into_iter().collect());
    let model = kiln::models::gguf::load_model(&gguf, &burn::tensor::Device::flex()).unwrap();
    // The parity fixture's inputs; the reference computed from the de-quantized weights.
    let diff = logit_difference(
        &model,
        &repo().join("tests/fixtures/parity/llama-gqa-tied"),
        repo().join("tests/fixtures/gguf/expected.safetensors"),
    );
    assert!(
        diff < 1e-4,
        "GGUF logits differ from transformers on the de-quantized weights by {diff}"
    );
}

/// The model-level halves of the `hf_json` and `gguf` fuzz targets (`kiln_models::fuzz`: what the
/// families make of a hostile file) replay every kept input without a panic; the container
/// halves replay in kiln-formats' unit tests.
#[test]
fn fuzz_inputs_replay_through_the_model_families() {
    let root = repo().join("fuzz");
    let mut replayed = 0;
    type Target = fn(&[u8]);
    let targets: [(&str, Target); 3] = [
        ("config_yaml", kiln::models::fuzz::config_yaml),
        ("hf_json", kiln::models::fuzz::hf_json),
        ("gguf", kiln::models::fuzz::gguf),
    ];
    for (name, target) in targets {
        for kind in ["regressions", "seeds"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else {
                continue;
            };
            for entry in entries.flatten() {
                let bytes = std::fs::read(entry.path()).unwrap();
                let outcome = std::panic::catch_unwind(|| target(&bytes));
                assert!(outcome.is_ok(), "{} panics", entry.path().display());
                replayed += 1;
            }
        }
    }
    // Every family's fixture config.json and GGUF go through the same checks.
    for family in ["qwen3", "gemma3", "phi3", "smollm3"] {
        let dir = repo().join("tests/fixtures/families").join(family);
        kiln::models::fuzz::hf_json(&std::fs::read(dir.join("config.json")).unwrap());
        kiln::models::fuzz::gguf(&std::fs::read(dir.join("model.gguf")).unwrap());
        replayed += 2;
    }
    assert!(replayed > 8, "only {replayed} inputs replayed");
}

/// Starts `kiln train` and returns it once it has printed a log line for step `after` or later.
fn spawn_until_step(config: &Path, extra: &[&str], after: usize) -> std::process::Child {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("train")
        .arg(config)
        .args(extra)
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("step")
            && let Some(n) = rest
                .trim_start()
                .split('/')
                .next()
                .and_then(|n| n.trim().parse::<usize>().ok())
            && n >= after
        {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

#[test]
fn sigint_checkpoints_exits_130_and_resume_is_exact_and_runs_are_locked() {
    let (dir, corpus) = scratch("signal");
    let out = dir.path().join("runs");
    let yaml = |name: &str| {
        let overrides = [
            "model.hidden_size=64",
            "train.max_steps=300",
            "train.save_every=0",
            "train.eval_every=0",
            "logging.log_every=1",
        ];
        write_tiny_config(dir.path(), &out, &corpus, name, &overrides)
    };
    let (full, split) = (yaml("full"), yaml("split"));
    let r = kiln(&["train", full.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let child = spawn_until_step(&split, &[], 10);
    // A second run on the same run directory is refused while the first holds it.
    let second = kiln(&["train", split.to_str().unwrap(), "--resume"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("in use"), "{err}");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted by SIGINT") && err.contains("step-"),
        "{err}"
    );
    let saved = kiln::train::checkpoint::latest(&out.join("split")).unwrap();
    let stopped_at: usize = kiln::train::checkpoint::read_state(&saved).unwrap().step;
    assert!((10..300).contains(&stopped_at), "stopped at {stopped_at}");

    let r = kiln(&["train", split.to_str().unwrap(), "--resume"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let weights =
        |run: &str| std::fs::read(out.join(run).join("step-0000300/model.safetensors")).unwrap();
    assert!(
        weights("full") == weights("split"),
        "interrupted at {stopped_at} and resumed: weights differ"
    );
}

#[test]
fn sigterm_exits_143_with_a_checkpoint_and_a_second_sigint_exits_at_once() {
    let (dir, corpus) = scratch("sigterm");
    let out = dir.path().join("runs");
    // Steps long enough (a few hundred ms) that a second signal lands inside one.
    let overrides = [
        "model.hidden_size=256",
        "model.max_position_embeddings=256",
        "data.seq_len=256",
        "train.batch_size=16",
        "train.max_steps=100000",
        "train.save_every=5",
        "train.eval_every=0",
        "logging.log_every=1",
    ];
    let config = write_tiny_config(dir.path(), &out, &corpus, "term", &overrides);
    let run = out.join("term");

    let child = spawn_until_step(&config, &[], 8);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");
    let saved = kiln::train::checkpoint::latest(&run).unwrap();
    let step = kiln::train::checkpoint::read_state(&saved).unwrap().step;
    assert!(err.contains(saved.file_name().unwrap().to_str().unwrap()));
    assert!(step >= 8, "{step}");

    // A second SIGINT while the first is still finishing its step ends the process at once,
    // without the graceful save; the newest complete checkpoint still verifies and the run
    // resumes from it. (Signals sent back to back would merge into one pending signal.)
    let child = spawn_until_step(&config, &["--resume"], step + 12);
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    std::thread::sleep(std::time::Duration::from_millis(30));
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(130), "{err}");
    assert!(!err.contains("interrupted by"), "{err}");
    let (newest, damaged) = kiln::train::checkpoint::latest_verified(&run);
    let newest = newest.expect("a complete checkpoint");
    assert!(damaged.is_empty(), "{damaged:?}");
    assert!(kiln::train::checkpoint::read_state(&newest).unwrap().step >= step + 5);
    // A changed config is refused on resume, naming each change, and nothing is written...
    let more = format!("train.max_steps={}", step + 20);
    let listing = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    };
    let before = listing(&run);
    let r = kiln(&[
        "train",
        config.to_str().unwrap(),
        "--resume",
        "--set",
        &more,
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("train.max_steps: ") && err.contains("--allow-config-change"),
        "{err}"
    );
    assert_eq!(listing(&run), before);
    // ...and continues when allowed, printing the change.
    let r = kiln(&[
        "train",
        config.to_str().unwrap(),
        "--resume",
        "--allow-config-change",
        "--set",
        &more,
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains(&format!("-> {}", step + 20)), "{err}");
}

#[test]
fn non_finite_steps_are_skipped_and_stop_the_run_keeping_the_last_checkpoint() {
    let (dir, corpus) = scratch("nan");
    let out = dir.path().join("runs");
    let path = dir.path().join("nan.yaml");
    std::fs::write(&path, tiny_yaml(&out, &corpus, "nan", "")).unwrap();
    // An absurd learning rate without clipping blows the weights up after the first update.
    let r = kiln(&[
        "train",
        path.to_str().unwrap(),
        "--set",
        "optim.lr=1e30",
        "--set",
        "optim.grad_clip=null",
        "--set",
        "optim.schedule.kind=constant",
        "--set",
        "optim.schedule.warmup_steps=0",
        "--set",
        "optim.schedule.min_lr=0",
        "--set",
        "train.save_every=1",
        "--set",
        "train.max_nonfinite_steps=3",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert_eq!(r.status.code(), Some(1), "{stdout}\n{err}");
    assert!(
        err.contains("stopping at step") && err.contains("non-finite"),
        "{err}"
    );
    assert!(
        stdout.contains("1 of 1 updates skipped (3 in a row)"),
        "{stdout}"
    );
    assert!(stdout.contains("step 1 done") && stdout.contains("s after start"));
    let latest = kiln::train::checkpoint::latest(&out.join("nan")).unwrap();
    assert!(
        err.contains(latest.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    let weights =
        kiln::models::safetensors_io::read_all(&latest.join("model.safetensors")).unwrap();
    assert!(
        weights
            .values()
            .all(|t| t.data.iter().all(|v| v.is_finite()))
    );
}

/// SIGKILL at a dozen moments (some during checkpoint writes), resuming after each; then a
/// damaged newest checkpoint. The run must end bit-identical to an uninterrupted one.
#[test]
fn killed_runs_and_damaged_checkpoints_resume_to_identical_weights() {
    let (dir, corpus) = scratch("kill");
    let out = dir.path().join("runs");
    let yaml = |name: &str| {
        let overrides = [
            "model.hidden_size=64",
            "train.max_steps=1500",
            "train.save_every=25",
            "train.eval_every=250",
            "logging.histograms_every=0",
        ];
        write_tiny_config(dir.path(), &out, &corpus, name, &overrides)
    };
    let (full, killed) = (yaml("full"), yaml("killed"));
    let r = kiln(&["train", full.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let run_dir = out.join("killed");
    let mut kills = 0;
    for i in 0..12u64 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.arg("train").arg(&killed).current_dir(repo());
        if kiln::train::checkpoint::latest(&run_dir).is_some() {
            cmd.arg("--resume");
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(120 + (i * 37) % 150));
        if child.try_wait().unwrap().is_none() {
            kills += 1;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    assert!(
        kills >= 10,
        "only {kills} runs were still going when killed"
    );
    let finish = |resume: bool| {
        let mut args = vec!["train", killed.to_str().unwrap()];
        if resume {
            args.push("--resume");
        }
        kiln(&args)
    };
    let r = finish(kiln::train::checkpoint::latest(&run_dir).is_some());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let weights =
        |run: &str| std::fs::read(out.join(run).join("step-0001500/model.safetensors")).unwrap();
    assert!(
        weights("full") == weights("killed"),
        "weights after {kills} kills differ"
    );

    // Damage the newest checkpoint: resume says why, falls back to the previous one, and ends the same.
    let newest = run_dir.join("step-0001500/model.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&newest, &bytes).unwrap();
    let r = finish(true);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("step-0001500") && err.contains("checksum"),
        "{err}"
    );
    assert!(
        weights("full") == weights("killed"),
        "weights after falling back differ"
    );
}

#[test]
fn a_failed_checkpoint_write_keeps_the_previous_one_and_stops_or_continues_as_configured() {
    let (dir, corpus) = scratch("savefail");
    let out = dir.path().join("runs");
    let path = dir.path().join("s.yaml");
    std::fs::write(&path, tiny_yaml(&out, &corpus, "stop", "")).unwrap();
    for (name, mode) in [("stop", "stop"), ("cont", "continue")] {
        // Something that is not a checkpoint directory sits where step 20 must go: the write fails.
        std::fs::create_dir_all(out.join(name)).unwrap();
        std::fs::write(out.join(name).join("step-0000020"), b"in the way").unwrap();
        let r = kiln(&[
            "train",
            path.to_str().unwrap(),
            "--set",
            &format!("run.name={name}"),
            "--set",
            "train.max_steps=30",
            "--set",
            "train.save_every=10",
            "--set",
            "train.eval_every=0",
            "--set",
            "train.keep_last=5",
            "--set",
            &format!("train.on_save_error={mode}"),
        ]);
        let (stdout, err) = (
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr),
        );
        let run = out.join(name);
        assert!(kiln::train::checkpoint::verify(&run.join("step-0000010")).is_ok());
        if mode == "stop" {
            assert_eq!(r.status.code(), Some(1), "{stdout}\n{err}");
            assert!(
                err.contains("step 20: checkpoint failed") && err.contains("step-0000010"),
                "{err}"
            );
            assert_eq!(
                kiln::train::checkpoint::latest(&run).unwrap(),
                run.join("step-0000010")
            );
        } else {
            assert!(r.status.success(), "{stdout}\n{err}");
            assert!(
                stdout.contains("step 20: checkpoint failed")
                    && stdout.contains("training goes on"),
                "{stdout}"
            );
            assert_eq!(
                kiln::train::checkpoint::latest(&run).unwrap(),
                run.join("step-0000030")
            );
        }
        assert!(
            !run.join(".step-0000020.tmp").exists(),
            "the half-written checkpoint is left behind"
        );
    }
}

/// Runs kiln with stdin closed and a deadline: a command that hangs fails the test.
fn kiln_within(args: &[&str], secs: u64) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(repo())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{args:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The findings of the hostile-input campaign (issue 13), each now a clear error naming what is
/// wrong, with exit 1 or 2, no panic and no hang.
#[test]
fn hostile_configs_and_files_get_named_errors_not_panics_or_hangs() {
    let (dir, corpus) = scratch("hostile");
    let d = dir.path();
    let out = d.join("runs");
    let yaml = d.join("h.yaml");
    std::fs::write(&yaml, tiny_yaml(&out, &corpus, "h", "")).unwrap();
    let y = yaml.to_str().unwrap();
    let plan_fails =
        |set: &str, needles: &[&str]| fails_naming(&["plan", y, "--set", set], needles);
    // Sizes beyond any model, a huge BPE vocabulary, counts that would allocate terabytes.
    plan_fails(
        "model.hidden_size=2147483648",
        &["model.hidden_size", "outside"],
    );
    plan_fails("model.hidden_size=1099511627776", &["model.hidden_size"]);
    plan_fails(
        "data.tokenizer.vocab_size=1000000000",
        &["data.tokenizer.vocab_size"],
    );
    plan_fails("train.eval_batches=10000000000000", &["train.eval_batches"]);
    plan_fails("run.name=.", &["run.name"]);
    plan_fails("run.output_dir=", &["run.output_dir"]);
    // NaN and infinities, in the file (with its line) and on the command line.
    for (good, bad, field) in [
        ("min_lr: 1.0e-4", "min_lr: .nan", "optim.schedule.min_lr"),
        ("lr: 3.0e-3", "lr: .inf", "optim.lr"),
    ] {
        let text = std::fs::read_to_string(&yaml).unwrap().replace(good, bad);
        let path = d.join("nonfinite.yaml");
        std::fs::write(&path, text).unwrap();
        fails_naming(
            &["train", path.to_str().unwrap()],
            &[field, "not a finite number", "nonfinite.yaml:"],
        );
    }
    fails_naming(
        &["generate", "--model", "x", "--temperature", "nan"],
        &["--temperature", "not a finite number"],
    );
    // An empty config file is refused rather than starting a default run.
    let empty = d.join("empty.yaml");
    std::fs::write(&empty, "# nothing here\n").unwrap();
    fails_naming(
        &["train", empty.to_str().unwrap()],
        &["empty.yaml", "empty"],
    );
    assert!(!out.exists(), "a refused config wrote {}", out.display());

    // Data that is not a regular file: a FIFO would block forever; a symlink loop is not
    // "not found"; a path given by --set is blamed on --set.
    let fifo = d.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let r = kiln_within(
        &[
            "train",
            y,
            "--set",
            &format!("data.train={}", fifo.display()),
        ],
        20,
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--set") && err.contains("not a regular file"),
        "{err}"
    );
    let (a, b) = (d.join("loop-a"), d.join("loop-b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    fails_naming(
        &["train", y, "--set", &format!("data.train={}", a.display())],
        &["loop-a", "symbolic links"],
    );
    fails_naming(
        &["train", y, "--set", "model.pretrained=/no/such/model"],
        &["--set", "model.pretrained", "not found"],
    );

    // An update that overflows f32 (a learning rate past f32's range, no clipping) leaves
    // weights that are not finite while the step's loss was: they are never saved.
    let r = kiln(&[
        "train",
        y,
        "--set",
        "optim.lr=1e39",
        "--set",
        "optim.grad_clip=null",
        "--set",
        "optim.schedule.warmup_steps=0",
        "--set",
        "optim.schedule.min_lr=0",
        "--set",
        "train.save_every=1",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("the weights are not finite"), "{err}");
    assert!(kiln::train::checkpoint::list(&out.join("h")).is_empty());
    std::fs::remove_dir_all(&out).unwrap();

    // A config.json with no positions.
    let no_pos = d.join("no-positions");
    copy_dir(&repo().join("tests/fixtures/families/qwen3"), &no_pos);
    let cfg = std::fs::read_to_string(no_pos.join("config.json")).unwrap();
    let at = cfg.find("\"max_position_embeddings\"").unwrap();
    let end = at + cfg[at..].find(',').unwrap();
    let cfg = format!(
        "{}\"max_position_embeddings\": 0{}",
        &cfg[..at],
        &cfg[end..]
    );
    std::fs::write(no_pos.join("config.json"), cfg).unwrap();
    fails_naming(
        &[
            "generate",
            "--model",
            no_pos.to_str().unwrap(),
            "--backend",
            "cpu",
        ],
        &["config.json", "max_position_embeddings", "outside"],
    );

    // A tokenizer with more ids than the model has embedding rows.
    let big = d.join("big-tokenizer");
    copy_dir(&repo().join("tests/fixtures/families/qwen3"), &big);
    let mut ids = serde_json::Map::new();
    for i in 0..200u32 {
        ids.insert(format!("t{i}"), i.into());
    }
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(big.join("tokenizer.json")).unwrap())
            .unwrap();
    let mut tok = tok;
    tok["model"] = serde_json::json!({"type": "WordLevel", "vocab": ids, "unk_token": "t0"});
    tok["added_tokens"] = serde_json::json!([]);
    std::fs::write(big.join("tokenizer.json"), tok.to_string()).unwrap();
    let text = d.join("t.txt");
    std::fs::write(&text, "t1 t2 t199").unwrap();
    for cmd in ["eval", "generate"] {
        let mut args = vec![cmd, "--model", big.to_str().unwrap(), "--backend", "cpu"];
        if cmd == "eval" {
            args.extend(["--data", text.to_str().unwrap()]);
        }
        fails_naming(&args, &["tokenizer has ids up to 199", "vocab_size is 96"]);
    }

    // A UTF-8 byte-order mark starts a JSONL file; a record far longer than the window is cut
    // before it is tokenized whole (a 50 MB line took a minute).
    let jsonl = d.join("bom.jsonl");
    let long = "word ".repeat(2_000_000);
    std::fs::write(
        &jsonl,
        format!(
            "\u{feff}{}\n{}\n",
            serde_json::json!({"text": "t1 t2"}),
            serde_json::json!({ "text": long })
        ),
    )
    .unwrap();
    let qwen3 = repo().join("tests/fixtures/families/qwen3");
    let r = kiln_within(
        &[
            "eval",
            "--model",
            qwen3.to_str().unwrap(),
            "--data",
            jsonl.to_str().unwrap(),
            "--seq-len",
            "16",
            "--backend",
            "cpu",
            "--json",
        ],
        30,
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// Checkpoints damaged in the ways the campaign found: every reader (resume, eval, generate,
/// fuse, --adapter) checks the manifest and says why it passes one over; resume falls back past
/// a checkpoint that verifies but does not load.
#[test]
fn damaged_checkpoints_are_refused_by_every_reader_with_the_reason() {
    let (dir, corpus) = scratch("damaged");
    let out = dir.path().join("runs");
    let config = write_tiny_config(
        dir.path(),
        &out,
        &corpus,
        "d",
        &[
            "train.max_steps=40",
            "train.save_every=10",
            "train.keep_last=9",
            "train.eval_every=0",
        ],
    );
    let r = kiln(&["train", config.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let run = out.join("d");
    let step = |n: usize| run.join(format!("step-{n:07}"));
    use kiln::train::checkpoint::{self, verify};
    // Each damage, to its own copy of step 40, and what verify must say.
    type Damage = Box<dyn Fn(&Path)>;
    let damage: Vec<(&str, Damage, &str)> = vec![
        (
            "flipped weight bytes",
            Box::new(|p: &Path| flip(&p.join("model.safetensors"), 100)),
            "fails its checksum",
        ),
        (
            "flipped manifest byte",
            Box::new(|p: &Path| flip(&p.join("manifest.json"), 0)),
            "manifest.json is damaged",
        ),
        (
            "deleted trainer state",
            Box::new(|p: &Path| std::fs::remove_file(p.join("trainer_state.json")).unwrap()),
            "trainer_state.json is missing",
        ),
        (
            "empty manifest file list",
            Box::new(|p: &Path| {
                std::fs::write(p.join("manifest.json"), r#"{"files": []}"#).unwrap()
            }),
            "lists neither",
        ),
        (
            "a step beyond the run, resealed",
            Box::new(|p: &Path| {
                let s = std::fs::read_to_string(p.join("trainer_state.json")).unwrap();
                let s = s.replace("\"step\": 40", "\"step\": 40000000000");
                std::fs::write(p.join("trainer_state.json"), s).unwrap();
                checkpoint::write_manifest(p).unwrap();
            }),
            "trainer_state.json: step 40000000000",
        ),
    ];
    let spare = dir.path().join("spare");
    for (what, hurt, needle) in &damage {
        let _ = std::fs::remove_dir_all(&spare);
        copy_dir(&step(40), &spare);
        let spare_step = spare.parent().unwrap().join("step-0000040");
        let _ = std::fs::remove_dir_all(&spare_step);
        std::fs::rename(&spare, &spare_step).unwrap();
        hurt(&spare_step);
        let why = verify(&spare_step).unwrap_err();
        assert!(why.contains(needle), "{what}: {why}");
        std::fs::remove_dir_all(&spare_step).unwrap();
    }

    // eval and generate refuse a damaged checkpoint, and pointed at the run, use the previous
    // one, saying why.
    flip(&step(40).join("model.safetensors"), 100);
    let c = corpus.to_str().unwrap();
    let s40 = step(40);
    fails_naming(
        &[
            "eval",
            "--checkpoint",
            s40.to_str().unwrap(),
            "--data",
            c,
            "--backend",
            "cpu",
        ],
        &["step-0000040", "checksum"],
    );
    let r = kiln(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        c,
        "--backend",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("not using") && err.contains("step-0000040"),
        "{err}"
    );
    // A checkpoint that verifies but does not load (a renamed tensor, the manifest resealed):
    // resume passes it over for the intact one before it and ends where an intact run ends.
    let st = step(30).join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let at = bytes
        .windows(6)
        .position(|w| w == b"q_proj")
        .expect("a q_proj tensor");
    let mut bytes = bytes;
    bytes[at..at + 6].copy_from_slice(b"q_prxj");
    std::fs::write(&st, bytes).unwrap();
    checkpoint::write_manifest(&step(30)).unwrap();
    let r = kiln(&[
        "train",
        config.to_str().unwrap(),
        "--resume",
        "--allow-config-change",
        "--set",
        "train.max_steps=50",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("step-0000040")
            && err.contains("step-0000030")
            && err.contains("missing from the weights"),
        "{err}"
    );
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        stdout.contains("resuming from") && stdout.contains("step-0000020"),
        "{stdout}"
    );
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = at.min(bytes.len() - 1);
    bytes[i] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

/// A closed stdout, a full disk under the event file, a full disk under the checkpoint, a
/// signal while loading, and many runs starting on one directory at once.
#[test]
fn sinks_disks_signals_and_races_cannot_kill_a_run_uncleanly() {
    let (dir, corpus) = scratch("sinks");
    let out = dir.path().join("runs");
    let config = write_tiny_config(
        dir.path(),
        &out,
        &corpus,
        "p",
        &[
            "train.max_steps=400",
            "train.save_every=0",
            "train.eval_every=0",
            "logging.log_every=1",
        ],
    );
    // stdout closed after a few lines (`| head`): a warning, a checkpoint, exit 1, no panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", config.to_str().unwrap()])
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..8 {
            lines.next();
        }
    } // the pipe closes here
    let r = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("Broken pipe") && err.contains("stopped at step"),
        "{err}"
    );
    let saved = kiln::train::checkpoint::latest(&out.join("p")).expect("a checkpoint");
    assert!(err.contains(saved.to_str().unwrap()), "{err}");

    // Forty starts on one fresh run directory: exactly one trains, every other is told why.
    let race = write_tiny_config(
        dir.path(),
        &out,
        &corpus,
        "race",
        &[
            "train.max_steps=30",
            "train.save_every=0",
            "train.eval_every=0",
        ],
    );
    let children: Vec<_> = (0..40)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["train", race.to_str().unwrap()])
                .current_dir(repo())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut won = 0;
    for c in children {
        let r = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        if r.status.success() {
            won += 1;
        } else {
            assert!(
                err.contains("in use by another kiln run") || err.contains("already holds"),
                "{err}"
            );
        }
    }
    assert_eq!(won, 1);

    // A signal while the model loads ends the process at once (nothing is half-written then).
    let gguf = smollm2().expect("KILN_SMOLLM2_GGUF: run the tests through scripts/test");
    let data = dir.path().join("chat");
    std::fs::create_dir_all(&data).unwrap();
    for f in ["train.jsonl", "valid.jsonl"] {
        std::fs::write(data.join(f), "{\"text\": \"hello there\"}\n").unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "finetune",
            "--model",
            gguf.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--output-dir",
            out.to_str().unwrap(),
            "--backend",
            "cpu",
            "--name",
            "sig",
        ])
        .current_dir(repo())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = std::time::Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(sent.elapsed().as_secs_f64() < 2.0, "{:?}", sent.elapsed());
    assert!(kiln::train::checkpoint::list(&out.join("sig")).is_empty());

    // A full disk (a small tmpfs; needs root to mount, as in CI): under the event file, a warning
    // and a checkpoint then exit 1 (`stop`) or training on (`continue`); under the checkpoint,
    // the reason reaches the user.
    let full = dir.path().join("full");
    std::fs::create_dir_all(full.join("run/tensorboard")).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(full.join("run/tensorboard"))
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("note: cannot mount a tmpfs (not root): the disk-full cases are not run");
        return;
    }
    let tb = write_tiny_config(
        dir.path(),
        &full,
        &corpus,
        "run",
        &[
            "train.max_steps=60",
            "train.save_every=0",
            "train.eval_every=0",
            "logging.histograms_every=5",
        ],
    );
    let r = kiln(&["train", tb.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("stopped at step"),
        "{err}"
    );
    let r = kiln(&[
        "train",
        tb.to_str().unwrap(),
        "--resume",
        "--allow-config-change",
        "--set",
        "train.on_save_error=continue",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("training goes on without that output"),
        "{err}"
    );
    let _ = Command::new("umount")
        .arg(full.join("run/tensorboard"))
        .status();

    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok);
    let wide = write_tiny_config(
        dir.path(),
        &small,
        &corpus,
        "w",
        &[
            "model.hidden_size=128",
            "train.max_steps=10",
            "logging.tensorboard=false",
        ],
    );
    let r = kiln(&["train", wide.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&r.stderr);
    let _ = Command::new("umount").arg(&small).status();
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("checkpoint failed") && err.contains("No space left on device"),
        "{err}"
    );
}

// kiln-models builds no test binary of its own (each links Burn): its unit-level checks live here.

/// The divisors llama.cpp writes as `rope_freqs` for a Llama 3 scaling.
fn llama3_divisors(theta: f64, dim: usize, scaling: &RopeScaling) -> Vec<f32> {
    let rope = Rope {
        theta,
        rotary_dim: dim,
        scaling: scaling.clone(),
    };
    let inv = rope.inv_freq(0);
    (0..dim / 2)
        .map(|i| ((1.0 / theta.powf(2.0 * i as f64 / dim as f64)) / inv[i]) as f32)
        .collect()
}

#[test]
fn llama3_parameters_are_recovered_from_gguf_divisors() {
    let llama3 = |factor, high, original| RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: high,
        original_max_position_embeddings: original,
    };
    // Llama 3.1 8B and Llama 3.2 1B, then a tiny one with a single frequency between the bands.
    for (theta, dim, scaling) in [
        (500000.0, 128, llama3(8.0, 4.0, 8192)),
        (500000.0, 64, llama3(32.0, 4.0, 8192)),
        (10000.0, 32, llama3(8.0, 4.0, 256)),
    ] {
        let v = llama3_divisors(theta, dim, &scaling);
        let found = Rope::llama3_from_divisors(theta, dim, &v).expect("recovered");
        let RopeScaling::Llama3 {
            factor,
            high_freq_factor,
            original_max_position_embeddings,
            ..
        } = found
        else {
            panic!("{found:?}");
        };
        let RopeScaling::Llama3 {
            factor: f0,
            high_freq_factor: h0,
            original_max_position_embeddings: o0,
            ..
        } = scaling
        else {
            unreachable!()
        };
        assert!((factor - f0).abs() < 1e-5 && original_max_position_embeddings == o0);
        // Where no frequency pins it, `high` may differ; the divisors must not.
        assert_eq!(llama3_divisors(theta, dim, &found).len(), v.len());
        if dim == 128 {
            assert!((high_freq_factor - h0).abs() < 1e-3, "{high_freq_factor}");
        }
    }
    assert_eq!(
        Rope::llama3_from_divisors(10000.0, 8, &[1.0; 4]),
        Some(RopeScaling::None)
    );
    assert_eq!(
        Rope::llama3_from_divisors(10000.0, 8, &[1.0, 5.0, 2.0, 8.0]),
        None
    );
    assert_eq!(Rope::llama3_from_divisors(10000.0, 8, &[f32::NAN; 4]), None);
}

/// Every GGUF vocabulary kiln rebuilds (`kiln_formats::gguf_tokenizer`) tokenizes llama.cpp's
/// tokenizer test inputs to the ids in llama.cpp's `.out` files, which llama.cpp made with
/// transformers (`convert_hf_to_gguf_update.py`): SentencePiece (Llama 2, Phi-3) and byte-level
/// BPE with each pre-tokenizer kiln reads. scripts/fetch-llama-vocab brings the files.
#[test]
fn gguf_tokenizers_match_llama_cpp_test_vectors() {
    let Some(dir) = std::env::var_os("KILN_LLAMA_VOCAB_DIR").map(PathBuf::from) else {
        panic!("KILN_LLAMA_VOCAB_DIR is not set: run the tests through scripts/test");
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in [
        "llama-spm",
        "phi-3",
        "qwen2",
        "llama-bpe",
        "gpt-2",
        "starcoder",
        "refact",
    ] {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let file = kiln::models::gguf::GgufFile::read(&path).unwrap();
        let json = file.tokenizer_json().unwrap().to_string();
        let tokenizer = kiln::data::Tokenizer::from_hf_json(&json, &path).unwrap();
        let inputs = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
        let outputs = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
        let inputs: Vec<&str> = inputs
            .strip_suffix("\n__ggml_vocab_test__\n")
            .unwrap()
            .split("\n__ggml_vocab_test__\n")
            .collect();
        let outputs: Vec<&str> = outputs.lines().collect();
        assert_eq!(inputs.len(), outputs.len(), "{name}: tests and results");
        for (text, ids) in inputs.iter().zip(&outputs) {
            let want: Vec<u32> = ids.split_whitespace().map(|t| t.parse().unwrap()).collect();
            let got = tokenizer.encode(text).unwrap();
            if got != want {
                failures.push(format!("{name}: {text:?}\n  kiln {got:?}\n  want {want:?}"));
            }
            checked += 1;
        }
    }
    assert!(checked > 200, "{checked} vectors");
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // SentencePiece text decodes back whole, and Gemma's files (`add_space_prefix = false`)
    // get no space in front: " Hello world" then tokenizes as Llama's "Hello world" does.
    let path = dir.join("ggml-vocab-llama-spm.gguf");
    let mut file = kiln::models::gguf::GgufFile::read(&path).unwrap();
    let spm = |file: &kiln::models::gguf::GgufFile| {
        let json = file.tokenizer_json().unwrap().to_string();
        kiln::data::Tokenizer::from_hf_json(&json, &path).unwrap()
    };
    let llama = spm(&file);
    let text = "Hello world\n\tcafé 🦙 <0x0A>";
    assert_eq!(llama.decode(&llama.encode(text).unwrap()).unwrap(), text);
    file.metadata.insert(
        "tokenizer.ggml.add_space_prefix".into(),
        kiln::models::gguf::Value::Bool(false),
    );
    let gemma_like = spm(&file);
    assert_eq!(
        gemma_like.encode(" Hello world").unwrap(),
        llama.encode("Hello world").unwrap()
    );
    assert_eq!(gemma_like.encode("Hello").unwrap(), vec![10994]); // "Hello", not "▁Hello"
    assert_eq!(
        gemma_like
            .decode(&gemma_like.encode(" Hello world").unwrap())
            .unwrap(),
        " Hello world"
    );
}

/// FNV-1a (64 bits) of f32 values' little-endian bytes, as tests/fixtures/make_kquants.py hashes
/// gguf-py's.
fn fnv1a64(values: &[f32]) -> u64 {
    values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Files llama.cpp's own quantizer wrote (tests/fixtures/make_kquants.py): Ollama's default mix,
/// Q4_K_M, as a whole file, and a file holding every other type it writes for such a model, one
/// per tensor. kiln's de-quantised values equal gguf-py's bit for bit (each tensor's FNV-1a), and
/// kiln's logits equal transformers' on those values.
#[test]
fn llama_quantize_files_load_at_gguf_py_values_and_transformers_logits() {
    let dir = repo().join("tests/fixtures/kquants");
    let checks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checks.json")).unwrap()).unwrap();
    let mut types = std::collections::BTreeSet::new();
    for name in ["Q4_K_M", "mixed"] {
        let file = kiln::models::gguf::GgufFile::read(&dir.join(format!("{name}.gguf"))).unwrap();
        let c = &checks[name];
        assert_eq!(file.tensors.len(), c["types"].as_object().unwrap().len());
        for t in &file.tensors {
            let ty = kiln::models::ggml_types::type_name(t.ggml_type);
            assert_eq!(
                ty,
                c["types"][&t.name].as_str().unwrap(),
                "{name}: {}",
                t.name
            );
            let hash = format!("{:016x}", fnv1a64(&file.dequantize(t)));
            assert_eq!(
                hash,
                c["fnv1a64"][&t.name].as_str().unwrap(),
                "{name}: {} ({ty}) differs from gguf-py",
                t.name
            );
            types.insert(ty);
        }
        let model = kiln::models::gguf::load_model(&file, &burn::tensor::Device::flex()).unwrap();
        let diff = logit_difference(&model, &dir, format!("expected-{name}.safetensors"));
        assert!(
            diff < 1e-4,
            "{name}: logits differ from transformers by {diff}"
        );
    }
    for ty in [
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q8_0",
    ] {
        assert!(
            types.contains(ty),
            "no tensor of {ty} in the fixtures: {types:?}"
        );
    }
}

/// `kiln … --model NAME` and `model.pretrained: NAME` find models where people keep them
/// (`kiln_config::locate`), in layouts this test builds under a scratch HOME: a Hugging Face
/// repo id in the Hub cache (the snapshot `refs/main` names, not the newer stray one), an Ollama
/// `NAME:TAG` through its manifest to the GGUF blob, an LM Studio `PUBLISHER/REPO`; a name on
/// no list, a missing tag and an ambiguous folder are refused (exit 2) saying where kiln looked.
#[test]
fn models_are_found_by_hub_ollama_and_lm_studio_names() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let family = repo().join("tests/fixtures/families/llama3");
    let copy_model = |dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(family.join(f), dir.join(f)).unwrap();
        }
    };
    let hub = h.join(".cache/huggingface/hub/models--kiln-test--tiny-llama");
    copy_model(&hub.join("snapshots/0123abcd"));
    std::fs::create_dir_all(hub.join("snapshots/ffff0000")).unwrap(); // newer, empty
    std::fs::create_dir_all(hub.join("refs")).unwrap();
    std::fs::write(hub.join("refs/main"), "0123abcd\n").unwrap();
    let store = h.join(".ollama/models");
    let digest = "ab".repeat(32);
    let manifest = store.join("manifests/registry.ollama.ai/library/tiny");
    std::fs::create_dir_all(&manifest).unwrap();
    std::fs::write(
        manifest.join("q4"),
        format!(
            r#"{{"schemaVersion":2,"layers":[{{"mediaType":"application/vnd.ollama.image.template","digest":"sha256:{}"}},{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{digest}"}}]}}"#,
            "cd".repeat(32)
        ),
    )
    .unwrap();
    std::fs::create_dir_all(store.join("blobs")).unwrap();
    let kquants = repo().join("tests/fixtures/kquants/Q4_K_M.gguf");
    std::fs::copy(&kquants, store.join(format!("blobs/sha256-{digest}"))).unwrap();
    let lms = h.join(".lmstudio/models/kiln-test/tiny-GGUF");
    std::fs::create_dir_all(&lms).unwrap();
    std::fs::copy(&kquants, lms.join("tiny-Q4_K_M.gguf")).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(repo())
            .env("HOME", h)
            .env_remove("HF_HOME")
            .env_remove("HF_HUB_CACHE")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("OLLAMA_MODELS")
            .output()
            .unwrap()
    };
    let text = output_text;
    // The Hub cache: generate from the repo id.
    let o = run(&[
        "generate",
        "--model",
        "kiln-test/tiny-llama",
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // Ollama and LM Studio, as `model.pretrained` (kiln plan reads the GGUF's shape).
    for name in [
        "ollama:tiny:q4",
        "kiln-test/tiny-GGUF",
        "lmstudio:kiln-test/tiny-GGUF",
    ] {
        let set = format!("model.pretrained={name}");
        let o = run(&["plan", "configs/smollm2-lora.yaml", "--set", &set]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(
            text(&o).contains("width 256, 4 heads (2 kv)"),
            "{name}: {}",
            text(&o)
        );
    }
    // HF_HUB_CACHE moves the Hub cache; the Ollama store follows OLLAMA_MODELS.
    let moved = tempfile::tempdir().unwrap();
    std::fs::rename(h.join(".cache/huggingface/hub"), moved.path().join("hub")).unwrap();
    std::fs::rename(&store, moved.path().join("ollama")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["plan", "configs/smollm2-lora.yaml", "--set"])
        .arg("model.pretrained=kiln-test/tiny-llama")
        .current_dir(repo())
        .env("HOME", h)
        .env("HF_HUB_CACHE", moved.path().join("hub"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["plan", "configs/smollm2-lora.yaml", "--set"])
        .arg("model.pretrained=ollama:tiny:q4")
        .current_dir(repo())
        .env("HOME", h)
        .env("OLLAMA_MODELS", moved.path().join("ollama"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // Refusals: exit 2, naming where kiln looked and how to fetch.
    std::fs::copy(&kquants, lms.join("tiny-Q6_K.gguf")).unwrap();
    for (args, wants) in [
        (
            vec![
                "generate",
                "--model",
                "HuggingFaceTB/SmolLM2-135M-Instruct",
                "--prompt",
                "hi",
            ],
            vec![
                "models--HuggingFaceTB--SmolLM2-135M-Instruct",
                ".lmstudio/models/HuggingFaceTB/SmolLM2-135M-Instruct",
                "huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct",
            ],
        ),
        (
            vec!["generate", "--model", "ollama:tiny:q8", "--prompt", "hi"],
            vec!["library/tiny/q8", "ollama pull tiny:q8"],
        ),
        (
            vec![
                "plan",
                "configs/smollm2-lora.yaml",
                "--set",
                "model.pretrained=kiln-test/tiny-GGUF",
            ],
            vec![
                "model.pretrained",
                "2 GGUF files",
                "kiln-test/tiny-GGUF/tiny-Q6_K.gguf",
            ],
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        for w in wants {
            assert!(text(&o).contains(w), "{args:?}: no `{w}` in {}", text(&o));
        }
    }
}

/// mlx-lm's `--fine-tune-type` means what `--full` does; DoRA is refused by name. Mistakes in
/// `kiln finetune` name the flag, and one bad `--set` names itself (all exit 2).
#[test]
fn finetune_takes_mlx_lm_fine_tune_type_and_errors_name_the_flag() {
    let model = repo().join("tests/fixtures/families/llama3");
    let config = |extra: &[&str]| {
        let mut args = vec![
            "finetune",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "datasets/roman-numerals",
            "--print-config",
        ];
        args.extend_from_slice(extra);
        kiln(&args)
    };
    let method = |o: &std::process::Output| {
        let yaml = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{yaml}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        yaml.lines()
            .skip_while(|l| !l.starts_with("finetune:"))
            .find(|l| l.trim_start().starts_with("method:"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(method(&config(&[])), "method: lora");
    // `--plan` prints kiln plan's report for the run the flags make.
    let o = kiln(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "datasets/roman-numerals",
        "--batch-size",
        "2",
        "--plan",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("model: llama") && out.contains("batch 2 x sequence") && out.contains("total"),
        "{out}"
    );
    assert_eq!(
        method(&config(&["--fine-tune-type", "full"])),
        "method: full"
    );
    assert_eq!(method(&config(&["--full"])), "method: full");
    let dora = config(&["--fine-tune-type", "dora"]);
    assert!(
        output_text(&dora).contains("dora: true"),
        "{}",
        output_text(&dora)
    );
    // Mistakes name the flag that made them, exit 2.
    for (bad, wants) in [
        (vec!["--fine-tune-type", "dora", "--full"], "--full"),
        (vec!["--fine-tune-type", "lora", "--full"], "--full"),
        (vec!["--rank", "0"], "--rank: 0 is outside"),
        (vec!["--backend", "gpu"], "--backend gpu: unknown variant"),
    ] {
        let o = config(&bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(wants) && !err.contains("--set"),
            "{bad:?}: {err}"
        );
    }
    // A dataset directory without its splits is refused before loading, naming the flag.
    let scratch_out = tempfile::tempdir().unwrap();
    let o = kiln(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "tests/fixtures",
        "--output-dir",
        scratch_out.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--data tests/fixtures: no train.jsonl"),
        "{err}"
    );
    // One bad `--set` among several is the one named; a section set whole lists its fields.
    let o = kiln(&[
        "train",
        "configs/shakespeare-char.yaml",
        "--set",
        "train.max_steps=5",
        "--set",
        "optim.lr=abc",
        "--set",
        "train.batch_size=2",
        "--print-config",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--set optim.lr=abc:") && !err.contains("max_steps"),
        "{err}"
    );
    let o = kiln(&[
        "train",
        "configs/shakespeare-char.yaml",
        "--set",
        "backend=cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("backend.kind") && o.status.code() == Some(2),
        "{err}"
    );
}

/// The thread count kiln reports is the one it runs on (`RAYON_NUM_THREADS`), and `generate`
/// reports its speed and peak memory on stderr as mlx-lm does, leaving stdout the text.
#[test]
fn generate_reports_speed_and_the_thread_count_follows_rayon() {
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("devices")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let devices = String::from_utf8_lossy(&o.stdout);
    assert!(devices.contains("Burn Flex, 1 threads"), "{devices}");
    // Each adapter names the compilers kiln can run on it: lavapipe only WGSL (SPIR-V crashes it).
    for adapter in devices.split("\ngpu: ").skip(1) {
        let compilers = adapter
            .lines()
            .find_map(|l| l.trim().strip_prefix("compilers: "))
            .unwrap_or_else(|| panic!("no compilers line: {devices}"));
        assert!(
            compilers.starts_with("wgsl (backend.kind: wgpu)"),
            "{devices}"
        );
        if adapter.contains("[software") {
            assert!(!compilers.contains("spirv"), "{devices}");
        }
    }
    let model = repo().join("tests/fixtures/families/llama3");
    let o = kiln(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        "--temp",
        "0",
        "--backend",
        "cpu",
    ]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("hi") && !out.contains("tokens/s"), "{out}");
    for want in [
        "prompt: ",
        "generation: 4 tokens, ",
        "tokens/s",
        "peak memory: ",
    ] {
        assert!(err.contains(want), "no `{want}` in {err}");
    }
}

/// splitmix64 from `seed`, each value `(u1 + u2 + u3 + u4 - 2) / 8` of four 53-bit uniforms in
/// f64, then f32: tests/fixtures/make_gguf_writes.py computes the same values bit for bit.
fn fixture_weights(seed: u64, n: usize) -> Vec<f32> {
    let uniform = |i: u64| {
        let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    };
    (0..n as u64)
        .map(|k| {
            let s = ((uniform(4 * k + 1) + uniform(4 * k + 2)) + uniform(4 * k + 3))
                + uniform(4 * k + 4);
            ((s - 2.0) / 8.0) as f32
        })
        .collect()
}

/// The model of tests/fixtures/make_gguf_writes.py as a Hugging Face directory in `dir`.
fn write_gguf_writes_model(
    dir: &Path,
) -> std::collections::BTreeMap<String, kiln::models::safetensors_io::HostTensor> {
    use kiln::models::safetensors_io::HostTensor;
    let (layers, width, heads, kv, ffn, vocab) = (8, 256, 4, 2, 288, 256);
    let head_dim = width / heads;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, width]),
        ("model.norm.weight".into(), vec![width]),
        ("lm_head.weight".into(), vec![vocab, width]),
    ];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![width]),
            ("post_attention_layernorm.weight", vec![width]),
            ("self_attn.q_proj.weight", vec![heads * head_dim, width]),
            ("self_attn.k_proj.weight", vec![kv * head_dim, width]),
            ("self_attn.v_proj.weight", vec![kv * head_dim, width]),
            ("self_attn.o_proj.weight", vec![width, heads * head_dim]),
            ("mlp.gate_proj.weight", vec![ffn, width]),
            ("mlp.up_proj.weight", vec![ffn, width]),
            ("mlp.down_proj.weight", vec![width, ffn]),
        ] {
            shapes.push((format!("{p}.{name}"), shape));
        }
    }
    let tensors: std::collections::BTreeMap<String, HostTensor> = shapes
        .into_iter()
        .enumerate()
        .map(|(seed, (name, shape))| {
            let mut data = fixture_weights(seed as u64, shape.iter().product());
            if name.contains("norm") {
                data.iter_mut().for_each(|v| *v += 1.0);
            }
            (name, HostTensor { shape, data })
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    kiln::models::safetensors_io::write_f32(&dir.join("model.safetensors"), &tensors, &[]).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": width, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tokenizer = repo().join("tests/fixtures/families/llama3/tokenizer.json");
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).unwrap();
    tensors
}

fn fnv1a64_bytes(bytes: &[u8]) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
    }
    format!("{h:016x}")
}

/// `kiln fuse --model MODEL --gguf OUT --quant QUANT`, which must succeed.
fn fuse_to_gguf(model: &Path, out: &Path, quant: &str) {
    let r = kiln(&[
        "fuse",
        "--model",
        model.to_str().unwrap(),
        "--gguf",
        out.to_str().unwrap(),
        "--quant",
        quant,
    ]);
    assert!(
        r.status.success(),
        "{} {quant}: {}",
        model.display(),
        output_text(&r)
    );
}

/// gguf-py's reading of `path` (tests/read_gguf.py).
fn gguf_py_view(path: &Path) -> serde_json::Value {
    let r = Command::new("python3")
        .arg(repo().join("tests/read_gguf.py"))
        .arg(path)
        .output()
        .expect("python3 with gguf is needed to read GGUF files with gguf-py");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    serde_json::from_slice(&r.stdout).unwrap()
}

/// gguf-py reads what kiln wrote as kiln does: the same tensors, shapes and types, and the
/// metadata llama.cpp needs to load it.
fn assert_gguf_py_agrees(path: &Path, architecture: &str) -> kiln::models::gguf::GgufFile {
    let file = kiln::models::gguf::GgufFile::read(path).unwrap();
    let view = gguf_py_view(path);
    let theirs = view["tensors"].as_array().unwrap();
    assert_eq!(theirs.len(), file.tensors.len());
    for (t, g) in file.tensors.iter().zip(theirs) {
        assert_eq!(g[0].as_str().unwrap(), t.name);
        let dims: Vec<u64> = g[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(dims, t.dims, "{}", t.name);
        assert_eq!(
            g[2].as_str().unwrap(),
            kiln::models::ggml_types::type_name(t.ggml_type),
            "{}",
            t.name
        );
    }
    let meta = &view["metadata"];
    assert_eq!(meta["general.architecture"], architecture);
    for key in [
        "block_count",
        "embedding_length",
        "attention.head_count",
        "rope.freq_base",
    ] {
        assert!(
            meta.get(format!("{architecture}.{key}")).is_some(),
            "{key}: {meta}"
        );
    }
    assert_eq!(
        meta["tokenizer.ggml.tokens"]["len"].as_u64().unwrap() as usize,
        file.metadata["tokenizer.ggml.tokens"]
            .as_array()
            .unwrap()
            .len()
    );
    file
}

/// `kiln fuse --gguf --quant` for every K-quant mix, against what llama.cpp's `llama-quantize`
/// made of the same weights (tests/fixtures/make_gguf_writes.py): each tensor gets the type
/// llama.cpp chose, and reconstructs its weights no worse than 1.05× llama.cpp's error.
#[test]
fn gguf_k_quant_mixes_match_llama_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    let source = write_gguf_writes_model(&model_dir);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/gguf_writes/reference.json")).unwrap(),
    )
    .unwrap();
    for quant in ["q4_k_m", "q5_k_m", "q6_k", "q8_0"] {
        let out = tmp.path().join(format!("{quant}.gguf"));
        fuse_to_gguf(&model_dir, &out, quant);
        let file = assert_gguf_py_agrees(&out, "llama");
        let bytes = std::fs::read(&out).unwrap();
        let (family, config) = kiln::models::gguf::read_config(&file).unwrap();
        let hf = kiln::models::gguf::hf_tensors(&file, family, &config).unwrap();
        let names = family.gguf_names();
        let expected = reference[quant].as_object().unwrap();
        assert_eq!(expected.len(), file.tensors.len(), "{quant}");
        let (mut identical, mut worst) = (0, 0f64);
        for t in &file.tensors {
            let e = &expected[&t.name];
            let ty = kiln::models::ggml_types::type_name(t.ggml_type);
            assert_eq!(ty, e["type"].as_str().unwrap(), "{quant}: {}", t.name);
            let hf_name = names.to_hf(&t.name).unwrap();
            let sq: f64 = source[&hf_name]
                .data
                .iter()
                .zip(&hf[&hf_name].data)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let theirs = e["sq_error"].as_f64().unwrap();
            let ratio = if theirs > 0.0 { sq / theirs } else { sq };
            assert!(
                ratio <= 1.05 || sq <= 1e-12,
                "{quant}: {} ({ty}) error {sq:.4e} vs llama.cpp's {theirs:.4e}",
                t.name
            );
            eprintln!(
                "  {quant} {:<28} {ty:<5} error {sq:.4e}, llama.cpp's {theirs:.4e}",
                t.name
            );
            worst = worst.max(ratio);
            let raw = &bytes[t.offset..t.offset + t.n_bytes];
            identical += usize::from(fnv1a64_bytes(raw) == e["fnv1a64"].as_str().unwrap());
        }
        eprintln!(
            "{quant}: {} tensors, worst error {worst:.4}× llama.cpp's, {identical} byte-identical \
             to llama-quantize's",
            file.tensors.len()
        );
    }
}

/// `kiln fuse --gguf` round trips: every family kiln writes, from Hugging Face and from GGUF,
/// in each unmixed encoding; gguf-py reads the file, kiln's logits from it follow
/// transformers' within the encoding's rounding, and llama.cpp's names match its converter's.
#[test]
fn gguf_files_kiln_writes_read_back_at_transformers_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let device = burn::tensor::Device::flex();
    for (name, arch) in [
        ("llama3", "llama"),
        ("qwen3", "qwen3"),
        ("gemma3", "gemma3"),
        ("phi3", "phi3"),
        ("smollm3", "smollm3"),
    ] {
        let fixture = repo().join("tests/fixtures/families").join(name);
        let converted = kiln::models::gguf::GgufFile::read(&fixture.join("model.gguf")).unwrap();
        // llama.cpp scales Gemma 3's scores by head_dim^-0.5: the fixture's other
        // query_pre_attn_scalar is refused, and the model as llama.cpp computes it is written
        // (transformers' logits of that model: expected-gguf.safetensors).
        let (dir, expected) = if name == "gemma3" {
            let out = tmp.path().join("refused.gguf");
            fails_naming(
                &[
                    "fuse",
                    "--model",
                    fixture.to_str().unwrap(),
                    "--gguf",
                    out.to_str().unwrap(),
                ],
                &["query_pre_attn_scalar"],
            );
            assert!(!out.exists());
            let dir = tmp.path().join("gemma3-llama-cpp-scale");
            copy_dir(&fixture, &dir);
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            config["query_pre_attn_scalar"] = config["head_dim"].clone();
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            (dir, "expected-gguf.safetensors")
        } else if name == "smollm3" {
            // The fixture keeps SmolLM3's own generation_config.json, whose end-of-turn id lies
            // beyond this tiny vocabulary: a model directory would be refused with it.
            let dir = tmp.path().join("smollm3");
            copy_dir(&fixture, &dir);
            std::fs::remove_file(dir.join("generation_config.json")).unwrap();
            (dir, "expected.safetensors")
        } else {
            (fixture, "expected.safetensors")
        };
        let mut reference_names: Vec<&str> =
            converted.tensors.iter().map(|t| t.name.as_str()).collect();
        reference_names.sort_unstable();
        let source = kiln::models::hf::load_model(&dir, &device)
            .unwrap()
            .to_hf_tensors();
        // (encoding, worst relative RMS error of a tensor, of the logits): the type's rounding.
        let logits = kiln::models::safetensors_io::read_all(&dir.join(expected)).unwrap();
        let max_logit = logits["logits"]
            .data
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        // Relative to the largest logit: a tiny random model turns the weights' rounding into
        // a few times that in its logits. Gemma's reference was computed on f16-rounded matrices.
        let f32_bound = if name == "gemma3" { 5e-3 } else { 2e-6 };
        for (quant, tensor_bound, logit_bound) in [
            ("f32", 1e-6, f32_bound),
            ("f16", 5e-4, 1e-2),
            ("bf16", 4e-3, 5e-2),
            ("q8_0", 1e-2, 0.15),
        ] {
            let out = tmp.path().join(format!("{name}-{quant}.gguf"));
            fuse_to_gguf(&dir, &out, quant);
            let file = assert_gguf_py_agrees(&out, arch);
            let mut names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, reference_names, "{name}: llama.cpp's tensor names");
            let (family, config) = kiln::models::gguf::read_config(&file).unwrap();
            let read = kiln::models::gguf::hf_tensors(&file, family, &config).unwrap();
            assert_eq!(read.len(), source.len(), "{name} {quant}");
            let mut worst = 0f64;
            for (tensor, t) in &read {
                let x = &source[tensor].data;
                let (mut err, mut norm) = (0f64, 0f64);
                for (a, b) in x.iter().zip(&t.data) {
                    err += ((a - b) as f64).powi(2);
                    norm += (*a as f64).powi(2);
                }
                worst = worst.max((err / norm.max(1e-30)).sqrt());
            }
            let model = kiln::models::gguf::load_model(&file, &device).unwrap();
            let diff = logit_difference(&model, &dir, expected);
            eprintln!(
                "{name} {quant}: worst tensor error {worst:.2e}, max |kiln GGUF - transformers| \
                 = {diff:.2e}"
            );
            assert!(
                worst <= tensor_bound,
                "{name} {quant}: a tensor is off by {worst}"
            );
            assert!(
                diff <= logit_bound * max_logit,
                "{name} {quant}: logits differ by {diff}"
            );
        }
        // From a GGUF base (the f32 file just written), the tokenizer metadata is carried over
        // as it was.
        let base = tmp.path().join(format!("{name}-f32.gguf"));
        let converted = kiln::models::gguf::GgufFile::read(&base).unwrap();
        let out = tmp.path().join(format!("{name}-from-gguf.gguf"));
        fuse_to_gguf(&base, &out, "f32");
        let file = kiln::models::gguf::GgufFile::read(&out).unwrap();
        let tokenizer_keys = converted
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."));
        assert!(
            tokenizer_keys.clone().count() >= 5,
            "{name}: {:?}",
            converted.metadata.keys()
        );
        for (key, value) in tokenizer_keys {
            assert_eq!(file.metadata.get(key), Some(value), "{name}: {key}");
        }
    }
    // An existing file is never written over; an unknown encoding is named.
    let existing = tmp.path().join("llama3-f32.gguf");
    let llama3 = repo().join("tests/fixtures/families/llama3");
    fails_naming(
        &[
            "fuse",
            "--model",
            llama3.to_str().unwrap(),
            "--gguf",
            existing.to_str().unwrap(),
        ],
        &["--gguf", "exists"],
    );
    fails_naming(
        &[
            "fuse",
            "--model",
            llama3.to_str().unwrap(),
            "--gguf",
            "x.gguf",
            "--quant",
            "q3_k",
        ],
        &["q3_k", "q4_k_m"],
    );
}

/// `llama_tensor_get_type` for the mixes kiln writes, on the shapes that decide it.
#[test]
fn gguf_mixes_choose_types_as_llama_quantize_does() {
    use kiln::models::ggml_types::{F16, F32, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
    use kiln::models::gguf_export::{GgufQuant, MixContext, tensor_type, use_more_bits};
    let ty = |quant: GgufQuant, name: &str, dims: &[u64], tied: bool| {
        let mix = MixContext {
            n_layer: 8,
            tied,
            is_70b: false,
        };
        tensor_type(quant, name, dims, mix)
    };
    use GgufQuant::{Q4KM, Q5KM, Q6K};
    // More bits for the first and last eighth and every third layer between: 0, 3, 6, 7 of 8.
    let more: Vec<usize> = (0..8).filter(|&l| use_more_bits(l, 8)).collect();
    assert_eq!(more, [0, 3, 6, 7]);
    assert_eq!(ty(Q4KM, "blk.3.attn_v.weight", &[256, 64], false), Q6_K);
    assert_eq!(ty(Q4KM, "blk.2.attn_v.weight", &[256, 64], false), Q4_K);
    // Fused QKV (Phi-3) is chosen as attn_v is.
    assert_eq!(ty(Q4KM, "blk.3.attn_qkv.weight", &[256, 512], false), Q6_K);
    assert_eq!(ty(Q4KM, "blk.2.attn_qkv.weight", &[256, 512], false), Q4_K);
    assert_eq!(ty(Q4KM, "blk.7.ffn_down.weight", &[512, 256], false), Q6_K);
    assert_eq!(ty(Q5KM, "blk.1.ffn_down.weight", &[512, 256], false), Q5_K);
    assert_eq!(ty(Q6K, "blk.0.ffn_down.weight", &[512, 256], false), Q6_K);
    assert_eq!(ty(Q4KM, "output.weight", &[256, 1000], false), Q6_K);
    assert_eq!(ty(Q4KM, "token_embd.weight", &[256, 1000], false), Q4_K);
    assert_eq!(ty(Q4KM, "token_embd.weight", &[256, 1000], true), Q6_K);
    // SmolLM2's width 576 is no multiple of 256: 32-block fallbacks.
    assert_eq!(ty(Q4KM, "token_embd.weight", &[576, 1000], true), Q8_0);
    assert_eq!(ty(Q4KM, "blk.1.attn_q.weight", &[576, 576], true), Q5_0);
    assert_eq!(ty(Q5KM, "blk.1.attn_q.weight", &[576, 576], true), Q5_1);
    assert_eq!(ty(Q4KM, "blk.0.attn_v.weight", &[576, 192], true), Q8_0);
    assert_eq!(
        ty(GgufQuant::Q8_0, "blk.0.attn_q.weight", &[40, 40], true),
        F16
    );
    assert_eq!(ty(Q4KM, "blk.0.attn_norm.weight", &[576], true), F32);
    assert_eq!(
        ty(GgufQuant::F16, "blk.0.attn_q.weight", &[576, 576], true),
        F16
    );
    assert_eq!(ty(GgufQuant::F16, "blk.0.attn_q.bias", &[576], true), F32);
}

/// `kiln export-adapter` writes what `convert_lora_to_gguf.py` writes: gguf-py reads an adapter
/// GGUF (`general.type = adapter`, `adapter.lora.alpha`, `<tensor>.lora_a`/`.lora_b`), and
/// applying it as llama.cpp does (`W += alpha / r · B A` on the base's GGUF tensors, Q/K rows
/// permuted) gives the tensors `kiln fuse --adapter` writes, rsLoRA's scale folded into alpha.
#[test]
fn lora_adapters_export_as_llama_cpp_adapter_gguf() {
    use kiln::models::safetensors_io::HostTensor;
    let tmp = tempfile::tempdir().unwrap();
    let base = repo().join("tests/fixtures/families/llama3");
    let model = kiln::models::hf::load_model(&base, &burn::tensor::Device::flex()).unwrap();
    let (rank, alpha) = (4usize, 8.0f64);
    let adapter_dir = tmp.path().join("adapter");
    std::fs::create_dir_all(&adapter_dir).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    let targets = ["q_proj", "k_proj", "v_proj", "down_proj"];
    for (seed, linear) in model.arch().linears().into_iter().enumerate() {
        if !targets.contains(&linear.module()) {
            continue;
        }
        let prefix = format!("base_model.model.{}", linear.path);
        for (matrix, shape) in [
            ("lora_A", [rank, linear.d_in]),
            ("lora_B", [linear.d_out, rank]),
        ] {
            let n = shape[0] * shape[1];
            let data = fixture_weights(1000 + 2 * seed as u64 + u64::from(matrix == "lora_B"), n);
            let t = HostTensor {
                shape: shape.to_vec(),
                data,
            };
            tensors.insert(format!("{prefix}.{matrix}.weight"), t);
        }
    }
    kiln::models::safetensors_io::write_f32(
        &adapter_dir.join("adapter_model.safetensors"),
        &tensors,
        &[],
    )
    .unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "use_rslora": true, "bias": "none",
        "base_model_name_or_path": base.to_str().unwrap(),
    });
    std::fs::write(adapter_dir.join("adapter_config.json"), config.to_string()).unwrap();

    let out = |name: &str| tmp.path().join(name);
    let run = |args: &[&str]| {
        let r = kiln(args);
        assert!(r.status.success(), "{args:?}: {}", output_text(&r));
        output_text(&r)
    };
    let (a, b, f) = (out("adapter.gguf"), out("base.gguf"), out("fused.gguf"));
    let text = run(&[
        "export-adapter",
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--gguf",
        a.to_str().unwrap(),
    ]);
    assert!(text.contains("--lora"), "{text}");
    let base_arg = base.to_str().unwrap();
    fuse_to_gguf(&base, &b, "f32");
    run(&[
        "fuse",
        "--model",
        base_arg,
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--gguf",
        f.to_str().unwrap(),
        "--quant",
        "f32",
    ]);

    let view = gguf_py_view(&a);
    let meta = &view["metadata"];
    assert_eq!(meta["general.type"], "adapter");
    assert_eq!(meta["adapter.type"], "lora");
    assert_eq!(meta["general.architecture"], "llama");
    // rsLoRA scales by alpha / √r; llama.cpp by alpha' / r: alpha' = alpha · √r.
    let folded = meta["adapter.lora.alpha"].as_f64().unwrap();
    assert!(
        (folded - alpha * (rank as f64).sqrt()).abs() < 1e-5,
        "{folded}"
    );
    let layers = model.config().num_hidden_layers;
    assert_eq!(
        view["tensors"].as_array().unwrap().len(),
        2 * targets.len() * layers
    );

    let adapter = kiln::models::gguf::GgufFile::read(&a).unwrap();
    let base_file = kiln::models::gguf::GgufFile::read(&b).unwrap();
    let fused = kiln::models::gguf::GgufFile::read(&f).unwrap();
    let find = |file: &kiln::models::gguf::GgufFile, name: &str| {
        file.tensors.iter().find(|t| t.name == name).cloned()
    };
    let mut adapted = 0;
    for t in &base_file.tensors {
        let w = base_file.dequantize(t);
        let want = fused.dequantize(&find(&fused, &t.name).unwrap());
        let merged = match (
            find(&adapter, &format!("{}.lora_a", t.name)),
            find(&adapter, &format!("{}.lora_b", t.name)),
        ) {
            (Some(la), Some(lb)) => {
                adapted += 1;
                let (d_in, r) = (la.dims[0] as usize, la.dims[1] as usize);
                let d_out = lb.dims[1] as usize;
                assert_eq!(
                    (t.dims[0] as usize, t.dims[1] as usize),
                    (d_in, d_out),
                    "{}",
                    t.name
                );
                assert_eq!(lb.dims[0] as usize, r);
                let (am, bm) = (adapter.dequantize(&la), adapter.dequantize(&lb));
                let scale = (folded / r as f64) as f32;
                let mut m = w.clone();
                for o in 0..d_out {
                    for i in 0..d_in {
                        let delta: f32 = (0..r).map(|k| bm[o * r + k] * am[k * d_in + i]).sum();
                        m[o * d_in + i] += scale * delta;
                    }
                }
                m
            }
            (None, None) => w,
            _ => panic!("{}: one of lora_a and lora_b", t.name),
        };
        let diff = merged
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "{}: llama.cpp's merge differs from kiln's by {diff}",
            t.name
        );
    }
    assert_eq!(adapted, targets.len() * layers);
    // A model is not an adapter.
    fails_naming(
        &[
            "export-adapter",
            "--adapter",
            base_arg,
            "--gguf",
            out("x.gguf").to_str().unwrap(),
        ],
        &["not a LoRA adapter"],
    );
}

/// Relative paths written in a config are the config file's (its data next to it, its runs
/// written beside it), wherever kiln runs from; `--set` paths are the current directory's.
#[test]
fn config_paths_are_relative_to_the_config_file() {
    let (tmp, corpus) = scratch("relative-paths");
    let project = tmp.path().join("project");
    std::fs::create_dir_all(project.join("configs")).unwrap();
    std::fs::create_dir_all(project.join("data")).unwrap();
    std::fs::rename(&corpus, project.join("data/corpus.txt")).unwrap();
    let yaml = tiny_yaml(
        Path::new("../runs"),
        Path::new("../data/corpus.txt"),
        "rel",
        "",
    );
    std::fs::write(project.join("configs/rel.yaml"), yaml).unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(&elsewhere)
            .output()
            .unwrap()
    };
    let r = run(&[
        "train",
        "../project/configs/rel.yaml",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.save_every=2",
    ]);
    assert!(r.status.success(), "{}", output_text(&r));
    assert!(
        project.join("runs/rel/latest").exists(),
        "{}",
        output_text(&r)
    );
    assert!(!elsewhere.join("runs").exists());
    // A path given with --set is the current directory's.
    let r = run(&[
        "train",
        "../project/configs/rel.yaml",
        "--set",
        "data.train=corpus.txt",
        "--print-config",
    ]);
    let text = output_text(&r);
    assert!(
        text.contains(&format!("{}", project.join("runs").display())),
        "{text}"
    );
    assert!(text.contains("train: corpus.txt"), "{text}");
}

/// Splits a shell command line into words: spaces separate, double quotes group.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            _ => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// The README's command blocks (every `sh` block's `scripts/kiln` lines: the default run, what
/// follows it, the LoRA walk-through), command by command as the README writes them, on SmolLM2
/// in a scratch directory: only the step counts shrink. The LoRA walk-through's YAML run and
/// flags run are alternatives, so the YAML one is renamed. Then the fused directory stops where a
/// turn ends: its generation_config.json and config.json name `<|im_end|>`, and (where Python has
/// transformers) `generate()` ends there.
#[test]
fn the_readme_command_blocks_run_as_written() {
    let Some(gguf) = smollm2() else {
        panic!("KILN_SMOLLM2_GGUF is not set: run the tests through scripts/test");
    };
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```sh\n")
        .skip(1)
        .map(|b| &b[..b.find("```").unwrap()])
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    std::os::unix::fs::symlink(repo().join("datasets"), cwd.join("datasets")).unwrap();
    copy_dir(&repo().join("configs"), &cwd.join("configs"));
    let mut ran = Vec::new();
    for line in blocks.join("\n").replace("\\\n", " ").lines() {
        let line = line.split(" # ").next().unwrap().trim();
        let Some(rest) = line.strip_prefix("scripts/kiln ") else {
            continue;
        };
        let mut args: Vec<String> = shell_words(&rest.replace("$G", gguf.to_str().unwrap()));
        for (flag, small) in [("--iters", "3"), ("--batch-size", "2")] {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = small.into();
            }
        }
        if args[0] == "train" {
            let mut sets = vec![
                "train.max_steps=2",
                "train.batch_size=2",
                "train.eval_every=2",
                "train.save_every=2",
            ];
            if args[1].contains("smollm2-lora") {
                sets.push("run.name=from-yaml");
            }
            for set in sets {
                args.extend(["--set".to_string(), set.to_string()]);
            }
        }
        let r = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(r.status.success(), "kiln {args:?}: {}", output_text(&r));
        ran.push(args[0].clone());
        if args[0] == "eval" || args.iter().any(|a| a == "--test") {
            assert!(
                output_text(&r).contains("perplexity"),
                "{}",
                output_text(&r)
            );
        }
    }
    assert_eq!(
        ran,
        [
            "train",
            "generate",
            "eval",
            "train",
            "train",
            "finetune",
            "eval",
            "generate",
            "fuse",
            "fuse",
            "export-adapter"
        ]
    );
    assert!(cwd.join("checkpoints/shakespeare-char/latest").exists());
    assert!(cwd.join("checkpoints/from-yaml/latest").exists());
    assert!(cwd.join("checkpoints/smollm2-roman-dpo/latest").exists());
    assert!(cwd.join("smollm2-roman.gguf").is_file() && cwd.join("roman-lora.gguf").is_file());
    let fused = cwd.join("smollm2-roman-hf");
    let json = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fused.join(name)).unwrap()).unwrap()
    };
    let im_end = kiln::data::Tokenizer::load_dir(&fused)
        .unwrap()
        .token_id("<|im_end|>")
        .unwrap();
    assert_eq!(json("generation_config.json")["eos_token_id"], im_end);
    assert_eq!(json("config.json")["eos_token_id"], im_end);
    let has_transformers = Command::new("python3")
        .args(["-c", "import transformers, torch"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_transformers {
        eprintln!("note: no transformers in this Python: generate() on the fused model not run");
        return;
    }
    let script = r#"
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok.apply_chat_template([{"role": "user", "content": "Write 1987 in Roman numerals."}],
                              add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
out = model.generate(ids, max_new_tokens=64, do_sample=False)[0][ids.shape[1]:]
print(len(out), int(out[-1]))
"#;
    let r = Command::new("python3")
        .args(["-c", script])
        .arg(&fused)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", output_text(&r));
    let text = String::from_utf8_lossy(&r.stdout);
    let (n, last) = text.trim().split_once(' ').unwrap();
    let (n, last): (usize, u32) = (n.parse().unwrap(), last.parse().unwrap());
    eprintln!("transformers generate() on the fused model: {n} tokens, ending with {last}");
    assert!(n < 64 && last == im_end, "generate() ran on: {text}");
}

/// DoRA as PEFT computes it (tests/fixtures/make_dora.py: PEFT's own adapter on a tiny Llama 3,
/// random A, B and magnitudes): kiln applies the adapter at PEFT's logits, fuses it at
/// `merge_and_unload()`'s, and its loss and every adapter gradient (the column norm detached)
/// are PEFT's. Then `kiln finetune --fine-tune-type dora` trains one and writes PEFT's layout,
/// which kiln reads back and fuses to the same logits; llama.cpp adapters refuse it.
#[test]
fn dora_adapters_match_peft_in_logits_gradients_and_merge() {
    use kiln::train::step::StepShape;
    let base = repo().join("tests/fixtures/families/llama3");
    let fixture = repo().join("tests/fixtures/dora");
    let expected =
        kiln::models::safetensors_io::read_all(&fixture.join("expected.safetensors")).unwrap();
    let cpu = burn::tensor::Device::flex();
    let model = kiln::models::hf::load_model(&base, &cpu).unwrap();
    let adapted = kiln::train::setup::apply_adapter_dir(model, &fixture.join("adapter")).unwrap();
    let max_diff = |model: &kiln::models::Model, key: &str| {
        let (ids, batch, seq) = parity_inputs(&base);
        let logits = model
            .forward(&ids, batch, seq, &mut None)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        logits
            .iter()
            .zip(&expected[key].data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let applied = max_diff(&adapted, "logits");
    let fused = kiln::models::lora::fuse(adapted.clone());
    let merged = max_diff(&fused, "merged");
    eprintln!("DoRA vs PEFT: logits {applied:.2e}, merged {merged:.2e}");
    assert!(applied < 1e-4 && merged < 1e-4, "{applied} {merged}");

    // The loss with the inputs as labels, and its gradients.
    let device = cpu.clone().autodiff();
    let trainable = kiln::models::lora::set_trainable(adapted, &device, true);
    let (ids, batch, seq) = parity_inputs(&base);
    let shifted = |offset: usize| -> Vec<u32> {
        ids.chunks(seq)
            .flat_map(|row| row[offset..offset + seq - 1].to_vec())
            .collect()
    };
    let b = kiln::data::Batch {
        batch_size: batch,
        seq_len: seq - 1,
        inputs: shifted(0),
        targets: shifted(1),
        loss_mask: None,
        segments: None,
        pairs: None,
    };
    let shape = StepShape {
        recompute_every: None,
        loss_chunk: usize::MAX,
        dtype: burn::tensor::FloatDType::F32,
    };
    let mut grads = kiln::train::optim::GradAccumulator::default();
    let loss =
        kiln::train::step::forward_backward(&trainable, &b, &mut None, shape, &mut grads, 1.0)
            .into_scalar::<f32>();
    let peft_loss = expected["loss"].data[0];
    assert!(
        (loss - peft_loss).abs() < 1e-5,
        "loss {loss} vs PEFT's {peft_loss}"
    );
    let grads = grads.to_host();
    let peft_grads: Vec<_> = expected
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .collect();
    assert_eq!(peft_grads.len(), grads.len());
    let mut worst = 0f32;
    for (key, theirs) in peft_grads {
        let name = &key["grad.".len()..];
        let ours = &grads[name];
        // kiln holds A as [in, r] and B as [r, out]: PEFT's transposed.
        let ours = if theirs.shape.len() == 2 {
            kiln::models::params::transpose_host(ours, theirs.shape[1], theirs.shape[0])
        } else {
            ours.clone()
        };
        let scale = theirs.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ours
            .iter()
            .zip(&theirs.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "{name}: gradient off by {diff} (max {scale})"
        );
        worst = worst.max(diff / scale.max(1e-12));
    }
    eprintln!("DoRA gradients vs PEFT: worst relative difference {worst:.2e}");

    // Trained by kiln from flags, saved in PEFT's layout, read back, fused.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let records: String = (0..40)
        .map(|i| format!("{{\"text\": \"The number {i} is {}.\"}}\n", i * 7 % 13))
        .collect();
    std::fs::write(data.join("train.jsonl"), &records).unwrap();
    let valid: String = records.lines().take(8).map(|l| format!("{l}\n")).collect();
    std::fs::write(data.join("valid.jsonl"), valid).unwrap();
    let out = tmp.path().join("runs");
    let r = kiln(&[
        "finetune",
        "--model",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--fine-tune-type",
        "dora",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--iters",
        "6",
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--seq-len",
        "24",
        "--output-dir",
        out.to_str().unwrap(),
        "--name",
        "dora",
        "--backend",
        "cpu",
    ]);
    assert!(r.status.success(), "{}", output_text(&r));
    let ckpt = out.join("dora/latest");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["use_dora"], true);
    let saved =
        kiln::models::safetensors_io::read_all(&ckpt.join("adapter_model.safetensors")).unwrap();
    let magnitude =
        &saved["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"];
    assert_eq!(magnitude.shape, vec![128]);
    // Trained: the magnitudes moved from the weights' own norms.
    let model = kiln::models::hf::load_model(&base, &cpu).unwrap();
    let w = model
        .hf_tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let moved = w
        .data
        .chunks(w.shape[1])
        .zip(&magnitude.data)
        .map(|(row, m)| (row.iter().map(|v| v * v).sum::<f32>().sqrt() - m).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-4, "magnitudes did not train: {moved}");
    let adapted = kiln::train::setup::apply_adapter_dir(model, &ckpt).unwrap();
    let (ids, batch, seq) = parity_inputs(&base);
    let logits = |m: &kiln::models::Model| {
        m.forward(&ids, batch, seq, &mut None)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let a = logits(&adapted);
    let f = logits(&kiln::models::lora::fuse(adapted));
    let diff = a
        .iter()
        .zip(&f)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "fused DoRA differs by {diff}");
    fails_naming(
        &[
            "export-adapter",
            "--adapter",
            ckpt.to_str().unwrap(),
            "--gguf",
            tmp.path().join("x.gguf").to_str().unwrap(),
        ],
        &["DoRA", "fuse"],
    );
}

/// Random blocks of a GGML type, `rows × cols` elements, with finite scales (d, dmin) of about
/// 0.01: what a quantized GGUF matrix holds, without needing a quantizer for every type.
fn random_blocks(ggml_type: u32, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    use kiln::models::ggml_types as t;
    let (block, bytes) = t::block_layout(ggml_type).unwrap();
    let mut rng = kiln::data::Rng::stream(seed, 31, ggml_type as u64);
    let mut raw: Vec<u8> = (0..rows * cols / block * bytes)
        .map(|_| (rng.next_f64() * 256.0) as u8)
        .collect();
    // Where each type keeps its f16 scale (and min).
    let (at, n) = match ggml_type {
        t::Q4_1 | t::Q5_1 | t::Q4_K | t::Q5_K => (0, 2),
        t::Q2_K => (80, 2),
        t::Q3_K => (108, 1),
        t::Q6_K => (208, 1),
        _ => (0, 1),
    };
    for b in raw.chunks_exact_mut(bytes) {
        for k in 0..n {
            let v = half::f16::from_f32((0.005 + rng.next_f64() * 0.01) as f32);
            b[at + 2 * k..at + 2 * k + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    raw
}

/// QLoRA's products: two linear layers with LoRA adapters over quantized bases (every held
/// type), and the same over the bases de-quantised to f32; the output, the adapters' gradients
/// and the input's gradient agree within 1e-5 relative (the second layer's input gradient is
/// the quantized backward). Bases of two scratch tiles are checked for the `tiled` types.
fn check_quantized_lora(device: &burn::tensor::Device, what: &str, types: &[u32], tiled: &[u32]) {
    use burn::prelude::*;
    use kiln::models::quant::QuantMatrix;
    let dev = device.clone().autodiff();
    let tensor =
        |v: Vec<f32>, dims: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v, dims), &dev);
    let close = |name: &str, a: Tensor<2>, b: Tensor<2>| {
        let values = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        assert_close(&format!("{what} {name}"), &values(a), &values(b), 1e-5);
    };
    for &ty in types {
        let mut shapes = vec![(8usize, 512usize, 256usize, 256usize)];
        if tiled.contains(&ty) {
            // 8448 × 512 elements: more than one scratch tile (SCRATCH_ELEMENTS).
            shapes.push((4, 8448, 512, 256));
        }
        for &(n, mid, d_in, d_out) in &shapes {
            let name = kiln::models::ggml_types::type_name(ty);
            let pack = |rows, cols, seed| {
                kiln::models::ggml_repack::repack(
                    ty,
                    &random_blocks(ty, rows, cols, seed),
                    rows,
                    cols,
                )
                .unwrap()
            };
            let (p1, p2) = (pack(mid, d_in, 1), pack(d_out, mid, 2));
            let (w1, w2) = (p1.dequantize(), p2.dequantize());
            let (q1, q2) = (
                QuantMatrix::from_packed(p1, device),
                QuantMatrix::from_packed(p2, device),
            );
            let r = 4;
            let run = |quantized: bool| {
                let x = tensor(noise(n * d_in, 5, 1.0), [n, d_in]).require_grad();
                let a1 = tensor(noise(d_in * r, 6, 0.1), [d_in, r]).require_grad();
                let b1 = tensor(noise(r * mid, 7, 0.1), [r, mid]).require_grad();
                let a2 = tensor(noise(mid * r, 8, 0.1), [mid, r]).require_grad();
                let b2 = tensor(noise(r * d_out, 9, 0.1), [r, d_out]).require_grad();
                let base = |x: Tensor<2>, q: &QuantMatrix, w: &[f32], rows: usize, cols: usize| {
                    if quantized {
                        kiln::models::fused::qmatmul(x, q)
                    } else {
                        x.matmul(tensor(w.to_vec(), [rows, cols]).transpose())
                    }
                };
                let h = base(x.clone(), &q1, &w1, mid, d_in)
                    + (x.clone().matmul(a1.clone()) * 2.0).matmul(b1.clone());
                let y = base(h.clone(), &q2, &w2, d_out, mid)
                    + (h.matmul(a2.clone()) * 2.0).matmul(b2.clone());
                let rr = tensor(noise(n * d_out, 10, 1.0), [n, d_out]);
                let grads = (y.clone() * rr).sum().backward();
                let g = |t: &Tensor<2>| t.grad(&grads).unwrap();
                (y.detach(), [g(&x), g(&a1), g(&b1), g(&a2), g(&b2)])
            };
            let (yq, gq) = run(true);
            let (yd, gd) = run(false);
            close(&format!("{name} {mid}x{d_in} output"), yq, yd);
            for ((label, a), b) in ["dx", "dA1", "dB1", "dA2", "dB2"].iter().zip(gq).zip(gd) {
                close(&format!("{name} {mid}x{d_in} {label}"), a, b);
            }
        }
    }
}

#[test]
fn lora_gradients_on_a_quantized_base_equal_those_on_its_f32_values() {
    use kiln::models::ggml_types as t;
    let all = [
        t::Q8_0,
        t::Q4_0,
        t::Q4_1,
        t::Q5_0,
        t::Q5_1,
        t::Q2_K,
        t::Q3_K,
        t::Q4_K,
        t::Q5_K,
        t::Q6_K,
    ];
    check_quantized_lora(&burn::tensor::Device::flex(), "cpu", &all, &all);
    if !software_vulkan("the wgpu half") {
        return;
    }
    check_quantized_lora(&lavapipe(), "wgpu", &all, &[t::Q4_K]);
}

/// `base_quant: keep` holds llama.cpp's own Q4_K_M file in its blocks (every matrix, Q/K rows
/// reordered as the family reads them) at transformers' logits on the de-quantised values;
/// `q8_0` re-quantizes an HF directory as it loads, close to its f32 logits. A GGUF holding a
/// type `keep` cannot hold (IQ4_NL) is refused naming the tensor and type, before loading; an
/// HF directory is refused `keep`.
#[test]
fn qlora_holds_gguf_blocks_at_transformers_logits_and_refuses_what_it_cannot_hold() {
    use kiln::models::ggml_types::Q8_0;
    use kiln::models::gguf::{GgufFile, load_model_held};
    use kiln::models::quant::BaseQuant;
    let cpu = burn::tensor::Device::flex();
    let dir = repo().join("tests/fixtures/kquants");
    let file = GgufFile::read(&dir.join("Q4_K_M.gguf")).unwrap();
    let model = load_model_held(&file, &cpu, BaseQuant::Keep).unwrap();
    let (held, bytes) = model.quantized_numel();
    let norms: usize = model
        .arch()
        .params
        .iter()
        .filter(|p| p.kind == kiln::models::ParamKind::Norm)
        .map(|p| p.numel())
        .sum();
    assert_eq!(held + norms, model.arch().num_params());
    // Under a third of f32 (Q4_K's 0.75 bytes an element, Q6_K's 1.25 for the output).
    assert!(bytes * 3 < held * 4, "{bytes} bytes for {held} elements");
    let diff = logit_difference(&model, &dir, "expected-Q4_K_M.safetensors");
    assert!(
        diff < 1e-4,
        "keep: logits differ from transformers by {diff}"
    );
    if software_vulkan("the wgpu half") {
        let gpu = load_model_held(&file, &lavapipe(), BaseQuant::Keep).unwrap();
        let diff = logit_difference(&gpu, &dir, "expected-Q4_K_M.safetensors");
        assert!(
            diff < 1e-3,
            "keep on wgpu: logits differ from transformers by {diff}"
        );
    }

    let mixed = GgufFile::read(&dir.join("mixed.gguf")).unwrap();
    let e = load_model_held(&mixed, &cpu, BaseQuant::Keep)
        .err()
        .unwrap()
        .to_string();
    for part in ["blk.0.ffn_gate.weight", "IQ4_NL", "base_quant", "q8_0"] {
        assert!(e.contains(part), "{e}");
    }
    // Re-quantized to Q8_0 instead, the same file loads.
    let q8 = load_model_held(&mixed, &cpu, BaseQuant::To(Q8_0)).unwrap();
    assert_eq!(q8.quantized_numel().0 + norms, q8.arch().num_params());

    let hf = repo().join("tests/fixtures/parity/llama-gqa-tied");
    let e = kiln::models::hf::load_model_held(&hf, &cpu, BaseQuant::Keep)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("keep") && e.contains("q4_k"), "{e}");
    let f32_diff = logit_difference(
        &kiln::models::hf::load_model(&hf, &cpu).unwrap(),
        &hf,
        "expected.safetensors",
    );
    let q8 = kiln::models::hf::load_model_held(&hf, &cpu, BaseQuant::To(Q8_0)).unwrap();
    assert!(q8.quantized_numel().0 > 0);
    // Each held matrix is exactly what Q8_0 blocks of the f32 weights decode to (kiln's
    // quantizer writes llama.cpp's bytes), and the logits move by quantization error only.
    let f32_model = kiln::models::hf::load_model(&hf, &cpu).unwrap();
    for p in &q8.arch().params {
        if q8.quantized_param(&p.name).is_none() {
            continue;
        }
        let original = f32_model.hf_tensor(&p.name).unwrap();
        let (blocks, _) =
            kiln::models::ggml_quantize::quantize_rows(Q8_0, original.shape[1], &original.data);
        let want = kiln::models::ggml_types::dequantize(Q8_0, &blocks).unwrap();
        assert!(q8.hf_tensor(&p.name).unwrap().data == want, "{}", p.name);
    }
    let q8_diff = logit_difference(&q8, &hf, "expected.safetensors");
    let expected =
        kiln::models::safetensors_io::read_all(&hf.join("expected.safetensors")).unwrap();
    let scale = expected["logits"]
        .data
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        q8_diff > f32_diff && q8_diff < 0.05 * scale,
        "q8_0 logits differ by {q8_diff} of {scale} (f32: {f32_diff})"
    );
}

/// A LoRA run on a `keep` base from `kiln finetune --base-quant keep`: it trains (loss falls as
/// on the f32 base, step for step within 1e-4), saves only the adapter; `kiln fuse` writes the
/// merged model in f32 from it, or (`--gguf --quant keep`) in the base's own encoding.
/// `--base-quant keep` on an HF directory, or with `--full`, exits 2 naming the flag.
#[test]
fn finetune_with_a_quantized_base_trains_like_the_f32_base_and_fuses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let records: String = (0..24)
        .map(|i| {
            format!(
                "{{\"text\": \"record {i}: the quick brown fox jumps over the lazy dog {i}\"}}\n"
            )
        })
        .collect();
    std::fs::write(data.join("train.jsonl"), &records).unwrap();
    let half: String = records.lines().take(12).map(|l| format!("{l}\n")).collect();
    std::fs::write(data.join("valid.jsonl"), half).unwrap();
    // A quantized GGUF with a tokenizer: kiln's own Q8_0 file of the Llama 3 fixture.
    let gguf = tmp.path().join("base-Q8_0.gguf");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["fuse", "--model"])
        .arg(repo().join("tests/fixtures/families/llama3"))
        .arg("--gguf")
        .arg(&gguf)
        .args(["--quant", "q8_0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let run = |quant: &str, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(["finetune", "--model"])
            .arg(&gguf)
            .arg("--data")
            .arg(&data)
            .arg("--output-dir")
            .arg(tmp.path().join("runs"))
            .args([
                "--name",
                quant,
                "--base-quant",
                quant,
                "--iters",
                "8",
                "--batch-size",
                "2",
            ])
            .args(["--lr", "1e-2", "--rank", "8"])
            .args(["--seq-len", "32", "--eval-every", "0", "--save-every", "0"])
            .args(extra);
        c.output().unwrap()
    };
    // The loss of each step, as the progress lines print it (`step 2/4  loss 3.1234 ...`).
    let losses = |o: &std::process::Output| -> Vec<f64> {
        output_text(o)
            .lines()
            .filter(|l| l.trim_start().starts_with("step "))
            .filter_map(|l| {
                l.split("loss ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let outputs: Vec<_> = ["none", "keep"]
        .iter()
        .map(|q| {
            let o = run(q, &["--set", "logging.log_every=1"]);
            assert!(o.status.success(), "{q}: {}", output_text(&o));
            o
        })
        .collect();
    let (f32_run, kept) = (losses(&outputs[0]), losses(&outputs[1]));
    let said = output_text(&outputs[1]);
    assert!(
        said.contains("held quantized (finetune.base_quant: keep)"),
        "{said}"
    );
    assert!(!output_text(&outputs[0]).contains("held quantized"));
    assert!(
        !kept.is_empty() && kept.len() == f32_run.len(),
        "{kept:?} {f32_run:?}"
    );
    for (a, b) in kept.iter().zip(&f32_run) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{kept:?} vs {f32_run:?}");
    }
    assert!(kept.last() < kept.first(), "{kept:?}");
    let ckpt = tmp.path().join("runs/keep");
    let saved: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .flatten()
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        saved.iter().any(|f| f == "adapter_model.safetensors"),
        "{saved:?}"
    );
    assert!(!saved.iter().any(|f| f == "model.safetensors"), "{saved:?}");
    let fused = tmp.path().join("fused");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["fuse", "--adapter"])
        .arg(&ckpt)
        .arg("--out")
        .arg(&fused)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let weights = kiln::models::safetensors_io::read_all(&fused.join("model.safetensors")).unwrap();
    assert!(weights.contains_key("model.layers.0.self_attn.q_proj.weight"));
    // `--quant keep`: the base's types; what no adapter changed is the base's bytes, what one
    // changed is the fused f32 weight quantized again (within Q8_0's error of it).
    let kept = tmp.path().join("kept.gguf");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["fuse", "--adapter"])
        .arg(&ckpt)
        .arg("--gguf")
        .arg(&kept)
        .args(["--quant", "keep"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let (base, out) = (
        kiln::models::gguf::GgufFile::read(&gguf).unwrap(),
        kiln::models::gguf::GgufFile::read(&kept).unwrap(),
    );
    assert_eq!(base.tensors.len(), out.tensors.len());
    let (mut copied, mut requantized) = (0, 0);
    for t in &out.tensors {
        let b = base.tensors.iter().find(|b| b.name == t.name).unwrap();
        assert_eq!((t.ggml_type, &t.dims), (b.ggml_type, &b.dims), "{}", t.name);
        if out.tensor_bytes(t) == base.tensor_bytes(b) {
            copied += 1;
            continue;
        }
        requantized += 1;
        let hf = match t.name.as_str() {
            n if n.ends_with("attn_q.weight") || n.ends_with("attn_k.weight") => continue,
            n => n
                .replace("blk.", "model.layers.")
                .replace(".attn_v.", ".self_attn.v_proj."),
        };
        let fused_values = &weights[&hf].data;
        let got = out.dequantize(t);
        let scale = fused_values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(fused_values)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= scale / 100.0, "{}: {err} of {scale}", t.name);
    }
    assert!(
        copied > 0 && requantized > 0,
        "{copied} copied, {requantized} quantized again"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["fuse", "--model"])
        .arg(repo().join("tests/fixtures/parity/llama-gqa-tied"))
        .arg("--gguf")
        .arg(tmp.path().join("refused.gguf"))
        .args(["--quant", "keep"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("not a GGUF file"),
        "{}",
        output_text(&o)
    );

    let o = run("keep", &["--full"]);
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("--base-quant"),
        "{}",
        output_text(&o)
    );
    let hf = repo().join("tests/fixtures/parity/llama-gqa-tied");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["finetune", "--model"])
        .arg(&hf)
        .arg("--data")
        .arg(&data)
        .args(["--base-quant", "keep", "--iters", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(output_text(&o).contains("keep"), "{}", output_text(&o));
}

/// `kiln plan`, as a user runs it: a Llama-3-8B-shaped base (its config.json alone: plan loads
/// no weights), LoRA at sequence 2048, on a 16 GB Mac's working set (10.7 GiB). Held as Q4_K
/// it fits (recomputing); held in f16 it does not, and the refusal gives the numbers.
#[test]
fn kiln_plan_fits_an_8b_base_held_as_q4_k_in_a_16_gb_mac() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
            "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let plan = |extra: &[&str]| {
        let base = format!("model.pretrained={}", dir.path().display());
        let mut args = vec!["plan", "configs/smollm2-lora.yaml", "--set", &base];
        for set in [
            "data.seq_len=2048",
            "train.batch_size=1",
            "memory.budget=10922MiB",
            "finetune.lora.rank=16",
        ] {
            args.extend(["--set", set]);
        }
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .current_dir(repo())
            .output()
            .unwrap()
    };
    let o = plan(&["--set", "finetune.base_quant=q4_k"]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("recompute every"),
        "{}",
        output_text(&o)
    );
    let o = plan(&[
        "--set",
        "finetune.base_quant=none",
        "--set",
        "train.dtype=f16",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("does not fit"),
        "{}",
        output_text(&o)
    );
}

/// Every family held with `keep` computes what its de-quantised file does: each family's
/// fixture written as a Q8_0 GGUF (kiln's writer), loaded held and loaded in f32, gives the same
/// logits within 1e-5 relative. The held matrices go through each family's GGUF-to-HF row order
/// (Llama's and SmolLM3's Q/K permutation, Phi-3's fused QKV, Qwen3's none). The Gemma 3 fixture
/// has a `query_pre_attn_scalar` llama.cpp would not use, so kiln does not write it as GGUF (its
/// GGUF transform touches only norms, which are never held).
#[test]
fn every_family_held_in_its_gguf_blocks_computes_its_f32_values() {
    use kiln::models::gguf::{GgufFile, load_model, load_model_held};
    use kiln::models::gguf_export::{GgufQuant, write_gguf};
    use kiln::models::quant::BaseQuant;
    let cpu = burn::tensor::Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    for family in ["llama3", "qwen3", "phi3", "smollm3"] {
        let dir = repo().join("tests/fixtures/families").join(family);
        // The weights alone: loading a model from GGUF needs no tokenizer.
        let model = kiln::models::hf::load_model(&dir, &cpu).unwrap();
        let path = tmp.path().join(format!("{family}.gguf"));
        write_gguf(&path, &model, Vec::new(), family, GgufQuant::Q8_0).unwrap();
        let file = GgufFile::read(&path).unwrap();
        let (f32_model, held) = (
            load_model(&file, &cpu).unwrap(),
            load_model_held(&file, &cpu, BaseQuant::Keep).unwrap(),
        );
        assert!(held.quantized_numel().0 > 0, "{family}: nothing held");
        let (ids, batch, seq) = parity_inputs(&dir);
        let logits = |m: &kiln::models::Model| {
            m.forward(&ids, batch, seq, &mut None)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap()
        };
        assert_close(
            &format!("{family} logits"),
            &logits(&held),
            &logits(&f32_model),
            1e-5,
        );
    }
}

/// `got` equals `want` within `relative` of `want`'s largest magnitude, element by element.
fn assert_close(what: &str, got: &[f32], want: &[f32], relative: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let d = relative_difference(got, want, 1e-12);
    assert!(
        d <= relative,
        "{what}: max difference {d:.2e} of the largest value"
    );
}

/// Relative difference of `got` from `want`, scaled by `want`'s largest magnitude (at least
/// `floor`, for values near zero).
fn relative_difference(got: &[f32], want: &[f32], floor: f32) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn dpo_and_orpo_match_trl_in_tokens_losses_rewards_and_lora_gradients() {
    use kiln::data::preference::{PairEncoding, collate_pairs, parse_pairs};
    use kiln::train::preference::{Preference, Reference};
    use kiln::train::step::StepShape;
    use kiln_config::DpoLoss;
    let base = repo().join("tests/fixtures/families/llama3");
    let fixture = repo().join("tests/fixtures/preference");
    let expected =
        kiln::models::safetensors_io::read_all(&fixture.join("expected.safetensors")).unwrap();
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("template.json")).unwrap())
            .unwrap();
    let tokenizer = kiln::data::Tokenizer::load_dir(&base).unwrap();
    let template = kiln::data::ChatTemplate {
        source: settings["chat_template"].as_str().unwrap().into(),
        bos_token: String::new(),
        eos_token: "!".into(),
        kwargs: Default::default(),
    };
    let max_len = settings["max_length"].as_u64().unwrap() as usize;
    let enc = PairEncoding {
        tokenizer: &tokenizer,
        chat_template: Some(&template),
        eos_id: Some(2),
        max_len,
    };
    let cpu = burn::tensor::Device::flex();
    let adapted = kiln::train::setup::apply_adapter_dir(
        kiln::models::hf::load_model(&base, &cpu).unwrap(),
        &fixture.join("adapter"),
    )
    .unwrap();
    let trainable = kiln::models::lora::set_trainable(adapted, &cpu.clone().autodiff(), true);
    let cases = [
        (
            "sigmoid",
            Preference::Dpo {
                beta: 0.1,
                loss: DpoLoss::Sigmoid,
                label_smoothing: 0.0,
            },
        ),
        (
            "ipo",
            Preference::Dpo {
                beta: 0.1,
                loss: DpoLoss::Ipo,
                label_smoothing: 0.0,
            },
        ),
        (
            "robust",
            Preference::Dpo {
                beta: 0.1,
                loss: DpoLoss::Robust,
                label_smoothing: 0.1,
            },
        ),
        ("orpo", Preference::Orpo { beta: 0.1 }),
    ];
    // One tape over the model, and block recompute with the head in chunks of 7 positions.
    let shapes = [
        StepShape {
            recompute_every: None,
            loss_chunk: usize::MAX,
            dtype: burn::tensor::FloatDType::F32,
        },
        StepShape {
            recompute_every: Some(1),
            loss_chunk: 7,
            dtype: burn::tensor::FloatDType::F32,
        },
    ];
    let mut worst = (0f32, 0f32, 0f32);
    for form in ["strings", "conversational"] {
        let path = fixture.join(format!("{form}.jsonl"));
        let split = parse_pairs(&std::fs::read_to_string(&path).unwrap(), &path, &enc).unwrap();
        assert_eq!(split.pairs.len(), 3, "{form}");
        assert!(split.truncated >= 1, "{form}: the long pair is cut");
        let batch = collate_pairs(&split.pairs.iter().collect::<Vec<_>>(), 2);
        // TRL's collated ids and completion mask, as kiln's inputs, targets and loss mask.
        let ids = &expected[&format!("{form}.input_ids")];
        let mask = &expected[&format!("{form}.completion_mask")];
        let (rows, len) = (ids.shape[0], ids.shape[1]);
        assert_eq!((batch.batch_size, batch.seq_len), (rows, len - 1), "{form}");
        let trl_ids: Vec<u32> = ids.data.iter().map(|&v| v as u32).collect();
        for r in 0..rows {
            let (row, ours) = (
                &trl_ids[r * len..(r + 1) * len],
                r * (len - 1)..(r + 1) * (len - 1),
            );
            // A sequence's last token is an input only in TRL's batch (kiln pads there): it
            // predicts padding, so it changes no loss.
            let real = &batch.pairs.as_ref().unwrap().sequence_mask[ours.clone()];
            let inputs = |ids: &[u32]| -> Vec<u32> {
                ids.iter()
                    .zip(real)
                    .map(|(&t, &m)| if m > 0.0 { t } else { 2 })
                    .collect()
            };
            assert_eq!(
                inputs(&batch.inputs[ours.clone()]),
                inputs(&row[..len - 1]),
                "{form} row {r}"
            );
            assert_eq!(&batch.targets[ours.clone()], &row[1..], "{form} row {r}");
            assert_eq!(
                &batch.loss_mask.as_ref().unwrap()[ours],
                &mask.data[r * len + 1..(r + 1) * len],
                "{form} row {r}: completion mask"
            );
        }
        for (case, p) in cases {
            let key = |what: &str| format!("{form}.{case}.{what}");
            for shape in shapes {
                let mut grads = kiln::train::optim::GradAccumulator::default();
                let (loss, metrics) = kiln::train::preference::forward_backward(
                    &trainable,
                    Reference::Base,
                    &batch,
                    &mut None,
                    shape,
                    &mut grads,
                    1.0,
                    p,
                );
                let loss = loss.into_scalar::<f32>();
                let trl_loss = expected[&key("loss")].data[0];
                let d_loss = (loss - trl_loss).abs() / trl_loss.abs();
                assert!(
                    d_loss < 1e-5,
                    "{form} {case}: loss {loss} vs TRL's {trl_loss}"
                );
                let metrics = metrics
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap();
                let trl_metrics = &expected[&key("metrics")].data;
                let n = p.metrics().len();
                assert_eq!(trl_metrics.len(), n);
                // DPO's rewards are β times a difference of two sums of log-probabilities (of
                // magnitude |logps|): f32 carries them to that scale, in TRL as in kiln.
                let reward_scale = match p {
                    Preference::Dpo { beta, .. } => {
                        beta as f32 * trl_metrics[4].abs().max(trl_metrics[5].abs())
                    }
                    Preference::Orpo { .. } => 1e-3,
                };
                for (i, name) in p.metrics().iter().enumerate() {
                    let floor = if [0, 1, 3].contains(&i) {
                        reward_scale
                    } else {
                        1e-3
                    };
                    let d = relative_difference(&metrics[i..i + 1], &trl_metrics[i..i + 1], floor);
                    assert!(
                        d < 1e-5,
                        "{form} {case} {name}: {} vs TRL's {}",
                        metrics[i],
                        trl_metrics[i]
                    );
                    worst.1 = worst.1.max(d);
                }
                let grads = grads.to_host();
                let prefix = key("grad.");
                let theirs: Vec<_> = expected
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .collect();
                assert_eq!(theirs.len(), grads.len(), "{form} {case}");
                for (k, t) in theirs {
                    let name = &k[prefix.len()..];
                    let ours =
                        kiln::models::params::transpose_host(&grads[name], t.shape[1], t.shape[0]);
                    let d = relative_difference(&ours, &t.data, 1e-12);
                    assert!(d < 1e-5, "{form} {case} {name}: gradient off by {d:.2e}");
                    worst.2 = worst.2.max(d);
                }
                worst.0 = worst.0.max(d_loss);
            }
        }
    }
    eprintln!(
        "DPO/ORPO vs TRL: worst relative difference: loss {:.1e}, metrics {:.1e}, LoRA gradients {:.1e}",
        worst.0, worst.1, worst.2
    );
}

/// String preference pairs for the tiny Llama fixture (its tokenizer has printable ASCII): the
/// chosen answer a number's digits doubled, the rejected one its digits reversed.
fn write_preference_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let record = |i: usize| {
        let n = (i * 37 + 11) % 1000;
        let doubled: String = n.to_string().chars().flat_map(|c| [c, c]).collect();
        let reversed: String = n.to_string().chars().rev().collect();
        format!(
            "{{\"prompt\": \"Q {n}: \", \"chosen\": \"{doubled}.\", \"rejected\": \"{reversed}?\"}}\n"
        )
    };
    std::fs::write(
        dir.join("train.jsonl"),
        (0..40).map(record).collect::<String>(),
    )
    .unwrap();
    std::fs::write(
        dir.join("valid.jsonl"),
        (40..48).map(record).collect::<String>(),
    )
    .unwrap();
}

fn preference_config(out: &Path, data: &Path, name: &str, overrides: &[&str]) -> Config {
    let yaml = format!(
        r#"
run: {{ name: {name}, seed: 3, output_dir: "{out}" }}
backend: {{ kind: cpu }}
model: {{ pretrained: "{base}" }}
finetune:
  method: lora
  lora: {{ rank: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj, down_proj] }}
  objective: dpo
data: {{ train: "{data}", seq_len: 24 }}
optim: {{ lr: 1.0e-2, weight_decay: 0.0, schedule: {{ kind: cosine, warmup_steps: 1, min_lr: 1.0e-4 }} }}
train: {{ max_steps: 6, batch_size: 2, grad_accum: 2, eval_every: 3, eval_batches: 2, save_every: 3 }}
logging: {{ log_every: 1, histograms_every: 0 }}
"#,
        out = out.display(),
        data = data.display(),
        base = repo().join("tests/fixtures/families/llama3").display(),
    );
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_yaml_str(&yaml, "preference.yaml")
        .unwrap()
        .with_overrides(&overrides)
        .unwrap()
}

#[test]
fn preference_runs_resume_exactly_log_trl_metrics_export_peft_and_refuse_bad_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs");
    write_preference_data(&data);
    let out = tmp.path().join("runs");
    // LoRA DPO (its reference the base with the adapters off) and full DPO (a frozen copy of the
    // pretrained model, also after a resume): a run split at step 3 ends where an uninterrupted
    // one does, with gradient accumulation on.
    for (what, file, extra) in [
        ("lora", "adapter_model.safetensors", vec![]),
        ("full", "model.safetensors", vec!["finetune.method=full"]),
        (
            "orpo",
            "adapter_model.safetensors",
            vec!["finetune.objective=orpo", "memory.checkpointing=every:1"],
        ),
        (
            "auto",
            "adapter_model.safetensors",
            vec![
                "train.batch_size=auto",
                "train.effective_batch_size=4",
                "train.grad_accum=1",
            ],
        ),
    ] {
        let whole_name = format!("{what}-whole");
        let whole = preference_config(&out, &data, &whole_name, &extra);
        let a = train(&whole, &quiet()).unwrap();
        assert_eq!(a.steps, 6);
        let split_name = format!("{what}-split");
        let split = preference_config(&out, &data, &split_name, &extra);
        let stop = TrainOptions {
            stop_after: Some(3),
            ..quiet()
        };
        train(&split, &stop).unwrap();
        let resume = TrainOptions {
            resume: true,
            ..quiet()
        };
        let b = train(&split, &resume).unwrap();
        let bytes =
            |run: &str| std::fs::read(out.join(run).join("step-0000006").join(file)).unwrap();
        assert!(
            bytes(&whole_name) == bytes(&split_name),
            "{what}: weights after resume differ from the uninterrupted run"
        );
        assert_eq!(a.final_val_loss, b.final_val_loss, "{what}");
        assert!(a.final_val_loss.unwrap().is_finite(), "{what}");
    }
    // In bf16 (the base held in it, the loss in f32) a DPO run starts at the reference too.
    let half = preference_config(
        &out,
        &data,
        "bf16",
        &["train.dtype=bf16", "train.max_steps=2"],
    );
    let h = train(&half, &quiet()).unwrap();
    assert!(h.final_val_loss.unwrap().is_finite());
    // PEFT's layout, loadable as any kiln LoRA adapter.
    let adapter = out.join("lora-whole/step-0000006");
    assert!(adapter.join("adapter_config.json").is_file());
    let base = repo().join("tests/fixtures/families/llama3");
    let cpu = burn::tensor::Device::flex();
    kiln::train::setup::apply_adapter_dir(
        kiln::models::hf::load_model(&base, &cpu).unwrap(),
        &adapter,
    )
    .unwrap();

    // TRL's metric names in TensorBoard, train and validation; the first DPO step starts at the
    // reference (loss ln 2, rewards 0).
    let r = Command::new("python3")
        .arg(repo().join("tests/read_events.py"))
        .arg(out.join("lora-whole/tensorboard"))
        .output()
        .expect("python3 is needed to read event files with TensorBoard");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    for split in ["train", "eval"] {
        for m in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            let tag = format!("{split}/{m}");
            assert!(v["scalars"][&tag].is_array(), "no `{tag}` in {v}");
        }
    }
    let first = |tag: &str| v["scalars"][tag][0][1].as_f64().unwrap();
    assert!((first("loss/train") - std::f64::consts::LN_2).abs() < 1e-6);
    assert_eq!(first("train/rewards/margins"), 0.0);

    // From flags: the progress line shows the reward accuracy.
    let r = kiln(&[
        "finetune",
        "--model",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--objective",
        "dpo",
        "--loss-type",
        "ipo",
        "--beta",
        "0.5",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "24",
        "--output-dir",
        out.to_str().unwrap(),
        "--name",
        "flags",
        "--backend",
        "cpu",
    ]);
    let text = output_text(&r);
    assert!(r.status.success(), "{text}");
    assert!(text.contains("reward acc"), "{text}");
    assert!(text.contains("preference pairs"), "{text}");

    // Bad pairs name their file and line and exit 2; so do preference records under SFT.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let good = r#"{"prompt": "Q: ", "chosen": "a", "rejected": "b"}"#;
    std::fs::write(bad.join("valid.jsonl"), format!("{good}\n")).unwrap();
    for (record, needle, objective) in [
        (
            r#"{"prompt": "Q: ", "chosen": "a"}"#,
            "missing `rejected`",
            "dpo",
        ),
        (
            r#"{"prompt": "Q: ", "chosen": "", "rejected": "b"}"#,
            "`chosen` is an empty answer",
            "orpo",
        ),
        (good, "finetune.objective: dpo or orpo", "sft"),
    ] {
        std::fs::write(bad.join("train.jsonl"), format!("{good}\n{record}\n")).unwrap();
        let r = kiln(&[
            "finetune",
            "--model",
            base.to_str().unwrap(),
            "--data",
            bad.to_str().unwrap(),
            "--objective",
            objective,
            "--iters",
            "1",
            "--output-dir",
            out.to_str().unwrap(),
            "--name",
            "bad",
            "--backend",
            "cpu",
        ]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{record}: {err}");
        assert!(err.contains(needle) && err.contains("train.jsonl"), "{err}");
        if objective != "sft" {
            assert!(err.contains("line 2"), "{err}");
        }
        assert!(!out.join("bad").join("step-0000001").exists());
    }
}
