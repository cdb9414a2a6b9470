//! `maskprune train-masks` / `prune` on the tiny fixture: a run killed with SIGKILL ten times
//! (once while writing a checkpoint) and resumed each time, across the commit to the
//! extracted widths, ends bit-identical to an uninterrupted one; resume refuses a corrupt
//! checkpoint or other inputs; bad training inputs are one-line errors.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{assert_success, bin, fixtures};

fn fixture() -> PathBuf {
    fixtures().join("tiny-llama")
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("train", name)
}

/// A calibration file of random windows and a config, in `dir`.
fn inputs(dir: &Path, steps: u64, max_token: u64) -> (PathBuf, PathBuf) {
    common::training_inputs(dir, steps, max_token, 12345, 7)
}

/// Lines in a run's log so far.
fn logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("log.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_run_killed_ten_times_and_resumed_is_bit_identical_to_an_uninterrupted_one() {
    let dir = scratch("resume");
    let (calib, config) = inputs(&dir, 200, 288);
    // The last 40 updates at the extracted widths: kills land before, across and after the
    // commit (update 160), and the resumed run must choose the same widths.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("commit_steps = 40\n");
    std::fs::write(&config, text).unwrap();
    let s = |p: &Path| p.display().to_string();
    let (calib, config, model) = (s(&calib), s(&config), s(&fixture()));
    let (full, killed) = (dir.join("full"), dir.join("killed"));

    let out = bin()
        .args(common::train_masks_args(&config, &calib, &model, &s(&full)))
        .output()
        .unwrap();
    assert_success(&out);

    // Ten kills at seeded random points, each after more updates than the last; the sixth is
    // the process dying while it writes a checkpoint (a test hook aborts it there).
    let mut rng = 0x5eed_u64;
    let mut random = |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    for kill in 0..10u64 {
        let mut cmd = bin();
        cmd.args(common::train_masks_args(
            &config,
            &calib,
            &model,
            &s(&killed),
        ));
        if kill > 0 {
            cmd.arg("--resume");
        }
        if kill == 5 {
            // The first checkpoint (every 7 updates) after the one it resumes from.
            let state: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(killed.join("checkpoint/state.json")).unwrap(),
            )
            .unwrap();
            let at = state["step"].as_u64().unwrap() + 7;
            let out = cmd
                .env("MASKPRUNE_FAULT_ABORT_IN_CHECKPOINT", at.to_string())
                .output()
                .unwrap();
            assert!(!out.status.success(), "the run survived its abort at {at}");
            assert_eq!(
                logged(&killed),
                at as usize,
                "it died writing checkpoint {at}"
            );
            continue;
        }
        let target = (15 + 17 * kill + random(10)) as usize;
        let mut child = cmd.spawn().unwrap();
        let start = Instant::now();
        while logged(&killed) < target {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "kill {kill}: the run never reached update {target}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(
            !killed.join("summary.json").exists(),
            "the run finished before kill {kill}; the test proves nothing"
        );
    }
    assert!(killed.join("checkpoint/state.json").exists());

    let out = bin()
        .args(common::train_masks_args(
            &config,
            &calib,
            &model,
            &s(&killed),
        ))
        .arg("--resume")
        .output()
        .unwrap();
    assert_success(&out);
    let tensors = |p: PathBuf| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.data().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert!(
        tensors(full.join("lora.safetensors")) == tensors(killed.join("lora.safetensors")),
        "the adapters differ between the uninterrupted and the resumed run"
    );
    for f in ["masks.json", "plan.json"] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(killed.join(f)).unwrap(),
            "{f} differs between the uninterrupted and the resumed run"
        );
    }
    let log_killed = common::log_records(&killed);
    assert_eq!(log_killed.len(), 200);
    assert_eq!(common::log_records(&full), log_killed, "the logs differ");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["committed_steps"], 40, "the run never committed");
}

