//! What a training run directory's loops share: the held-out split of the calibration
//! windows, the seeded batch order (a function of the step alone, so a resumed run needs no
//! data cursor), the log cut back to a checkpoint, checkpoints with checksums and the
//! inputs they were trained from, and one-line errors naming a file.

use std::path::Path;

use maskprune_data::text::sha256_hex;
use maskprune_data::{CalibrationSet, SplitMix64};
use maskprune_model::output::{write_dir_atomically, write_file_atomically};
use maskprune_model::ModelConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::LoraSettings;
use crate::trainer::files;
use maskprune_model::lora::Adapters;

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

/// What a checkpoint was trained from: resuming with anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Provenance {
    /// SHA-256 of the (student) model's weight files.
    pub weights_sha256: String,
    /// SHA-256 of the resolved configuration (JSON).
    pub config_sha256: String,
    /// SHA-256 of the calibration or training windows (JSON).
    pub calibration_sha256: String,
    /// SHA-256 of the teacher's weight files, when there is one.
    pub teacher_sha256: Option<String>,
}

impl Provenance {
    /// One string of every fingerprint: processes training one run must agree on it.
    pub fn fingerprint(&self) -> String {
        format!(
            "{} {} {} {}",
            self.weights_sha256,
            self.config_sha256,
            self.calibration_sha256,
            self.teacher_sha256.as_deref().unwrap_or("-")
        )
    }

    /// Fingerprints of a run's inputs.
    pub fn new(
        weights_sha256: String,
        config: &impl Serialize,
        calibration: &CalibrationSet,
        teacher_sha256: Option<String>,
    ) -> Self {
        Self {
            weights_sha256,
            config_sha256: json_sha256(config),
            calibration_sha256: json_sha256(calibration),
            teacher_sha256,
        }
    }

    /// `Ok` when `checkpoint` (read from `dir`) was trained from the same inputs as `self`.
    fn check(&self, checkpoint: &Provenance, dir: &Path) -> Result<(), String> {
        let refuse = |what: &str| {
            Err(err(
                dir,
                format!("the checkpoint was trained {what}; start a new run (or use another run directory)"),
            ))
        };
        if checkpoint.weights_sha256 != self.weights_sha256 {
            return refuse("on another model's weights");
        }
        if checkpoint.teacher_sha256 != self.teacher_sha256 {
            return refuse("with another teacher (or without one)");
        }
        if checkpoint.config_sha256 != self.config_sha256 {
            return refuse("with another configuration (the run's config.toml changed)");
        }
        if checkpoint.calibration_sha256 != self.calibration_sha256 {
            return refuse("on other calibration windows (the run's calibration.json changed)");
        }
        Ok(())
    }
}

/// SHA-256 of a value's JSON.
fn json_sha256(value: &impl Serialize) -> String {
    sha256_hex(&serde_json::to_vec(value).expect("inputs serialise"))
}

/// The files of a checkpoint directory besides `checksums.json`.
const CHECKPOINT_FILES: [&str; 2] = ["state.json", files::LORA];

/// Replaces the checkpoint directory `dir` atomically with `state.json` (`state`), the
/// adapters with their Adam moments, and `checksums.json` (SHA-256 of both).
pub(crate) fn write_checkpoint<S: Serialize>(
    dir: &Path,
    step: u64,
    state: &S,
    adapters: &Adapters,
) -> Result<(), String> {
    write_dir_atomically(dir, true, |d| {
        let model_err = |m: String| maskprune_model::ModelError::new(d, m);
        let state = serde_json::to_vec(state).expect("state serialises");
        write_file_atomically(&d.join(CHECKPOINT_FILES[0]), &state)?;
        if fault_abort_in_checkpoint() == Some(step) {
            // Test hook: dies half-way through writing a checkpoint, as a SIGKILL could.
            std::process::abort();
        }
        adapters
            .save(&d.join(files::LORA), true)
            .map_err(model_err)?;
        let mut sums = std::collections::BTreeMap::new();
        for f in CHECKPOINT_FILES {
            let bytes = std::fs::read(d.join(f))
                .map_err(|e| model_err(format!("{f}: cannot read back: {e}")))?;
            sums.insert(f, sha256_hex(&bytes));
        }
        let sums = serde_json::to_vec(&sums).expect("checksums serialise");
        write_file_atomically(&d.join("checksums.json"), &sums)
    })
    .map_err(|e| e.to_string())
}

/// A checkpoint state that carries the inputs it was trained from.
pub(crate) trait Checkpoint: DeserializeOwned {
    /// Where the checkpoint's inputs came from.
    fn provenance(&self) -> &Provenance;
}

/// The checkpoint in `dir`: its files checked against `checksums.json`, its inputs against
/// `fresh` (one-line errors naming the directory), and its adapters loaded.
pub(crate) fn read_checkpoint<S: Checkpoint>(
    dir: &Path,
    fresh: &Provenance,
    c: &ModelConfig,
    lora: &LoraSettings,
) -> Result<(S, Adapters), String> {
    let sums_path = dir.join("checksums.json");
    let sums = std::fs::read(&sums_path).map_err(|e| {
        if dir.join(CHECKPOINT_FILES[0]).is_file() {
            err(
                &sums_path,
                "missing: a checkpoint without checksums (an older maskprune's, or cut short) cannot be resumed; start the run again without --resume",
            )
        } else {
            err(
                dir,
                format!("no checkpoint to resume from ({e}); start the run without --resume"),
            )
        }
    })?;
    let sums: std::collections::BTreeMap<String, String> = serde_json::from_slice(&sums)
        .map_err(|e| err(&sums_path, format!("corrupt checkpoint: {e}")))?;
    let mut state_bytes = Vec::new();
    for f in CHECKPOINT_FILES {
        let path = dir.join(f);
        let bytes = std::fs::read(&path).map_err(|e| err(&path, format!("cannot read: {e}")))?;
        if sums.get(f) != Some(&sha256_hex(&bytes)) {
            return Err(err(
                &path,
                "corrupt checkpoint: its checksum does not match checksums.json",
            ));
        }
        if f == CHECKPOINT_FILES[0] {
            state_bytes = bytes;
        }
    }
    let state: S = serde_json::from_slice(&state_bytes).map_err(|e| {
        err(
            &dir.join(CHECKPOINT_FILES[0]),
            format!("corrupt checkpoint: {e}"),
        )
    })?;
    fresh.check(state.provenance(), dir)?;
    let adapters = Adapters::load(&dir.join(files::LORA), c, lora)?;
    Ok((state, adapters))
}

/// Test hook: `MASKPRUNE_FAULT_ABORT_IN_CHECKPOINT=k` aborts the process while it writes the
/// checkpoint of update `k` (after `state.json`, before the adapters).
fn fault_abort_in_checkpoint() -> Option<u64> {
    std::env::var("MASKPRUNE_FAULT_ABORT_IN_CHECKPOINT")
        .ok()?
        .parse()
        .ok()
}
