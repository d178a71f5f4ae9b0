//! The `kiln` command line: parses, calls the library, prints. Exit codes: 0 success, 1 a failure
//! while running, 2 a mistake in the config or the arguments (nothing is written then).

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kiln_config::{AdapterChoice, BackendConfig, BackendKind, Config};
use kiln_data::Message;
use kiln_models::gguf_export::GgufQuant;
use kiln_models::pretrained::Pretrained;
use kiln_train::checkpoint;
use kiln_train::device;
use kiln_train::inference::{self, SampleOptions};
use kiln_train::memory::human_bytes;
use kiln_train::ranks::Ranks;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train and fine-tune small language models on your own machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model as a YAML config describes.
    Train(TrainArgs),
    /// Fine-tune a pretrained model (LoRA by default) on a JSONL dataset directory, from flags.
    Finetune(Box<FinetuneArgs>),
    /// Continue a prompt with a trained model.
    Generate(GenerateArgs),
    /// Loss, perplexity and token count of a model on a text or JSONL file.
    Eval(EvalArgs),
    /// List the compute devices kiln can use.
    Devices,
    /// Merge a LoRA adapter into its base and write a Hugging Face model directory (--out) or a
    /// GGUF file (--gguf, --quant); without --adapter this converts the model.
    Fuse(FuseArgs),
    /// Write a LoRA adapter (a run or a PEFT directory) as llama.cpp's adapter GGUF, for
    /// `llama-cli --lora` and Ollama's `ADAPTER`.
    ExportAdapter(ExportAdapterArgs),
    /// Time the training step of a config (tokens/s, peak memory). Prints figures; writes nothing.
    Bench(BenchArgs),
    /// Estimate a config's peak memory (weights, gradients, optimizer, activations, logits) and
    /// choose the checkpointing that fits the device's budget. Loads no weights.
    Plan(PlanArgs),
}

#[derive(Args)]
struct PlanArgs {
    config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// The experiment's YAML file.
    config: PathBuf,
    /// Override a config field: `--set optim.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from the newest checkpoint in the run directory.
    #[arg(long)]
    resume: bool,
    /// With --resume: continue although the config differs from the run's (the differences are
    /// printed; the run's kiln.yaml becomes the new config).
    #[arg(long, requires = "resume")]
    allow_config_change: bool,
    /// Print the resolved config (file plus overrides) and exit.
    #[arg(long)]
    print_config: bool,
    /// Stop after this step, leaving a checkpoint to resume from (the schedule still spans the run).
    #[arg(long, value_name = "STEP")]
    stop_after: Option<usize>,
}

#[derive(Args)]
struct FuseArgs {
    /// The base: a Hugging Face model directory, a GGUF file or a model name (see `generate`);
    /// without it, the base the adapter's run was trained on.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A LoRA adapter directory (PEFT layout), or a run directory (its latest checkpoint).
    #[arg(long, visible_alias = "adapter-path")]
    adapter: Option<PathBuf>,
    /// Where to write a Hugging Face model directory (must not exist, or be empty).
    #[arg(long, required_unless_present = "gguf")]
    out: Option<PathBuf>,
    /// Where to write a GGUF file for llama.cpp, Ollama and LM Studio (must not exist).
    #[arg(long, value_name = "OUT.gguf")]
    gguf: Option<PathBuf>,
    /// The GGUF's encoding: f32, f16, bf16, q8_0, llama.cpp's mixes q4_k_m, q5_k_m, q6_k, or
    /// keep (a GGUF base's own types: the tensors no adapter changed copied block for block,
    /// the changed ones quantized again to their type).
    #[arg(long, requires = "gguf", default_value = "f16", value_parser = parse_quant)]
    quant: FuseQuant,
}

/// `kiln fuse --quant`.
#[derive(Debug, Clone, Copy)]
enum FuseQuant {
    Quant(GgufQuant),
    Keep,
}

impl FuseQuant {
    fn name(self) -> &'static str {
        match self {
            FuseQuant::Quant(q) => q.name(),
            FuseQuant::Keep => "keep",
        }
    }
}

fn parse_quant(text: &str) -> Result<FuseQuant, String> {
    if text.eq_ignore_ascii_case("keep") {
        return Ok(FuseQuant::Keep);
    }
    GgufQuant::parse(text)
        .map(FuseQuant::Quant)
        .ok_or_else(|| format!("`{text}`: choose {}, keep", GgufQuant::NAMES))
}

#[derive(Args)]
struct ExportAdapterArgs {
    /// A LoRA adapter directory (PEFT layout), or a run directory (its latest checkpoint).
    #[arg(long, visible_alias = "adapter-path")]
    adapter: PathBuf,
    /// Where to write the adapter GGUF (must not exist).
    #[arg(long, value_name = "OUT.gguf")]
    gguf: PathBuf,
    /// The base model; without it, the base the adapter names.
    #[arg(long)]
    base: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Measured steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Steps run before measuring (first kernels, allocator warmup).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FinetuneArgs {
    /// The base: a Hugging Face model directory or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// A directory with train.jsonl and valid.jsonl (text, completions or chat records; preference
    /// pairs with --objective dpo or orpo).
    #[arg(long)]
    data: PathBuf,
    /// Train every weight instead of LoRA adapters.
    #[arg(long)]
    full: bool,
    /// mlx-lm's spelling: `lora` (the default), `dora` (LoRA that also learns each output's
    /// magnitude, PEFT's `use_dora`) or `full` (as --full).
    #[arg(long, value_name = "lora|dora|full", value_parser = ["lora", "full", "dora"])]
    fine_tune_type: Option<String>,
    /// QLoRA: hold the frozen base quantized while the adapters train. `keep` holds a GGUF
    /// base in its own blocks (Q4_K_M, Q8_0, ...); q8_0, q4_0, q4_k quantize any base as it loads.
    #[arg(long, value_name = "none|keep|q8_0|q4_0|q4_k", default_value = "none", value_parser = ["none", "keep", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])]
    base_quant: String,
    /// What to optimize: `sft` (next-token loss on the examples), or `dpo` / `orpo` on
    /// preference pairs (`{"prompt", "chosen", "rejected"}` records), as TRL's trainers do.
    #[arg(long, value_name = "sft|dpo|orpo", default_value = "sft", value_parser = ["sft", "dpo", "orpo"])]
    objective: String,
    /// DPO's or ORPO's beta (TRL's `beta`; default 0.1).
    #[arg(long, value_parser = finite_f64)]
    beta: Option<f64>,
    /// DPO's loss (TRL's `loss_type`; default sigmoid).
    #[arg(long, value_name = "sigmoid|ipo|robust", value_parser = ["sigmoid", "ipo", "robust"])]
    loss_type: Option<String>,
    /// The label-flip probability of `--loss-type robust` (TRL's `label_smoothing`).
    #[arg(long, value_parser = finite_f64)]
    label_smoothing: Option<f64>,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0, value_parser = finite_f64)]
    alpha: f64,
    #[arg(long, default_value_t = 0.05, value_parser = finite_f64)]
    dropout: f64,
    /// Comma-separated HF module names, or all-linear.
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    /// Adapt only the last N blocks.
    #[arg(long)]
    num_layers: Option<usize>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    iters: usize,
    #[arg(long, default_value_t = 1e-4, value_parser = finite_f64)]
    lr: f64,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Longest example in tokens (longer ones are truncated and counted).
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Train on completion / assistant tokens only.
    #[arg(long)]
    mask_prompt: bool,
    /// Run name (outputs in <output-dir>/<name>).
    #[arg(long, default_value = "finetune")]
    name: String,
    #[arg(long, default_value = "checkpoints")]
    output_dir: PathBuf,
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Any other config field: `--set optim.weight_decay=0.01` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the config these flags make (as YAML for `kiln train`) and exit.
    #[arg(long)]
    print_config: bool,
    /// Print `kiln plan`'s memory estimate for the run these flags make, and exit.
    #[arg(long)]
    plan: bool,
    /// Time the training step of the run these flags make (`kiln bench`: 30 steps after 5), and
    /// exit; writes nothing.
    #[arg(long)]
    bench: bool,
    /// After training, score the run on the dataset's test.jsonl (as mlx-lm's `--test`), with
    /// the run's sequence length and prompt masking.
    #[arg(long)]
    test: bool,
    /// Continue the run `--name` names from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// With --resume: continue although the flags make another config than the run's.
    #[arg(long, requires = "resume")]
    allow_config_change: bool,
}

