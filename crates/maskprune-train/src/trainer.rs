//! The training loop: per update, the dense teacher's logits, the masked student with LoRA,
//! the distillation loss and its gradients, then the host-side minimax and Adam updates.
//! Writes the run directory (see [`files`]) and resumes from its checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use burn::tensor::Tensor;
use maskprune_data::{CalibrationSet, SplitMix64};
use maskprune_eval::perplexity::token_tensor;
use maskprune_mask::{next_token_targets, UnitMasks};
use maskprune_model::output::{write_dir_atomically, write_file_atomically};
use maskprune_model::{weights_sha256, HeadTerms, LayerMask, Llama, TrainKernels, WeightStore};
use maskprune_surgery::{magnitude_scores, Granularity, PrunePlan, Widths};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::adapters::Adapters;
use crate::config::{MaskInit, TrainConfig};
use crate::extract::{Budget, LayerCounts};
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
    /// Mask values at the first update and half-way (`masks-step00000.json`, ...), for plots.
    pub const SNAPSHOTS: &str = "snapshots";
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
    /// The roundings of `s` considered and their held-out loss (the lowest was kept).
    pub rounding: Vec<(Widths, f64)>,
    /// The same for the dense model with the trained adapters (the floor).
    pub loss_dense_with_lora: f64,
    /// Non-uniform runs (`minimax.uniform = false`): units kept in each layer (then `widths`
    /// is the rounded mean and the parameters are those of the masked units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonuniform_kept: Option<Vec<LayerCounts>>,
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

/// What every part of a run shares.
struct Context<'a, B: TrainKernels> {
    model: &'a Llama<B>,
    spec: &'a RunSpec<'a>,
    budget: Budget,
    train_idx: Vec<usize>,
    /// The training windows in the first epoch's order: the teacher runs over consecutive
    /// batches of it (see [`Context::teacher_hidden`]).
    first_epoch: Vec<usize>,
    eval_idx: Vec<usize>,
    source_sha: String,
    /// The dense teacher's final hidden states `[len, hidden]` by calibration window: the
    /// teacher never changes, so each update needs only the LM head on them.
    teacher_hidden: Mutex<HashMap<usize, Tensor<B, 2>>>,
    /// The model's weights outside autodiff, for the teacher.
    teacher: Llama<B::InnerBackend>,
}

/// Where a run stands: the minimax state, the adapters, updates done, seconds spent.
struct Progress {
    state: MinimaxState,
    adapters: Adapters,
    step: u64,
    seconds: f64,
}

/// The losses and gradients of one batch.
struct Gradients {
    distill: f64,
    ntp: Option<f64>,
    masks: [Vec<Vec<f32>>; 2],
    lora: Vec<Vec<f32>>,
}

