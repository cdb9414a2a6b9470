//! `maskprune calib`: a seeded calibration set of token windows from calibration text.

use std::path::{Path, PathBuf};

use anyhow::Context;

use maskprune_data::{
    load_rows, pack_windows, resolve_dataset, sample_windows, CalibrationSet, DataError, Role,
};
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
    /// Number of windows (with --packed, 0 takes them all).
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// Cut the calibration documents' concatenation into consecutive windows (every token
    /// once, in a seeded order) instead of drawing random windows of long documents.
    #[arg(long)]
    packed: bool,
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
        &Draw {
            dataset: &a.dataset,
            samples: a.samples,
            seq_len: a.seq_len,
            seed: a.seed,
            packed: a.packed,
        },
        a.data_dir.as_deref(),
    )?;
    write_file_atomically(&a.out, &serde_json::to_vec(&set)?)?;
    println!(
        "calibration set: {} {}windows of {} tokens from `{}` documents {}..{} (seed {}) -> {}",
        set.samples.len(),
        if set.packed { "packed " } else { "" },
        a.seq_len,
        set.dataset,
        set.documents.0,
        set.documents.1,
        a.seed,
        a.out.display()
    );
    Ok(())
}

/// How a calibration set is drawn.
pub struct Draw<'a> {
    /// A dataset manifest of role `calibration`.
    pub dataset: &'a str,
    /// Windows (packed: at most this many, 0 for all).
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the draw (or of the packed windows' order).
    pub seed: u64,
    /// Consecutive windows of the documents' concatenation instead of random ones.
    pub packed: bool,
}

/// Draws a calibration set from a dataset of role `calibration`, skipping the rows its
/// evaluation protocol uses.
pub fn build(model: &Path, d: &Draw, data_dir: Option<&Path>) -> anyhow::Result<CalibrationSet> {
    let (dataset, samples, seq_len, seed) = (d.dataset, d.samples, d.seq_len, d.seed);
    anyhow::ensure!(
        (samples > 0 || d.packed) && seq_len > 1,
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
        "calib: {} windows of {seq_len} tokens from {}",
        if d.packed { "packing" } else { "drawing" },
        file.display()
    ));
    // Sampling encodes one document per window (a few more when documents are short);
    // packing encodes each document once.
    let documents = if d.packed { docs.len() } else { samples };
    let bar = progress::bar("calib", documents as u64, "documents");
    let encode = |text: &str| -> Result<Vec<u32>, DataError> {
        bar.inc(1);
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| DataError(format!("{}: tokenization failed: {e}", file.display())))?;
        Ok(enc.get_ids().to_vec())
    };
    let windows = if d.packed {
        let n = (samples > 0).then_some(samples);
        let separator = config.eos_token_ids.first().copied();
        pack_windows(docs, &|t| encode(t), n, seq_len, separator, seed)
    } else {
        sample_windows(docs, &|t| encode(t), samples, seq_len, seed)
    }
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
        packed: d.packed,
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
