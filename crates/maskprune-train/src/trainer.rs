//! The training loop: per update, the dense teacher's logits, the masked student with LoRA,
//! the distillation loss and its gradients, then the host-side minimax and Adam updates.
//! Writes the run directory (see [`files`]) and resumes from its checkpoint.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use maskprune_data::{CalibrationSet, SplitMix64};
use maskprune_eval::perplexity::token_tensor;
use maskprune_mask::{distillation_kl, next_token_loss, UnitMasks};
use maskprune_model::output::{write_dir_atomically, write_file_atomically};
use maskprune_model::{weights_sha256, LayerMask, Llama, WeightStore};
use maskprune_surgery::{magnitude_scores, Granularity, PrunePlan, Widths};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::adapters::Adapters;
use crate::config::{MaskInit, TrainConfig};
use crate::extract::Budget;
use crate::minimax::{scheduled_target, MinimaxState, ATTENTION, CHANNELS};

/// File names inside a run directory.
pub mod files {
    /// The resolved configuration.
    pub const CONFIG: &str = "config.toml";
    /// The calibration set used.
    pub const CALIBRATION: &str = "calibration.json";
    /// One JSON object per update.
    pub const LOG: &str = "log.jsonl";
    /// The last checkpoint (a directory, replaced atomically).
    pub const CHECKPOINT: &str = "checkpoint";
    /// Final masks, widths and multipliers.
    pub const MASKS: &str = "masks.json";
    /// Final LoRA adapters.
    pub const LORA: &str = "lora.safetensors";
    /// The extracted uniform prune plan.
    pub const PLAN: &str = "plan.json";
    /// Wall time, parameters, widths and the extraction gap.
    pub const SUMMARY: &str = "summary.json";
}

/// What a checkpoint holds besides the adapters.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    seconds: f64,
    weights_sha256: String,
    minimax: MinimaxState,
}

/// One line of `log.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Updates done (1-based).
    pub step: u64,
    /// Of this many.
    pub steps: u64,
    /// The Lagrangian: distillation + next-token + uniformity + budget terms.
    pub lagrangian: f64,
    /// KL(teacher || student).
    pub distill: f64,
    /// Next-token cross-entropy of the student (weighted in the Lagrangian by `ntp_weight`).
    pub ntp: Option<f64>,
    /// `Σ_t mean_l y (kept/n − r)`.
    pub uniformity_term: f64,
    /// `μ (p(r) − p_target)`.
    pub budget_term: f64,
    /// The shared widths `s` in units (attention, channels).
    pub s_attention: f64,
    /// See `s_attention`.
    pub s_channels: f64,
    /// Decoder-layer linear parameters the widths `s` imply.
    pub params_s: f64,
    /// Decoder-layer linear parameters the kept counts imply (mean over layers).
    pub params_achieved: f64,
    /// The budget this update (warm-up included).
    pub params_target: f64,
    /// The final budget.
    pub params_final_target: usize,
    /// `μ`.
    pub mu: f64,
    /// Mean and max of `y` over layers, per kind.
    pub y_attention: [f64; 2],
    /// See `y_attention`.
    pub y_channels: [f64; 2],
    /// Kept units per layer, per kind.
    pub kept_attention: Vec<usize>,
    /// See `kept_attention`.
    pub kept_channels: Vec<usize>,
    /// Seconds for this update.
    pub seconds: f64,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Updates done.
    pub steps: u64,
    /// Wall time of the training updates, in seconds (all sessions of a resumed run).
    pub train_seconds: f64,
    /// Granularity.
    pub granularity: Granularity,
    /// Widths every layer keeps.
    pub widths: Widths,
    /// Final continuous widths `s`.
    pub s: [f64; 2],
    /// Dense and pruned decoder-layer linear parameters, and the target.
    pub decoder_linear: [usize; 3],
    /// Dense and pruned parameters of the whole model.
    pub total_params: [usize; 2],
    /// Held-out distillation loss with the training masks, just before extraction.
    pub loss_before_extraction: f64,
    /// The same with the extracted uniform plan.
    pub loss_after_extraction: f64,
    /// The same for the dense model with the trained adapters (the floor).
    pub loss_dense_with_lora: f64,
}

/// Everything a run needs.
pub struct RunSpec<'a> {
    /// The model directory (weights for the magnitude initialisation and provenance).
    pub model_dir: &'a Path,
    /// The resolved configuration.
    pub config: &'a TrainConfig,
    /// The calibration set.
    pub calibration: &'a CalibrationSet,
    /// The run directory.
    pub run_dir: &'a Path,
    /// Continue from the run directory's checkpoint.
    pub resume: bool,
}

