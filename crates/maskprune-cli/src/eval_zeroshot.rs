//! `maskprune eval zeroshot`: the seven zero-shot tasks of LLM-Pruner's tables, scored as
//! lm-eval-harness 0.4 scores them; resumable task by task.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use maskprune_data::data_dir_candidates;
use maskprune_eval::zeroshot::{
    encode_pair, read_documents, score_documents, score_requests, task_metrics, Request,
};
use maskprune_model::{
    load_tokenizer, output::write_file_atomically, weights_sha256, Kernels, Llama, ModelConfig,
    WeightStore,
};
use serde_json::{json, Value};

use crate::backend::{dispatch, BackendJob};
use crate::{progress, RunOptions};

/// The tasks, and the metric LLM-Pruner's tables average for each.
pub const TASKS: [(&str, &str); 7] = [
    ("boolq", "acc"),
    ("piqa", "acc"),
    ("hellaswag", "acc_norm"),
    ("winogrande", "acc"),
    ("arc_easy", "acc_norm"),
    ("arc_challenge", "acc_norm"),
    ("openbookqa", "acc_norm"),
];

/// Arguments of `eval zeroshot`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated tasks (files `zeroshot/<task>.jsonl` in the data directory).
    #[arg(
        long,
        default_value = "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
    )]
    tasks: String,
    /// Score only the first N documents of each task (the same documents for every model).
    #[arg(long)]
    limit: Option<usize>,
    /// Requests per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Longest input; longer requests keep their last tokens (lm-eval's truncation).
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Prepend the BOS token: auto follows `add_bos_token` in tokenizer_config.json.
    #[arg(long, default_value = "auto", value_parser = ["auto", "yes", "no"])]
    bos: String,
    /// Results JSON; tasks already in it (same model, limit and BOS) are not scored again.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write every choice's log-likelihood here (JSONL, one line per document).
    #[arg(long)]
    dump_scores: Option<PathBuf>,
    /// Run every (context, continuation) pair whole instead of computing a context shared by
    /// a document's choices once (same scores to float rounding; for checking).
    #[arg(long)]
    no_shared_context: bool,
    #[command(flatten)]
    run: RunOptions,
}

struct Job(Args);

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch >= 1 && args.max_len >= 2,
        "--batch must be positive and --max-len at least 2"
    );
    dispatch(args.run.device, Job(args))
}

fn tokenizer_wants_bos(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("add_bos_token").and_then(Value::as_bool))
        .unwrap_or(false)
}