#[derive(Args, Clone)]
struct BackendArgs {
    /// auto | metal | vulkan | wgpu | cpu
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Use a software GPU adapter (lavapipe) with a GPU backend.
    #[arg(long)]
    software_adapter: bool,
}

impl BackendArgs {
    fn config(&self) -> Result<BackendConfig, String> {
        let kind = match self.backend.as_str() {
            "auto" => BackendKind::Auto,
            "metal" => BackendKind::Metal,
            "vulkan" => BackendKind::Vulkan,
            "wgpu" => BackendKind::Wgpu,
            "cpu" => BackendKind::Cpu,
            other => {
                return Err(format!(
                    "--backend {other}: expected one of auto, metal, vulkan, wgpu, cpu"
                ));
            }
        };
        Ok(BackendConfig {
            kind,
            adapter: if self.software_adapter {
                AdapterChoice::Software
            } else {
                AdapterChoice::Default
            },
            ..BackendConfig::default()
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// A Hugging Face model directory, a GGUF file, a kiln checkpoint, a run directory (its
    /// `latest` checkpoint; a LoRA run applies itself to its base), or a model name: a Hugging
    /// Face repo id in the local cache, `ollama:NAME[:TAG]`, an LM Studio `PUBLISHER/REPO`.
    #[arg(long, visible_alias = "checkpoint")]
    model: PathBuf,
    /// A LoRA adapter directory (PEFT layout, e.g. a kiln LoRA checkpoint) to apply.
    #[arg(long, visible_alias = "adapter-path")]
    adapter: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template and stop at end of turn.
    #[arg(long)]
    chat: bool,
    /// With --chat: a JSON object of variables for the chat template, as mlx-lm's
    /// `--chat-template-config` (`'{"enable_thinking": false}'` for Qwen3 and SmolLM3).
    #[arg(long, value_name = "JSON")]
    chat_template_config: Option<String>,
    /// The prompt; `-` reads it from standard input.
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, visible_alias = "temp", default_value_t = 0.8, value_parser = finite_f64)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f64)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    backend: BackendArgs,
}

#[derive(Args)]
struct EvalArgs {
    /// A Hugging Face model directory, a GGUF file, a kiln checkpoint, a run directory (a LoRA
    /// run applies itself to its base), or a model name (see `generate`).
    #[arg(long, visible_alias = "checkpoint")]
    model: PathBuf,
    /// A LoRA adapter directory (PEFT layout) to apply; its run's `data.seq_len` and
    /// `data.mask_prompt` are the defaults.
    #[arg(long, visible_alias = "adapter-path")]
    adapter: Option<PathBuf>,
    /// UTF-8 text file, or a JSONL file of text/completions/chat records, to score; a dataset
    /// directory is scored on its test.jsonl (mlx-lm's `--test`).
    #[arg(long)]
    data: PathBuf,
    /// Window length (default: the run's data.seq_len, else the model's context).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Print one JSON object: {"loss", "perplexity", "tokens"}.
    #[arg(long)]
    json: bool,
    /// JSONL data: score completion / assistant tokens only.
    #[arg(long)]
    mask_prompt: bool,
    /// Also write the logits of the first window of a text file (`logits` [n, vocab] and
    /// `input_ids` [n], both f32) to this safetensors file, for comparison with other tools.
    #[arg(long, value_name = "FILE")]
    logits_out: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// A float flag: NaN and infinities are refused (`--temperature nan` would sample from NaN).
fn finite_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        Ok(x) => Err(format!("{x} is not a finite number")),
        Err(e) => Err(e.to_string()),
    }
}

/// `println!` that cannot panic: stdout closed early (`kiln eval ... | head -1`) is not an error
/// of the command.
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
    /// Every rank of a distributed run fails alike here (they disagree on the run, or a signal
    /// stopped them all): they end MPI together. Any other failure on a rank aborts them all.
    together: bool,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure {
            code: 1,
            error,
            together: false,
        }
    }
}

fn usage(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        together: false,
        code: 2,
        error: error.into(),
    }
}

/// Mesa's Vulkan drivers complain on every adapter query when XDG_RUNTIME_DIR is unset (common in
/// containers and CI); give them a private one.
fn ensure_runtime_dir() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        use std::os::unix::fs::DirBuilderExt;
        // SAFETY: getuid has no side effects.
        let uid = unsafe { libc_getuid() };
        let dir = std::env::temp_dir().join(format!("kiln-xdg-{uid}"));
        if std::fs::DirBuilder::new().mode(0o700).create(&dir).is_ok() || dir.is_dir() {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
    }
}

#[cfg(target_os = "linux")]
unsafe extern "C" {
    #[link_name = "getuid"]
    fn libc_getuid() -> u32;
}

pub fn main() -> ExitCode {
    kiln_train::trainer::mark_process_start();
    ensure_runtime_dir();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    kiln_train::memory::tune_allocator();
    // Under `mpirun`, a training command is one rank of a run (before the thread pool starts:
    // ranks on one machine share its cores).
    let ranks = match &cli.command {
        Command::Train(_) | Command::Finetune(_) => match Ranks::join() {
            Ok(ranks) => ranks,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: {e}");
                return ExitCode::from(2);
            }
        },
        _ => Ranks::single(),
    };
    // The command runs on a worker of the CPU kernels' thread pool (kiln_train::threads).
    let result = kiln_train::threads::run_on_pool(|| match cli.command {
        Command::Train(args) => train(args, &ranks),
        Command::Finetune(args) => finetune(*args, &ranks),
        Command::Generate(args) => generate(args),
        Command::Eval(args) => eval(args),
        Command::Devices => devices().map_err(Failure::from),
        Command::Bench(args) => bench(args),
        Command::Plan(args) => plan(args),
        Command::Fuse(args) => fuse(args),
        Command::ExportAdapter(args) => export_adapter(args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if ranks.is_distributed() && !f.together {
                // The other ranks may be waiting for this one in a collective: ending MPI
                // normally would hang them, MPI_Abort ends the whole run (mpirun names the rank).
                let _ = writeln!(
                    std::io::stderr(),
                    "error: rank {}: {:#}",
                    ranks.rank(),
                    f.error
                );
                ranks.abort(i32::from(f.code));
            }
            if !ranks.is_distributed() || ranks.is_root() {
                let _ = writeln!(std::io::stderr(), "error: {:#}", f.error);
            }
            ExitCode::from(f.code)
        }
    }
}