fn err(path: &Path, m: impl std::fmt::Display) -> String {
    format!("{}: {m}", path.display())
}

/// Trains masks, widths and adapters and writes the run directory; `on_step` sees every
/// update (progress bars).
pub fn train<B: AutodiffBackend>(
    model: &Llama<B>,
    spec: &RunSpec,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<TrainSummary, String> {
    let cfg = spec.config;
    let c = &model.config;
    let device = model.device();
    let run = spec.run_dir;
    let budget = Budget::new(
        c,
        cfg.budget.granularity,
        cfg.budget.round_to,
        cfg.budget.sparsity,
        cfg.budget.target_params,
    )
    .map_err(|m| err(&spec.model_dir.join("config.json"), m))?;
    let (train_idx, eval_idx) = split_calibration(spec.calibration, cfg)?;
    let store = WeightStore::open(spec.model_dir).map_err(|e| e.to_string())?;
    let source_sha = weights_sha256(&store);
    let rates = &cfg.minimax;
    let layers = c.num_hidden_layers;

    // Start or resume.
    let ckpt_dir = run.join(files::CHECKPOINT);
    let (mut state, mut adapters, start, mut seconds) = if spec.resume {
        let text = std::fs::read_to_string(ckpt_dir.join("state.json")).map_err(|e| {
            err(
                &ckpt_dir,
                format!("no checkpoint to resume from ({e}); start the run without --resume"),
            )
        })?;
        let s: CheckpointState = serde_json::from_str(&text).map_err(|e| {
            err(
                &ckpt_dir.join("state.json"),
                format!("corrupt checkpoint: {e}"),
            )
        })?;
        if s.weights_sha256 != source_sha {
            return Err(err(
                &ckpt_dir,
                "the checkpoint was trained on different weights (masks from another model?)",
            ));
        }
        if s.minimax.z[ATTENTION].len() != layers
            || s.minimax.z[ATTENTION]
                .iter()
                .any(|z| z.len() != budget.kinds[ATTENTION].units)
            || s.minimax.z[CHANNELS]
                .iter()
                .any(|z| z.len() != c.intermediate_size)
        {
            return Err(err(
                &ckpt_dir,
                "the checkpoint's masks do not fit this model and granularity",
            ));
        }
        let adapters = Adapters::load(&ckpt_dir.join(files::LORA), c, &cfg.lora)?;
        truncate_log(&run.join(files::LOG), s.step)?;
        (s.minimax, adapters, s.step, s.seconds)
    } else {
        let init = match cfg.train.mask_init {
            MaskInit::Fisher => fisher_init(model, spec, &train_idx, &budget)?,
            _ => initial_masks(&store, c, cfg, &budget)?,
        };
        (
            MinimaxState::new(init),
            Adapters::new(c, &cfg.lora, cfg.train.seed),
            0,
            0.0,
        )
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.join(files::LOG))
        .map_err(|e| err(&run.join(files::LOG), format!("cannot open: {e}")))?;

    let steps = cfg.train.steps;
    let target_fraction = budget.target_fraction();
    let mut last_checkpoint = start;
    for step in start..steps {
        let t0 = Instant::now();
        let batch = batch_rows(&train_idx, cfg, step);
        let rows: Vec<&[u32]> = batch
            .iter()
            .map(|&i| spec.calibration.samples[i].as_slice())
            .collect();
        let tokens = token_tensor::<B>(&rows, &device);
        let teacher = model
            .forward(tokens.clone())
            .map_err(|e| e.to_string())?
            .detach();
        let masks = state.masks(rates);
        let unit = UnitMasks::<B>::from_values(
            c,
            cfg.budget.granularity,
            masks[ATTENTION].clone(),
            masks[CHANNELS].clone(),
            &device,
        )
        .require_grad();
        let (lora, lora_flat) = adapters.to_tensors::<B>(layers, &device, Tensor::require_grad);
        let student = model
            .forward_with(tokens.clone(), Some(&unit.layer_masks()), Some(&lora))
            .map_err(|e| e.to_string())?;
        let distill = distillation_kl(student.clone(), teacher, cfg.train.temperature);
        let (loss, ntp) = if cfg.train.ntp_weight > 0.0 {
            let ntp = next_token_loss(student, tokens);
            let ntp_value: f64 = ntp.clone().into_scalar().elem();
            (
                distill.clone() + ntp.mul_scalar(cfg.train.ntp_weight),
                Some(ntp_value),
            )
        } else {
            (distill.clone(), None)
        };
        let distill_value: f64 = distill.into_scalar().elem();
        for (term, v) in [("distillation", Some(distill_value)), ("next-token", ntp)] {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return Err(format!(
                    "{}: step {}: the {term} loss is {v}; training stopped. The last good checkpoint is {} (step {last_checkpoint}); lower the learning rates and continue with --resume",
                    run.display(),
                    step + 1,
                    ckpt_dir.display()
                ));
            }
        }
        let grads = loss.backward();
        let to_host = |t: Option<Tensor<B::InnerBackend, 1>>, n: usize| -> Vec<f32> {
            t.map(|g| g.into_data().convert::<f32>().to_vec().expect("f32"))
                .unwrap_or_else(|| vec![0.0; n])
        };
        let mask_grads: [Vec<Vec<f32>>; 2] = [
            unit.attention
                .iter()
                .map(|m| to_host(m.grad(&grads), budget.kinds[ATTENTION].units))
                .collect(),
            unit.channels
                .iter()
                .map(|m| to_host(m.grad(&grads), c.intermediate_size))
                .collect(),
        ];
        let lora_grads: Vec<Vec<f32>> = lora_flat
            .iter()
            .zip(&adapters.matrices)
            .map(|(t, m)| {
                t.grad(&grads)
                    .map(|g| g.into_data().convert::<f32>().to_vec().expect("f32"))
                    .unwrap_or_else(|| vec![0.0; m.value.len()])
            })
            .collect();
        let scheduled = scheduled_target(target_fraction, step, cfg.train.warmup_steps);
        let stats = state.update(
            &mask_grads,
            &budget.kinds,
            rates,
            scheduled - budget.fixed_share,
        );
        adapters.adam_step(&lora_grads, cfg.train.lora_lr);
        let dt = t0.elapsed().as_secs_f64();
        seconds += dt;
        let y_stats = |t: usize| {
            let y = &state.y[t];
            [
                y.iter().sum::<f64>() / y.len().max(1) as f64,
                y.iter().cloned().fold(0.0, f64::max),
            ]
        };
        let dense = budget.dense as f64;
        let record = StepRecord {
            step: step + 1,
            steps,
            lagrangian: distill_value
                + ntp.map_or(0.0, |v| v * cfg.train.ntp_weight)
                + stats.uniformity_term
                + stats.budget_term,
            distill: distill_value,
            ntp,
            uniformity_term: stats.uniformity_term,
            budget_term: stats.budget_term,
            s_attention: stats.s[ATTENTION],
            s_channels: stats.s[CHANNELS],
            params_s: dense * (stats.params_fraction + budget.fixed_share),
            params_achieved: dense * (stats.achieved_fraction + budget.fixed_share),
            params_target: dense * scheduled,
            params_final_target: budget.target,
            mu: state.mu,
            y_attention: y_stats(ATTENTION),
            y_channels: y_stats(CHANNELS),
            kept_attention: stats.kept[ATTENTION].clone(),
            kept_channels: stats.kept[CHANNELS].clone(),
            seconds: dt,
        };
        let line = serde_json::to_string(&record).expect("record serialises");
        writeln!(log, "{line}")
            .map_err(|e| err(&run.join(files::LOG), format!("cannot write: {e}")))?;
        on_step(&record);
        let done = step + 1;
        if done % cfg.train.checkpoint_every == 0 || done == steps {
            log.flush()
                .map_err(|e| err(&run.join(files::LOG), format!("cannot write: {e}")))?;
            let ck = CheckpointState {
                step: done,
                seconds,
                weights_sha256: source_sha.clone(),
                minimax: state.clone(),
            };
            write_dir_atomically(&ckpt_dir, true, |d| {
                write_file_atomically(
                    &d.join("state.json"),
                    serde_json::to_string(&ck)
                        .expect("state serialises")
                        .as_bytes(),
                )?;
                adapters
                    .save(&d.join(files::LORA), true)
                    .map_err(|m| maskprune_model::ModelError::new(d, m))
            })
            .map_err(|e| e.to_string())?;
            last_checkpoint = done;
        }
    }

    // Extraction: exactly round_to(s) units in every layer, the top ones by |z|.
    let s = std::array::from_fn(|t| state.width[t] * budget.kinds[t].units as f64);
    let widths = budget.round_widths(c, s);
    let plan = budget.extract(c, &state.z, widths, "maskprune");
    let plan_masks = plan.masks::<B>(c, &device);
    let final_masks = state.masks(rates);
    let train_masks = UnitMasks::<B>::from_values(
        c,
        cfg.budget.granularity,
        final_masks[ATTENTION].clone(),
        final_masks[CHANNELS].clone(),
        &device,
    )
    .layer_masks();
    let (lora, _) = adapters.to_tensors::<B>(layers, &device, |t| t);
    let eval_rows: Vec<&[u32]> = eval_idx
        .iter()
        .map(|&i| spec.calibration.samples[i].as_slice())
        .collect();
    let held_out = |masks: Option<&[LayerMask<B>]>| -> Result<f64, String> {
        let mut total = 0.0;
        for chunk in eval_rows.chunks(cfg.train.batch) {
            let tokens = token_tensor::<B>(chunk, &device);
            let teacher = model.forward(tokens.clone()).map_err(|e| e.to_string())?;
            let student = model
                .forward_with(tokens, masks, Some(&lora))
                .map_err(|e| e.to_string())?;
            let kl: f64 = distillation_kl(student, teacher, cfg.train.temperature)
                .into_scalar()
                .elem();
            total += kl * chunk.len() as f64;
        }
        Ok(total / eval_rows.len() as f64)
    };
    let loss_before = held_out(Some(&train_masks))?;
    let loss_after = held_out(Some(&plan_masks))?;
    let loss_dense = held_out(None)?;

    let pruned_config = pruned_total_params(c, widths);
    let summary = TrainSummary {
        steps,
        train_seconds: seconds,
        granularity: cfg.budget.granularity,
        widths,
        s,
        decoder_linear: [
            budget.dense,
            maskprune_surgery::decoder_linear_params(c, widths),
            budget.target,
        ],
        total_params: [c.total_params(), pruned_config],
        loss_before_extraction: loss_before,
        loss_after_extraction: loss_after,
        loss_dense_with_lora: loss_dense,
    };
    write_outputs(
        run,
        &state,
        &final_masks,
        &adapters,
        &plan,
        &summary,
        &budget,
    )?;
    Ok(summary)
}

