//! `maskprune rank` (a one-shot ranking into a prune plan) and `maskprune surgery`
//! (a plan applied to the weights, written as a standard checkpoint).

use std::path::PathBuf;

use anyhow::Context;
use maskprune_model::{output::write_file_atomically, ModelConfig, WeightStore};
use maskprune_surgery::{magnitude_plan, prune_checkpoint, uniform_widths, Granularity, PrunePlan};

use crate::progress;

/// Arguments of `rank`.
#[derive(clap::Args)]
pub struct RankArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Ranking method (one-shot): magnitude (L2 norm of each unit's weights).
    #[arg(long, default_value = "magnitude", value_parser = ["magnitude"])]
    method: String,
    /// Fraction of the decoder layers' linear parameters to remove.
    #[arg(long)]
    sparsity: f64,
    /// Attention unit: kv_group (num_key_value_heads shrinks) or query_head.
    #[arg(long, default_value = "kv_group")]
    granularity: Granularity,
    /// MLP widths are multiples of this.
    #[arg(long, default_value_t = 64)]
    round_to: usize,
    /// Where to write the plan (JSON).
    #[arg(long)]
    out: PathBuf,
}

pub fn rank(a: RankArgs) -> anyhow::Result<()> {
    let config = ModelConfig::from_file(&a.model.join("config.json"))?;
    let widths = uniform_widths(&config, a.granularity, a.sparsity, a.round_to)
        .map_err(|m| anyhow::anyhow!("{}: {m}", a.model.display()))?;
    let store = WeightStore::open(&a.model)?;
    let plan = magnitude_plan(&store, &config, a.granularity, widths)?;
    write_file_atomically(&a.out, &serde_json::to_vec_pretty(&plan)?)?;
    println!(
        "{} plan: {} query heads / {} KV heads / {} channels per layer -> {}",
        plan.method,
        widths.query_heads,
        widths.kv_heads,
        widths.channels,
        a.out.display()
    );
    Ok(())
}

/// Arguments of `surgery`.
#[derive(clap::Args)]
pub struct SurgeryArgs {
    /// Source model directory.
    #[arg(long)]
    model: PathBuf,
    /// Prune plan (from `maskprune rank` or mask training).
    #[arg(long)]
    plan: PathBuf,
    /// Output model directory (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
}

pub fn surgery(a: SurgeryArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.plan)
        .with_context(|| format!("{}: cannot read", a.plan.display()))?;
    let plan: PrunePlan = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid prune plan: {e}", a.plan.display()))?;
    progress::info(format!(
        "pruning {} with {} ...",
        a.model.display(),
        a.plan.display()
    ));
    let r = prune_checkpoint(&a.model, &plan, &a.out, a.overwrite)?;
    println!(
        "wrote {}: {} -> {} parameters ({:.1}% of all, {:.1}% of decoder-layer linear weights removed); heads {} / KV heads {} / MLP {}",
        a.out.display(),
        r.params_before,
        r.params_after,
        100.0 * (1.0 - r.params_after as f64 / r.params_before as f64),
        100.0 * (1.0 - r.decoder_linear_after as f64 / r.decoder_linear_before as f64),
        r.shape.num_attention_heads,
        r.shape.num_key_value_heads,
        r.shape.intermediate_size
    );
    Ok(())
}
