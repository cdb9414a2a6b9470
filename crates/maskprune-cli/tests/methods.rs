//! Issue 4 on the tiny fixture: every pruning method reaches exactly MaskPrune's widths, the
//! non-uniform ablation is a masked checkpoint, `bench --baseline` reports ratios, and
//! `scripts/reproduce-table.sh --quick` writes the table (when the shared data is present).

mod common;

use std::path::{Path, PathBuf};

use common::{fixtures, maskprune};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    common::scratch("methods", name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A calibration file of random windows and a 6-step config, in `dir`.
fn inputs(dir: &Path) -> (String, String) {
    let calib_path = dir.join("calib.json");
    common::random_calibration(&calib_path, 24, 16, 288, 777);
    let config_path = dir.join("tiny.toml");
    std::fs::write(
        &config_path,
        "[budget]\nsparsity = 0.5\nround_to = 16\n[train]\nsteps = 6\nbatch = 4\nwarmup_steps = 3\neval_samples = 4\ninit_batches = 1\n",
    )
    .unwrap();
    (
        calib_path.display().to_string(),
        config_path.display().to_string(),
    )
}

fn prune(dir: &Path, method: &str, extra: &[&str]) -> PathBuf {
    let (calib, config) = inputs(dir);
    let out = dir.join(method);
    let model = fixtures().join("tiny-llama");
    let mut args = vec![
        "--quiet",
        "prune",
        "--method",
        method,
        "--config",
        &config,
        "--calib",
        &calib,
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = maskprune(&args);
    assert_eq!(code, 0, "{method}: {stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    out
}

fn widths(dir: &Path) -> (u64, u64, u64) {
    let c = json(&dir.join("config.json"));
    let n = |k: &str| c[k].as_u64().unwrap();
    (
        n("num_attention_heads"),
        n("num_key_value_heads"),
        n("intermediate_size"),
    )
}

#[test]
fn every_method_prunes_to_maskprunes_widths() {
    let dir = scratch("widths");
    let mp = prune(&dir, "maskprune", &[]);
    let plan = dir.join("maskprune.run/plan.json").display().to_string();
    let target = widths(&mp);
    assert!(target.2 < 128, "nothing was pruned: {target:?}");
    let mut kept = Vec::new();
    for method in ["random", "magnitude", "wanda-sp", "flap", "taylor"] {
        let out = prune(&dir, method, &["--widths-from", &plan]);
        assert_eq!(widths(&out), target, "{method}");
        let prov = json(&out.join("maskprune.json"));
        assert_eq!(prov["method"], method);
        assert!(dir.join(format!("{method}.run/scores.json")).is_file());
        kept.push(prov["kept"].clone());
    }
    // Different rankings keep different units.
    assert!(
        kept.windows(2).any(|w| w[0] != w[1]),
        "all methods kept the same units"
    );
    // Saved scores give the same plan without recomputing.
    let scores = dir.join("taylor.run/scores.json").display().to_string();
    let again = prune(
        &scratch("widths-again"),
        "taylor",
        &["--widths-from", &plan, "--scores-from", &scores],
    );
    assert_eq!(json(&again.join("maskprune.json"))["kept"], kept[4]);
    // Scores of another method are refused.
    let (calib, config) = inputs(&dir);
    let (code, _, stderr) = maskprune(&[
        "--quiet",
        "prune",
        "--method",
        "flap",
        "--config",
        &config,
        "--calib",
        &calib,
        "--model",
        fixtures().join("tiny-llama").to_str().unwrap(),
        "--out",
        dir.join("bad").to_str().unwrap(),
        "--widths-from",
        &plan,
        "--scores-from",
        &scores,
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("scores of method `taylor`, not `flap`") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn committed_nonuniform_updates_keep_the_extracted_counts() {
    let dir = scratch("nonuniform-committed");
    prune(
        &dir,
        "maskprune-nonuniform",
        &["--set", "train.commit_steps=2"],
    );
    let run = dir.join("maskprune-nonuniform.run");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["committed_steps"], 2);
    assert_eq!(
        summary["loss_before_extraction"], summary["loss_after_extraction"],
        "extraction changed what the committed updates trained"
    );
    let kept = |key: &str| -> Vec<u64> {
        summary["nonuniform_kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l[key].as_u64().unwrap())
            .collect()
    };
    let (attention, channels) = (kept("attention"), kept("channels"));
    for r in &common::log_records(&run)[4..] {
        let counts = |key: &str| -> Vec<u64> { serde_json::from_value(r[key].clone()).unwrap() };
        assert_eq!(counts("kept_attention"), attention, "update {}", r["step"]);
        assert_eq!(counts("kept_channels"), channels, "update {}", r["step"]);
    }
}

#[test]
fn the_nonuniform_ablation_is_a_masked_checkpoint_within_the_budget() {
    let dir = scratch("nonuniform");
    let out = prune(&dir, "maskprune-nonuniform", &[]);
    assert_eq!(
        widths(&out),
        (4, 2, 128),
        "a masked checkpoint keeps the original shapes"
    );
    let prov = json(&out.join("maskprune.json"));
    assert_eq!(prov["masked"], true);
    assert_eq!(prov["method"], "maskprune-nonuniform");
    let p = &prov["params"];
    let (before, after) = (
        p["decoder_linear_before"].as_f64().unwrap(),
        p["decoder_linear_after"].as_f64().unwrap(),
    );
    assert!(after <= 0.5 * before + 1.0 && after > 0.4 * before, "{p}");
    let summary = json(&dir.join("maskprune-nonuniform.run/summary.json"));
    assert_eq!(summary["nonuniform_kept"].as_array().unwrap().len(), 2);
    let config = std::fs::read_to_string(dir.join("maskprune-nonuniform.run/config.toml")).unwrap();
    assert!(config.contains("uniform = false"), "{config}");
    // The run's report: snapshots at the start and half-way, the figures as SVG and PNG.
    let run = dir.join("maskprune-nonuniform.run");
    for step in ["00000", "00003"] {
        assert!(
            run.join(format!("snapshots/masks-step{step}.json"))
                .is_file(),
            "snapshot {step}"
        );
    }
    let report = run.join("report");
    for fig in [
        "loss",
        "widths",
        "params",
        "multipliers",
        "masks-0-channels",
        "masks-2-channels",
        "kept",
    ] {
        let png = std::fs::read(report.join(format!("{fig}.png")))
            .unwrap_or_else(|e| panic!("{fig}.png: {e}"));
        assert_eq!(&png[1..4], b"PNG", "{fig}.png");
        assert!(report.join(format!("{fig}.svg")).is_file(), "{fig}.svg");
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("![Loss terms per update](loss.png)"), "{md}");
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(
        html.matches("<svg").count() >= 7,
        "the HTML embeds its figures"
    );
}

#[test]
fn bench_compares_a_pruned_model_with_its_baseline() {
    let dir = scratch("bench");
    let pruned = prune(&dir, "magnitude", &[]);
    let out = dir.join("bench.json");
    let (code, stdout, stderr) = maskprune(&[
        "--quiet",
        "bench",
        "--model",
        pruned.to_str().unwrap(),
        "--baseline",
        fixtures().join("tiny-llama").to_str().unwrap(),
        "--shapes",
        "1x8,2x4",
        "--decode",
        "1x4+3",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("decode 1x4+3"), "{stdout}");
    let r: maskprune_records::bench::BenchComparison = maskprune_records::read_json(&out).unwrap();
    let ratio = |k: &str| r.ratio[k].unwrap_or_else(|| panic!("{k}: {:?}", r.ratio));
    // Sizes: the pruned model's parameters are those surgery reported.
    let pruned_params = json(&pruned.join("maskprune.json"))["params"]["total_after"].as_u64();
    assert_eq!(Some(r.model.params as u64), pruned_params);
    assert_eq!(
        ratio("params"),
        r.model.params as f64 / r.baseline.params as f64
    );
    assert!(ratio("params") < 1.0 && ratio("macs_per_token_linear") < 1.0);
    // Speeds: each shape's tokens/s is its tokens over its median time, each ratio model over
    // baseline, for every shape asked for.
    for (bench, shapes) in [
        (&r.model, [(1, 8), (2, 4)]),
        (&r.baseline, [(1, 8), (2, 4)]),
    ] {
        for timings in [&bench.forward, &bench.prefill] {
            let got: Vec<(usize, usize)> = timings.iter().map(|t| (t.batch, t.seq_len)).collect();
            assert_eq!(got, shapes);
            for t in timings {
                assert_eq!(t.seconds.len(), 1);
                assert_eq!(t.tokens_per_s, (t.batch * t.seq_len) as f64 / t.median_s);
            }
        }
        let d = bench.decode.as_ref().unwrap();
        assert_eq!((d.batch, d.prompt, d.new_tokens), (1, 4, 3));
        assert_eq!(d.tokens_per_s, 3.0 / d.decode_s);
        assert!(bench.peak_rss_bytes > 0);
    }
    assert_eq!(
        ratio("prefill_1x8_tokens_per_s"),
        r.model.prefill[0].tokens_per_s / r.baseline.prefill[0].tokens_per_s
    );
    assert_eq!(
        ratio("decode_tokens_per_s"),
        r.model.decode.as_ref().unwrap().tokens_per_s
            / r.baseline.decode.as_ref().unwrap().tokens_per_s
    );
    let (code, _, stderr) = maskprune(&[
        "bench",
        "--model",
        pruned.to_str().unwrap(),
        "--decode",
        "1x4",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("BATCHxPROMPT+NEW"), "{stderr}");
}

#[test]
fn ranking_bad_inputs_are_one_line_errors() {
    let dir = scratch("bad");
    let model = fixtures().join("tiny-llama");
    let m = model.to_str().unwrap();
    let out = dir.join("p.json");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "rank",
                "--model",
                m,
                "--method",
                "wanda-sp",
                "--sparsity",
                "0.5",
                "--round-to",
                "16",
                "--out",
                o,
            ],
            "needs calibration data",
        ),
        (
            vec![
                "rank",
                "--model",
                m,
                "--method",
                "obs",
                "--sparsity",
                "0.5",
                "--out",
                o,
            ],
            "unknown ranking method `obs`",
        ),
        (
            vec![
                "prune",
                "--method",
                "sparsegpt",
                "--config",
                "x.toml",
                "--model",
                m,
                "--out",
                o,
            ],
            "unknown method `sparsegpt`",
        ),
        (
            vec!["table", "--rows", dir.to_str().unwrap(), "--out", o],
            "no finished rows",
        ),
    ] {
        let (code, _, stderr) = maskprune(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(
            stderr.contains(needle) && stderr.trim().lines().count() == 1,
            "{args:?}: {stderr}"
        );
    }
}

/// A data directory with the evaluation data (WikiText-2, PTB, the zero-shot tasks), found as
/// the tool finds it: $MASKPRUNE_DATA, ../shared/data next to the checkout, the cache.
fn shared_data() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("MASKPRUNE_DATA").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/maskprune/data")),
    ];
    candidates.into_iter().flatten().find(|d| {
        [
            "zeroshot/piqa.jsonl",
            "wikitext2/wiki.test.joined.txt",
            "ptb/ptb.test.txt",
            "c4/c4-validation-2k.jsonl",
        ]
        .iter()
        .all(|f| d.join(f).is_file())
    })
}

#[test]
fn reproduce_table_quick_writes_the_table() {
    let Some(data) = shared_data() else {
        // scripts/test.sh sets this whenever it finds the data: then a miss here is a bug.
        assert_ne!(
            std::env::var("MASKPRUNE_REQUIRE_DATA").as_deref(),
            Ok("1"),
            "evaluation data required but not found"
        );
        eprintln!("skipped: no ../shared/data (WikiText-2, PTB, the zero-shot tasks) next to the checkout");
        return;
    };
    let dir = scratch("table");
    let configs = dir.join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(
        configs.join("tiny-50.toml"),
        "[budget]\nsparsity = 0.5\nround_to = 16\n[calibration]\nsamples = 24\nseq_len = 16\n[train]\nsteps = 4\nbatch = 4\nwarmup_steps = 2\neval_samples = 4\n",
    )
    .unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let quick = || {
        std::process::Command::new("bash")
            .arg(root.join("scripts/reproduce-table.sh"))
            .arg("--quick")
            .current_dir(&root)
            .env("MASKPRUNE_BIN", env!("CARGO_BIN_EXE_maskprune"))
            .env("MASKPRUNE_DATA", &data)
            .env("MODEL", fixtures().join("tiny-llama"))
            .env("NAME", "tiny")
            .env("CONFIGS", &configs)
            .env("WORK", dir.join("work"))
            .env("RESULTS", dir.join("results"))
            // Every path, not the defaults: the appendix and recovery of the ablation row too.
            .env("APPENDIX_METHODS", "random magnitude")
            .env(
                "TUNE_METHODS",
                "maskprune maskprune-nonuniform wanda-sp flap taylor",
            )
            .output()
            .unwrap()
    };
    let status = quick();
    assert!(
        status.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    let table = json(&dir.join("results/table.json"));
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        11,
        "dense + 5 methods at 50%, and the 5 after the recovery"
    );
    let tuned: Vec<&serde_json::Value> = rows.iter().filter(|r| r["tuned"] == true).collect();
    assert_eq!(tuned.len(), 5);
    assert!(
        tuned.iter().all(|r| r["tokens"].as_u64().unwrap() > 0),
        "{tuned:?}"
    );
    assert!(rows
        .iter()
        .all(|r| r["commit"].as_str().is_some_and(|c| !c.is_empty())));
    let appendix = json(&dir.join("results/appendix/table.json"));
    assert_eq!(
        appendix["rows"].as_array().unwrap().len(),
        3,
        "dense, random, magnitude"
    );
    assert_eq!(appendix["protocol"]["zeroshot_limit"], 2);
    for r in rows {
        for k in [
            "wikitext2",
            "ptb",
            "boolq",
            "openbookqa",
            "average",
            "params",
        ] {
            assert!(r[k].as_f64().is_some(), "{k} missing in {r}");
        }
    }
    assert_eq!(table["protocol"]["zeroshot_limit"], 3);
    let md = std::fs::read_to_string(dir.join("results/table.md")).unwrap();
    assert!(
        md.contains("| 50% | wanda-sp |")
            && md.contains("decode tokens/s")
            && md.contains("**w/ tune**"),
        "{md}"
    );
    let report =
        std::fs::read_to_string(dir.join("work-quick/s50/maskprune.run/report/report.md")).unwrap();
    assert!(
        report.contains("## Results") && report.contains("| 50% | flap |"),
        "{report}"
    );
    let csv = std::fs::read_to_string(dir.join("results/table.csv")).unwrap();
    assert_eq!(csv.lines().count(), 12);
    // A second run finds every row and recomputes nothing.
    let again = quick();
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success()
            && !text.contains("== 50%: pruning")
            && !text.contains("perplexity")
            && !text.contains("recovery"),
        "{text}"
    );
}