fn pruned_total_params(c: &maskprune_model::ModelConfig, w: Widths) -> usize {
    let mut p = c.clone();
    p.num_attention_heads = w.query_heads;
    p.num_key_value_heads = w.kv_heads;
    p.intermediate_size = w.channels;
    p.total_params()
}

fn write_outputs(
    run: &Path,
    state: &MinimaxState,
    masks: &[Vec<Vec<f32>>; 2],
    adapters: &Adapters,
    plan: &PrunePlan,
    summary: &TrainSummary,
    budget: &Budget,
) -> Result<(), String> {
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON serialises");
    let masks_json = json!({
        "granularity": budget.granularity,
        "attention_units": budget.kinds[ATTENTION].units,
        "s": summary.s,
        "width_fraction": state.width,
        "mu": state.mu,
        "y_attention": state.y[ATTENTION],
        "y_channels": state.y[CHANNELS],
        "z_attention": state.z[ATTENTION],
        "z_channels": state.z[CHANNELS],
        "m_attention": masks[ATTENTION],
        "m_channels": masks[CHANNELS],
    });
    write_file_atomically(&run.join(files::MASKS), &pretty(&masks_json))
        .map_err(|e| e.to_string())?;
    adapters.save(&run.join(files::LORA), false)?;
    write_file_atomically(
        &run.join(files::PLAN),
        &serde_json::to_vec_pretty(plan).expect("plan serialises"),
    )
    .map_err(|e| e.to_string())?;
    write_file_atomically(
        &run.join(files::SUMMARY),
        &serde_json::to_vec_pretty(summary).expect("summary serialises"),
    )
    .map_err(|e| e.to_string())
}

