//! `maskprune calib`: a seeded calibration set of token windows from calibration text.

use std::path::{Path, PathBuf};

use maskprune_data::{draw_calibration, CalibrationSet, Encoder};
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

pub use maskprune_data::Draw;

/// Draws a calibration set with the model's tokenizer (see
/// [`maskprune_data::draw_calibration`]), with a progress bar over the documents encoded.
pub fn build(model: &Path, d: &Draw, data_dir: Option<&Path>) -> anyhow::Result<CalibrationSet> {
    let config = ModelConfig::from_file(&model.join("config.json"))?;
    let tokenizer = load_tokenizer(model, &config)?;
    let encoder = Encoder {
        tokenizer: &tokenizer,
        sha256: file_sha256(&model.join("tokenizer.json"))?,
        separator: config.eos_token_ids.first().copied(),
    };
    let mut bar = None;
    let set = draw_calibration(d, &encoder, data_dir, &mut |done, total| {
        bar.get_or_insert_with(|| progress::bar("calib", total as u64, "documents"))
            .set_position(done as u64);
    })
    .map_err(|e| anyhow::anyhow!(e.0))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    progress::info(format!(
        "calib: {} {} windows of {} tokens from {}",
        if d.packed { "packed" } else { "drew" },
        set.samples.len(),
        d.seq_len,
        set.file
    ));
    Ok(set)
}

/// Reads a calibration set written by `maskprune calib`.
pub fn read(path: &Path) -> anyhow::Result<CalibrationSet> {
    CalibrationSet::read(path).map_err(|e| anyhow::anyhow!(e.0))
}

/// Refuses a calibration set with token ids the model's vocabulary does not have.
pub fn check_vocabulary(set: &CalibrationSet, vocab: usize) -> anyhow::Result<()> {
    set.check_vocabulary(vocab)
        .map_err(|e| anyhow::anyhow!(e.0))
}
