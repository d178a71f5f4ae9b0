//! Data-parallel runs under `mpirun` on this machine (loopback), against one process: the `mpi`
//! feature's end-to-end tests (scripts/test installs Open MPI and builds with it).

use super::{output_text, repo, scratch, smollm2, write_tiny_config};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun -np N` on this machine, more ranks than cores allowed.
fn mpirun(np: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", &np.to_string()]);
    // Open MPI refuses root unless told (CI containers run as root).
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        cmd.arg("--allow-run-as-root");
    }
    cmd.current_dir(repo());
    cmd
}

fn kiln_under_mpirun(np: usize, args: &[&str]) -> Output {
    mpirun(np)
        // Gathers of 1000 values: the tiny model's tensors split across gathers and group
        // within one, and the sums must still be the single process's bits.
        .args(["-x", "KILN_GATHER_VALUES=1000"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("mpirun (scripts/test installs Open MPI)")
}

fn run_alone(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn succeeded(what: &str, o: &Output) {
    assert!(o.status.success(), "{what}: {}", output_text(o));
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The last train loss a checkpoint's trainer state holds.
fn last_loss(step_dir: &Path) -> f64 {
    let state: serde_json::Value =
        serde_json::from_slice(&read(&step_dir.join("trainer_state.json"))).unwrap();
    state["last_train_loss"].as_f64().unwrap()
}

/// The largest per-tensor relative difference `‖a − b‖ / ‖b‖` between two safetensors files.
fn largest_relative_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (
        kiln::models::safetensors_io::read_all(a).unwrap(),
        kiln::models::safetensors_io::read_all(b).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for (name, x) in &a {
        let y = &b[name];
        let (mut diff, mut norm) = (0f64, 0f64);
        for (p, q) in x.data.iter().zip(&y.data) {
            diff += (*p as f64 - *q as f64).powi(2);
            norm += (*q as f64).powi(2);
        }
        worst = worst.max((diff / norm.max(1e-300)).sqrt());
    }
    worst
}

#[test]
fn ranks_train_as_one_process_with_their_accumulation_and_resume_exactly() {
    let (dir, corpus) = scratch("mpi-equal");
    let out = dir.path().join("runs");
    let config = |name: &str, accum: usize| {
        let overrides = [
            format!("train.grad_accum={accum}"),
            "train.max_steps=6".into(),
            "train.save_every=3".into(),
            "train.eval_every=0".into(),
            "logging.histograms_every=0".into(),
        ];
        let overrides: Vec<&str> = overrides.iter().map(String::as_str).collect();
        write_tiny_config(dir.path(), &out, &corpus, name, &overrides)
    };
    let step = |run: &str, n: usize| out.join(run).join(format!("step-{n:07}"));
    let same_files =
        |a: &str, b: &str, file: &str| read(&step(a, 6).join(file)) == read(&step(b, 6).join(file));

    // N ranks, one micro-batch each = one process accumulating N: the same additions in the same
    // order, so the same bits (two and three ranks).
    for ranks in [2, 3] {
        let (many, one) = (format!("ranks{ranks}"), format!("alone{ranks}"));
        let r = kiln_under_mpirun(ranks, &["train", config(&many, 1).to_str().unwrap()]);
        succeeded(&many, &r);
        let text = output_text(&r);
        assert!(
            text.contains(&format!("ranks: {ranks} processes")) && text.contains("gradients from"),
            "{text}"
        );
        // Rank 0 alone prints: one summary.
        assert_eq!(text.matches("done: 6 of 6 steps").count(), 1, "{text}");
        succeeded(
            &one,
            &run_alone(&["train", config(&one, ranks).to_str().unwrap()]),
        );
        for file in ["model.safetensors", "optimizer.safetensors"] {
            assert!(
                same_files(&many, &one, file),
                "{ranks} ranks: {file} differs"
            );
        }
        assert_eq!(last_loss(&step(&many, 6)), last_loss(&step(&one, 6)));
    }

    // Two micro-batches on each of two ranks: the ranks' sums are added, not the four in order,
    // so the bits may differ, within float rounding.
    let r = kiln_under_mpirun(2, &["train", config("ranks2x2", 2).to_str().unwrap()]);
    succeeded("ranks2x2", &r);
    succeeded(
        "alone4",
        &run_alone(&["train", config("alone4", 4).to_str().unwrap()]),
    );
    let worst = largest_relative_difference(
        &step("ranks2x2", 6).join("model.safetensors"),
        &step("alone4", 6).join("model.safetensors"),
    );
    assert!(worst <= 1e-6, "2 ranks × 2 against 4 alone: {worst:e}");
    let (a, b) = (
        last_loss(&step("ranks2x2", 6)),
        last_loss(&step("alone4", 6)),
    );
    assert!((a - b).abs() <= 1e-6 * b.abs(), "losses {a} and {b}");

    // Stopped at step 3 and resumed by the same two ranks: the uninterrupted run's bits.
    let split = config("split", 1);
    let r = kiln_under_mpirun(2, &["train", split.to_str().unwrap(), "--stop-after", "3"]);
    succeeded("split, first half", &r);
    let r = kiln_under_mpirun(2, &["train", split.to_str().unwrap(), "--resume"]);
    succeeded("split, resumed", &r);
    assert!(same_files("split", "ranks2", "model.safetensors"));
    assert!(same_files("split", "ranks2", "optimizer.safetensors"));

    // Resumed by three ranks: it goes on, and says it is not the two ranks' run.
    let other = config("other", 1);
    let r = kiln_under_mpirun(2, &["train", other.to_str().unwrap(), "--stop-after", "3"]);
    succeeded("other, first half", &r);
    let r = kiln_under_mpirun(3, &["train", other.to_str().unwrap(), "--resume"]);
    succeeded("other, resumed by 3", &r);
    let text = output_text(&r);
    assert!(
        text.contains("trained by 2 process(es), this run has 3")
            && text.contains("not bit-identical"),
        "{text}"
    );
    assert_eq!(text.matches("not bit-identical").count(), 1, "{text}");
    assert!(step("other", 6).join("model.safetensors").is_file());
}

#[test]
fn lora_ranks_on_smollm2_equal_one_process() {
    let gguf = smollm2().expect("KILN_SMOLLM2_GGUF: run the tests through scripts/test");
    let dir = tempfile::tempdir().unwrap();
    let data = repo().join("datasets/roman-numerals");
    let out = dir.path().to_str().unwrap().to_string();
    let args = |name: &'static str| -> Vec<String> {
        [
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
            "3",
            "--lr",
            "2e-3",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--mask-prompt",
            "--eval-every",
            "0",
            "--save-every",
            "3",
            "--output-dir",
            &out,
            "--backend",
            "cpu",
            "--set",
            "finetune.lora.dropout=0.0",
            "--name",
            name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let r = kiln_under_mpirun(2, &refs(&args("ranks")));
    succeeded("2 ranks", &r);
    let mut alone = args("alone");
    alone.extend(["--set".into(), "train.grad_accum=2".into()]);
    succeeded("alone", &run_alone(&refs(&alone)));
    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let at = |run: &str| read(&dir.path().join(run).join("step-0000003").join(file));
        assert!(at("ranks") == at("alone"), "{file} differs");
    }
    // The adapter is PEFT's, whichever way it was trained.
    assert!(
        dir.path()
            .join("ranks/step-0000003/adapter_config.json")
            .is_file()
    );
}

/// The process of rank `rank` whose command line holds `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<i32> {
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let holds = |bytes: &[u8], s: &str| bytes.split(|&b| b == 0).any(|w| w == s.as_bytes());
        let cmd = String::from_utf8_lossy(&cmdline);
        (cmd.contains(marker) && cmd.contains("kiln") && holds(&environ, &wanted)).then_some(pid)
    })
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file for a long run's output: mpirun blocks when a pipe nobody reads fills up.
fn to_file(path: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(path).unwrap())
}

