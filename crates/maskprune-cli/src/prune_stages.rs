//! `maskprune rank` (a one-shot ranking into a prune plan) and `maskprune surgery`
//! (a plan applied to the weights, written as a standard checkpoint).

use std::path::PathBuf;

use anyhow::Context;
use maskprune_baselines::magnitude_scores;
use maskprune_baselines::{activation_scores, random_scores, taylor_scores, Method};
use maskprune_data::CalibrationSet;
use maskprune_model::{
    output::write_file_atomically, Llama, ModelConfig, TrainKernels, WeightStore,
};
use maskprune_surgery::rank::plan_from_scores;
use maskprune_surgery::{apply_plan, uniform_widths, Granularity, LayerScores, PrunePlan, Widths};

use crate::backend::{dispatch_autodiff, AutodiffJob, DeviceArg};
use crate::{calib, progress};

/// Arguments of `rank`.
#[derive(clap::Args)]
pub struct RankArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Ranking method: random, magnitude, wanda-sp, flap or taylor (the last three read
    /// --calib).
    #[arg(long, default_value = "magnitude")]
    method: Method,
    /// Seed of the random ranking.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Calibration set from `maskprune calib` (wanda-sp, flap, taylor).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration windows per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
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
    /// Reuse unit scores saved by an earlier `rank --save-scores` (same model and method).
    #[arg(long)]
    scores_from: Option<PathBuf>,
    /// Also save the unit scores (JSON), to rank other widths without recomputing them.
    #[arg(long)]
    save_scores: Option<PathBuf>,
    /// Where to write the plan (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
}

pub fn rank(a: RankArgs) -> anyhow::Result<()> {
    let config = ModelConfig::from_file(&a.model.join("config.json"))?;
    let (granularity, widths) = match (&a.widths_from, a.sparsity) {
        (Some(p), _) => widths_of_plan(p, &config)?,
        (None, Some(s)) => (
            a.granularity,
            uniform_widths(&config, a.granularity, s, a.round_to)
                .map_err(|m| anyhow::anyhow!("{}: {m}", a.model.display()))?,
        ),
        (None, None) => anyhow::bail!("give --sparsity or --widths-from"),
    };
    let scores = match &a.scores_from {
        Some(p) => read_scores(p, &config, a.method)?,
        None => {
            let calib = match &a.calib {
                Some(p) => Some(calib::read(p)?),
                None if a.method.needs_calibration() => anyhow::bail!(
                    "--method {} needs calibration data: pass --calib (from `maskprune calib`)",
                    a.method.name()
                ),
                None => None,
            };
            let job = ScoreJob {
                model: a.model.clone(),
                method: a.method,
                seed: a.seed,
                calib,
                batch: a.batch,
            };
            dispatch_autodiff(a.device, job)?
        }
    };
    if let Some(p) = &a.save_scores {
        write_scores(p, a.method, &scores)?;
    }
    let plan = plan_from_scores(&scores, &config, granularity, widths, a.method.name());
    plan.write(&a.out).map_err(anyhow::Error::msg)?;
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

/// The granularity and uniform widths of an existing prune plan.
pub fn widths_of_plan(
    path: &std::path::Path,
    config: &ModelConfig,
) -> anyhow::Result<(Granularity, Widths)> {
    let plan = read_plan(path)?;
    let shape = plan
        .validate(config)
        .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
    Ok((
        plan.granularity,
        Widths {
            query_heads: shape.num_attention_heads,
            kv_heads: shape.num_key_value_heads,
            channels: shape.intermediate_size,
        },
    ))
}

/// Unit scores on disk (`rank --save-scores`).
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedScores {
    method: String,
    layers: Vec<LayerScores>,
}

/// Saves unit scores for `rank --scores-from` / `prune --scores-from`.
pub fn write_scores(
    path: &std::path::Path,
    method: Method,
    scores: &[LayerScores],
) -> anyhow::Result<()> {
    let saved = SavedScores {
        method: method.name().to_string(),
        layers: scores.to_vec(),
    };
    write_file_atomically(path, &serde_json::to_vec(&saved)?)?;
    Ok(())
}

/// Reads unit scores saved by `write_scores`, checking method and model shape.
pub fn read_scores(
    path: &std::path::Path,
    config: &ModelConfig,
    method: Method,
) -> anyhow::Result<Vec<LayerScores>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let saved: SavedScores = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid scores file: {e}", path.display()))?;
    anyhow::ensure!(
        saved.method == method.name(),
        "{}: scores of method `{}`, not `{}`",
        path.display(),
        saved.method,
        method.name()
    );
    let fits = saved.layers.len() == config.num_hidden_layers
        && saved.layers.iter().all(|l| {
            l.query_heads.len() == config.num_attention_heads
                && l.kv_groups.len() == config.num_key_value_heads
                && l.channels.len() == config.intermediate_size
        });
    anyhow::ensure!(
        fits,
        "{}: the scores do not fit this model's layers, heads and channels (scores of another model?)",
        path.display()
    );
    Ok(saved.layers)
}