#[test]
fn prune_runs_every_stage_and_refuses_to_clobber() {
    let dir = scratch("prune");
    let (calib, config) = inputs(&dir, 12, 288);
    let s = |p: &Path| p.display().to_string();
    let out = dir.join("pruned");
    let args = [
        "--quiet",
        "prune",
        "--config",
        &s(&config),
        "--calib",
        &s(&calib),
        "--model",
        &s(&fixture()),
        "--out",
        &s(&out),
    ];
    let o = bin().args(args).output().unwrap();
    assert_success(&o);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg["intermediate_size"].as_u64().unwrap() < 128);
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("maskprune.json")).unwrap())
            .unwrap();
    assert_eq!(prov["method"], "maskprune");
    assert!(prov["lora_merged"].is_string());
    assert!(dir.join("pruned.run/plan.json").exists());
    let o = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("already exists"),
        "{err}"
    );
}

#[test]
fn bad_training_inputs_are_one_line_errors() {
    let dir = scratch("bad");
    let (calib, config) = inputs(&dir, 10, 288);
    let (bad_calib_dir, _) = (dir.join("other"), ());
    std::fs::create_dir_all(&bad_calib_dir).unwrap();
    let (foreign_calib, _) = inputs(&bad_calib_dir, 10, 50_000);
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[budget]\nsparsity = 0.5\n[train]\nstepz = 3\n").unwrap();
    let s = |p: &Path| p.display().to_string();
    let (calib, config, model, typo, foreign) = (
        s(&calib),
        s(&config),
        s(&fixture()),
        s(&typo),
        s(&foreign_calib),
    );
    let existing = dir.join("exists");
    std::fs::create_dir_all(&existing).unwrap();
    let (existing, fresh) = (s(&existing), s(&dir.join("fresh")));
    let base = |run: &str| {
        common::train_masks_args(&config, &calib, &model, run)
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let with = |run: &str, extra: &[&str]| {
        let mut v = base(run);
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            with(&fresh, &["--sparsity", "0.99"]),
            "smallest uniform model",
        ),
        (with(&fresh, &["--sparsity", "1.5"]), "budget.sparsity"),
        (with(&fresh, &["--target-params", "10"]), "impossible"),
        (with(&fresh, &["--resume"]), "no checkpoint"),
        (with(&existing, &[]), "already exists"),
        (with(&fresh, &["--set", "train.batch=0"]), "train.batch"),
        (with(&fresh, &["--set", "nonsense"]), "section.key=value"),
        (with(&fresh, &["--max-steps", "0"]), "--max-steps"),
        (
            common::train_masks_args(&typo, &calib, &model, &fresh)
                .into_iter()
                .map(String::from)
                .collect(),
            "stepz",
        ),
        (
            common::train_masks_args(&config, &foreign, &model, &fresh)
                .into_iter()
                .map(String::from)
                .collect(),
            "vocabulary",
        ),
        (
            with(&fresh, &["--set", "train.eval_samples=38"]),
            "calibration set has 40 windows",
        ),
    ];
    for (args, needle) in cases {
        let o = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn resume_refuses_a_corrupt_checkpoint_and_other_inputs() {
    let dir = scratch("refuse");
    let (calib, config) = inputs(&dir, 10, 288);
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let other_calib = other.join("calib.json");
    common::random_calibration(&other_calib, 40, 16, 288, 999);
    let other_config = other.join("tiny.toml");
    std::fs::write(
        &other_config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("sparsity = 0.5", "sparsity = 0.4"),
    )
    .unwrap();
    let s = |p: &Path| p.display().to_string();
    let (calib, config, model) = (s(&calib), s(&config), s(&fixture()));
    let run = dir.join("run");
    assert_success(
        &bin()
            .args(common::train_masks_args(&config, &calib, &model, &s(&run)))
            .output()
            .unwrap(),
    );
    // Each case: a change to a copy of the finished run, the flags, and the error's needle.
    type Change = fn(&Path);
    let keep: Change = |_| {};
    let flip_lora: Change = |r| {
        let p = r.join("checkpoint/lora.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&p, b).unwrap();
    };
    let edit_state: Change = |r| {
        let p = r.join("checkpoint/state.json");
        let t = std::fs::read_to_string(&p)
            .unwrap()
            .replacen("\"step\":", "\"step\":1", 1);
        std::fs::write(&p, t).unwrap();
    };
    let no_sums: Change = |r| std::fs::remove_file(r.join("checkpoint/checksums.json")).unwrap();
    let edit_config: Change = |r| {
        let p = r.join("config.toml");
        let t = std::fs::read_to_string(&p)
            .unwrap()
            .replace("seed = 0", "seed = 1");
        std::fs::write(&p, t).unwrap();
    };
    let (other_model, other_config, other_calib) = (
        s(&fixtures().join("tiny-mistral")),
        s(&other_config),
        s(&other_calib),
    );
    // (change, --config, --calib, --model, more flags, the error's needle)
    type Case<'a> = (Change, &'a str, &'a str, &'a str, &'a [&'a str], &'a str);
    let cases: Vec<Case> = vec![
        (
            flip_lora,
            &config,
            &calib,
            &model,
            &[],
            "lora.safetensors: corrupt checkpoint",
        ),
        (
            edit_state,
            &config,
            &calib,
            &model,
            &[],
            "state.json: corrupt checkpoint",
        ),
        (
            no_sums,
            &config,
            &calib,
            &model,
            &[],
            "checksums.json: missing: a checkpoint without checksums",
        ),
        (
            edit_config,
            &config,
            &calib,
            &model,
            &[],
            "another configuration",
        ),
        (
            keep,
            &other_config,
            &calib,
            &model,
            &[],
            "another configuration than the run's",
        ),
        (
            keep,
            &config,
            &calib,
            &model,
            &["--max-steps", "5"],
            "another configuration than the run's",
        ),
        (
            keep,
            &config,
            &other_calib,
            &model,
            &[],
            "not the calibration windows",
        ),
        (
            keep,
            &config,
            &calib,
            &other_model,
            &[],
            "another model's weights",
        ),
    ];
    for (i, (change, config, calib, model, flags, needle)) in cases.into_iter().enumerate() {
        let copy = dir.join(format!("case{i}"));
        let out = std::process::Command::new("cp")
            .args(["-r", &s(&run), &s(&copy)])
            .output()
            .unwrap();
        assert_success(&out);
        std::fs::remove_file(copy.join("summary.json")).unwrap();
        change(&copy);
        let copy = s(&copy);
        let mut args = common::train_masks_args(config, calib, model, &copy);
        args.extend(flags);
        args.push("--resume");
        let o = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "case {i} resumed: {args:?}");
        assert_eq!(err.trim().lines().count(), 1, "case {i}: {err}");
        assert!(err.contains(needle), "case {i}: `{needle}` missing: {err}");
    }
}

#[test]
fn a_nan_loss_stops_the_run_and_resume_continues_from_the_last_good_checkpoint() {
    let dir = scratch("nan");
    // 20 updates, a checkpoint every 7: the NaN at update 12 leaves the step-7 checkpoint.
    let (calib, config) = inputs(&dir, 20, 288);
    let s = |p: &Path| p.display().to_string();
    let (calib, config, model) = (s(&calib), s(&config), s(&fixture()));
    let (full, broken) = (dir.join("full"), dir.join("broken"));
    assert_success(
        &bin()
            .args(common::train_masks_args(&config, &calib, &model, &s(&full)))
            .output()
            .unwrap(),
    );
    let out = bin()
        .args(common::train_masks_args(
            &config,
            &calib,
            &model,
            &s(&broken),
        ))
        .env("MASKPRUNE_FAULT_NAN_STEP", "12")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    for needle in [
        "step 12",
        "distillation loss is NaN",
        "checkpoint",
        "(step 7)",
        "--resume",
    ] {
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
    }
    assert!(!broken.join("summary.json").exists());
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(broken.join("checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 7, "the checkpoint is the last good one");
    // Resumed without the fault, the run ends exactly as the uninterrupted one.
    let out = bin()
        .args(common::train_masks_args(
            &config,
            &calib,
            &model,
            &s(&broken),
        ))
        .arg("--resume")
        .output()
        .unwrap();
    assert_success(&out);
    for f in ["masks.json", "plan.json"] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(broken.join(f)).unwrap(),
            "{f} differs after resuming from the NaN"
        );
    }
}
