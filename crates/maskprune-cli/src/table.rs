//! `maskprune table`: collects finished result rows (one directory per method and sparsity,
//! written by `scripts/reproduce-table.sh`) into `table.json`, `table.csv` and `table.md`,
//! laid out like LLM-Pruner's Table 1.
//!
//! A row directory holds `row.json` (`{"method", "sparsity", "model", "prune_seconds",
//! "tuned", "tokens", "commit"}`), the JSON of `eval ppl` for `wikitext2.json` and `ptb.json`,
//! of `eval zeroshot` for `zeroshot.json`, and optionally `bench.json` (`bench --baseline`).
//! Rows missing a file are listed as incomplete and left out. Rows with `tuned: true` (the
//! same recovery fine-tuning for every method) form a second block, "w/ tune", as in
//! LLM-Pruner's Table 1.

use std::path::{Path, PathBuf};

use anyhow::Context;
use maskprune_model::output::write_file_atomically;
use serde_json::{json, Value};

use crate::eval_zeroshot::TASKS;

/// Arguments of `table`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory of row directories.
    #[arg(long)]
    rows: PathBuf,
    /// Where table.json, table.csv and table.md go.
    #[arg(long)]
    out: PathBuf,
    /// Title of table.md.
    #[arg(long, default_value = "Results")]
    title: String,
}

/// Method order in the table.
const METHODS: [&str; 8] = [
    "dense",
    "maskprune",
    "maskprune-nonuniform",
    "random",
    "magnitude",
    "wanda-sp",
    "flap",
    "taylor",
];

fn read(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))
}

/// One finished row and the protocol it was measured with.
struct Row {
    value: Value,
    protocol: Value,
}