/// `<name>.log` then `<name>.err` in `dir`.
fn logs(dir: &Path, name: &str) -> String {
    let read =
        |ext: &str| std::fs::read_to_string(dir.join(format!("{name}.{ext}"))).unwrap_or_default();
    format!("{}{}", read("log"), read("err"))
}

/// A run long enough to be stopped while it trains.
fn long_config(dir: &Path, out: &Path, corpus: &Path, name: &str, save_every: usize) -> PathBuf {
    let save = format!("train.save_every={save_every}");
    write_tiny_config(
        dir,
        out,
        corpus,
        name,
        &[
            &save,
            "model.hidden_size=64",
            "train.max_steps=100000",
            "optim.schedule.kind=constant",
            "optim.schedule.warmup_steps=0",
            "train.eval_every=0",
            "logging.histograms_every=0",
        ],
    )
}

#[test]
fn a_killed_rank_stops_the_run_and_resume_continues_it_exactly() {
    let (dir, corpus) = scratch("mpi-kill");
    let out = dir.path().join("runs");
    let killed = long_config(dir.path(), &out, &corpus, "killed", 40);
    let run_dir = out.join("killed");
    let log = dir.path().join("killed.log");
    let mut child = mpirun(2)
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", killed.to_str().unwrap()])
        .stdout(to_file(&log))
        .stderr(to_file(&dir.path().join("killed.err")))
        .spawn()
        .unwrap();
    wait_for("a first checkpoint", Duration::from_secs(120), || {
        run_dir.join("step-0000040").is_dir()
    });
    let pid = rank_pid(killed.to_str().unwrap(), 1).expect("rank 1's process");
    let killed_at = Instant::now();
    // SAFETY: a plain kill of a process this test started (through mpirun).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("mpirun to end", Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    let stopped_in = killed_at.elapsed();
    let status = child.wait().unwrap();
    let text = logs(dir.path(), "killed");
    assert!(!status.success(), "{text}");
    assert!(text.contains("rank 1"), "mpirun names the rank: {text}");
    assert!(
        rank_pid(killed.to_str().unwrap(), 0).is_none(),
        "rank 0 outlived the run"
    );
    // Every checkpoint left is whole.
    let left = kiln::train::checkpoint::list(&run_dir);
    assert!(!left.is_empty());
    for (_, ckpt) in &left {
        kiln::train::checkpoint::verify(ckpt)
            .unwrap_or_else(|why| panic!("{}: {why}", ckpt.display()));
    }
    let newest = left.last().unwrap().0;
    let until = (newest + 20).to_string();

    // Resumed by two ranks, it reaches the weights of a run that was never killed.
    let r = kiln_under_mpirun(
        2,
        &[
            "train",
            killed.to_str().unwrap(),
            "--resume",
            "--stop-after",
            &until,
        ],
    );
    succeeded("resumed", &r);
    let whole = long_config(dir.path(), &out, &corpus, "whole", 40);
    let r = kiln_under_mpirun(
        2,
        &["train", whole.to_str().unwrap(), "--stop-after", &until],
    );
    succeeded("uninterrupted", &r);
    let weights = |run: &str| {
        read(
            &out.join(run)
                .join(format!("step-{:07}", newest + 20))
                .join("model.safetensors"),
        )
    };
    assert!(
        weights("killed") == weights("whole"),
        "resumed weights differ"
    );
    eprintln!("a killed rank ended the run in {stopped_in:?}");
}

