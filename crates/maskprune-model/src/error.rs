//! The one error type of the model crate: a file (or tensor) and what is wrong with it.

use std::fmt;
use std::path::{Path, PathBuf};

/// An error that names the file it comes from and the cause, printed on one line.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelError {
    /// The file (or directory) at fault.
    pub path: PathBuf,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl ModelError {
    /// Builds an error for `path` with `message`.
    pub fn new(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for ModelError {}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, ModelError>;
