//! `maskprune train-masks` (minimax mask training into a run directory) and `maskprune prune`
//! (calibration, training and surgery in one go).

use std::path::{Path, PathBuf};

use anyhow::Context;
use maskprune_baselines::Method;
use maskprune_data::CalibrationSet;
use maskprune_model::output::write_file_atomically;
use maskprune_model::Llama;
use maskprune_surgery::rank::plan_from_scores;
use maskprune_surgery::{uniform_widths, Granularity, PrunePlan};
use maskprune_train::{
    files, train_parallel, ConfigFile, Nodes, Peers, RunSpec, TrainConfig, TrainSummary,
};

use crate::backend::{dispatch_autodiff, dispatch_autodiff_on, AutodiffJob, DeviceArg, DeviceList};
use crate::prune_stages::{
    apply_plan_with_bar, read_scores, widths_of_plan, write_scores, ScoreJob,
};
use crate::{calib, progress};

/// Options shared by `train-masks` and `prune`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainOptions {
    /// Training configuration (TOML; see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Model directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// Calibration set from `maskprune calib` (default: drawn as the config's [calibration] says).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Cut the schedule to this many updates (the warm-up and committed updates shrink in
    /// proportion).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Fraction of the decoder layers' linear parameters to remove (replaces the config's budget).
    #[arg(long, conflicts_with = "target_params")]
    sparsity: Option<f64>,
    /// Parameters of the whole pruned model (replaces the config's budget).
    #[arg(long)]
    target_params: Option<u64>,
    /// Attention unit: kv_group or query_head (replaces the config's).
    #[arg(long)]
    granularity: Option<Granularity>,
    /// Override any config value: `--set train.steps=200 --set minimax.mask_lr=0.1`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run in --run-dir from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite_run: bool,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    /// Data-parallel training, one peer per device, each update's batch split between them:
    /// `cpu,cpu` or `cuda:0,cuda:1` (replaces --device).
    #[arg(long, conflicts_with = "device")]
    devices: Option<DeviceList>,
    /// Train over this many processes (machines), each on an equal share of every batch; start
    /// each with its own --node-rank and the same --coordinator and inputs.
    #[arg(long, default_value_t = 1, requires = "coordinator")]
    nodes: usize,
    /// This process's place among --nodes (0 is the coordinator).
    #[arg(long, default_value_t = 0, requires = "coordinator")]
    node_rank: usize,
    /// HOST:PORT node 0 listens on and the other nodes connect to.
    #[arg(long)]
    coordinator: Option<String>,
    /// Free (non-uniform) masks: set by `prune --method maskprune-nonuniform`, not a flag.
    #[arg(skip)]
    nonuniform: bool,
    /// Data directory (default: $MASKPRUNE_DATA, ../shared/data, ~/.cache/maskprune/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Arguments of `train-masks`.
#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    opts: TrainOptions,
    /// Run directory (masks, widths, multipliers, LoRA, log.jsonl, checkpoint, plan.json).
    #[arg(long)]
    run_dir: PathBuf,
}

/// Arguments of `prune`.
#[derive(clap::Args)]
pub struct PruneArgs {
    #[command(flatten)]
    opts: TrainOptions,
    /// Output model directory (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Run directory (default: OUT.run).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
    /// Pruning method: maskprune (learned masks, uniform widths), maskprune-nonuniform (the
    /// same minimax with a free width per layer; written as a masked checkpoint of the
    /// original shape), or a one-shot baseline: random, magnitude, wanda-sp, flap, taylor.
    #[arg(long, default_value = "maskprune")]
    method: PruneMethod,
    /// Baselines: prune to the widths of this plan (e.g. a MaskPrune run's plan.json) instead
    /// of the widths the config's budget gives.
    #[arg(long)]
    widths_from: Option<PathBuf>,
    /// Baselines: reuse the unit scores another run of the same method saved (its
    /// `scores.json`; same model and calibration set) instead of computing them again.
    #[arg(long)]
    scores_from: Option<PathBuf>,
}

/// What `prune --method` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneMethod {
    /// Learned masks with uniform widths.
    MaskPrune,
    /// Learned masks, widths free per layer (an ablation).
    MaskPruneNonuniform,
    /// A one-shot ranking.
    Baseline(Method),
}