fn load_row(dir: &Path) -> anyhow::Result<Option<Row>> {
    let files = ["row.json", "wikitext2.json", "ptb.json", "zeroshot.json"];
    if files.iter().any(|f| !dir.join(f).is_file()) {
        return Ok(None);
    }
    let row = read(&dir.join("row.json"))?;
    let (wt2, ptb, zs) = (
        read(&dir.join("wikitext2.json"))?,
        read(&dir.join("ptb.json"))?,
        read(&dir.join("zeroshot.json"))?,
    );
    let method = row["method"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{}: no `method`", dir.join("row.json").display()))?;
    let model_dir = PathBuf::from(row["model"].as_str().unwrap_or_default());
    // A masked (non-uniform) checkpoint counts only its kept units (maskprune.json).
    let params = row["params"]
        .as_u64()
        .or_else(|| {
            read(&model_dir.join("maskprune.json"))
                .ok()
                .and_then(|p| p["params"]["total_after"].as_u64())
        })
        .or_else(|| wt2["model"]["params"].as_u64());
    let mut v = json!({
        "method": method,
        "sparsity": row["sparsity"],
        "tuned": row["tuned"].as_bool().unwrap_or(false),
        "params": params,
        "tokens": row["tokens"],
        "commit": row["commit"],
        "wikitext2": wt2["result"]["ppl"],
        "ptb": ptb["result"]["ppl"],
    });
    let mut complete = true;
    for (task, metric) in TASKS {
        match zs["tasks"][task][metric].as_f64() {
            Some(x) => v[task] = json!(x),
            None => complete = false,
        }
    }
    if !complete {
        return Ok(None);
    }
    v["average"] = zs["average"]["value"].clone();
    // The average's standard error from the tasks' (independent documents).
    let variance: f64 = TASKS
        .iter()
        .filter_map(|(t, m)| zs["tasks"][t][format!("{m}_stderr")].as_f64())
        .map(|se| se * se)
        .sum();
    v["average_stderr"] = json!(variance.sqrt() / TASKS.len() as f64);
    let zs_seconds: f64 = TASKS
        .iter()
        .filter_map(|(t, _)| zs["tasks"][t]["seconds"].as_f64())
        .sum();
    v["wall_s"] = json!({
        "prune": row["prune_seconds"],
        "wikitext2": wt2["result"]["seconds"],
        "ptb": ptb["result"]["seconds"],
        "zeroshot": zs_seconds,
    });
    if let Ok(bench) = read(&dir.join("bench.json")) {
        v["bench_ratio"] = bench["ratio"].clone();
    }
    let protocol = json!({
        "ppl_seq_len": wt2["protocol"]["seq_len"],
        "wikitext2_windows": wt2["protocol"]["windows"],
        "ptb_windows": ptb["protocol"]["windows"],
        "zeroshot_limit": zs["protocol"]["limit"],
        "bos": zs["protocol"]["bos"],
    });
    Ok(Some(Row { value: v, protocol }))
}

fn fmt_num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.digits$}"))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut incomplete = Vec::new();
    let entries = std::fs::read_dir(&a.rows)
        .with_context(|| format!("{}: cannot read the rows directory", a.rows.display()))?;
    for e in entries {
        let dir = e?.path();
        if !dir.is_dir() {
            continue;
        }
        match load_row(&dir)? {
            Some(r) => rows.push(r),
            None => incomplete.push(
                dir.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string(),
            ),
        }
    }
    anyhow::ensure!(!rows.is_empty(), "{}: no finished rows", a.rows.display());
    let protocol = rows[0].protocol.clone();
    if let Some(other) = rows.iter().find(|r| r.protocol != protocol) {
        anyhow::bail!(
            "{}: rows were measured with different protocols ({} vs {}); rerun them alike",
            a.rows.display(),
            protocol,
            other.protocol
        );
    }
    let key = |v: &Value| {
        let m = v["method"].as_str().unwrap_or_default();
        let order = METHODS
            .iter()
            .position(|x| *x == m)
            .unwrap_or(METHODS.len());
        (
            v["tuned"].as_bool().unwrap_or(false),
            (v["sparsity"].as_f64().unwrap_or(0.0) * 1000.0).round() as i64,
            order,
            m.to_string(),
        )
    };
    let mut values: Vec<Value> = rows.into_iter().map(|r| r.value).collect();
    values.sort_by_key(key);

    write_file_atomically(
        &a.out.join("table.json"),
        &serde_json::to_vec_pretty(&json!({
            "protocol": protocol, "rows": values, "incomplete": incomplete,
        }))?,
    )?;

    let mut csv = String::from("method,sparsity,tuned,params,tokens,wikitext2,ptb");
    for (t, _) in TASKS {
        csv += &format!(",{t}");
    }
    csv += ",average,average_stderr\n";
    for v in &values {
        csv += &format!(
            "{},{},{},{},{},{},{}",
            v["method"].as_str().unwrap_or_default(),
            v["sparsity"],
            v["tuned"],
            v["params"],
            v["tokens"],
            v["wikitext2"],
            v["ptb"]
        );
        for (t, _) in TASKS {
            csv += &format!(",{}", v[t]);
        }
        csv += &format!(",{},{}\n", v["average"], v["average_stderr"]);
    }
    write_file_atomically(&a.out.join("table.csv"), csv.as_bytes())?;

    let p = &protocol;
    let mut commits: Vec<&str> = values.iter().filter_map(|v| v["commit"].as_str()).collect();
    commits.sort();
    commits.dedup();
    let mut md = format!(
        "# {}\n\nPerplexity at seq-len {} (WikiText-2: first {} windows, PTB: first {} windows); zero-shot: first {} documents of each task (the whole task where it is smaller; the same documents for every row), scored as lm-eval-harness 0.4; acc for BoolQ, PIQA, WinoGrande and acc_norm for HellaSwag, ARC-e, ARC-c, OpenBookQA, as LLM-Pruner's Table 1; the average with its standard error. Sparsity: fraction of the decoder layers' linear parameters removed. Tokens: training tokens the row's model saw (mask training and recovery; none for one-shot rankings). Built by commit {}.\n\n",
        a.title, p["ppl_seq_len"], p["wikitext2_windows"], p["ptb_windows"],
        p["zeroshot_limit"].as_u64().map_or("all".into(), |n| n.to_string()),
        if commits.is_empty() { "(not recorded)".to_string() } else { commits.join(", ") },
    );
    let header = "| sparsity | method | params | tokens | WikiText-2 ↓ | PTB ↓ | BoolQ | PIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | average ↑ |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    let mut block = None;
    for v in &values {
        let tuned = v["tuned"].as_bool().unwrap_or(false);
        if block != Some(tuned) {
            md += if tuned {
                "\n**w/ tune** (the same recovery fine-tuning for every row)\n\n"
            } else {
                "**w/o tune**\n\n"
            };
            md += header;
            block = Some(tuned);
        }
        let params = v["params"]
            .as_f64()
            .map_or("–".into(), |n| format!("{:.1}M", n / 1e6));
        let tokens = v["tokens"]
            .as_f64()
            .map_or("–".into(), |n| format!("{:.2}M", n / 1e6));
        md += &format!(
            "| {:.0}% | {} | {} | {} | {} | {} |",
            100.0 * v["sparsity"].as_f64().unwrap_or(0.0),
            v["method"].as_str().unwrap_or_default(),
            params,
            tokens,
            fmt_num(&v["wikitext2"], 2),
            fmt_num(&v["ptb"], 2)
        );
        for (t, _) in TASKS {
            md += &format!(
                " {} |",
                fmt_num(&v[t].clone().as_f64().map(|x| 100.0 * x).into(), 1)
            );
        }
        md += &format!(
            " {} ± {} |\n",
            fmt_num(&v["average"].as_f64().map(|x| 100.0 * x).into(), 2),
            fmt_num(&v["average_stderr"].as_f64().map(|x| 100.0 * x).into(), 2)
        );
    }
    let benched: Vec<&Value> = values
        .iter()
        .filter(|v| v["bench_ratio"].is_object())
        .collect();
    if !benched.is_empty() {
        md += "\nSpeed and size, pruned / dense (`maskprune bench --baseline`, each model in its own process; prefill: the KV cache filled and the last position's logits):\n\n| sparsity | method | params | MACs/token (linear) | peak RSS | prefill tokens/s | decode tokens/s (KV cache) |\n|---|---|---|---|---|---|---|\n";
        for v in benched {
            let r = &v["bench_ratio"];
            let prefill: Vec<String> = r
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.starts_with("prefill_"))
                .map(|(k, x)| {
                    format!(
                        "{} {}",
                        k.trim_start_matches("prefill_")
                            .trim_end_matches("_tokens_per_s"),
                        fmt_num(x, 2)
                    )
                })
                .collect();
            md += &format!(
                "| {:.0}% | {} | {} | {} | {} | {} | {} |\n",
                100.0 * v["sparsity"].as_f64().unwrap_or(0.0),
                v["method"].as_str().unwrap_or_default(),
                fmt_num(&r["params"], 3),
                fmt_num(&r["macs_per_token_linear"], 3),
                fmt_num(&r["peak_rss_bytes"], 3),
                prefill.join(", "),
                fmt_num(&r["decode_tokens_per_s"], 2)
            );
        }
    }
    md += "\nWall time (s) of each part (prune: the method's own time; w/ tune rows: the recovery's):\n\n| sparsity | method | block | prune | WikiText-2 | PTB | zero-shot |\n|---|---|---|---|---|---|---|\n";
    for v in &values {
        let w = &v["wall_s"];
        md += &format!(
            "| {:.0}% | {} | {} | {} | {} | {} | {} |\n",
            100.0 * v["sparsity"].as_f64().unwrap_or(0.0),
            v["method"].as_str().unwrap_or_default(),
            if v["tuned"].as_bool().unwrap_or(false) {
                "w/ tune"
            } else {
                "w/o tune"
            },
            fmt_num(&w["prune"], 0),
            fmt_num(&w["wikitext2"], 0),
            fmt_num(&w["ptb"], 0),
            fmt_num(&w["zeroshot"], 0)
        );
    }
    if !incomplete.is_empty() {
        md += &format!("\nNot finished yet: {}.\n", incomplete.join(", "));
    }
    write_file_atomically(&a.out.join("table.md"), md.as_bytes())?;
    println!(
        "{} rows ({} not finished) -> {}",
        values.len(),
        incomplete.len(),
        a.out.join("table.md").display()
    );
    Ok(())
}