fn train(args: TrainArgs, ranks: &Ranks) -> Result<(), Failure> {
    let config = Config::load(&args.config, &args.set).map_err(usage)?;
    if args.print_config {
        let _ = write!(std::io::stdout(), "{}", config.to_yaml());
        return Ok(());
    }
    run_training(
        config,
        &args.config.display().to_string(),
        &args.set,
        Resume::from_flags(args.resume, args.allow_config_change),
        args.stop_after,
        ranks,
    )
}

/// Whether a run continues, and whether its config may change on the way.
#[derive(Clone, Copy, PartialEq)]
enum Resume {
    No,
    Same,
    AllowChange,
}

impl Resume {
    fn from_flags(resume: bool, allow_change: bool) -> Self {
        match (resume, allow_change) {
            (false, _) => Resume::No,
            (true, false) => Resume::Same,
            (true, true) => Resume::AllowChange,
        }
    }
}

/// A resumed run continues the config it was trained with: the differences of `config` from the
/// one its newest checkpoint (`newest`, in `run_dir`) holds are refused (exit 2) unless allowed,
/// and printed either way.
fn check_resumed_config(
    config: &Config,
    resume: Resume,
    run_dir: &Path,
    newest: &Path,
) -> Result<(), Failure> {
    let Ok(saved) = Config::load(&newest.join(checkpoint::KILN_CONFIG_FILE), &[]) else {
        return Ok(()); // the trainer's checkpoint checks name what is wrong with it
    };
    // The micro-batch and accumulation `auto` chose are stored resolved.
    let auto_batch = matches!(config.train.batch_size, kiln_config::BatchSize::Auto);
    let changed: Vec<String> = kiln_config::diff::differences(&saved, config)
        .into_iter()
        .filter(|(f, ..)| !(auto_batch && (f == "train.batch_size" || f == "train.grad_accum")))
        .map(|(f, old, new)| format!("  {f}: {old} -> {new}"))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let list = changed.join("\n");
    if resume == Resume::AllowChange {
        eprintln!(
            "--resume --allow-config-change: {} continues with these changes:\n{list}",
            run_dir.display()
        );
        return Ok(());
    }
    Err(usage(anyhow::anyhow!(
        "--resume: the config differs from the one {} was trained with ({}):\n{list}\npass \
         --allow-config-change to continue with the new config",
        run_dir.display(),
        newest.join(checkpoint::KILN_CONFIG_FILE).display()
    )))
}

/// How errors name a run that `kiln finetune` configured.
const FINETUNE: &str = "kiln finetune";

/// The `kiln finetune` flag that sets a config field.
fn finetune_flag(field: &str) -> Option<&'static str> {
    Some(match field {
        "run.name" => "--name",
        "run.output_dir" => "--output-dir",
        "backend.kind" => "--backend",
        "model.pretrained" => "--model",
        "finetune.method" => "--full",
        "finetune.lora.rank" => "--rank",
        "finetune.lora.alpha" => "--alpha",
        "finetune.lora.dropout" => "--dropout",
        "finetune.lora.target_modules" => "--targets",
        "finetune.lora.num_layers" => "--num-layers",
        "finetune.lora.dora" => "--fine-tune-type",
        "finetune.base_quant" => "--base-quant",
        "finetune.objective" => "--objective",
        "finetune.dpo.beta" | "finetune.orpo.beta" => "--beta",
        "finetune.dpo.loss" => "--loss-type",
        "finetune.dpo.label_smoothing" => "--label-smoothing",
        "data.train" => "--data",
        "data.seq_len" => "--seq-len",
        "data.mask_prompt" => "--mask-prompt",
        "optim.lr" => "--lr",
        "train.max_steps" => "--iters",
        "train.batch_size" => "--batch-size",
        "train.eval_every" => "--eval-every",
        "train.save_every" => "--save-every",
        _ => return None,
    })
}

/// The config `kiln finetune` flags describe: the same a YAML file would give `kiln train`.
fn finetune_config(args: &FinetuneArgs) -> Result<Config, Failure> {
    let set = |k: &str, v: String| format!("{k}={v}");
    let full = match args.fine_tune_type.as_deref() {
        Some("full") => true,
        Some(kind) if args.full => {
            return Err(usage(anyhow::anyhow!(
                "--full and --fine-tune-type {kind} disagree: give one"
            )));
        }
        Some(_) => false,
        None => args.full,
    };
    let targets = if args.targets == "all-linear" {
        "all-linear".to_string()
    } else {
        format!("[{}]", args.targets)
    };
    let mut items = vec![
        set("run.name", args.name.clone()),
        set("run.output_dir", args.output_dir.display().to_string()),
        set("backend.kind", args.backend.clone()),
        set("model.pretrained", args.model.display().to_string()),
        set(
            "finetune.method",
            if full { "full".into() } else { "lora".into() },
        ),
        set("finetune.base_quant", args.base_quant.clone()),
        set("finetune.lora.rank", args.rank.to_string()),
        set("finetune.lora.alpha", args.alpha.to_string()),
        set("finetune.lora.dropout", args.dropout.to_string()),
        set("finetune.lora.target_modules", targets),
        set("data.train", args.data.display().to_string()),
        set("data.seq_len", args.seq_len.to_string()),
        set("data.mask_prompt", args.mask_prompt.to_string()),
        set("optim.lr", args.lr.to_string()),
        set("optim.weight_decay", "0.0".into()),
        set(
            "optim.schedule.warmup_steps",
            (args.iters / 20).min(100).to_string(),
        ),
        set("optim.schedule.min_lr", (args.lr / 10.0).to_string()),
        set("train.max_steps", args.iters.to_string()),
        set("train.batch_size", args.batch_size.to_string()),
        set("train.eval_every", args.eval_every.to_string()),
        set("train.save_every", args.save_every.to_string()),
        set("logging.histograms_every", "0".into()),
    ];
    if let Some(n) = args.num_layers {
        items.push(set("finetune.lora.num_layers", n.to_string()));
    }
    if args.fine_tune_type.as_deref() == Some("dora") {
        items.push(set("finetune.lora.dora", "true".into()));
    }
    items.push(set("finetune.objective", args.objective.clone()));
    if let Some(beta) = args.beta {
        let key = match args.objective.as_str() {
            "orpo" => "finetune.orpo.beta",
            "dpo" => "finetune.dpo.beta",
            _ => {
                return Err(usage(anyhow::anyhow!(
                    "--beta weighs a preference objective: give --objective dpo or orpo"
                )));
            }
        };
        items.push(set(key, beta.to_string()));
    }
    for (flag, key, value) in [
        ("--loss-type", "finetune.dpo.loss", args.loss_type.clone()),
        (
            "--label-smoothing",
            "finetune.dpo.label_smoothing",
            args.label_smoothing.map(|v| v.to_string()),
        ),
    ] {
        if let Some(v) = value {
            if args.objective != "dpo" {
                return Err(usage(anyhow::anyhow!(
                    "{flag} is a DPO setting: give --objective dpo"
                )));
            }
            items.push(set(key, v));
        }
    }
    items.extend(args.set.iter().cloned());
    Config::default()
        .with_overrides(&items)
        .and_then(|c| c.expand_home().locate_pretrained("--model"))
        .map_err(|e| {
            // Blame the flag that set the field, not the `--set` the flags became (a field the
            // user's own `--set` gave stays theirs).
            let flag = |key: &str| {
                let key = key.trim();
                let user_set = args
                    .set
                    .iter()
                    .any(|o| o.split('=').next().map(str::trim) == Some(key));
                finetune_flag(key).filter(|_| !user_set)
            };
            match &e {
                kiln_config::ConfigError::Invalid { field, message, .. } => match flag(field) {
                    Some(f) => usage(anyhow::anyhow!("{f}: {message}")),
                    None => usage(e),
                },
                kiln_config::ConfigError::Override { item, message } => {
                    let (key, value) = item.split_once('=').unwrap_or((item, ""));
                    match flag(key) {
                        Some(f) => usage(anyhow::anyhow!("{f} {value}: {message}")),
                        None => usage(e),
                    }
                }
                _ => usage(e),
            }
        })
}

