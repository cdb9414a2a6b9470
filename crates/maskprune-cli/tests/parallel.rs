//! Data-parallel `train-masks` on the tiny fixture: two CPU devices (two peers of burn's
//! collective, each on half of every batch) against one device at the same global batch, and
//! a two-device run resumed on one device; two processes (nodes) over loopback against one
//! process with two devices.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_success, bin, fixtures};

const STEPS: u64 = 30;

/// A calibration set (vocabulary 288) and a config with batch 4, in `dir`.
fn inputs(dir: &Path) -> (String, String) {
    let (calib, config) = common::training_inputs(dir, STEPS, 288, 777, 10);
    (s(&calib), s(&config))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `train-masks` with the inputs into `run`, plus `extra`.
fn train(calib: &str, config: &str, run: &Path, extra: &[&str]) -> std::process::Command {
    let (model, run) = (s(&fixtures().join("tiny-llama")), s(run));
    let mut cmd = bin();
    cmd.args(common::train_masks_args(config, calib, &model, &run))
        .args(extra);
    cmd
}

/// Every float of the adapters, by tensor name.
fn adapters(run: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(run.join("lora.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let f = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n, f)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Every number in a JSON value, in order.
fn numbers(v: &serde_json::Value, out: &mut Vec<f64>) {
    match v {
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| numbers(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| numbers(x, out)),
        _ => {}
    }
}

/// The largest difference between two runs' mask values (masks.json: z, m, y, widths).
fn masks_gap(a: &Path, b: &Path) -> f64 {
    let read = |p: &Path| {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("masks.json")).unwrap()).unwrap();
        let mut out = Vec::new();
        numbers(&v, &mut out);
        out
    };
    let (x, y) = (read(a), read(b));
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
}

fn adapters_gap(a: &Path, b: &Path) -> f64 {
    let (x, y) = (adapters(a), adapters(b));
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(&y)
        .flat_map(|((n, p), (m, q))| {
            assert_eq!(n, m);
            p.iter().zip(q).map(|(u, v)| (u - v).abs() as f64)
        })
        .fold(0.0, f64::max)
}

fn run_ok(mut cmd: std::process::Command) -> Output {
    let out = cmd.output().unwrap();
    assert_success(&out);
    out
}

#[test]
fn two_cpu_devices_match_one_device_at_the_same_global_batch() {
    let dir = common::scratch("parallel", "devices");
    let (calib, config) = inputs(&dir);
    let (one, two) = (dir.join("one"), dir.join("two"));
    run_ok(train(&calib, &config, &one, &[]));
    run_ok(train(&calib, &config, &two, &["--devices", "cpu,cpu"]));

    // Same units kept in every layer.
    assert_eq!(
        std::fs::read_to_string(one.join("plan.json")).unwrap(),
        std::fs::read_to_string(two.join("plan.json")).unwrap(),
        "the plans differ"
    );
    // Each device sums its half of the batch's matrix products, so the gradients agree with
    // one device's to rounding, not bit for bit; 30 updates keep them within these bounds.
    let (masks, lora) = (masks_gap(&one, &two), adapters_gap(&one, &two));
    eprintln!("1 vs 2 devices after {STEPS} updates: masks {masks:.3e}, adapters {lora:.3e}");
    assert!(masks < 1e-3, "masks differ by {masks}");
    assert!(lora < 1e-3, "adapters differ by {lora}");
    let (a, b) = (common::log_records(&one), common::log_records(&two));
    assert_eq!(a.len(), STEPS as usize);
    for (x, y) in a.iter().zip(&b) {
        let (dx, dy) = (
            x["distill"].as_f64().unwrap(),
            y["distill"].as_f64().unwrap(),
        );
        assert!(
            (dx - dy).abs() <= 1e-4 * dx.abs().max(1e-3),
            "step {}: distillation {dx} vs {dy}",
            x["step"]
        );
        assert_eq!(x["kept_attention"], y["kept_attention"]);
        assert_eq!(x["kept_channels"], y["kept_channels"]);
    }

    // A two-device run stopped at update 15 (a NaN loss; its last checkpoint is update 10)
    // and resumed on one device ends where the one-device run does, to rounding.
    let switched = dir.join("switched");
    let out = train(&calib, &config, &switched, &["--devices", "cpu,cpu"])
        .env("MASKPRUNE_FAULT_NAN_STEP", "15")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the NaN hook did not stop the run");
    run_ok(train(&calib, &config, &switched, &["--resume"]));
    assert_eq!(common::log_records(&switched).len(), STEPS as usize);
    assert_eq!(
        std::fs::read_to_string(one.join("plan.json")).unwrap(),
        std::fs::read_to_string(switched.join("plan.json")).unwrap(),
        "resumed on one device: the plans differ"
    );
    let masks = masks_gap(&one, &switched);
    assert!(
        masks < 1e-3,
        "resumed on one device: masks differ by {masks}"
    );

    // A batch that does not split evenly is refused before anything runs.
    let out = train(
        &calib,
        &config,
        &dir.join("three"),
        &["--devices", "cpu,cpu,cpu"],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multiple of 3"), "{err}");
    assert!(!dir.join("three").exists());
}

/// A free TCP port on loopback, as `HOST:PORT`.
fn free_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Starts one `train-masks` process per entry of `extra`, as node `k` of them, and waits for all.
fn nodes(calib: &str, config: &str, dir: &Path, extra: &[&[&str]]) -> Vec<Output> {
    let at = free_address();
    let count = extra.len().to_string();
    let children: Vec<_> = extra
        .iter()
        .enumerate()
        .map(|(k, more)| {
            let rank = k.to_string();
            let mut cmd = train(calib, config, &dir.join(format!("node{k}")), more);
            cmd.args([
                "--nodes",
                &count,
                "--node-rank",
                &rank,
                "--coordinator",
                &at,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
            cmd.spawn().unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

#[test]
fn two_processes_over_loopback_match_one_process_with_two_devices() {
    let dir = common::scratch("parallel", "nodes");
    let (calib, config) = inputs(&dir);
    let devices = dir.join("devices");
    run_ok(train(&calib, &config, &devices, &["--devices", "cpu,cpu"]));
    for out in nodes(&calib, &config, &dir, &[&[], &[]]) {
        assert_success(&out);
    }
    // The same shards summed in the same order (a + b, one way or the other), and every node
    // applies the same sum: bit for bit the two-device run's results, on both nodes (the
    // adapters by value: their file's metadata order is a HashMap's).
    for node in ["node0", "node1"] {
        assert!(
            adapters(&devices) == adapters(&dir.join(node)),
            "{node}: the adapters differ from the two-device run's"
        );
        for file in ["plan.json", "masks.json"] {
            assert!(
                std::fs::read(devices.join(file)).unwrap()
                    == std::fs::read(dir.join(node).join(file)).unwrap(),
                "{node}/{file} differs from the two-device run's"
            );
        }
        let (a, b) = (
            common::log_records(&devices),
            common::log_records(&dir.join(node)),
        );
        assert_eq!(a.len(), STEPS as usize);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x["distill"], y["distill"], "step {}", x["step"]);
        }
    }

    // A node started with another configuration is refused, in one line, on both sides.
    let refused = dir.join("refused");
    let outs = nodes(
        &calib,
        &config,
        &refused,
        &[&[], &["--set", "train.seed=1"]],
    );
    for out in outs {
        assert!(!out.status.success(), "a mismatched node was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("node 1 has another model, configuration or calibration set"),
            "{err}"
        );
    }
}
