//! The `maskprune` binary: user mistakes end in one line on stderr and a non-zero exit.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, fixtures, maskprune};

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli", name)
}

fn assert_one_line_error(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let dir = scratch("bad");
    let truncated = dir.join("t.gguf");
    let gguf = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
    std::fs::write(&truncated, &gguf[..1000]).unwrap();
    let not_gguf = dir.join("x.gguf");
    std::fs::write(&not_gguf, b"hello world, not a model").unwrap();
    let out = dir.join("out");
    let model = fixtures().join("tiny-llama");
    let s = |p: &Path| p.display().to_string();
    let (trunc, junk, none) = (s(&truncated), s(&not_gguf), s(&dir.join("none.gguf")));
    let (tiny_gguf, tiny, empty, outp, plan) = (
        s(&fixtures().join("tiny-llama.gguf")),
        s(&model),
        s(&dir),
        s(&out),
        s(&dir.join("p.json")),
    );
    let calib_out = s(&dir.join("c.json"));
    #[rustfmt::skip]
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["import-gguf", &trunc, "--out", &outp], "truncated"),
        (vec!["import-gguf", &junk, "--out", &outp], "bad magic"),
        (vec!["import-gguf", &none, "--out", &outp], "cannot open"),
        (vec!["import-gguf", &tiny_gguf, "--out", &tiny], "already exists"),
        (vec!["eval", "ppl", "--model", &empty], "config.json"),
        (vec!["eval", "ppl", "--model", &tiny, "--dataset", "nope"], "unknown dataset"),
        (vec!["eval", "ppl", "--model", &tiny, "--dataset", "wikitext2", "--data-dir", &empty], "file not found"),
        (vec!["eval", "ppl", "--model", &tiny, "--seq-len", "1"], "--seq-len"),
        (vec!["eval", "ppl", "--model", &tiny, "--device", "cuda"], "CUDA"),
        (vec!["eval", "zeroshot", "--model", &tiny, "--tasks", "mmlu"], "unknown task `mmlu`"),
        (vec!["eval", "zeroshot", "--model", &tiny, "--tasks", "piqa", "--data-dir", &empty], "task `piqa`: file not found"),
        (vec!["calib", "--model", &tiny, "--dataset", "wikitext2", "--out", &calib_out], "evaluation text"),
        (vec!["rank", "--model", &tiny, "--sparsity", "0.999", "--out", &plan], "leaves no room"),
        (vec!["rank", "--model", &tiny, "--sparsity", "0.5", "--granularity", "heads", "--out", &plan], "unknown granularity"),
        (vec!["surgery", "--model", &tiny, "--plan", &junk, "--out", &outp], "invalid prune plan"),
        (vec!["inspect", &empty], "cannot read config"),
        (vec!["bench", "--model", &tiny, "--shapes", "4by8"], "BATCHxLEN"),
        (vec!["datasets", "wikitext2", "--data-dir", &empty], "not found"),
    ];
    for (args, needle) in cases {
        let (code, _, stderr) = maskprune(&args);
        // 1 for bad inputs, 2 for command-line usage mistakes.
        assert!(code == 1 || code == 2, "{args:?}: exit {code}: {stderr}");
        assert_one_line_error(&stderr, needle);
    }
    assert!(!out.exists(), "a failed import left an output directory");
}