fn finetune(args: FinetuneArgs, ranks: &Ranks) -> Result<(), Failure> {
    let config = finetune_config(&args)?;
    if args.print_config {
        let _ = write!(std::io::stdout(), "{}", config.to_yaml());
        return Ok(());
    }
    if args.plan {
        return print_plan(&config, false);
    }
    if args.bench {
        return print_bench(&config, 30, 5, false);
    }
    let test = args.data.join("test.jsonl");
    if args.test && config.finetune.objective.is_preference() {
        return Err(usage(anyhow::anyhow!(
            "--test scores test.jsonl with the next-token loss; a {} run reports its rewards on \
             valid.jsonl at each evaluation",
            config.finetune.objective.name()
        )));
    }
    if args.test && !test.is_file() {
        return Err(usage(anyhow::anyhow!(
            "--test: {} has no test.jsonl to score",
            args.data.display()
        )));
    }
    let run_dir = config.run.output_dir.join(&config.run.name);
    let backend = args.backend.clone();
    run_training(
        config,
        FINETUNE,
        &[],
        Resume::from_flags(args.resume, args.allow_config_change),
        None,
        ranks,
    )?;
    // The test set is scored once, by rank 0.
    if args.test && ranks.is_root() {
        out!("test ({}):", test.display());
        eval(EvalArgs {
            model: run_dir,
            adapter: None,
            data: test,
            seq_len: None,
            json: false,
            mask_prompt: false,
            logits_out: None,
            backend: BackendArgs {
                backend,
                software_adapter: false,
            },
        })?;
    }
    Ok(())
}

fn run_training(
    config: Config,
    origin: &str,
    overrides: &[String],
    resume: Resume,
    stop_after: Option<usize>,
    ranks: &Ranks,
) -> Result<(), Failure> {
    // A field set by `--set` is blamed on the override, not on the file; `kiln finetune`'s
    // fields on the flags that set them.
    let origin_of = |field: &str| {
        if overrides
            .iter()
            .any(|o| o.split('=').next().is_some_and(|k| k.trim() == field))
        {
            "--set".to_string()
        } else if origin == FINETUNE {
            finetune_flag(field).map_or_else(|| format!("{origin} --set"), str::to_string)
        } else {
            origin.to_string()
        }
    };
    let name_of = |field: &str| match finetune_flag(field).filter(|_| origin == FINETUNE) {
        Some(flag) => flag.to_string(),
        None => format!("{}: field `{field}`", origin_of(field)),
    };
    for (field, path, check) in [
        (
            "data.train",
            Some(&config.data.train),
            kiln_config::paths::check_file_or_dir as fn(&Path) -> std::io::Result<()>,
        ),
        (
            "data.valid",
            config.data.valid.as_ref(),
            kiln_config::paths::check_regular_file,
        ),
        (
            "data.tokenizer.path",
            config.data.tokenizer.path.as_ref(),
            kiln_config::paths::check_regular_file,
        ),
        (
            "model.pretrained",
            config.model.pretrained.as_ref(),
            kiln_config::paths::check_file_or_dir,
        ),
    ] {
        if let Some(p) = path
            && let Err(e) = check(p)
        {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => "not found".to_string(),
                _ => e.to_string(),
            };
            return Err(usage(anyhow::anyhow!(
                "{}: field `{field}`: {}: {why}",
                origin_of(field),
                p.display()
            )));
        }
    }
    // A dataset directory needs its two splits before anything loads.
    if config.data.train.is_dir() {
        for split in ["train.jsonl", "valid.jsonl"] {
            if !config.data.train.join(split).is_file() {
                return Err(usage(anyhow::anyhow!(
                    "{} {}: no {split} in this directory (a dataset directory holds train.jsonl \
                     and valid.jsonl, and optionally test.jsonl)",
                    name_of("data.train"),
                    config.data.train.display()
                )));
            }
        }
    }
    let run_dir = config.run.output_dir.join(&config.run.name);
    let newest = checkpoint::list(&run_dir).pop();
    match (&newest, resume) {
        // Never write over a run (the trainer refuses too; here it is an argument mistake).
        (Some((_, dir)), Resume::No) => {
            return Err(usage(anyhow::anyhow!(
                "{} already holds checkpoints (newest: {}); pass --resume to continue it, or \
                 choose another {}",
                run_dir.display(),
                dir.display(),
                if origin == FINETUNE {
                    "--name"
                } else {
                    "run.name"
                }
            )));
        }
        (Some((_, dir)), _) => {
            check_resumed_config(&config, resume, &run_dir, dir)?;
            let at = checkpoint::read_state(dir).map(|s| s.step).unwrap_or(0);
            if let Some(stop) = stop_after.filter(|&s| s <= at) {
                return Err(usage(anyhow::anyhow!(
                    "--stop-after {stop}: {} is already at step {at}",
                    run_dir.display()
                )));
            }
        }
        (None, _) => {}
    }
    let options = kiln_train::TrainOptions {
        resume: resume != Resume::No,
        quiet: false,
        stop_after,
        ranks: ranks.clone(),
    };
    kiln_train::signals::install();
    let summary = kiln_train::train(&config, &options).map_err(|e| match e {
        // A field the model refuses is a mistake in the arguments: named as the user gave it.
        kiln_train::TrainError::Field { field, message } => {
            usage(anyhow::anyhow!("{}: {message}", name_of(&field)))
        }
        // A malformed record (named by file and line) is bad input, as a bad flag is.
        // Every rank found the same disagreement (README: Several machines).
        e @ kiln_train::TrainError::Ranks(_) => Failure {
            code: 2,
            error: anyhow::Error::from(e),
            together: true,
        },
        e @ kiln_train::TrainError::Data(kiln_data::DataError::Corpus { .. }) => Failure {
            together: false,
            code: 2,
            error: anyhow::Error::from(e).context("training failed"),
        },
        e => Failure::from(anyhow::Error::from(e).context("training failed")),
    })?;
    if let Some(sig) = summary.interrupted_by {
        return Err(Failure {
            // The ranks agreed on the signal and stopped after the same step.
            together: true,
            // Under mpirun the signal is whichever mpirun passed on: the user interrupted it.
            code: if ranks.is_distributed() {
                130
            } else {
                (128 + sig).clamp(1, 255) as u8
            },
            error: anyhow::anyhow!(
                "interrupted by {} after step {}; checkpoint {} (continue with --resume)",
                kiln_train::signals::name(sig),
                summary.steps,
                summary
                    .last_checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            ),
        });
    }
    if !ranks.is_root() {
        return Ok(());
    }
    out!(
        "done: {} of {} steps on {}",
        summary.steps,
        summary.total_steps,
        summary.device
    );
    if let Some(l) = summary.final_train_loss {
        out!("  train loss {l:.4}");
    }
    if let Some(l) = summary.final_val_loss {
        out!(
            "  val loss   {l:.4} (best {:.4})",
            summary.best_val_loss.unwrap_or(l)
        );
    }
    out!(
        "  {:.0} tokens/s, {:.3} s a step",
        summary.tokens_per_s,
        summary.secs_per_step
    );
    if summary.replayed_steps > 0 {
        out!(
            "  {} steps replayed from the captured step",
            summary.replayed_steps
        );
    }
    if let Some((bytes, secs)) = summary.communication {
        out!(
            "  gradients from the other ranks: {} in {:.1} ms a step ({} ranks)",
            human_bytes(bytes),
            secs * 1e3,
            ranks.size()
        );
    }
    if let Some(p) = summary.peak_memory_bytes {
        out!(
            "  peak memory {} (estimated {})",
            human_bytes(p),
            human_bytes(summary.estimated_peak_bytes)
        );
    }
    if let Some(dir) = &summary.last_checkpoint {
        out!("  checkpoint {}", dir.display());
    }
    // Over the output directory TensorBoard names each run by its folder (`NAME/tensorboard`),
    // so runs compare side by side; pointed at one run's event folder it would name it `.`.
    if let Some(e) = &summary.event_file {
        let runs = e
            .ancestors()
            .nth(3)
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        out!("  TensorBoard: tensorboard --logdir {}", runs.display());
    }
    Ok(())
}

