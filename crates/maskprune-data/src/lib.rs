//! Evaluation and calibration text: dataset manifests (`datasets/*.toml`), lookup of the data
//! directory, loading a corpus exactly as the published protocol joins it, and cutting token
//! streams into fixed-length windows.

pub mod calibration;
pub mod manifest;
pub mod text;
pub mod windows;

pub use calibration::{
    draw_calibration, pack_windows, sample_windows, CalibrationSet, Draw, Encoder, SplitMix64,
};
pub use manifest::{builtin_manifests, DatasetManifest, Format, Role};
pub use text::{data_dir_candidates, load_dataset, load_rows, resolve_dataset, LoadedText};
pub use windows::windows;

/// Error of this crate: the file (or dataset) and what is wrong, on one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DataError(pub String);

/// Result alias of the data crate.
pub type Result<T> = std::result::Result<T, DataError>;