/// Initial `z`: ones, or each unit's weight norm divided by its layer's mean.
fn initial_masks(
    store: &WeightStore,
    c: &maskprune_model::ModelConfig,
    cfg: &TrainConfig,
    budget: &Budget,
) -> Result<[Vec<Vec<f32>>; 2], String> {
    let layers = c.num_hidden_layers;
    let units = [budget.kinds[ATTENTION].units, c.intermediate_size];
    match cfg.train.mask_init {
        MaskInit::Fisher => unreachable!("the Fisher initialisation needs the model"),
        MaskInit::Ones => Ok(std::array::from_fn(|t| vec![vec![1.0; units[t]]; layers])),
        MaskInit::Magnitude => {
            let scores = magnitude_scores(store, c).map_err(|e| e.to_string())?;
            let norm = |v: &[f64]| {
                let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                v.iter().map(|x| (x / mean) as f32).collect::<Vec<f32>>()
            };
            Ok([
                scores
                    .iter()
                    .map(|s| match budget.granularity {
                        Granularity::KvGroup => norm(&s.kv_groups),
                        Granularity::QueryHead => norm(&s.query_heads),
                    })
                    .collect(),
                scores.iter().map(|s| norm(&s.channels)).collect(),
            ])
        }
    }
}

/// Each layer's values divided by their mean (all ones when they are all zero).
fn normalise_layers(v: Vec<Vec<f64>>) -> Vec<Vec<f32>> {
    v.into_iter()
        .map(|l| {
            let mean = l.iter().sum::<f64>() / l.len().max(1) as f64;
            l.iter()
                .map(|x| if mean > 0.0 { (x / mean) as f32 } else { 1.0 })
                .collect()
        })
        .collect()
}