/// A model directory or GGUF file itself, a kiln checkpoint (verified against its manifest), or
/// a run directory's newest checkpoint that verifies.
fn resolve_model(path: &Path) -> Result<PathBuf, Failure> {
    // A name (an HF repo id, `ollama:NAME`, an LM Studio model) becomes the path it names.
    let path =
        &kiln_config::locate::locate_model(path).map_err(|e| usage(anyhow::Error::from(e)))?;
    if let Err(e) = kiln_config::paths::check_file_or_dir(path) {
        return Err(usage(anyhow::anyhow!("{}: {e}", path.display())));
    }
    let path = checkpoint::resolve(path).map_err(|e| Failure::from(anyhow::Error::from(e)))?;
    if kiln_models::pretrained::is_gguf(&path)
        || path.join("config.json").is_file()
        || is_adapter(&path)
    {
        return Ok(path);
    }
    Err(usage(anyhow::anyhow!(
        "{}: not a model (no config.json, not GGUF, no adapter) and no checkpoints inside",
        path.display()
    )))
}

/// A LoRA checkpoint or PEFT adapter directory: adapter weights without a model of their own.
fn is_adapter(dir: &Path) -> bool {
    dir.join(checkpoint::ADAPTER_CONFIG_FILE).is_file() && !dir.join("config.json").is_file()
}

/// The base model a LoRA checkpoint was trained on: its run's `model.pretrained`, else the
/// adapter's `base_model_name_or_path` where that is a path on this machine.
fn base_of_adapter(dir: &Path) -> Result<PathBuf, Failure> {
    let from_run = Config::load(&dir.join(checkpoint::KILN_CONFIG_FILE), &[])
        .ok()
        .and_then(|c| c.model.pretrained);
    let from_peft = || {
        let text = std::fs::read_to_string(dir.join(checkpoint::ADAPTER_CONFIG_FILE)).ok()?;
        let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
        let base = PathBuf::from(doc["base_model_name_or_path"].as_str()?);
        kiln_config::locate::locate_model(&base).ok()
    };
    from_run.or_else(from_peft).ok_or_else(|| {
        usage(anyhow::anyhow!(
            "{}: the adapter names no base model found on this machine (its kiln.yaml has no \
             model.pretrained, and adapter_config.json's base_model_name_or_path is not here); \
             give it with --model BASE --adapter {}",
            dir.display(),
            dir.display()
        ))
    })
}

/// The base to load and the adapter to apply: a LoRA checkpoint given as the model stands for its
/// base with itself applied.
fn model_and_adapter(
    model_arg: &Path,
    adapter: Option<&Path>,
) -> Result<(PathBuf, Option<PathBuf>), Failure> {
    let path = resolve_model(model_arg)?;
    let adapter = match adapter {
        Some(dir) => {
            if let Err(e) = kiln_config::paths::check_file_or_dir(dir) {
                return Err(usage(anyhow::anyhow!("--adapter {}: {e}", dir.display())));
            }
            Some(checkpoint::resolve(dir).map_err(|e| Failure::from(anyhow::Error::from(e)))?)
        }
        None => None,
    };
    if !is_adapter(&path) {
        return Ok((path, adapter));
    }
    if adapter.is_some() {
        return Err(usage(anyhow::anyhow!(
            "--model {} is a LoRA adapter, and --adapter gives another: give the base model as \
             --model",
            model_arg.display()
        )));
    }
    Ok((resolve_model(&base_of_adapter(&path)?)?, Some(path)))
}

fn load(
    model_arg: &Path,
    adapter: Option<&Path>,
    backend: &BackendArgs,
) -> Result<(Pretrained, Option<PathBuf>), Failure> {
    let (path, adapter) = model_and_adapter(model_arg, adapter)?;
    let backend = backend.config().map_err(|e| usage(anyhow::anyhow!(e)))?;
    let selected = device::select(&backend).map_err(|e| Failure::from(anyhow::Error::from(e)))?;
    let p = Pretrained::load(&path, &selected.device)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((with_adapter(p, adapter.as_deref())?, adapter))
}

/// `p` with the adapter directory (if any) applied.
fn with_adapter(mut p: Pretrained, adapter: Option<&Path>) -> Result<Pretrained, Failure> {
    if let Some(dir) = adapter {
        p.model = kiln_train::setup::apply_adapter_dir(p.model, dir)
            .with_context(|| format!("applying adapter {}", dir.display()))?;
    }
    Ok(p)
}