/// Scores every unit of a model with a one-shot method.
pub struct ScoreJob {
    /// Model directory.
    pub model: PathBuf,
    /// The method.
    pub method: Method,
    /// Seed (random).
    pub seed: u64,
    /// Calibration windows (wanda-sp, flap, taylor).
    pub calib: Option<CalibrationSet>,
    /// Windows per forward pass.
    pub batch: usize,
}

impl AutodiffJob for ScoreJob {
    type Output = Vec<LayerScores>;

    fn run<B: TrainKernels>(self, device: B::Device) -> anyhow::Result<Self::Output> {
        let config = ModelConfig::from_file(&self.model.join("config.json"))?;
        let store = WeightStore::open(&self.model)?;
        if !self.method.needs_calibration() {
            return Ok(match self.method {
                Method::Random => random_scores(&config, self.seed),
                _ => magnitude_scores(&store, &config)?,
            });
        }
        let calib = self.calib.expect("checked by the caller");
        anyhow::ensure!(!calib.samples.is_empty(), "the calibration set is empty");
        calib::check_vocabulary(&calib, config.vocab_size)?;
        progress::info(format!("loading {} ...", self.model.display()));
        let model = Llama::<B>::from_store(config, &store, &device)?;
        let batches = calib.samples.len().div_ceil(self.batch.max(1));
        let bar = progress::bar(
            &format!("{} scores", self.method.name()),
            batches as u64,
            "batches",
        );
        let mut tick = || bar.inc(1);
        let scores = match self.method {
            Method::Taylor => taylor_scores(model, &calib.samples, self.batch, &mut tick)?,
            m => activation_scores(m, &model, &store, &calib.samples, self.batch, &mut tick)?,
        };
        bar.finish_and_clear();
        Ok(scores)
    }
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
    /// Keep the original shapes and zero the dropped units instead (for plans whose layers
    /// keep different numbers of units, e.g. `prune --method maskprune-nonuniform`).
    #[arg(long)]
    masked: bool,
}

pub fn surgery(a: SurgeryArgs) -> anyhow::Result<()> {
    let plan = read_plan(&a.plan)?;
    progress::info(format!(
        "pruning {} with {} ...",
        a.model.display(),
        a.plan.display()
    ));
    let r = apply_plan_with_bar(
        &a.model,
        &plan,
        a.lora.as_deref(),
        &a.out,
        a.overwrite,
        a.masked,
    )?;
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

/// Weight surgery (`maskprune_surgery::apply_plan`) with a progress bar over the tensors.
pub fn apply_plan_with_bar(
    model: &std::path::Path,
    plan: &PrunePlan,
    lora: Option<&std::path::Path>,
    out: &std::path::Path,
    overwrite: bool,
    masked: bool,
) -> anyhow::Result<maskprune_surgery::SurgeryReport> {
    let report = progress::over_tensors("surgery", |progress| {
        apply_plan(model, plan, lora, out, overwrite, masked, progress)
    })?;
    Ok(report)
}

fn read_plan(path: &std::path::Path) -> anyhow::Result<PrunePlan> {
    PrunePlan::read(path).map_err(anyhow::Error::msg)
}