impl std::str::FromStr for PruneMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "maskprune" => Ok(PruneMethod::MaskPrune),
            "maskprune-nonuniform" => Ok(PruneMethod::MaskPruneNonuniform),
            _ => s.parse().map(PruneMethod::Baseline).map_err(|_| {
                format!("unknown method `{s}` (maskprune, maskprune-nonuniform, random, magnitude, wanda-sp, flap, taylor)")
            }),
        }
    }
}

/// Resolves the configuration: the file, its `--set` overrides, then the flags.
fn resolve_config(o: &TrainOptions) -> anyhow::Result<TrainConfig> {
    let text = std::fs::read_to_string(&o.config)
        .with_context(|| format!("{}: cannot read", o.config.display()))?;
    let mut config = TrainConfig::parse_with(&text, &o.set, |c| {
        // A budget flag replaces the config's budget kind.
        if let Some(s) = o.sparsity {
            (c.budget.sparsity, c.budget.target_params) = (Some(s), None);
        }
        if let Some(n) = o.target_params {
            (c.budget.sparsity, c.budget.target_params) = (None, Some(n));
        }
        if let Some(g) = o.granularity {
            c.budget.granularity = g;
        }
        if o.nonuniform {
            c.minimax.uniform = false;
        }
    })
    .map_err(|m| anyhow::anyhow!("{}: {m}", o.config.display()))?;
    if let Some(n) = o.max_steps {
        anyhow::ensure!(n > 0, "--max-steps must be positive");
        config.cut_to(n);
    }
    Ok(config)
}

impl TrainOptions {
    /// The devices `--devices` (or `--device`) names.
    fn devices(&self) -> Vec<DeviceArg> {
        self.devices
            .as_ref()
            .map_or_else(|| vec![self.device], |d| d.0.clone())
    }
}

struct TrainJob {
    peers: Peers,
    model: PathBuf,
    config: TrainConfig,
    calibration: CalibrationSet,
    run_dir: PathBuf,
    resume: bool,
}

impl AutodiffJob for TrainJob {
    type Output = TrainSummary;
    fn run<B: maskprune_model::TrainKernels>(
        self,
        device: B::Device,
    ) -> anyhow::Result<TrainSummary> {
        self.run_on::<B>(vec![device])
    }

    fn run_on<B: maskprune_model::TrainKernels>(
        self,
        devices: Vec<B::Device>,
    ) -> anyhow::Result<TrainSummary> {
        progress::info(format!("loading {} ...", self.model.display()));
        // One copy of the weights per distinct device; peers on the same device share it.
        let mut replicas: Vec<Llama<B>> = Vec::new();
        for (k, device) in devices.iter().enumerate() {
            let model = match devices[..k].iter().position(|d| d == device) {
                Some(same) => replicas[same].clone(),
                None => Llama::<B>::load(&self.model, device)?,
            };
            replicas.push(model);
        }
        let model = &replicas[0];
        let steps = self.config.train.steps;
        let bar = progress::StepBar::new("train", steps);
        let spec = RunSpec {
            model_dir: &self.model,
            config: &self.config,
            calibration: &self.calibration,
            run_dir: &self.run_dir,
            resume: self.resume,
        };
        let dense = model.config.num_hidden_layers * model.config.layer_linear_params();
        let summary = train_parallel(&replicas, &self.peers, &spec, &mut |r| {
            let msg = format!(
                "loss {:.4} s {:.2}/{:.0} sparsity {:.1}% (target {:.1}%)",
                r.distill,
                r.s_attention,
                r.s_channels,
                100.0 * (1.0 - r.params_achieved / dense as f64),
                100.0 * (1.0 - r.params_target / dense as f64)
            );
            bar.update(r.step, r.steps, r.seconds, msg);
        })
        .map_err(anyhow::Error::msg)?;
        bar.finish();
        Ok(summary)
    }
}