#[test]
fn import_then_perplexity_on_the_tiny_fixture() {
    let dir = scratch("ok");
    let out = dir.join("model");
    let (code, stdout, stderr) = maskprune(&[
        "--quiet",
        "import-gguf",
        fixtures().join("tiny-llama.gguf").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("imported") && stdout.contains("F16"),
        "{stdout}"
    );
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let json = dir.join("ppl.json");
    let (code, stdout, stderr) = maskprune(&[
        "--quiet",
        "eval",
        "ppl",
        "--model",
        out.to_str().unwrap(),
        "--dataset",
        text.to_str().unwrap(),
        "--seq-len",
        "32",
        "--batch",
        "3",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ppl"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let windows = report["result"]["windows"].as_u64().unwrap();
    assert!(windows >= 5);
    assert_eq!(
        report["result"]["predicted_tokens"].as_u64().unwrap(),
        windows * 31
    );
    assert_eq!(report["protocol"]["seq_len"], 32);
    assert!(report["result"]["ppl"].as_f64().unwrap().is_finite());
    assert_eq!(
        report["model"]["weights_sha256"].as_str().unwrap().len(),
        64
    );
}

#[test]
fn rank_then_surgery_writes_a_smaller_checkpoint() {
    let dir = scratch("prune");
    let model = fixtures().join("tiny-llama");
    let plan = dir.join("plan.json");
    let (code, stdout, stderr) = maskprune(&[
        "rank",
        "--model",
        model.to_str().unwrap(),
        "--sparsity",
        "0.5",
        "--round-to",
        "16",
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("magnitude plan"), "{stdout}");
    let out = dir.join("pruned");
    let (code, stdout, stderr) = maskprune(&[
        "--quiet",
        "surgery",
        "--model",
        model.to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("decoder-layer linear weights removed"),
        "{stdout}"
    );
    let (code, stdout, _) = maskprune(&["inspect", out.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("maskprune.json") && stdout.contains("\"method\": \"magnitude\""),
        "{stdout}"
    );
    // A plan for another model (the wrong number of layers) is refused.
    let mut p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let first = p["layers"][0].clone();
    p["layers"].as_array_mut().unwrap().push(first);
    std::fs::write(&plan, p.to_string()).unwrap();
    let (code, _, stderr) = maskprune(&[
        "--quiet",
        "surgery",
        "--model",
        model.to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        dir.join("x").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert_one_line_error(&stderr, "plan has 3 layers but the model has 2");
}

#[test]
fn calibration_windows_come_from_calibration_documents_only() {
    let dir = scratch("calib");
    let model = fixtures().join("tiny-llama");
    let docs: Vec<String> = (0..10)
        .map(|i| format!("{{\"text\": \"document {i}: the quick brown fox jumps over the lazy dog again and again\"}}"))
        .collect();
    std::fs::write(dir.join("docs.jsonl"), docs.join("\n")).unwrap();
    let manifest = dir.join("cal.toml");
    std::fs::write(
        &manifest,
        "name='cal'\nrole='calibration'\ndescription='d'\nsource='s'\nfile='docs.jsonl'\nformat='jsonl'\nfields=['text']\ntake=4\njoin=' '\n",
    )
    .unwrap();
    let out = dir.join("calib.json");
    let args = [
        "--quiet",
        "calib",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        manifest.to_str().unwrap(),
        "--data-dir",
        dir.to_str().unwrap(),
        "--samples",
        "6",
        "--seq-len",
        "8",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = maskprune(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("documents 4..10"), "{stdout}");
    let set: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(set["samples"].as_array().unwrap().len(), 6);
    assert!(set["samples"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s.as_array().unwrap().len() == 8));
    let first = std::fs::read(&out).unwrap();
    maskprune(&args);
    assert_eq!(
        first,
        std::fs::read(&out).unwrap(),
        "same seed, different samples"
    );
}

#[test]
fn zeroshot_scores_and_resumes() {
    let dir = scratch("zeroshot");
    std::fs::create_dir_all(dir.join("zeroshot")).unwrap();
    let doc = |gold: usize| {
        format!(
            "{{\"contexts\": [\"The quick brown fox \", \"The quick brown fox \"], \"continuations\": [\" jumps over the lazy dog\", \" masks\"], \"gold\": {gold}}}"
        )
    };
    std::fs::write(
        dir.join("zeroshot/piqa.jsonl"),
        [doc(0), doc(1), doc(0)].join("\n"),
    )
    .unwrap();
    std::fs::write(dir.join("zeroshot/winogrande.jsonl"), doc(1)).unwrap();
    let model = fixtures().join("tiny-llama");
    let json = dir.join("zs.json");
    let run = |tasks: &str| {
        maskprune(&[
            "--quiet",
            "eval",
            "zeroshot",
            "--model",
            model.to_str().unwrap(),
            "--tasks",
            tasks,
            "--data-dir",
            dir.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--batch",
            "2",
        ])
    };
    let (code, stdout, stderr) = run("piqa");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("piqa") && stdout.contains("(n = 3)"),
        "{stdout}"
    );
    let (code, stdout, _) = run("piqa,winogrande");
    assert_eq!(code, 0);
    assert!(!stdout.contains("piqa "), "piqa was scored again: {stdout}");
    assert!(
        stdout.contains("winogrande") && stdout.contains("average"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let acc = |task: &str| report["tasks"][task]["acc"].as_f64().unwrap();
    // `acc` ranks the choices by summed log-likelihood. The fixture's weights are random, so
    // each token costs about ln(vocab) nats and the one-word choice " masks" (gold 1) wins
    // every document by many nats: winogrande (gold 1) scores 1, piqa (golds 0, 1, 0) 1/3.
    assert_eq!(acc("winogrande"), 1.0);
    assert!((acc("piqa") - 1.0 / 3.0).abs() < 1e-12, "{}", acc("piqa"));
    let average = report["average"]["value"].as_f64().unwrap();
    assert!(
        (average - (1.0 + 1.0 / 3.0) / 2.0).abs() < 1e-12,
        "average {average}"
    );
}

#[test]
fn random_ranking_is_seeded_and_takes_the_widths_of_another_plan() {
    let dir = scratch("random");
    let model = fixtures().join("tiny-llama");
    let s = |p: &Path| p.display().to_string();
    let magnitude = dir.join("magnitude.json");
    let (code, _, stderr) = maskprune(&[
        "rank",
        "--model",
        &s(&model),
        "--sparsity",
        "0.5",
        "--round-to",
        "16",
        "--granularity",
        "query_head",
        "--out",
        &s(&magnitude),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let plan = |seed: &str, name: &str| -> serde_json::Value {
        let out = dir.join(name);
        let (code, _, stderr) = maskprune(&[
            "rank",
            "--model",
            &s(&model),
            "--method",
            "random",
            "--seed",
            seed,
            "--widths-from",
            &s(&magnitude),
            "--out",
            &s(&out),
        ]);
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
    };
    let (a, b, c) = (
        plan("1", "a.json"),
        plan("1", "b.json"),
        plan("2", "c.json"),
    );
    assert_eq!(a, b, "the same seed gives the same plan");
    assert_ne!(a["layers"], c["layers"], "another seed gives another plan");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&magnitude).unwrap()).unwrap();
    assert_eq!(a["method"], "random");
    assert_eq!(a["granularity"], m["granularity"]);
    for (x, y) in a["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(m["layers"].as_array().unwrap())
    {
        for key in ["query_heads", "kv_heads", "channels"] {
            assert_eq!(
                x[key].as_array().unwrap().len(),
                y[key].as_array().unwrap().len()
            );
        }
    }
}

#[test]
fn a_write_that_fails_halfway_leaves_no_output() {
    // A full disk, simulated with a file-size limit of 64 KiB: the surgery's safetensors file
    // (about 100 KiB) cannot be written.
    let dir = scratch("full");
    let model = fixtures().join("tiny-llama");
    let plan = dir.join("plan.json");
    let (code, _, stderr) = maskprune(&[
        "rank",
        "--model",
        model.to_str().unwrap(),
        "--sparsity",
        "0.25",
        "--round-to",
        "16",
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let out = dir.join("pruned");
    let run = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -f 64; exec '{}' --quiet surgery --model '{}' --plan '{}' --out '{}'",
            env!("CARGO_BIN_EXE_maskprune"),
            model.display(),
            plan.display(),
            out.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert_one_line_error(&stderr, "File too large");
    assert!(!out.exists(), "a half-written output directory was left");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "plan.json")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn a_closed_stdout_ends_every_verb_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // Each verb prints more than a pipe's first read takes; its reader is gone at once.
    let model = fixtures().join("tiny-llama");
    let model = model.to_str().unwrap();
    for args in [vec!["inspect", model], vec!["datasets"], vec!["--help"]] {
        let mut child = bin()
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // `| head -c 0`
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        // Ended by SIGPIPE, as `ls | head` ends `ls`, or done before it noticed.
        assert!(
            out.status.success() || out.status.signal() == Some(libc_sigpipe()),
            "{args:?}: {:?}",
            out.status
        );
    }
}

/// SIGPIPE's number on Linux and the BSDs.
fn libc_sigpipe() -> i32 {
    13
}

#[test]
fn generate_and_chat_on_the_tiny_fixture() {
    let dir = scratch("generate");
    // A GGUF file is imported once into the cache, then generates.
    let gguf = fixtures().join("tiny-llama.gguf");
    let out = bin()
        .env("MASKPRUNE_CACHE", &dir)
        .args([
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-new-tokens",
            "5",
        ])
        .args(["--json", dir.join("gen.json").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("gen.json")).unwrap()).unwrap();
    assert_eq!(report["generated"]["tokens"].as_array().unwrap().len(), 5);
    assert!(dir.join("gguf-imports").read_dir().unwrap().count() == 1);
    // Without a chat template, chat says so in one line.
    let model = fixtures().join("tiny-llama");
    let (code, _, stderr) = maskprune(&["chat", "--model", model.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_one_line_error(&stderr, "chat_template");
    // With one, a conversation over stdin: two turns, then an empty line ends it.
    let with_template = dir.join("templated");
    std::fs::create_dir_all(&with_template).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, with_template.join(f.file_name().unwrap())).unwrap();
    }
    let config_path = with_template.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["chat_template"] = serde_json::json!(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut child = bin()
        .args([
            "chat",
            "--model",
            with_template.to_str().unwrap(),
            "--max-new-tokens",
            "3",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello\nagain\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("> ").count(), 3, "{stdout}");
}
