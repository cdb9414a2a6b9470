//! `maskprune finetune`: recovery fine-tuning of a pruned checkpoint (LoRA adapters with the
//! next-token loss, plus distillation from the dense model with `--teacher`), merged into a
//! standard checkpoint. The same recovery for every method's model makes the table's
//! "w/ tune" block.

use std::path::{Path, PathBuf};

use anyhow::Context;
use maskprune_data::CalibrationSet;
use maskprune_model::output::write_file_atomically;
use maskprune_model::{Llama, TrainKernels};
use maskprune_train::{files, finetune, ConfigFile, FinetuneConfig, FinetuneSpec, FinetuneSummary};
use serde_json::json;

use crate::backend::{dispatch_autodiff, AutodiffJob};
use crate::{calib, progress, RunOptions};

/// Arguments of `finetune`.
#[derive(clap::Args)]
pub struct Args {
    /// The pruned model's directory.
    #[arg(long)]
    model: PathBuf,
    /// Output model directory: the adapters merged (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// The dense model it was pruned from: its logits are distilled besides the next-token
    /// loss (it must share the model's vocabulary and LM head).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Training text: a calibration dataset (`c4`, a manifest of role `calibration`) or a
    /// calibration set from `maskprune calib` (a `.json` file). Default: the config's [data]
    /// (every C4 calibration token once, in windows of 256).
    #[arg(long)]
    data: Option<String>,
    /// Updates (replaces the config's `train.steps`).
    #[arg(long)]
    steps: Option<u64>,
    /// LoRA rank (replaces the config's `lora.rank`).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// Projections with adapters, comma separated (replaces `lora.targets`; default all seven).
    #[arg(long)]
    lora_targets: Option<String>,
    /// A recovery configuration (TOML with [data], [train], [lora]; see configs/README.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config value: `--set train.lr=1e-4`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Run directory (default: OUT.run).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in the run directory from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite_run: bool,
    #[command(flatten)]
    run: RunOptions,
}

/// The configuration: the run's own when resuming, else `--config` (or the defaults) with
/// the flags and `--set` applied.
fn resolve_config(a: &Args, run_dir: &Path) -> anyhow::Result<FinetuneConfig> {
    if a.resume {
        let path = run_dir.join(files::CONFIG);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: no run to resume (start without --resume)",
                path.display()
            )
        })?;
        return FinetuneConfig::parse(&text, &[])
            .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()));
    }
    let text = match &a.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?
        }
        None => toml::to_string(&FinetuneConfig::default())?,
    };
    let source = a
        .config
        .as_deref()
        .unwrap_or(Path::new("finetune defaults"));
    FinetuneConfig::parse_with(&text, &a.set, |c| {
        if let Some(n) = a.steps {
            c.train.steps = n;
        }
        if let Some(r) = a.lora_rank {
            c.lora.rank = r;
        }
        if let Some(t) = &a.lora_targets {
            c.lora.targets = t.split(',').map(|x| x.trim().to_string()).collect();
        }
        if let Some(d) = a.data.as_deref().filter(|d| !is_calibration_file(d)) {
            c.data.dataset = d.to_string();
        }
    })
    .map_err(|m| anyhow::anyhow!("{}: {m}", source.display()))
}

/// Whether `--data` names a calibration set file rather than a dataset.
fn is_calibration_file(data: &str) -> bool {
    data.ends_with(".json") || Path::new(data).is_file()
}

