//! Helpers shared by the CLI's integration tests.
#![allow(dead_code)] // each test file uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `maskprune` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_maskprune"))
}

/// Runs `maskprune args` and returns (exit code, stdout, stderr).
pub fn maskprune(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a finished command succeeded, showing its stderr otherwise.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tests/fixtures` of the workspace.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fresh, empty scratch directory unique to this test process, `prefix` and `name`.
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("maskprune-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A calibration file (`maskprune calib` format) of `windows` seeded random windows of `len`
/// token ids below `max_token`, written to `path`.
pub fn random_calibration(path: &Path, windows: usize, len: usize, max_token: u64, seed: u64) {
    let mut x = seed;
    let samples: Vec<Vec<u64>> = (0..windows)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (x >> 33) % max_token
                })
                .collect()
        })
        .collect();
    let calib = serde_json::json!({
        "dataset": "random", "file": "(generated)", "sha256": "", "documents": [0, 0], "seed": 0,
        "seq_len": len, "tokenizer_sha256": "", "samples": samples,
    });
    std::fs::write(path, calib.to_string()).unwrap();
}

/// A mask-training run's inputs for the tiny fixture, in `dir`: `calib.json`, 40 seeded random
/// windows of 16 token ids below `max_token`, and `tiny.toml`, 50% sparsity, batch 4, the
/// budget's warm-up over half the `steps`, a checkpoint every `checkpoint_every` updates.
pub fn training_inputs(
    dir: &Path,
    steps: u64,
    max_token: u64,
    seed: u64,
    checkpoint_every: u64,
) -> (PathBuf, PathBuf) {
    let calib_path = dir.join("calib.json");
    random_calibration(&calib_path, 40, 16, max_token, seed);
    let config_path = dir.join("tiny.toml");
    std::fs::write(
        &config_path,
        format!(
            "[budget]\nsparsity = 0.5\nround_to = 16\n[train]\nsteps = {steps}\nbatch = 4\n\
             warmup_steps = {}\ncheckpoint_every = {checkpoint_every}\neval_samples = 4\n",
            steps / 2
        ),
    )
    .unwrap();
    (calib_path, config_path)
}

/// A run's `log.jsonl` records without their wall times (the one field equal runs differ in).
pub fn log_records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

/// `--quiet train-masks` with a config, calibration set, model and run directory.
pub fn train_masks_args<'a>(
    config: &'a str,
    calib: &'a str,
    model: &'a str,
    run: &'a str,
) -> Vec<&'a str> {
    vec![
        "--quiet",
        "train-masks",
        "--config",
        config,
        "--calib",
        calib,
        "--model",
        model,
        "--run-dir",
        run,
    ]
}