/// For `kiln fuse --quant keep`: the GGUF base, read once, and the model loaded from it with
/// its matrices in their own blocks (only the adapted ones are widened to f32 by the fuse), or
/// de-quantised when it holds a type kiln cannot hold. The file stays for its blocks to be
/// copied.
fn load_keeping(
    model_arg: &Path,
    adapter: Option<&Path>,
    backend: &BackendArgs,
) -> Result<(Pretrained, kiln_models::gguf::GgufFile), Failure> {
    use kiln_models::quant::BaseQuant;
    let (path, adapter) = model_and_adapter(model_arg, adapter)?;
    let backend = backend.config().map_err(|e| usage(anyhow::anyhow!(e)))?;
    let selected = device::select(&backend).map_err(|e| Failure::from(anyhow::Error::from(e)))?;
    if !kiln_models::pretrained::is_gguf(&path) {
        return Err(usage(anyhow::anyhow!(
            "--quant keep: the base {} is not a GGUF file; choose one of {}",
            path.display(),
            GgufQuant::NAMES
        )));
    }
    let file = kiln_models::gguf::GgufFile::read(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    let quant = match kiln_models::gguf::first_unholdable(&file) {
        None => BaseQuant::Keep,
        Some(_) => BaseQuant::None,
    };
    let p = Pretrained::from_gguf_held(&file, &selected.device, quant)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((with_adapter(p, adapter.as_deref())?, file))
}

/// `--prompt -` reads the prompt from standard input.
fn read_prompt(prompt: &str) -> Result<String, Failure> {
    if prompt != "-" {
        return Ok(prompt.to_string());
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .map_err(|e| usage(anyhow::anyhow!("--prompt -: reading standard input: {e}")))?;
    Ok(text)
}

fn generate(args: GenerateArgs) -> Result<(), Failure> {
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(usage(anyhow::anyhow!("--top-p must be in (0, 1]")));
    }
    if args.temperature < 0.0 {
        return Err(usage(anyhow::anyhow!(
            "--temperature must be 0 (greedy) or positive"
        )));
    }
    let (p, _) = load(&args.model, args.adapter.as_deref(), &args.backend)?;
    let prompt = read_prompt(&args.prompt)?;
    let text = if args.chat {
        let mut template = p.chat_template.clone().ok_or_else(|| {
            usage(anyhow::anyhow!(
                "--chat: {} has no chat template",
                args.model.display()
            ))
        })?;
        if let Some(json) = &args.chat_template_config {
            let kwargs: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
                .map_err(|e| {
                    usage(anyhow::anyhow!(
                        "--chat-template-config: not a JSON object: {e}"
                    ))
                })?;
            template.kwargs.extend(kwargs);
        }
        template
            .render(&[Message::new("user", &prompt)], true)
            .map_err(|e| Failure::from(anyhow::Error::from(e)))?
    } else if prompt.is_empty() {
        "\n".to_string()
    } else {
        prompt.clone()
    };
    let ids = p
        .tokenizer
        .encode(&text)
        .map_err(|e| usage(anyhow::anyhow!("--prompt: {e}")))?;
    let options = SampleOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: p.stop_ids.clone(),
    };
    let mut out = std::io::stdout().lock();
    if !args.chat {
        let _ = write!(out, "{prompt}");
    }
    let mut produced = Vec::new();
    let mut printed = String::new();
    // mlx-lm's figures, on stderr so that stdout stays the text: the prompt's pass (until the
    // first new token) and the generation after it.
    let start = std::time::Instant::now();
    let mut first_token: Option<f64> = None;
    let mut generated = 0usize;
    inference::generate(&p.model, &ids, &options, |id| {
        generated += 1;
        first_token.get_or_insert_with(|| start.elapsed().as_secs_f64());
        if p.stop_ids.contains(&id) {
            return;
        }
        // Decode the whole continuation and print what is new, so multi-token characters print whole.
        produced.push(id);
        if let Ok(text) = p.tokenizer.decode(&produced)
            && text.len() > printed.len()
            && text.starts_with(&printed)
        {
            let _ = write!(out, "{}", &text[printed.len()..]);
            let _ = out.flush();
            printed = text;
        }
    });
    let _ = writeln!(out);
    let total = start.elapsed().as_secs_f64();
    if let Some(first) = first_token {
        let rate = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s",
            ids.len(),
            rate(ids.len(), first)
        );
        eprintln!(
            "generation: {generated} tokens, {:.1} tokens/s",
            rate(generated.saturating_sub(1), total - first)
        );
        if let Some(peak) = kiln_train::memory::peak_rss() {
            eprintln!("peak memory: {} (RSS)", human_bytes(peak));
        }
    }
    Ok(())
}

fn eval(args: EvalArgs) -> Result<(), Failure> {
    // A dataset directory is scored on its test split, as mlx-lm's `--test` does.
    let data = if args.data.is_dir() {
        let test = args.data.join("test.jsonl");
        if !test.is_file() {
            return Err(usage(anyhow::anyhow!(
                "--data {}: a dataset directory is scored on its test.jsonl, which it lacks \
                 (name a file to score another split: --data {}/valid.jsonl)",
                args.data.display(),
                args.data.display()
            )));
        }
        test
    } else if args.data.is_file() {
        args.data.clone()
    } else {
        return Err(usage(anyhow::anyhow!(
            "--data {}: file not found",
            args.data.display()
        )));
    };
    let (p, adapter) = load(&args.model, args.adapter.as_deref(), &args.backend)?;
    // The run that made the adapter (or the checkpoint given as the model) says how its data was
    // cut and scored.
    let run = Config::load(
        &adapter
            .as_deref()
            .unwrap_or(&p.path)
            .join(checkpoint::KILN_CONFIG_FILE),
        &[],
    )
    .ok();
    let max = p.model.config().max_position_embeddings;
    let seq_len = match args.seq_len {
        Some(s) => s,
        None => run
            .as_ref()
            .map(|c| c.data.seq_len)
            .unwrap_or(max.min(1024)),
    };
    let mask_prompt = args.mask_prompt || run.as_ref().is_some_and(|c| c.data.mask_prompt);
    if seq_len == 0 || seq_len > max {
        return Err(usage(anyhow::anyhow!("--seq-len must be in 1..={max}")));
    }
    let (loss, scored) = if data.extension().is_some_and(|e| e == "jsonl") {
        let enc = kiln_data::jsonl::Encoding {
            tokenizer: &p.tokenizer,
            chat_template: p.chat_template.as_ref(),
            eos_id: p.stop_ids.first().copied(),
            mask_prompt,
            max_seq_len: seq_len,
        };
        let (_, split) = kiln_data::jsonl::read_split(&data, None, &enc)
            .map_err(|e| usage(anyhow::Error::from(e)))?;
        let batches = kiln_data::jsonl::sequential_batches(&split, 8, enc.eos_id.unwrap_or(0));
        let scored: usize = batches
            .iter()
            .map(|b| {
                b.loss_mask
                    .as_ref()
                    .map_or(0, |m| m.iter().filter(|&&w| w > 0.0).count())
            })
            .sum();
        (inference::mean_loss(&p.model, batches.into_iter()), scored)
    } else {
        let tokens = kiln_data::tokenize_file(&data, &p.tokenizer)
            .map_err(|e| usage(anyhow::Error::from(e)))?;
        if tokens.len() < 2 {
            bail_usage(&format!("{}: fewer than 2 tokens to score", data.display()))?;
        }
        if let Some(out) = &args.logits_out {
            let ids = &tokens[..seq_len.min(tokens.len())];
            let logits = p.model.forward(ids, 1, ids.len(), &mut None).into_data();
            let host = |shape: Vec<usize>, data: Vec<f32>| {
                kiln_models::safetensors_io::HostTensor { shape, data }
            };
            let map = std::collections::BTreeMap::from([
                (
                    "logits".to_string(),
                    host(
                        logits.shape().to_vec(),
                        logits
                            .convert::<f32>()
                            .try_into_vec::<f32>()
                            .unwrap_or_default(),
                    ),
                ),
                (
                    "input_ids".to_string(),
                    host(vec![ids.len()], ids.iter().map(|&i| i as f32).collect()),
                ),
            ]);
            kiln_models::safetensors_io::write_f32(out, &map, &[])
                .context("writing --logits-out")?;
        }
        inference::evaluate_tokens(&p.model, &tokens, seq_len)
    };
    if args.json {
        out!(
            "{}",
            serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": scored})
        );
    } else {
        out!(
            "loss {loss:.4}  perplexity {:.3}  tokens {scored}",
            loss.exp()
        );
    }
    Ok(())
}

