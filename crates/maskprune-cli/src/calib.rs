//! `maskprune calib`: a seeded calibration set of token windows from calibration text.

use std::path::{Path, PathBuf};

use anyhow::Context;

use maskprune_data::{load_rows, resolve_dataset, sample_windows, CalibrationSet, DataError, Role};
use maskprune_model::{load_tokenizer, output::write_file_atomically, ModelConfig};

use crate::eval_ppl::file_sha256;
use crate::progress;

/// Arguments of `calib`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (its tokenizer encodes the samples).
    #[arg(long)]
    model: PathBuf,
    /// Calibration dataset: a manifest of role `calibration` (default: the C4 sample, whose
    /// first 1,100 documents are left to C4 perplexity).
    #[arg(long, default_value = "c4")]
    dataset: String,
    /// Number of windows.
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data directory (default: $MASKPRUNE_DATA, ../shared/data, ~/.cache/maskprune/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Output file (JSON).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let set = build(
        &a.model,
        &a.dataset,
        a.samples,
        a.seq_len,
        a.seed,
        a.data_dir.as_deref(),
    )?;
    write_file_atomically(&a.out, &serde_json::to_vec(&set)?)?;
    println!(
        "calibration set: {} windows of {} tokens from `{}` documents {}..{} (seed {}) -> {}",
        a.samples,
        a.seq_len,
        set.dataset,
        set.documents.0,
        set.documents.1,
        a.seed,
        a.out.display()
    );
    Ok(())
}

/// Draws a calibration set: `samples` windows of `seq_len` tokens from a dataset of role
/// `calibration`, skipping the rows its evaluation protocol uses.
pub fn build(
    model: &Path,
    dataset: &str,
    samples: usize,
    seq_len: usize,
    seed: u64,
    data_dir: Option<&Path>,
) -> anyhow::Result<CalibrationSet> {
    anyhow::ensure!(
        samples > 0 && seq_len > 1,
        "calibration needs a positive number of samples and a seq-len of at least 2"
    );
    let config = ModelConfig::from_file(&model.join("config.json"))?;
    let tokenizer = load_tokenizer(model, &config)?;
    let manifest = resolve_dataset(dataset)?.ok_or_else(|| {
        anyhow::anyhow!("{dataset}: calibration needs a dataset manifest of role `calibration`")
    })?;
    anyhow::ensure!(
        manifest.role == Role::Calibration,
        "dataset `{}` is evaluation text; calibration must never use it (use c4 or a manifest with role = \"calibration\")",
        manifest.name
    );
    let (rows, file, sha256) = load_rows(&manifest, data_dir)?;
    // Rows the manifest's evaluation protocol uses (`take`) are never calibration documents.
    let first = manifest.take.unwrap_or(0).min(rows.len());
    let docs = &rows[first..];
    anyhow::ensure!(
        !docs.is_empty(),
        "{}: no documents left after the {first} used for evaluation",
        file.display()
    );
    progress::info(format!(
        "calib: drawing {samples} windows of {seq_len} tokens from {}",
        file.display()
    ));
    // One document is drawn and encoded per window (a few more when documents are short).
    let bar = progress::bar("calib", samples as u64, "documents");
    let encode = |text: &str| -> Result<Vec<u32>, DataError> {
        bar.inc(1);
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| DataError(format!("{}: tokenization failed: {e}", file.display())))?;
        Ok(enc.get_ids().to_vec())
    };
    let windows = sample_windows(docs, &|t| encode(t), samples, seq_len, seed)
        .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.0))?;
    bar.finish_and_clear();
    Ok(CalibrationSet {
        dataset: manifest.name.clone(),
        file: file.display().to_string(),
        sha256,
        documents: (first, rows.len()),
        seed,
        seq_len,
        tokenizer_sha256: file_sha256(&model.join("tokenizer.json"))?,
        samples: windows,
    })
}

/// Reads a calibration set written by `maskprune calib`.
pub fn read(path: &Path) -> anyhow::Result<CalibrationSet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid calibration set: {e}", path.display()))
}

/// Refuses a calibration set with token ids the model's vocabulary does not have.
pub fn check_vocabulary(set: &CalibrationSet, vocab: usize) -> anyhow::Result<()> {
    if let Some(bad) = set.samples.iter().flatten().find(|&&t| t as usize >= vocab) {
        anyhow::bail!(
            "calibration set has token id {bad} but the model's vocabulary has {vocab} entries (drawn with another tokenizer?)"
        );
    }
    Ok(())
}