#[test]
fn signals_to_mpirun_checkpoint_once_and_resume_goes_on() {
    let (dir, corpus) = scratch("mpi-signal");
    let out = dir.path().join("runs");
    for (signal, name) in [(libc::SIGUSR1, "usr1"), (libc::SIGINT, "int")] {
        // No checkpoint but the one the signal asks for.
        let config = long_config(dir.path(), &out, &corpus, name, 1_000_000);
        let run_dir = out.join(name);
        let mut cmd = mpirun(2);
        // Time for the ranks between mpirun's SIGTERM and its SIGKILL (README: Several machines).
        cmd.env("OMPI_MCA_odls_base_sigkill_timeout", "5");
        let mut child = cmd
            .arg(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", config.to_str().unwrap()])
            .stdout(to_file(&dir.path().join(format!("{name}.log"))))
            .stderr(to_file(&dir.path().join(format!("{name}.err"))))
            .spawn()
            .unwrap();
        // Training has started when the first report is out.
        let log = dir.path().join(format!("{name}.log"));
        wait_for("the first steps", Duration::from_secs(120), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("step 5/"))
        });
        // SAFETY: a signal to the mpirun this test started.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        let text = logs(dir.path(), name);
        // mpirun passes SIGUSR1 on and returns the ranks' 130; on SIGINT Open MPI 4's mpirun
        // ends the job itself and returns 1 (its own code), after the ranks have saved.
        let expected = if signal == libc::SIGUSR1 { 130 } else { 1 };
        assert_eq!(status.code(), Some(expected), "{name}: {text}");
        let left = kiln::train::checkpoint::list(&run_dir);
        assert_eq!(left.len(), 1, "{name}: {left:?}\n{text}");
        let (last, ckpt) = left[0].clone();
        kiln::train::checkpoint::verify(&ckpt).unwrap();
        if signal == libc::SIGUSR1 {
            // Rank 0 alone saved it, once, and said where.
            assert_eq!(
                text.matches(&format!("step {last}: saved")).count(),
                1,
                "{text}"
            );
            assert!(
                text.contains(&format!("interrupted by SIGUSR1 after step {last}")),
                "{text}"
            );
        }
        let until = (last + 5).to_string();
        let r = kiln_under_mpirun(
            2,
            &[
                "train",
                config.to_str().unwrap(),
                "--resume",
                "--stop-after",
                &until,
            ],
        );
        succeeded(name, &r);
        assert!(run_dir.join(format!("step-{:07}", last + 5)).is_dir());
    }
}

#[test]
fn ranks_that_differ_stop_before_training_naming_the_difference() {
    let (dir, corpus) = scratch("mpi-differ");
    let out = dir.path().join("runs");
    let config = write_tiny_config(dir.path(), &out, &corpus, "differ", &["train.max_steps=3"]);
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");
    let mut cmd = mpirun(1);
    let o = cmd
        .args([kiln_bin, "train", config.to_str().unwrap(), ":", "-np", "1"])
        .args([kiln_bin, "train", config.to_str().unwrap()])
        .args(["--set", "optim.lr=0.01"])
        .output()
        .unwrap();
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(
        text.contains("rank 1: optim.lr is 0.01 there, 0.003 on rank 0"),
        "{text}"
    );
    assert!(!out.join("differ").join("step-0000003").exists());
}