fn fuse(args: FuseArgs) -> Result<(), Failure> {
    if let Some(out) = &args.out
        && out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(usage(anyhow::anyhow!(
            "--out {}: exists and is not empty",
            out.display()
        )));
    }
    if let Some(gguf) = &args.gguf {
        check_new_file("--gguf", gguf)?;
    }
    let cpu = BackendArgs {
        backend: "cpu".into(),
        software_adapter: false,
    };
    // Without --model, the adapter's run names the base.
    let (model_arg, adapter) = match (&args.model, &args.adapter) {
        (Some(m), a) => (m.clone(), a.clone()),
        (None, Some(a)) => (a.clone(), None),
        (None, None) => {
            return Err(usage(anyhow::anyhow!(
                "give --model BASE, or --adapter DIR (a LoRA run names its base)"
            )));
        }
    };
    let (mut p, keep_base) = match args.quant {
        FuseQuant::Keep if args.gguf.is_some() => {
            let (p, file) = load_keeping(&model_arg, adapter.as_deref(), &cpu)?;
            (p, Some(file))
        }
        _ => (load(&model_arg, adapter.as_deref(), &cpu)?.0, None),
    };
    let adapted = kiln_models::lora::adapted_weights(&p.model);
    p.model = kiln_models::lora::fuse(p.model);
    let model = &p.model;
    let summary = format!(
        "{} {:.1}M parameters",
        model.config().model_type,
        model.arch().num_params() as f64 / 1e6
    );
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let base = (!kiln_models::pretrained::is_gguf(&p.path)).then_some(p.path.as_path());
        checkpoint::write_model_dir(
            out,
            model,
            &p.tokenizer,
            p.tokenizer_json.as_ref(),
            p.chat_template.as_ref(),
            base,
        )
        .context("writing the fused model")?;
        out!("wrote {} ({summary}, f32)", out.display());
    }
    if let Some(path) = &args.gguf {
        let vocab = kiln_models::gguf_export::vocab_metadata(&p).context("the tokenizer")?;
        let name = model_name(&model_arg);
        let report = match (args.quant, &keep_base) {
            (FuseQuant::Quant(quant), _) => {
                kiln_models::gguf_export::write_gguf(path, model, vocab, &name, quant)
            }
            (FuseQuant::Keep, file) => {
                let file = file
                    .as_ref()
                    .context("--quant keep: the base file was not read")?;
                let base = kiln_models::gguf_export::KeepBase {
                    file,
                    changed: adapted,
                };
                kiln_models::gguf_export::write_gguf_keeping(path, model, vocab, &name, &base)
            }
        }
        .context("writing the GGUF file")?;
        out!(
            "wrote {} ({summary}, {}: {}; {:.1} MB)",
            path.display(),
            args.quant.name(),
            describe_types(&report),
            report.bytes as f64 / 1e6
        );
    }
    Ok(())
}

