//! The records that one stage writes and another reads, typed once for both sides: a
//! mask-training run's files ([`run`]) and benchmark results ([`bench`]). No model code:
//! the report and scripts read these without loading a model.

pub mod bench;
pub mod run;

use std::path::Path;

use serde::de::DeserializeOwned;

pub use bench::{ForwardBench, ShapeTiming};
pub use run::{
    Granularity, LayerCounts, MaskSnapshot, MaskState, StepRecord, TrainSummary, Widths,
};

/// One JSON file as `T`; errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: invalid: {e}", path.display()))
}

/// A JSON-lines file (blank lines skipped) as `T`s; errors name the file and line.
pub fn read_json_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| format!("{}:{}: invalid: {e}", path.display(), i + 1))
        })
        .collect()
}
