//! `maskprune finetune` on the tiny fixture: the recovery lowers the held-out loss, writes a
//! standard checkpoint with its provenance, resumes bit-identically after SIGKILL, and
//! refuses a teacher that is not the pruned model's original.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{assert_success, bin, fixtures, maskprune};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The tiny fixture pruned to half its MLP by magnitude, and a calibration file of
/// learnable text (each window counts up through tokens 0-7 from a random start), in `dir`.
fn pruned_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let calib = dir.join("calib.json");
    let mut x = 777u64;
    let samples: Vec<Vec<u64>> = (0..48)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let start = (x >> 33) % 8;
            (0..16).map(|i| (start + i) % 8).collect()
        })
        .collect();
    let set = serde_json::json!({
        "dataset": "counting", "file": "(generated)", "sha256": "", "documents": [0, 0],
        "seed": 0, "seq_len": 16, "tokenizer_sha256": "", "samples": samples,
    });
    std::fs::write(&calib, set.to_string()).unwrap();
    let config = dir.join("tiny.toml");
    std::fs::write(&config, "[budget]\nsparsity = 0.5\nround_to = 16\n").unwrap();
    let pruned = dir.join("pruned");
    let dense = fixtures().join("tiny-llama");
    let out = bin()
        .args([
            "--quiet",
            "prune",
            "--method",
            "magnitude",
            "--config",
            &s(&config),
        ])
        .args([
            "--calib",
            &s(&calib),
            "--model",
            &s(&dense),
            "--out",
            &s(&pruned),
        ])
        .output()
        .unwrap();
    assert_success(&out);
    (pruned, calib)
}

fn finetune_args(pruned: &Path, calib: &Path, out: &Path, steps: u64) -> Vec<String> {
    let teacher = fixtures().join("tiny-llama");
    [
        "--quiet",
        "finetune",
        "--model",
        &s(pruned),
        "--teacher",
        &s(&teacher),
        "--data",
        &s(calib),
        "--out",
        &s(out),
        "--steps",
        &steps.to_string(),
        "--set",
        "train.lr=0.01",
        "--set",
        "train.eval_samples=8",
        "--set",
        "train.checkpoint_every=5",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn recovery_lowers_the_held_out_loss_and_writes_a_standard_checkpoint() {
    let dir = common::scratch("finetune", "recover");
    let (pruned, calib) = pruned_fixture(&dir);
    let out = dir.join("tuned");
    let run = bin()
        .args(finetune_args(&pruned, &calib, &out, 40))
        .output()
        .unwrap();
    assert_success(&run);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tuned.run/summary.json")).unwrap())
            .unwrap();
    let (before, after) = (&summary["before"], &summary["after"]);
    let total = |x: &serde_json::Value| x["ntp"].as_f64().unwrap() + x["distill"].as_f64().unwrap();
    assert!(
        after["ntp"].as_f64().unwrap() < before["ntp"].as_f64().unwrap() - 1.0,
        "held-out next-token loss did not go down: {summary}"
    );
    assert!(total(after) < total(before), "{summary}");
    assert_eq!(summary["tokens"], 40 * 4 * 16);
    // The training loss goes down too.
    let log: Vec<f64> = std::fs::read_to_string(dir.join("tuned.run/log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(log.len(), 40);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    assert!(mean(&log[35..]) < mean(&log[..5]), "{log:?}");
    // Same shapes as the pruned model; provenance keeps the pruning and adds the recovery.
    let config = |d: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(
        config(&out)["intermediate_size"],
        config(&pruned)["intermediate_size"]
    );
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("maskprune.json")).unwrap()).unwrap();
    assert_eq!(provenance["method"], "magnitude");
    assert_eq!(provenance["recovery"]["steps"], 40);
    assert!(provenance["lora_merged"]
        .as_array()
        .is_some_and(|a| a.len() == 1));
    // The merged checkpoint evaluates like any other.
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let (code, stdout, stderr) = maskprune(&[
        "eval",
        "ppl",
        "--model",
        &s(&out),
        "--dataset",
        &s(&text),
        "--seq-len",
        "16",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ppl"), "{stdout}");
}

#[test]
fn killed_and_resumed_recovery_is_bit_identical() {
    let dir = common::scratch("finetune", "resume");
    let (pruned, calib) = pruned_fixture(&dir);
    let (full, killed) = (dir.join("full"), dir.join("killed"));
    assert_success(
        &bin()
            .args(finetune_args(&pruned, &calib, &full, 300))
            .output()
            .unwrap(),
    );
    let mut child = bin()
        .args(finetune_args(&pruned, &calib, &killed, 300))
        .spawn()
        .unwrap();
    let log = dir.join("killed.run/log.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 60
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run never got going"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !dir.join("killed.run/summary.json").exists(),
        "the run finished before it was killed; the test proves nothing"
    );
    let mut resume = finetune_args(&pruned, &calib, &killed, 300);
    resume.push("--resume".into());
    assert_success(&bin().args(resume).output().unwrap());
    // The adapters' values (their file's metadata order is a hash map's), and the merged
    // checkpoint byte for byte.
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
        tensors(dir.join("full.run/lora.safetensors"))
            == tensors(dir.join("killed.run/lora.safetensors")),
        "the adapters differ between the uninterrupted and the resumed run"
    );
    assert!(
        std::fs::read(full.join("model.safetensors")).unwrap()
            == std::fs::read(killed.join("model.safetensors")).unwrap(),
        "the merged checkpoints differ"
    );
}

#[test]
fn a_teacher_that_is_not_the_original_is_refused() {
    let dir = common::scratch("finetune", "teacher");
    let (pruned, calib) = pruned_fixture(&dir);
    // A model with another LM head: the dense fixture with one value of its head changed.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let dense = fixtures().join("tiny-llama");
    for f in std::fs::read_dir(&dense).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let st_path = other.join("model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let mut data = t.data().to_vec();
            if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                // Flip the sign bit of the first value: another head.
                let last = data.len() - 1;
                data[3.min(last)] ^= 0x80;
            }
            (n, t.dtype(), t.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &st_path).unwrap();
    let mut args = finetune_args(&pruned, &calib, &dir.join("tuned"), 3);
    let at = args.iter().position(|a| a == "--teacher").unwrap();
    args[at + 1] = s(&other);
    let out = bin().args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("LM head differs"), "{stderr}");
}