/// An output file that does not exist yet, in a directory that does.
fn check_new_file(flag: &str, path: &Path) -> Result<(), Failure> {
    if path.exists() {
        return Err(usage(anyhow::anyhow!(
            "{flag} {}: exists (kiln does not write over a file)",
            path.display()
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(usage(anyhow::anyhow!(
            "{flag} {}: directory {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    Ok(())
}

fn export_adapter(args: ExportAdapterArgs) -> Result<(), Failure> {
    check_new_file("--gguf", &args.gguf)?;
    let cpu = BackendArgs {
        backend: "cpu".into(),
        software_adapter: false,
    };
    let (model_arg, adapter) = match &args.base {
        Some(base) => (base.clone(), Some(args.adapter.clone())),
        None => (args.adapter.clone(), None),
    };
    let (p, adapter) = load(&model_arg, adapter.as_deref(), &cpu)?;
    if adapter.is_none() {
        return Err(usage(anyhow::anyhow!(
            "--adapter {}: not a LoRA adapter (no adapter_config.json without a config.json)",
            args.adapter.display()
        )));
    }
    let name = model_name(&args.adapter);
    let report = kiln_models::gguf_export::write_adapter_gguf(&args.gguf, &p.model, &name)
        .context("writing the adapter GGUF")?;
    out!(
        "wrote {} ({} LoRA matrices for {} {}, {:.1} MB); use it with llama-cli -m BASE.gguf \
         --lora {}",
        args.gguf.display(),
        report.tensors.len(),
        p.model.config().model_type,
        p.path.display(),
        report.bytes as f64 / 1e6,
        args.gguf.display()
    );
    Ok(())
}

/// `general.name`: the model's directory or file name, as llama.cpp's converter takes it.
fn model_name(model_arg: &Path) -> String {
    let path = model_arg.components().next_back();
    path.map(|c| c.as_os_str().to_string_lossy().to_string())
        .map(|n| n.trim_end_matches(".gguf").to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "kiln model".to_string())
}

/// "q5_0 ×182, q6_k ×30, f32 ×61; worst tensor error 3.1% (blk.0.attn_q.weight)".
fn describe_types(report: &kiln_models::gguf_export::GgufReport) -> String {
    let mut counts: Vec<(u32, usize)> = Vec::new();
    for t in &report.tensors {
        match counts.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
            Some((_, n)) => *n += 1,
            None => counts.push((t.ggml_type, 1)),
        }
    }
    let types = counts
        .iter()
        .map(|(ty, n)| {
            format!(
                "{} ×{n}",
                kiln_models::ggml_types::type_name(*ty).to_lowercase()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let worst = report
        .tensors
        .iter()
        .max_by(|a, b| a.error.relative_rms().total_cmp(&b.error.relative_rms()));
    match worst {
        Some(w) if w.error.sq_error > 0.0 => format!(
            "{types}; worst tensor error {:.2}% ({})",
            100.0 * w.error.relative_rms(),
            w.name
        ),
        _ => types,
    }
}

fn plan(args: PlanArgs) -> Result<(), Failure> {
    let config = Config::load(&args.config, &args.set).map_err(usage)?;
    print_plan(&config, args.json)
}

/// `kiln plan`'s report for a config (from a YAML file, or from `kiln finetune`'s flags).
fn print_plan(config: &Config, json: bool) -> Result<(), Failure> {
    let r = kiln_train::plan::plan_config(config).context("plan failed")?;
    if json {
        let mut v = serde_json::to_value(&r).context("report")?;
        // `plan` as an object, or `{"error": ...}` when nothing fits.
        v["plan"] = match &r.plan {
            Ok(p) => serde_json::to_value(p).context("report")?,
            Err(e) => serde_json::json!({ "error": e }),
        };
        out!("{v}");
    } else {
        out!("device: {}", r.device);
        out!("model: {}", r.model);
        out!(
            "parameters: {:.3}M trainable of {:.3}M; batch {} x sequence {}",
            r.trainable_params as f64 / 1e6,
            r.total_params as f64 / 1e6,
            r.batch_size,
            r.seq_len
        );
        out!(
            "budget: {} ({})",
            r.budget
                .map(human_bytes)
                .unwrap_or_else(|| "unknown".into()),
            r.budget_source
        );
        out!(
            "{:<12} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
            "checkpoint",
            "weights",
            "gradients",
            "optimizer",
            "activations",
            "logits",
            "overhead",
            "total"
        );
        for (name, e) in &r.options {
            out!(
                "{:<12} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
                name,
                human_bytes(e.weights),
                human_bytes(e.gradients),
                human_bytes(e.optimizer),
                human_bytes(e.activations),
                human_bytes(e.logits),
                human_bytes(e.overhead),
                human_bytes(e.total)
            );
        }
        if r.attention_tiled {
            out!(
                "attention: in tiles, no scores kept (materialised they would take {})",
                human_bytes(r.attention_scores)
            );
        } else {
            out!(
                "attention: scores materialised for dropout on them (model.dropout): {}",
                human_bytes(r.attention_scores)
            );
        }
        match &r.plan {
            Ok(p) => out!(
                "plan: micro-batch {} x {} accumulated, {}: estimated peak {} of {} usable ({} budget less the {:.0}% margin)",
                p.micro_batch,
                p.grad_accum,
                kiln_train::plan::describe(p.recompute_every),
                human_bytes(p.estimate.total),
                human_bytes(p.usable),
                human_bytes(p.budget),
                kiln_train::plan::SAFETY_MARGIN * 100.0
            ),
            Err(e) => out!("plan: none fits: {e}"),
        }
    }
    match r.plan {
        Ok(_) => Ok(()),
        Err(e) => Err(Failure::from(anyhow::anyhow!(e))),
    }
}

fn bench(args: BenchArgs) -> Result<(), Failure> {
    let config = Config::load(&args.config, &args.set).map_err(usage)?;
    if args.steps == 0 {
        return Err(usage(anyhow::anyhow!("--steps must be at least 1")));
    }
    print_bench(&config, args.steps, args.warmup, args.json)
}

/// `kiln bench`'s report for a config (from a YAML file, or from `kiln finetune`'s flags).
fn print_bench(config: &Config, steps: usize, warmup: usize, json: bool) -> Result<(), Failure> {
    let r = kiln_train::bench::bench(config, steps, warmup).context("bench failed")?;
    if json {
        out!("{}", serde_json::to_string(&r).context("report")?);
        return Ok(());
    }
    out!("device: {} ({} threads)", r.device, r.threads);
    out!(
        "model: {:.3}M parameters; {} tokens per step (mean)",
        r.parameters as f64 / 1e6,
        r.tokens_per_step
    );
    out!("first step done after {:.2} s", r.first_step_secs);
    out!(
        "tokens/s over {} steps: median {:.0} (min {:.0}, max {:.0})",
        r.step_secs.len(),
        r.median_tokens_per_s,
        r.min_tokens_per_s,
        r.max_tokens_per_s
    );
    out!(
        "host time to issue a step: median {:.2} ms, {:.2} ms CPU of the calling thread ({} of {} measured steps replayed from the captured step)",
        r.median_issue_secs * 1e3,
        r.median_issue_cpu_secs * 1e3,
        r.replayed_steps,
        r.step_secs.len()
    );
    if let Some(p) = r.peak_rss_bytes {
        out!("peak RSS: {}", human_bytes(p));
    }
    if let (Some(p), Some(before)) = (r.peak_steps_bytes, r.rss_before_steps) {
        out!(
            "while stepping: peak RSS {} (estimated {}; {} before the first step), {}",
            human_bytes(p),
            human_bytes(r.estimate.total),
            human_bytes(before),
            kiln_train::plan::describe(r.recompute_every)
        );
    }
    if let Some(p) = r.peak_device_bytes {
        out!(
            "peak device memory reserved: {} (estimated {})",
            human_bytes(p),
            human_bytes(r.estimate.total)
        );
    }
    Ok(())
}

fn bail_usage(message: &str) -> Result<(), Failure> {
    Err(usage(anyhow::anyhow!(message.to_string())))
}

fn devices() -> Result<()> {
    let threads = kiln_train::threads::count();
    out!("cpu: Burn Flex, {threads} threads");
    if let Some((total, available)) = kiln_train::memory::host_memory() {
        out!(
            "  memory: {} total, {} available",
            human_bytes(total),
            human_bytes(available)
        );
    }
    if let Some(limit) = kiln_train::memory::cgroup_limit() {
        out!("  cgroup limit: {}", human_bytes(limit));
    }
    match device::cpu_budget() {
        Some(b) => out!("  memory budget: {} ({})", human_bytes(b.bytes), b.source),
        None => out!("  memory budget: unknown (set memory.budget)"),
    }
    let adapters = device::list_adapters();
    if adapters.is_empty() {
        out!("gpu: no adapters found through wgpu");
    }
    for a in adapters {
        out!(
            "gpu: {} ({}, {}{}){}",
            a.name,
            a.device_type,
            a.backend,
            if a.driver.is_empty() {
                String::new()
            } else {
                format!(", {}", a.driver)
            },
            if a.software {
                " [software: use backend.adapter: software]"
            } else {
                ""
            }
        );
        out!(
            "  max buffer {}, max storage binding {}",
            human_bytes(a.max_buffer_size),
            human_bytes(a.max_storage_binding)
        );
        out!("  compilers: {}", device::compilers_for(&a).join(", "));
        match device::gpu_budget(&a) {
            Some(b) => out!("  memory budget: {} ({})", human_bytes(b.bytes), b.source),
            None => out!("  memory budget: not reported (set memory.budget)"),
        }
    }
    let auto = device::select(&BackendConfig::default()).map(|d| d.description);
    match auto {
        Ok(d) => out!("backend: auto would use {d}"),
        Err(e) => bail!("backend: auto failed: {e}"),
    }
    Ok(())
}