/// Initial `z` from the Fisher information of the masks: `sqrt(Σ_batches (∂NTP/∂b)²)` at the
/// dense model, over `init_batches` training batches, divided by the layer's mean.
fn fisher_init<B: AutodiffBackend>(
    model: &Llama<B>,
    spec: &RunSpec,
    train_idx: &[usize],
    budget: &Budget,
) -> Result<[Vec<Vec<f32>>; 2], String> {
    let (c, cfg, device) = (&model.config, spec.config, model.device());
    let units = [budget.kinds[ATTENTION].units, c.intermediate_size];
    let mut acc: [Vec<Vec<f64>>; 2] =
        std::array::from_fn(|t| vec![vec![0.0; units[t]]; c.num_hidden_layers]);
    for k in 0..cfg.train.init_batches.max(1) {
        let batch = batch_rows(train_idx, cfg, k);
        let rows: Vec<&[u32]> = batch
            .iter()
            .map(|&i| spec.calibration.samples[i].as_slice())
            .collect();
        let tokens = token_tensor::<B>(&rows, &device);
        let ones = UnitMasks::<B>::ones(c, cfg.budget.granularity, &device).require_grad();
        let logits = model
            .forward_masked(tokens.clone(), Some(&ones.layer_masks()))
            .map_err(|e| e.to_string())?;
        let grads = next_token_loss(logits, tokens).backward();
        for (t, masks) in [&ones.attention, &ones.channels].into_iter().enumerate() {
            for (l, m) in masks.iter().enumerate() {
                if let Some(g) = m.grad(&grads) {
                    let g: Vec<f32> = g.into_data().convert::<f32>().to_vec().expect("f32");
                    for (a, x) in acc[t][l].iter_mut().zip(g) {
                        *a += (x as f64) * (x as f64);
                    }
                }
            }
        }
    }
    Ok(acc.map(|k| {
        normalise_layers(
            k.into_iter()
                .map(|l| l.into_iter().map(f64::sqrt).collect())
                .collect(),
        )
    }))
}

/// Training and held-out sample indices: the last `eval_samples` windows are held out.
fn split_calibration(
    calib: &CalibrationSet,
    cfg: &TrainConfig,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let n = calib.samples.len();
    let eval = cfg.train.eval_samples.max(1);
    if n < eval + cfg.train.batch {
        return Err(format!(
            "{}: the calibration set has {n} windows; training needs at least batch ({}) + eval_samples ({eval})",
            calib.file, cfg.train.batch
        ));
    }
    if let Some(short) = calib
        .samples
        .iter()
        .find(|s| s.len() < 2 || s.len() != calib.seq_len)
    {
        return Err(format!(
            "{}: a calibration window has {} tokens, expected {}",
            calib.file,
            short.len(),
            calib.seq_len
        ));
    }
    Ok(((0..n - eval).collect(), (n - eval..n).collect()))
}

/// The calibration windows of update `step`: epochs of a seeded shuffle, so the order depends
/// only on the seed and the step (resuming needs no data cursor beyond the step).
fn batch_rows(train: &[usize], cfg: &TrainConfig, step: u64) -> Vec<usize> {
    let b = cfg.train.batch;
    let n = train.len();
    (0..b)
        .map(|k| {
            let pos = step as usize * b + k;
            let (epoch, i) = (pos / n, pos % n);
            let mut order: Vec<usize> = train.to_vec();
            let mut rng = SplitMix64(cfg.train.seed.wrapping_add(0x5EED_0000 + epoch as u64));
            for j in (1..n).rev() {
                order.swap(j, rng.below(j + 1));
            }
            order[i]
        })
        .collect()
}

/// Drops log lines past the checkpoint's step (they are recomputed on resume).
fn truncate_log(path: &Path, step: u64) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .take(step as usize)
        .map(|l| format!("{l}\n"))
        .collect();
    write_file_atomically(path, kept.as_bytes()).map_err(|e| e.to_string())
}