impl BackendJob for Job {
    type Output = ();
    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.0;
        let config = ModelConfig::from_file(&a.model.join("config.json"))?;
        let tokenizer = load_tokenizer(&a.model, &config)?;
        let tasks: Vec<&str> = a
            .tasks
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        for t in &tasks {
            anyhow::ensure!(
                TASKS.iter().any(|(n, _)| n == t),
                "unknown task `{t}` (known: {})",
                TASKS.map(|t| t.0).join(", ")
            );
        }
        let candidates = data_dir_candidates(a.run.data_dir.as_deref());
        let task_file = |t: &str| -> anyhow::Result<PathBuf> {
            let rel = format!("zeroshot/{t}.jsonl");
            candidates
                .iter()
                .map(|d| d.join(&rel))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "task `{t}`: file not found; looked for {}",
                        candidates
                            .iter()
                            .map(|d| d.join(&rel).display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
        };
        let files: Vec<PathBuf> = tasks
            .iter()
            .map(|t| task_file(t))
            .collect::<anyhow::Result<_>>()?;
        let bos = match a.bos.as_str() {
            "yes" => true,
            "no" => false,
            _ => tokenizer_wants_bos(&a.model),
        };
        let bos_id = if bos {
            Some(config.bos_token_id.ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: --bos needs `bos_token_id` in config.json",
                    a.model.display()
                )
            })?)
        } else {
            None
        };
        let store = WeightStore::open(&a.model)?;
        let model_sha = weights_sha256(&store);
        let protocol = json!({
            "scorer": "lm-eval-harness 0.4 loglikelihood (acc, acc_norm by characters of the choice)",
            "limit": a.limit, "bos": bos, "max_len": a.max_len,
        });
        let mut report: Value = match &a.json {
            Some(p) if p.is_file() => {
                let old: Value = serde_json::from_str(&std::fs::read_to_string(p)?)
                    .map_err(|e| anyhow::anyhow!("{}: not a results file: {e}", p.display()))?;
                if old["model"]["weights_sha256"] == json!(model_sha) && old["protocol"] == protocol
                {
                    old
                } else {
                    anyhow::bail!(
                        "{}: holds results of another model or protocol; pick another --json",
                        p.display()
                    );
                }
            }
            _ => {
                json!({"model": {"dir": a.model, "weights_sha256": model_sha, "params": config.total_params()},
                        "protocol": protocol, "tasks": {}})
            }
        };
        let model = Llama::<B>::from_store(config, &store, &device)?;
        drop(store);
        let encode = |s: &str| -> Result<Vec<u32>, String> {
            tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string())
        };
        let mut dump = Vec::new();
        for (task, file) in tasks.iter().zip(&files) {
            if report["tasks"].get(*task).is_some() {
                progress::info(format!("{task}: already in the results, skipped"));
                continue;
            }
            let docs = read_documents(file, a.limit).map_err(anyhow::Error::msg)?;
            let mut requests = Vec::new();
            for (di, d) in docs.iter().enumerate() {
                for (ci, (ctx, cont)) in d.contexts.iter().zip(&d.continuations).enumerate() {
                    let (mut c, k) = encode_pair(ctx, cont, &encode)
                        .map_err(|e| anyhow::anyhow!("{}: document {di}: {e}", file.display()))?;
                    if let Some(b) = bos_id {
                        c.insert(0, b);
                    }
                    let continuation_len = k.len();
                    anyhow::ensure!(
                        continuation_len > 0,
                        "{}: document {di} choice {ci}: empty continuation",
                        file.display()
                    );
                    c.extend(k);
                    requests.push(Request {
                        doc: di,
                        choice: ci,
                        tokens: c,
                        continuation_len,
                    });
                }
            }
            let started = std::time::Instant::now();
            let pb = progress::bar(task, requests.len() as u64, "requests");
            let score = if a.no_shared_context {
                score_requests
            } else {
                score_documents
            };
            let scores = score(&model, &requests, a.batch, a.max_len, None, &mut |d| {
                pb.set_position(d as u64)
            })?;
            pb.finish_and_clear();
            let mut per_doc: Vec<Vec<f64>> =
                docs.iter().map(|d| vec![0.0; d.contexts.len()]).collect();
            for (r, s) in requests.iter().zip(&scores) {
                per_doc[r.doc][r.choice] = *s;
            }
            let result = task_metrics(&docs, &per_doc);
            println!(
                "{task:<14} acc {:.4} ± {:.4}  acc_norm {:.4} ± {:.4}  (n = {})",
                result.acc, result.acc_stderr, result.acc_norm, result.acc_norm_stderr, result.n
            );
            report["tasks"][*task] = serde_json::to_value(&result)?;
            report["tasks"][*task]["seconds"] = json!(started.elapsed().as_secs_f64());
            if a.dump_scores.is_some() {
                dump.extend(
                    per_doc
                        .iter()
                        .enumerate()
                        .map(|(i, s)| json!({"task": task, "doc": i, "scores": s}).to_string()),
                );
            }
            if let Some(p) = &a.json {
                write_file_atomically(p, &serde_json::to_vec_pretty(&report)?)?;
            }
        }
        let mut used = BTreeMap::new();
        let mut values = Vec::new();
        for (task, metric) in TASKS {
            if let Some(v) = report["tasks"].get(task).and_then(|t| t[metric].as_f64()) {
                used.insert(task, metric);
                values.push(v);
            }
        }
        if !values.is_empty() {
            let avg = values.iter().sum::<f64>() / values.len() as f64;
            println!("average {avg:.4} over {} tasks (acc for boolq, piqa, winogrande; acc_norm for the others)", values.len());
            report["average"] = json!({"value": avg, "metrics": used});
        }
        if let Some(p) = &a.json {
            write_file_atomically(p, &serde_json::to_vec_pretty(&report)?)?;
        }
        if let Some(p) = &a.dump_scores {
            write_file_atomically(p, (dump.join("\n") + "\n").as_bytes())?;
        }
        Ok(())
    }
}