/// The run directory, refusing to clobber one, with its configuration and training windows.
fn prepare_run(
    a: &Args,
    config: &FinetuneConfig,
    run_dir: &Path,
) -> anyhow::Result<CalibrationSet> {
    let data_path = run_dir.join(files::CALIBRATION);
    if a.resume {
        return calib::read(&data_path);
    }
    if run_dir.exists() {
        anyhow::ensure!(
            a.overwrite_run,
            "{}: run directory already exists (pass --resume to continue it or --overwrite-run to replace it)",
            run_dir.display()
        );
        std::fs::remove_dir_all(run_dir)
            .with_context(|| format!("{}: cannot remove", run_dir.display()))?;
    }
    let data = match a.data.as_deref().filter(|d| is_calibration_file(d)) {
        Some(p) => calib::read(Path::new(p))?,
        None => {
            let d = &config.data;
            let draw = calib::Draw {
                dataset: &d.dataset,
                samples: d.samples,
                seq_len: d.seq_len,
                seed: d.seed,
                packed: d.packed,
            };
            calib::build(&a.model, &draw, a.run.data_dir.as_deref())?
        }
    };
    let vocab = maskprune_model::ModelConfig::from_file(&a.model.join("config.json"))?.vocab_size;
    calib::check_vocabulary(&data, vocab)?;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("{}: cannot create", run_dir.display()))?;
    write_file_atomically(&data_path, &serde_json::to_vec(&data)?)?;
    write_file_atomically(
        &run_dir.join(files::CONFIG),
        toml::to_string(config)?.as_bytes(),
    )?;
    Ok(data)
}

struct Job<'a> {
    args: &'a Args,
    config: FinetuneConfig,
    data: CalibrationSet,
    run_dir: PathBuf,
}

impl AutodiffJob for Job<'_> {
    type Output = FinetuneSummary;
    fn run<B: TrainKernels>(self, device: B::Device) -> anyhow::Result<FinetuneSummary> {
        let a = self.args;
        progress::info(format!("loading {} ...", a.model.display()));
        let student = Llama::<B>::load(&a.model, &device)?;
        let teacher = match &a.teacher {
            Some(dir) => Some(Llama::<B::InnerBackend>::load(dir, &device)?),
            None => None,
        };
        let steps = self.config.train.steps;
        let bar = progress::StepBar::new("finetune", steps);
        let spec = FinetuneSpec {
            model_dir: &a.model,
            teacher_dir: a.teacher.as_deref(),
            config: &self.config,
            data: &self.data,
            run_dir: &self.run_dir,
            resume: a.resume,
        };
        let summary = finetune(&student, teacher.as_ref(), &spec, &mut |r| {
            let distill = r
                .distill
                .map(|d| format!(" distill {d:.4}"))
                .unwrap_or_default();
            let msg = format!("loss {:.4} ntp {:.4}{distill}", r.loss, r.ntp);
            bar.update(r.step, r.steps, r.seconds, msg);
        })
        .map_err(anyhow::Error::msg)?;
        bar.finish();
        Ok(summary)
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let run_dir = crate::train::run_dir_for(&a.out, a.overwrite, a.run_dir.as_deref())?;
    let config = resolve_config(&a, &run_dir)?;
    let data = prepare_run(&a, &config, &run_dir)?;
    let summary = dispatch_autodiff(
        a.run.device,
        Job {
            args: &a,
            config: config.clone(),
            data,
            run_dir: run_dir.clone(),
        },
    )?;
    let recovery = json!({
        "run": run_dir,
        "steps": summary.steps,
        "tokens": summary.tokens,
        "train_seconds": summary.train_seconds,
        "teacher": summary.teacher,
        "lora": config.lora,
        "lr": config.train.lr,
        "held_out_ntp": [summary.before.ntp, summary.after.ntp],
    });
    progress::over_tensors("merge", |progress| {
        maskprune_surgery::merge_adapters(
            &a.model,
            &run_dir.join(files::LORA),
            &a.out,
            a.overwrite,
            recovery,
            progress,
        )
    })?;
    println!(
        "recovered {} -> {}: {} updates, {} tokens in {:.0} s; held-out next-token loss {:.4} -> {:.4}{}",
        a.model.display(),
        a.out.display(),
        summary.steps,
        summary.tokens,
        summary.train_seconds,
        summary.before.ntp,
        summary.after.ntp,
        match (summary.before.distill, summary.after.distill) {
            (Some(b), Some(f)) => format!(", KL to the teacher {b:.4} -> {f:.4}"),
            _ => String::new(),
        }
    );
    Ok(())
}
