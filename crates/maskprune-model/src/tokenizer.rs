//! The model's `tokenizer.json`, loaded with the `tokenizers` crate and checked against the
//! model's vocabulary.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Loads `tokenizer.json` from a model directory and checks its ids fit the embedding matrix.
pub fn load_tokenizer(dir: &Path, config: &ModelConfig) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(ModelError::new(&path, "tokenizer.json is missing"));
    }
    let tokenizer = Tokenizer::from_file(&path).map_err(|e| {
        ModelError::new(
            &path,
            format!("cannot load tokenizer: {}", one_line(&e.to_string())),
        )
    })?;
    let size = tokenizer.get_vocab_size(true);
    if size > config.vocab_size {
        return Err(ModelError::new(
            &path,
            format!(
                "tokenizer has {size} tokens but config.json `vocab_size` is {}; they belong to different models",
                config.vocab_size
            ),
        ));
    }
    Ok(tokenizer)
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}
