//! `maskprune eval ppl`: perplexity on WikiText-2, PTB, C4, LAMBADA or any text file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use maskprune_data::{load_dataset, windows, Role};
use maskprune_eval::perplexity;
use maskprune_model::{
    load_tokenizer, output::write_file_atomically, weights_sha256, Kernels, Llama, WeightStore,
};
use serde_json::json;

use crate::backend::{dispatch, BackendJob};
use crate::{progress, RunOptions};

/// Arguments of `eval ppl`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// wikitext2, ptb, c4, lambada, a manifest .toml or a plain text file.
    #[arg(long, default_value = "wikitext2")]
    dataset: String,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Evaluate at most this many windows (default: all, or the dataset's protocol limit).
    #[arg(long)]
    max_windows: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Write the result and the protocol as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    run: RunOptions,
}

struct Job(Args);

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.seq_len >= 2, "--seq-len must be at least 2");
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    dispatch(args.run.device, Job(args))
}

impl BackendJob for Job {
    type Output = ();
    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<()> {
        let a = self.0;
        // Cheap checks first: the model's config and tokenizer, then the text, then the weights.
        let config = maskprune_model::ModelConfig::from_file(&a.model.join("config.json"))?;
        let tokenizer = load_tokenizer(&a.model, &config)?;
        let text = load_dataset(&a.dataset, a.run.data_dir.as_deref())?;
        if text.role == Role::Calibration {
            progress::info(format!(
                "note: `{}` is also calibration text: this evaluation reads its first {} rows, calibration only the rows after them (the same source, so not an out-of-distribution number)",
                text.name, text.rows
            ));
        }
        let store = WeightStore::open(&a.model)?;
        progress::info(format!("loading {} ...", a.model.display()));
        let model_sha = weights_sha256(&store);
        let model = Llama::<B>::from_store(config, &store, &device)?;
        drop(store);
        let encoding = tokenizer
            .encode(text.text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("{}: tokenization failed: {e}", text.file.display()))?;
        let ids = encoding.get_ids();
        let limit = a.max_windows.or(text.max_windows);
        let wins = windows(ids, a.seq_len, limit);
        anyhow::ensure!(
            !wins.is_empty(),
            "{}: {} tokens is less than one window of {}",
            text.file.display(),
            ids.len(),
            a.seq_len
        );
        progress::info(format!(
            "{}: {} tokens, {} windows of {} ({})",
            text.name,
            ids.len(),
            wins.len(),
            a.seq_len,
            text.description
        ));
        let pb = progress::bar("ppl", (wins.len() * a.seq_len) as u64, "tokens");
        let result = perplexity(&model, &wins, a.batch, None, &mut |done| {
            pb.set_position(done as u64)
        })?;
        pb.finish_and_clear();
        println!(
            "{} ppl {:.4} (seq_len {}, {} windows, {} predicted tokens, {:.0} tokens/s)",
            text.name,
            result.ppl,
            a.seq_len,
            result.windows,
            result.predicted_tokens,
            result.tokens_per_s
        );
        if let Some(path) = &a.json {
            let tokenizer_file = a.model.join("tokenizer.json");
            let report = json!({
                "task": "perplexity",
                "dataset": {
                    "name": text.name, "description": text.description, "file": text.file,
                    "sha256": text.sha256, "rows": text.rows, "role": format!("{:?}", text.role).to_lowercase(),
                },
                "protocol": {
                    "seq_len": a.seq_len, "windows": result.windows, "max_windows": limit,
                    "text_tokens": ids.len(), "tokens": result.tokens, "predicted_tokens": result.predicted_tokens,
                    "add_special_tokens": true, "windows_overlap": false, "tail": "dropped",
                },
                "tokenizer": { "file": tokenizer_file, "sha256": file_sha256(&tokenizer_file)? },
                "model": {
                    "dir": a.model, "weights_sha256": model_sha,
                    "model_type": model.config.family.model_type(), "params": model.config.total_params(),
                },
                "backend": { "device": a.run.device.to_string(), "dtype": "f32", "batch": a.batch },
                "result": result,
            });
            write_file_atomically(path, &serde_json::to_vec_pretty(&report)?)?;
        }
        Ok(())
    }
}

/// Hex SHA-256 of a file.
pub fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Ok(maskprune_data::text::sha256_hex(&bytes))
}