/// Trains masks, widths and adapters and writes the run directory; `on_step` sees every
/// update (progress bars).
pub fn train<B: TrainKernels>(
    model: &Llama<B>,
    spec: &RunSpec,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<TrainSummary, String> {
    let cfg = spec.config;
    let budget = Budget::new(
        &model.config,
        cfg.budget.granularity,
        cfg.budget.round_to,
        cfg.budget.sparsity,
        cfg.budget.target_params,
    )
    .map_err(|m| err(&spec.model_dir.join("config.json"), m))?;
    let (train_idx, eval_idx) = split_calibration(spec.calibration, cfg)?;
    let store = WeightStore::open(spec.model_dir).map_err(|e| e.to_string())?;
    let cx = Context {
        model,
        spec,
        budget,
        first_epoch: epoch_order(&train_idx, cfg.train.seed, 0),
        train_idx,
        eval_idx,
        source_sha: weights_sha256(&store),
        teacher_hidden: Mutex::new(HashMap::new()),
        teacher: model.inner(),
    };
    let mut run = if spec.resume {
        cx.resume()?
    } else {
        cx.start(&store)?
    };
    let log_path = spec.run_dir.join(files::LOG);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| err(&log_path, format!("cannot open: {e}")))?;
    let mut last_checkpoint = run.step;
    while run.step < cfg.train.steps {
        if run.step == 0 || run.step == cfg.train.steps / 2 {
            cx.snapshot(&run)?;
        }
        let t0 = Instant::now();
        let g = cx.gradients(&run)?;
        for (term, v) in [("distillation", Some(g.distill)), ("next-token", g.ntp)] {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return Err(format!(
                    "{}: step {}: the {term} loss is {v}; training stopped. The last good checkpoint is {} (step {last_checkpoint}); lower the learning rates and continue with --resume",
                    spec.run_dir.display(),
                    run.step + 1,
                    spec.run_dir.join(files::CHECKPOINT).display()
                ));
            }
        }
        let record = cx.apply(&mut run, &g, t0);
        let line = serde_json::to_string(&record).expect("record serialises");
        writeln!(log, "{line}").map_err(|e| err(&log_path, format!("cannot write: {e}")))?;
        on_step(&record);
        if run.step % cfg.train.checkpoint_every == 0 || run.step == cfg.train.steps {
            log.flush()
                .map_err(|e| err(&log_path, format!("cannot write: {e}")))?;
            cx.checkpoint(&run)?;
            last_checkpoint = run.step;
        }
    }
    B::run(|| cx.finish(&run))
}