/// Prepares the run directory (refusing to clobber one) and returns the calibration set.
fn prepare_run(
    o: &TrainOptions,
    config: &TrainConfig,
    run_dir: &Path,
) -> anyhow::Result<CalibrationSet> {
    let calib_path = run_dir.join(files::CALIBRATION);
    if o.resume {
        anyhow::ensure!(
            run_dir.join(files::CHECKPOINT).is_dir(),
            "{}: no checkpoint to resume from",
            run_dir.display()
        );
        let calibration = calib::read(&calib_path)?;
        if let Some(p) = &o.calib {
            anyhow::ensure!(
                calib::read(p)?.samples == calibration.samples,
                "{}: not the calibration windows this run was trained on ({}); resume without --calib, or start a new run",
                p.display(),
                calib_path.display()
            );
        }
        return Ok(calibration);
    }
    if run_dir.exists() {
        anyhow::ensure!(
            o.overwrite_run,
            "{}: run directory already exists (pass --resume to continue it or --overwrite-run to replace it)",
            run_dir.display()
        );
        std::fs::remove_dir_all(run_dir)
            .with_context(|| format!("{}: cannot remove", run_dir.display()))?;
    }
    let calibration = match &o.calib {
        Some(p) => calib::read(p)?,
        None => {
            let c = &config.calibration;
            let draw = calib::Draw {
                dataset: &c.dataset,
                samples: c.samples,
                seq_len: c.seq_len,
                seed: c.seed,
                packed: c.packed,
            };
            calib::build(&o.model, &draw, o.data_dir.as_deref())?
        }
    };
    let vocab = maskprune_model::ModelConfig::from_file(&o.model.join("config.json"))?.vocab_size;
    calib::check_vocabulary(&calibration, vocab)?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("{}: cannot create", run_dir.display()))?;
    write_file_atomically(&calib_path, &serde_json::to_vec(&calibration)?)?;
    write_file_atomically(
        &run_dir.join(files::CONFIG),
        toml::to_string(config)?.as_bytes(),
    )?;
    Ok(calibration)
}

/// The config's budget on this model (an error names the config when it cannot be met).
fn budget_of(
    o: &TrainOptions,
    config: &TrainConfig,
    model: &maskprune_model::ModelConfig,
) -> anyhow::Result<maskprune_train::Budget> {
    let b = &config.budget;
    maskprune_train::Budget::new(
        model,
        b.granularity,
        b.round_to,
        b.sparsity,
        b.target_params,
    )
    .map_err(|m| anyhow::anyhow!("{}: {m}", o.config.display()))
}

fn run_training(o: &TrainOptions, run_dir: &Path) -> anyhow::Result<TrainSummary> {
    let config = if o.resume {
        anyhow::ensure!(
            run_dir.join(files::CHECKPOINT).join("state.json").is_file(),
            "{}: no checkpoint to resume from (start the run without --resume)",
            run_dir.display()
        );
        // The run's own resolved config, so a resumed run continues the same schedule; the
        // flags given now must resolve to it.
        let path = run_dir.join(files::CONFIG);
        let config = TrainConfig::from_file(&path, &[]).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            resolve_config(o)? == config,
            "{}: --config and the budget/--set/--max-steps flags resolve to another configuration than the run's ({}); resume with the same ones, or start a new run",
            o.config.display(),
            path.display()
        );
        config
    } else {
        let config = resolve_config(o)?;
        // Impossible budgets fail before anything is written.
        let model_config = maskprune_model::ModelConfig::from_file(&o.model.join("config.json"))?;
        budget_of(o, &config, &model_config)?;
        config
    };
    let peers = Peers {
        devices: o.devices().len(),
        nodes: Nodes {
            count: o.nodes,
            rank: o.node_rank,
            coordinator: o.coordinator.clone().unwrap_or_default(),
        },
    };
    peers
        .check(config.train.batch)
        .map_err(|m| anyhow::anyhow!("{}: {m}", o.config.display()))?;
    let calibration = prepare_run(o, &config, run_dir)?;
    let summary = dispatch_autodiff_on(
        &o.devices(),
        TrainJob {
            peers,
            model: o.model.clone(),
            config,
            calibration,
            run_dir: run_dir.to_path_buf(),
            resume: o.resume,
        },
    )?;
    let w = summary.widths;
    println!(
        "trained {} steps in {:.0} s: {} query heads / {} KV heads / {} channels in every layer; decoder-layer linear parameters {} -> {} (target {}); held-out KL {:.4} before extraction, {:.4} after (dense with LoRA {:.4}) -> {}",
        summary.steps,
        summary.train_seconds,
        w.query_heads,
        w.kv_heads,
        w.channels,
        summary.decoder_linear[0],
        summary.decoder_linear[1],
        summary.decoder_linear[2],
        summary.loss_before_extraction,
        summary.loss_after_extraction,
        summary.loss_dense_with_lora,
        run_dir.display()
    );
    Ok(summary)
}

pub fn train_masks(a: TrainArgs) -> anyhow::Result<()> {
    run_training(&a.opts, &a.run_dir)?;
    write_report(&a.run_dir);
    Ok(())
}

