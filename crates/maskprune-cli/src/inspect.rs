//! `maskprune inspect`: architecture, parameter counts and provenance of a checkpoint.

use std::path::PathBuf;

use anyhow::Context;
use maskprune_model::{ModelConfig, WeightStore};

/// Arguments of `inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory.
    dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let c = ModelConfig::from_file(&args.dir.join("config.json"))?;
    let store = WeightStore::open(&args.dir)?;
    println!("model       {}", args.dir.display());
    println!(
        "family      {} ({})",
        c.family.model_type(),
        c.family.architecture()
    );
    println!("layers      {}", c.num_hidden_layers);
    println!("hidden      {}", c.hidden_size);
    println!(
        "attention   {} query heads / {} KV heads x head_dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("mlp         {}", c.intermediate_size);
    println!(
        "vocab       {} (tied embeddings: {})",
        c.vocab_size, c.tie_word_embeddings
    );
    println!(
        "parameters  {} total, {} in decoder-layer linear weights",
        c.total_params(),
        c.num_hidden_layers * c.layer_linear_params()
    );
    println!(
        "tensors     {} in {}",
        store.names().len(),
        store
            .paths()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for name in ["maskprune.json", "maskprune_import.json"] {
        let path = args.dir.join(name);
        if path.is_file() {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            let mut value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
            // Kept indices are per layer and long: summarised here, listed in the file.
            if let Some(kept) = value.get_mut("kept") {
                let layers = kept.as_array().map_or(0, Vec::len);
                *kept =
                    serde_json::json!(format!("{layers} layers of kept indices (see the file)"));
            }
            println!(
                "provenance  {name}:\n{}",
                serde_json::to_string_pretty(&value)?
            );
        }
    }
    Ok(())
}
