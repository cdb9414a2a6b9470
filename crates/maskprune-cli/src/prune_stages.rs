//! `maskprune rank` (a one-shot ranking into a prune plan) and `maskprune surgery`
//! (a plan applied to the weights, written as a standard checkpoint).

use std::path::PathBuf;

use anyhow::Context;
use maskprune_model::{output::write_file_atomically, ModelConfig, WeightStore};
use maskprune_surgery::rank::plan_from_scores;
use maskprune_surgery::{
    magnitude_plan, prune_checkpoint_with_lora, uniform_widths, Granularity, LayerScores,
    PrunePlan, Widths,
};

use crate::progress;

/// Arguments of `rank`.
#[derive(clap::Args)]
pub struct RankArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Ranking method (one-shot): magnitude (L2 norm of each unit's weights) or random.
    #[arg(long, default_value = "magnitude", value_parser = ["magnitude", "random"])]
    method: String,
    /// Seed of the random ranking.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of the decoder layers' linear parameters to remove.
    #[arg(long, required_unless_present = "widths_from")]
    sparsity: Option<f64>,
    /// Use the widths of this prune plan (e.g. a mask-training run's plan.json) instead of
    /// --sparsity, so the baseline has exactly the same architecture.
    #[arg(long, conflicts_with = "sparsity")]
    widths_from: Option<PathBuf>,
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
    let (granularity, widths) = match (&a.widths_from, a.sparsity) {
        (Some(p), _) => {
            let plan = read_plan(p)?;
            let shape = plan
                .validate(&config)
                .map_err(|m| anyhow::anyhow!("{}: {m}", p.display()))?;
            let w = Widths {
                query_heads: shape.num_attention_heads,
                kv_heads: shape.num_key_value_heads,
                channels: shape.intermediate_size,
            };
            (plan.granularity, w)
        }
        (None, Some(s)) => (
            a.granularity,
            uniform_widths(&config, a.granularity, s, a.round_to)
                .map_err(|m| anyhow::anyhow!("{}: {m}", a.model.display()))?,
        ),
        (None, None) => anyhow::bail!("give --sparsity or --widths-from"),
    };
    let store = WeightStore::open(&a.model)?;
    let plan = match a.method.as_str() {
        "random" => plan_from_scores(
            &random_scores(&config, a.seed),
            &config,
            granularity,
            widths,
            "random",
        ),
        _ => magnitude_plan(&store, &config, granularity, widths)?,
    };
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
    /// LoRA adapters to merge first (`lora.safetensors` of a mask-training run).
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
}

pub fn surgery(a: SurgeryArgs) -> anyhow::Result<()> {
    let plan = read_plan(&a.plan)?;
    progress::info(format!(
        "pruning {} with {} ...",
        a.model.display(),
        a.plan.display()
    ));
    let r = prune_checkpoint_with_lora(&a.model, &plan, a.lora.as_deref(), &a.out, a.overwrite)?;
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

fn read_plan(path: &std::path::Path) -> anyhow::Result<PrunePlan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid prune plan: {e}", path.display()))
}

/// Uniform random scores for every unit (the `random` baseline), seeded.
fn random_scores(c: &ModelConfig, seed: u64) -> Vec<LayerScores> {
    let mut rng = maskprune_data::SplitMix64(seed);
    let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.next_u64() as f64).collect() };
    (0..c.num_hidden_layers)
        .map(|_| LayerScores {
            query_heads: draw(c.num_attention_heads),
            kv_groups: draw(c.num_key_value_heads),
            channels: draw(c.intermediate_size),
        })
        .collect()
}