/// The run's report (plots); a failure there is a warning, the run itself is done.
fn write_report(run_dir: &Path) {
    match maskprune_report::write_report(run_dir, None) {
        Ok(dir) => progress::info(format!("report: {}", dir.join("report.md").display())),
        Err(m) => eprintln!("warning: no report for {}: {m}", run_dir.display()),
    }
}

/// The run directory of a stage writing the model directory `out` (`OUT.run` unless given),
/// after refusing an existing `out` without `overwrite`.
pub(crate) fn run_dir_for(
    out: &Path,
    overwrite: bool,
    run_dir: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    if out.exists() && !overwrite {
        anyhow::bail!(
            "{}: output directory already exists (pass --overwrite to replace it)",
            out.display()
        );
    }
    Ok(run_dir.map(Path::to_path_buf).unwrap_or_else(|| {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".run");
        out.with_file_name(name)
    }))
}

pub fn prune(a: PruneArgs) -> anyhow::Result<()> {
    let run_dir = run_dir_for(&a.out, a.overwrite, a.run_dir.as_deref())?;
    let r = match a.method {
        PruneMethod::Baseline(m) => {
            let plan = baseline_plan(&a, m, &run_dir)?;
            apply_plan_with_bar(&a.opts.model, &plan, None, &a.out, a.overwrite, false)?
        }
        method => {
            anyhow::ensure!(
                a.widths_from.is_none(),
                "--widths-from is for the one-shot baselines; mask training finds its own widths"
            );
            let mut opts = a.opts.clone();
            let nonuniform = method == PruneMethod::MaskPruneNonuniform;
            if nonuniform && !opts.resume {
                opts.nonuniform = true;
            }
            run_training(&opts, &run_dir)?;
            write_report(&run_dir);
            let plan_path = run_dir.join(files::PLAN);
            let plan = PrunePlan::read(&plan_path).map_err(anyhow::Error::msg)?;
            let lora = run_dir.join(files::LORA);
            apply_plan_with_bar(
                &a.opts.model,
                &plan,
                Some(&lora),
                &a.out,
                a.overwrite,
                nonuniform,
            )?
        }
    };
    println!(
        "wrote {}: {} -> {} parameters ({:.1}% of all removed)",
        a.out.display(),
        r.params_before,
        r.params_after,
        100.0 * (1.0 - r.params_after as f64 / r.params_before as f64)
    );
    Ok(())
}

/// A one-shot baseline's plan at the widths of `--widths-from` or of the config's budget,
/// scored on the config's calibration set; the run directory gets the calibration set and
/// the plan.
fn baseline_plan(a: &PruneArgs, method: Method, run_dir: &Path) -> anyhow::Result<PrunePlan> {
    let o = &a.opts;
    anyhow::ensure!(
        !o.resume,
        "--resume is for mask training; a baseline has nothing to resume"
    );
    let config = resolve_config(o)?;
    let model_config = maskprune_model::ModelConfig::from_file(&o.model.join("config.json"))?;
    let (granularity, widths) = match &a.widths_from {
        Some(p) => widths_of_plan(p, &model_config)?,
        None => {
            let b = &config.budget;
            let budget = budget_of(o, &config, &model_config)?;
            let sparsity = 1.0 - budget.target as f64 / budget.dense as f64;
            let w = uniform_widths(&model_config, b.granularity, sparsity, b.round_to)
                .map_err(|m| anyhow::anyhow!("{}: {m}", o.config.display()))?;
            (b.granularity, w)
        }
    };
    let calibration = prepare_run(o, &config, run_dir)?;
    let scores = match &a.scores_from {
        Some(p) => read_scores(p, &model_config, method)?,
        None => {
            let job = ScoreJob {
                model: o.model.clone(),
                method,
                seed: config.train.seed,
                calib: method.needs_calibration().then_some(calibration),
                batch: config.train.batch,
            };
            dispatch_autodiff(o.device, job)?
        }
    };
    write_scores(&run_dir.join("scores.json"), method, &scores)?;
    let plan = plan_from_scores(&scores, &model_config, granularity, widths, method.name());
    plan.write(&run_dir.join(files::PLAN))
        .map_err(anyhow::Error::msg)?;
    println!(
        "{} plan: {} query heads / {} KV heads / {} channels in every layer -> {}",
        method.name(),
        widths.query_heads,
        widths.kv_heads,
        widths.channels,
        run_dir.join(files::PLAN).display()
    );
    Ok(plan)
}
