//! What a training run directory's loops share: the held-out split of the calibration
//! windows, the seeded batch order (a function of the step alone, so a resumed run needs no
//! data cursor), the log cut back to a checkpoint, and one-line errors naming a file.

use std::path::Path;

use maskprune_data::{CalibrationSet, SplitMix64};
use maskprune_model::output::write_file_atomically;

/// `path: message`.
pub(crate) fn err(path: &Path, m: impl std::fmt::Display) -> String {
    format!("{}: {m}", path.display())
}

/// Training and held-out sample indices: the last `eval_samples` windows are held out.
pub(crate) fn split_calibration(
    calib: &CalibrationSet,
    batch: usize,
    eval_samples: usize,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let n = calib.samples.len();
    let eval = eval_samples.max(1);
    if n < eval + batch {
        return Err(format!(
            "{}: the calibration set has {n} windows; training needs at least batch ({batch}) + eval_samples ({eval})",
            calib.file
        ));
    }
    if let Some(short) = calib
        .samples
        .iter()
        .find(|s| s.len() < 2 || s.len() != calib.seq_len)
    {
        return Err(format!(
            "{}: a calibration window has {} tokens, expected {}",
            calib.file,
            short.len(),
            calib.seq_len
        ));
    }
    Ok(((0..n - eval).collect(), (n - eval..n).collect()))
}

/// The calibration windows of update `step`: epochs of a seeded shuffle, so the order depends
/// only on the seed and the step (resuming needs no data cursor beyond the step).
pub(crate) fn batch_rows(train: &[usize], b: usize, seed: u64, step: u64) -> Vec<usize> {
    let n = train.len();
    let mut shuffled: Option<(usize, Vec<usize>)> = None;
    (0..b)
        .map(|k| {
            let pos = step as usize * b + k;
            let (epoch, i) = (pos / n, pos % n);
            // A batch spans at most two epochs: shuffle once per epoch, not once per window.
            if shuffled.as_ref().is_none_or(|(e, _)| *e != epoch) {
                shuffled = Some((epoch, epoch_order(train, seed, epoch)));
            }
            shuffled.as_ref().expect("just set").1[i]
        })
        .collect()
}

/// The training windows in the seeded order of `epoch` (Fisher-Yates).
pub(crate) fn epoch_order(train: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = train.to_vec();
    let mut rng = SplitMix64(seed.wrapping_add(0x5EED_0000 + epoch as u64));
    for j in (1..order.len()).rev() {
        order.swap(j, rng.below(j + 1));
    }
    order
}

/// Opens a run's `log.jsonl` for appending (created if missing).
pub(crate) fn open_log(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| err(path, format!("cannot open: {e}")))
}

/// Drops log lines past the checkpoint's step (they are recomputed on resume).
pub(crate) fn truncate_log(path: &Path, step: u64) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .take(step as usize)
        .map(|l| format!("{l}\n"))
        .collect();
    write_file_atomically(path, kept.as_bytes()).map_err(|e| e.to_string())
}