impl<B: TrainKernels> Context<'_, B> {
    fn cfg(&self) -> &TrainConfig {
        self.spec.config
    }

    /// A fresh run: initial masks, fresh adapters.
    fn start(&self, store: &WeightStore) -> Result<Progress, String> {
        let (c, cfg) = (&self.model.config, self.cfg());
        let init = match cfg.train.mask_init {
            MaskInit::Fisher => self.fisher_init()?,
            _ => initial_masks(store, c, cfg, &self.budget)?,
        };
        Ok(Progress {
            state: MinimaxState::new(init),
            adapters: Adapters::new(c, &cfg.lora, cfg.train.seed),
            step: 0,
            seconds: 0.0,
        })
    }

    /// The run directory's checkpoint, checked against this model; the log is cut back to it.
    fn resume(&self) -> Result<Progress, String> {
        let c = &self.model.config;
        let ckpt_dir = self.spec.run_dir.join(files::CHECKPOINT);
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
        if s.weights_sha256 != self.source_sha {
            return Err(err(
                &ckpt_dir,
                "the checkpoint was trained on different weights (masks from another model?)",
            ));
        }
        let units = [self.budget.kinds[ATTENTION].units, c.intermediate_size];
        if (0..2).any(|t| {
            s.minimax.z[t].len() != c.num_hidden_layers
                || s.minimax.z[t].iter().any(|z| z.len() != units[t])
        }) {
            return Err(err(
                &ckpt_dir,
                "the checkpoint's masks do not fit this model and granularity",
            ));
        }
        let adapters = Adapters::load(&ckpt_dir.join(files::LORA), c, &self.cfg().lora)?;
        truncate_log(&self.spec.run_dir.join(files::LOG), s.step)?;
        Ok(Progress {
            state: s.minimax,
            adapters,
            step: s.step,
            seconds: s.seconds,
        })
    }

    /// The dense teacher's final hidden states `[batch · len, hidden]` for the training
    /// windows `batch`.
    ///
    /// They are computed once per window and kept (75 MB for SmolLM2's 256 windows of 128),
    /// for the first epoch's batches (consecutive `batch` windows of its order): a window's
    /// values never depend on which update first asked for it (a resumed run matches bit
    /// for bit), and each update of the first epoch runs the teacher over its own batch.
    fn teacher_hidden(&self, batch: &[usize]) -> Result<Tensor<B, 2>, String> {
        let b = self.cfg().train.batch;
        let mut cache = self.teacher_hidden.lock().expect("teacher cache");
        for &window in batch {
            if cache.contains_key(&window) {
                continue;
            }
            let pos = self
                .first_epoch
                .iter()
                .position(|&i| i == window)
                .expect("batches hold training windows");
            let start = pos / b * b;
            let chunk = &self.first_epoch[start..(start + b).min(self.first_epoch.len())];
            let rows: Vec<&[u32]> = chunk
                .iter()
                .map(|&i| self.spec.calibration.samples[i].as_slice())
                .collect();
            let hidden = self
                .teacher
                .hidden_states(token_tensor(&rows, &self.teacher.device()), None, None)
                .map_err(|e| e.to_string())?;
            let hidden = Tensor::<B, 3>::from_inner(hidden);
            let [_, len, width] = hidden.dims();
            for (k, &i) in chunk.iter().enumerate() {
                cache.insert(i, hidden.clone().narrow(0, k, 1).reshape([len, width]));
            }
        }
        Ok(Tensor::cat(
            batch.iter().map(|w| cache[w].clone()).collect(),
            0,
        ))
    }

    /// The teacher's hidden states, the masked student with adapters, the loss and its
    /// gradients for the batch of update `run.step`, on the backend's worker pool.
    fn gradients(&self, run: &Progress) -> Result<Gradients, String> {
        B::run(|| self.gradients_here(run))
    }

    fn gradients_here(&self, run: &Progress) -> Result<Gradients, String> {
        let (model, cfg, c) = (self.model, self.cfg(), &self.model.config);
        let device = model.device();
        let batch = batch_rows(&self.train_idx, cfg, run.step);
        let rows: Vec<&[u32]> = batch
            .iter()
            .map(|&i| self.spec.calibration.samples[i].as_slice())
            .collect();
        let tokens = token_tensor::<B>(&rows, &device);
        let teacher = self.teacher_hidden(&batch)?;
        let masks = run.state.masks(&cfg.minimax);
        let unit = UnitMasks::<B>::from_values(
            c,
            cfg.budget.granularity,
            masks[ATTENTION].clone(),
            masks[CHANNELS].clone(),
            &device,
        )
        .require_grad();
        let (lora, lora_flat) =
            run.adapters
                .to_tensors::<B>(c.num_hidden_layers, &device, Tensor::require_grad);
        let student = model
            .hidden_states(tokens, Some(&unit.layer_masks()), Some(&lora))
            .map_err(|e| e.to_string())?;
        let targets = next_token_targets(&rows);
        let loss = model.head_loss(
            student,
            HeadTerms {
                teacher: Some((teacher, cfg.train.temperature)),
                targets: (cfg.train.ntp_weight > 0.0)
                    .then_some((&targets[..], cfg.train.ntp_weight)),
            },
        );
        let ntp = loss.ntp;
        let mut distill = loss.distill.expect("a teacher was given");
        if fault_nan_step() == Some(run.step + 1) {
            distill = f64::NAN;
        }
        let grads = loss.loss.backward();
        let host = |t: Option<Tensor<B::InnerBackend, 1>>, n: usize| -> Vec<f32> {
            t.map(|g| g.into_data().convert::<f32>().to_vec().expect("f32"))
                .unwrap_or_else(|| vec![0.0; n])
        };
        let units = [self.budget.kinds[ATTENTION].units, c.intermediate_size];
        let masks = [
            unit.attention
                .iter()
                .map(|m| host(m.grad(&grads), units[ATTENTION]))
                .collect(),
            unit.channels
                .iter()
                .map(|m| host(m.grad(&grads), units[CHANNELS]))
                .collect(),
        ];
        let lora = lora_flat
            .iter()
            .zip(&run.adapters.matrices)
            .map(|(t, m)| {
                t.grad(&grads)
                    .map(|g| g.into_data().convert::<f32>().to_vec().expect("f32"))
                    .unwrap_or_else(|| vec![0.0; m.value.len()])
            })
            .collect();
        Ok(Gradients {
            distill,
            ntp,
            masks,
            lora,
        })
    }

    /// The minimax and Adam updates; returns the log record.
    fn apply(&self, run: &mut Progress, g: &Gradients, t0: Instant) -> StepRecord {
        let (cfg, budget) = (self.cfg(), &self.budget);
        let scheduled =
            scheduled_target(budget.target_fraction(), run.step, cfg.train.warmup_steps);
        let stats = run.state.update(
            &g.masks,
            &budget.kinds,
            &cfg.minimax,
            scheduled - budget.fixed_share,
        );
        run.adapters.adam_step(&g.lora, cfg.train.lora_lr);
        run.step += 1;
        let dt = t0.elapsed().as_secs_f64();
        run.seconds += dt;
        let y_stats = |t: usize| {
            let y = &run.state.y[t];
            [
                y.iter().sum::<f64>() / y.len().max(1) as f64,
                y.iter().cloned().fold(0.0, f64::max),
            ]
        };
        let dense = budget.dense as f64;
        StepRecord {
            step: run.step,
            steps: cfg.train.steps,
            lagrangian: g.distill
                + g.ntp.map_or(0.0, |v| v * cfg.train.ntp_weight)
                + stats.uniformity_term
                + stats.budget_term,
            distill: g.distill,
            ntp: g.ntp,
            uniformity_term: stats.uniformity_term,
            budget_term: stats.budget_term,
            s_attention: stats.s[ATTENTION],
            s_channels: stats.s[CHANNELS],
            params_s: dense * (stats.params_fraction + budget.fixed_share),
            params_achieved: dense * (stats.achieved_fraction + budget.fixed_share),
            params_target: dense * scheduled,
            params_final_target: budget.target,
            mu: run.state.mu,
            y_attention: y_stats(ATTENTION),
            y_channels: y_stats(CHANNELS),
            kept_attention: stats.kept[ATTENTION].clone(),
            kept_channels: stats.kept[CHANNELS].clone(),
            seconds: dt,
        }
    }

    /// Replaces the checkpoint directory (atomically).
    fn checkpoint(&self, run: &Progress) -> Result<(), String> {
        let ck = CheckpointState {
            step: run.step,
            seconds: run.seconds,
            weights_sha256: self.source_sha.clone(),
            minimax: run.state.clone(),
        };
        write_dir_atomically(&self.spec.run_dir.join(files::CHECKPOINT), true, |d| {
            write_file_atomically(
                &d.join("state.json"),
                serde_json::to_string(&ck)
                    .expect("state serialises")
                    .as_bytes(),
            )?;
            run.adapters
                .save(&d.join(files::LORA), true)
                .map_err(|m| maskprune_model::ModelError::new(d, m))
        })
        .map_err(|e| e.to_string())
    }

    /// Writes the current mask values to `snapshots/masks-stepNNNNN.json`.
    fn snapshot(&self, run: &Progress) -> Result<(), String> {
        let masks = run.state.masks(&self.cfg().minimax);
        let dir = self.spec.run_dir.join(files::SNAPSHOTS);
        std::fs::create_dir_all(&dir).map_err(|e| err(&dir, format!("cannot create: {e}")))?;
        let value = json!({
            "step": run.step,
            "m_attention": masks[ATTENTION],
            "m_channels": masks[CHANNELS],
        });
        let path = dir.join(format!("masks-step{:05}.json", run.step));
        write_file_atomically(&path, &serde_json::to_vec(&value).expect("JSON serialises"))
            .map_err(|e| e.to_string())
    }

    /// Extraction (exactly `round_to(s)` units in every layer, the top ones by |z|), the
    /// extraction gap on the held-out windows, and the final files.
    fn finish(&self, run: &Progress) -> Result<TrainSummary, String> {
        let (model, cfg, c, budget) = (self.model, self.cfg(), &self.model.config, &self.budget);
        let device = model.device();
        let state = &run.state;
        let s = std::array::from_fn(|t| state.width[t] * budget.kinds[t].units as f64);
        let final_masks = state.masks(&cfg.minimax);
        let train_masks = UnitMasks::<B>::from_values(
            c,
            cfg.budget.granularity,
            final_masks[ATTENTION].clone(),
            final_masks[CHANNELS].clone(),
            &device,
        )
        .layer_masks();
        let (lora, _) = run
            .adapters
            .to_tensors::<B>(c.num_hidden_layers, &device, |t| t);
        let eval_rows: Vec<&[u32]> = self
            .eval_idx
            .iter()
            .map(|&i| self.spec.calibration.samples[i].as_slice())
            .collect();
        let held_out = |masks: Option<&[LayerMask<B>]>| -> Result<f64, String> {
            let mut total = 0.0;
            for chunk in eval_rows.chunks(cfg.train.batch) {
                let teacher = self
                    .teacher
                    .hidden_states(token_tensor(chunk, &self.teacher.device()), None, None)
                    .map_err(|e| e.to_string())?;
                let [b, t, h] = teacher.dims();
                let student = model
                    .hidden_states(token_tensor(chunk, &device), masks, Some(&lora))
                    .map_err(|e| e.to_string())?;
                let teacher = Tensor::from_inner(teacher.reshape([b * t, h]));
                let terms = HeadTerms {
                    teacher: Some((teacher, cfg.train.temperature)),
                    targets: None,
                };
                let kl = model.head_loss(student, terms).distill;
                total += kl.expect("a teacher was given") * chunk.len() as f64;
            }
            Ok(total / eval_rows.len() as f64)
        };
        // Rounding s: attention down or up (the MLP filling the budget either way); the
        // rounding with the lower held-out loss is kept.
        let mut candidates = Vec::new();
        let mut nonuniform = Vec::new();
        if cfg.minimax.uniform {
            for widths in budget.candidate_widths(c, s) {
                let plan = budget.extract(c, &state.z, widths, "maskprune");
                let loss = held_out(Some(&plan.masks::<B>(c, &device)))?;
                candidates.push((widths, loss, plan));
            }
        } else {
            for total in budget.nonuniform_candidates(c.num_hidden_layers, s) {
                let (plan, counts, params) = budget.extract_nonuniform(c, &state.z, total);
                let loss = held_out(Some(&plan.masks::<B>(c, &device)))?;
                candidates.push((mean_widths(c, &plan), loss, plan));
                nonuniform.push((counts, params));
            }
        }
        let best = candidates
            .iter()
            .enumerate()
            .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
            .map(|(i, _)| i)
            .expect("at least one candidate");
        let rounding: Vec<(Widths, f64)> = candidates.iter().map(|(w, l, _)| (*w, *l)).collect();
        let (widths, loss_after, plan) = candidates.swap_remove(best);
        let (nonuniform_kept, decoder_linear_after) = if nonuniform.is_empty() {
            (None, maskprune_surgery::decoder_linear_params(c, widths))
        } else {
            let (counts, params) = nonuniform.swap_remove(best);
            (Some(counts), params)
        };
        let summary = TrainSummary {
            steps: run.step,
            train_seconds: run.seconds,
            granularity: cfg.budget.granularity,
            widths,
            s,
            decoder_linear: [budget.dense, decoder_linear_after, budget.target],
            total_params: [
                c.total_params(),
                c.total_params() - (budget.dense - decoder_linear_after),
            ],
            loss_before_extraction: held_out(Some(&train_masks))?,
            loss_after_extraction: loss_after,
            rounding,
            loss_dense_with_lora: held_out(None)?,
            nonuniform_kept,
        };
        write_outputs(
            self.spec.run_dir,
            state,
            &final_masks,
            &run.adapters,
            &plan,
            &summary,
            budget,
        )?;
        Ok(summary)
    }

    /// Initial `z` from the Fisher information of the masks: `sqrt(Σ_batches (∂NTP/∂b)²)`
    /// at the dense model, over `init_batches` training batches, divided by the layer's mean.
    fn fisher_init(&self) -> Result<[Vec<Vec<f32>>; 2], String> {
        let (model, cfg, c) = (self.model, self.cfg(), &self.model.config);
        let device = model.device();
        let units = [self.budget.kinds[ATTENTION].units, c.intermediate_size];
        let mut acc: [Vec<Vec<f64>>; 2] =
            std::array::from_fn(|t| vec![vec![0.0; units[t]]; c.num_hidden_layers]);
        for k in 0..cfg.train.init_batches.max(1) {
            let batch = batch_rows(&self.train_idx, cfg, k);
            let rows: Vec<&[u32]> = batch
                .iter()
                .map(|&i| self.spec.calibration.samples[i].as_slice())
                .collect();
            let tokens = token_tensor::<B>(&rows, &device);
            let ones = UnitMasks::<B>::ones(c, cfg.budget.granularity, &device).require_grad();
            let targets = next_token_targets(&rows);
            let grads = B::run(|| {
                let hidden = model.hidden_states(tokens, Some(&ones.layer_masks()), None)?;
                let terms = HeadTerms {
                    teacher: None,
                    targets: Some((&targets[..], 1.0)),
                };
                Ok::<_, maskprune_model::ModelError>(model.head_loss(hidden, terms).loss.backward())
            })
            .map_err(|e| e.to_string())?;
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
}

/// The per-layer mean widths of a (non-uniform) plan, rounded.
fn mean_widths(c: &maskprune_model::ModelConfig, plan: &PrunePlan) -> Widths {
    let n = c.num_hidden_layers.max(1) as f64;
    let mean = |f: fn(&maskprune_surgery::LayerPlan) -> usize| {
        (plan.layers.iter().map(f).sum::<usize>() as f64 / n).round() as usize
    };
    Widths {
        query_heads: mean(|l| l.query_heads.len()),
        kv_heads: mean(|l| l.kv_heads.len()),
        channels: mean(|l| l.channels.len()),
    }
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

/// Test hook: `MASKPRUNE_FAULT_NAN_STEP=k` makes the distillation loss of update `k` NaN, to
/// check that a diverging run stops cleanly and resumes from its last good checkpoint.
fn fault_nan_step() -> Option<u64> {
    std::env::var("MASKPRUNE_FAULT_NAN_STEP").ok()?.parse().ok()
}

/// Initial `z` without the model: ones, or each unit's weight norm divided by its layer's mean.
fn initial_masks(
    store: &WeightStore,
    c: &maskprune_model::ModelConfig,
    cfg: &TrainConfig,
    budget: &Budget,
) -> Result<[Vec<Vec<f32>>; 2], String> {
    let layers = c.num_hidden_layers;
    let units = [budget.kinds[ATTENTION].units, c.intermediate_size];
    if cfg.train.mask_init == MaskInit::Ones {
        return Ok(std::array::from_fn(|t| vec![vec![1.0; units[t]]; layers]));
    }
    let scores = magnitude_scores(store, c).map_err(|e| e.to_string())?;
    let attention = scores
        .iter()
        .map(|s| match budget.granularity {
            Granularity::KvGroup => s.kv_groups.clone(),
            Granularity::QueryHead => s.query_heads.clone(),
        })
        .collect();
    let channels = scores.iter().map(|s| s.channels.clone()).collect();
    Ok([normalise_layers(attention), normalise_layers(channels)])
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
    let mut shuffled: Option<(usize, Vec<usize>)> = None;
    (0..b)
        .map(|k| {
            let pos = step as usize * b + k;
            let (epoch, i) = (pos / n, pos % n);
            // A batch spans at most two epochs: shuffle once per epoch, not once per window.
            if shuffled.as_ref().is_none_or(|(e, _)| *e != epoch) {
                shuffled = Some((epoch, epoch_order(train, cfg.train.seed, epoch)));
            }
            shuffled.as_ref().expect("just set").1[i]
        })
        .collect()
}

/// The training windows in the seeded order of `epoch` (Fisher-Yates).
fn epoch_order(train: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = train.to_vec();
    let mut rng = SplitMix64(seed.wrapping_add(0x5EED_0000 + epoch as u64));
    for j in (1..order.len()).rev() {
        order.swap(j, rng.below(j + 1));
    }
    order
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
