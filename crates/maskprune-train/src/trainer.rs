//! The training loop: per update, the dense teacher's logits, the masked student with LoRA,
//! the distillation loss and its gradients, then the host-side minimax and Adam updates.
//! Writes the run directory (see [`files`]) and resumes from its checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use burn::tensor::{ElementConversion, Tensor};
use maskprune_baselines::magnitude_scores;
use maskprune_data::CalibrationSet;
use maskprune_eval::perplexity::token_tensor;
use maskprune_mask::{next_token_targets, UnitMasks};
use maskprune_model::output::write_file_atomically;
use maskprune_model::Extras;
use maskprune_model::{
    weights_sha256, HeadTerms, LayerMask, Llama, Site, TrainKernels, WeightStore,
};
use maskprune_surgery::{Granularity, PrunePlan, Widths};
use serde::{Deserialize, Serialize};

use maskprune_baselines::{activation_scores, Method};
use maskprune_model::Kernels;
use maskprune_records::{run::OverLayers, LayerCounts, MaskSnapshot, MaskState};

use crate::config::{MaskInit, TrainConfig};
use crate::extract::Budget;
use crate::minimax::{
    kept_counts, scheduled_target, Committed, MinimaxState, UpdateStats, ATTENTION, CHANNELS,
};
use crate::nodes::NodeLink;
use crate::parallel::{Membership, Peers};
use crate::run::{
    batch_rows, epoch_order, err, open_log, read_checkpoint, split_calibration, truncate_log,
    write_checkpoint, Checkpoint, Provenance,
};
use maskprune_model::lora::Adapters;

pub use maskprune_records::run::files;

pub use maskprune_records::{StepRecord, TrainSummary};

/// What a checkpoint holds besides the adapters.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    seconds: f64,
    provenance: Provenance,
    minimax: MinimaxState,
}

impl Checkpoint for CheckpointState {
    fn provenance(&self) -> &Provenance {
        &self.provenance
    }
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

/// What every part of a run shares.
struct Context<'a, B: TrainKernels> {
    /// The first device's model: initialisation, the teacher, extraction.
    model: &'a Llama<B>,
    /// The model on each device (one peer each).
    replicas: &'a [Llama<B>],
    /// How batches are split over devices.
    peers: &'a Peers,
    /// The peers' registration with the collective, for a data-parallel run.
    membership: Option<Membership<B::InnerBackend>>,
    /// The other processes, for a run over several nodes.
    link: Option<Mutex<NodeLink>>,
    spec: &'a RunSpec<'a>,
    budget: Budget,
    train_idx: Vec<usize>,
    /// The training windows in the first epoch's order: the teacher runs over consecutive
    /// batches of it (see [`Context::teacher_hidden`]).
    first_epoch: Vec<usize>,
    eval_idx: Vec<usize>,
    /// The fingerprints of the model, configuration and calibration windows.
    provenance: Provenance,
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

/// A plan extracted at integer widths.
struct Extraction {
    /// The widths it was extracted at.
    choice: Committed,
    /// Per-layer widths (the rounded mean for a non-uniform plan).
    widths: Widths,
    plan: PrunePlan,
    /// A non-uniform plan's per-layer counts and decoder-layer linear parameters.
    nonuniform: Option<(Vec<LayerCounts>, usize)>,
}

/// The losses and gradients of one batch.
struct Gradients {
    distill: f64,
    ntp: Option<f64>,
    hidden: Option<f64>,
    masks: [Vec<Vec<f32>>; 2],
    lora: Vec<Vec<f32>>,
}

impl Gradients {
    /// How many values [`Gradients::flatten`] gives: three losses, every mask, every LoRA
    /// matrix.
    fn flat_len(c: &maskprune_model::ModelConfig, budget: &Budget, adapters: &Adapters) -> usize {
        let units = budget.kinds[ATTENTION].units + c.intermediate_size;
        let lora: usize = adapters.matrices.iter().map(|m| m.value.len()).sum();
        3 + c.num_hidden_layers * units + lora
    }

    /// Losses and gradients in one vector, each times `scale` (a peer's share of the batch).
    fn flatten(&self, scale: f32) -> Vec<f32> {
        let losses = [
            self.distill,
            self.ntp.unwrap_or(0.0),
            self.hidden.unwrap_or(0.0),
        ];
        losses
            .iter()
            .map(|&v| v as f32)
            .chain(self.masks.iter().flatten().flatten().copied())
            .chain(self.lora.iter().flatten().copied())
            .map(|v| v * scale)
            .collect()
    }

    /// What a peer or node contributes to a sum: its values times `scale`, or `len` NaNs when
    /// it failed — the others still wait for its share, and the NaN loss stops them all.
    fn share(own: &Result<Gradients, String>, scale: f32, len: usize) -> Vec<f32> {
        match own {
            Ok(g) => g.flatten(scale),
            Err(_) => vec![f32::NAN; len],
        }
    }

    /// This batch's layout filled with `flat`'s values (as [`Gradients::flatten`] lays them out).
    fn unflatten(&self, flat: &[f32]) -> Gradients {
        let mut values = flat.iter().copied();
        let mut take = |n: usize| -> Vec<f32> { values.by_ref().take(n).collect() };
        let losses = take(3);
        let present = |o: Option<f64>, v: f32| o.map(|_| v as f64);
        Gradients {
            distill: losses[0] as f64,
            ntp: present(self.ntp, losses[1]),
            hidden: present(self.hidden, losses[2]),
            masks: std::array::from_fn(|t| self.masks[t].iter().map(|l| take(l.len())).collect()),
            lora: self.lora.iter().map(|m| take(m.len())).collect(),
        }
    }
}

/// Trains masks, widths and adapters and writes the run directory; `on_step` sees every
/// update (progress bars).
pub fn train<B: TrainKernels>(
    model: &Llama<B>,
    spec: &RunSpec,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<TrainSummary, String> {
    train_parallel(std::slice::from_ref(model), &Peers::single(), spec, on_step)
}

/// [`train`] with every batch split over `peers`: `replicas` holds the model on each device
/// (see [`crate::parallel`]).
pub fn train_parallel<B: TrainKernels>(
    replicas: &[Llama<B>],
    peers: &Peers,
    spec: &RunSpec,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<TrainSummary, String> {
    let cfg = spec.config;
    peers
        .check(cfg.train.batch)
        .map_err(|m| format!("{}: {m}", spec.run_dir.display()))?;
    if replicas.len() != peers.devices {
        return Err(format!(
            "{} models for {} devices: one per device",
            replicas.len(),
            peers.devices
        ));
    }
    let model = &replicas[0];
    let budget = Budget::new(
        &model.config,
        cfg.budget.granularity,
        cfg.budget.round_to,
        cfg.budget.sparsity,
        cfg.budget.target_params,
    )
    .map_err(|m| err(&spec.model_dir.join("config.json"), m))?;
    let (train_idx, eval_idx) =
        split_calibration(spec.calibration, cfg.train.batch, cfg.train.eval_samples)?;
    let store = WeightStore::open(spec.model_dir).map_err(|e| e.to_string())?;
    let membership = if peers.is_parallel() {
        let devices: Vec<_> = replicas.iter().map(|m| m.device()).collect();
        Some(peers.join::<B::InnerBackend>(&devices)?)
    } else {
        None
    };
    let mut cx = Context {
        model,
        replicas,
        peers,
        membership,
        link: None,
        spec,
        budget,
        first_epoch: epoch_order(&train_idx, cfg.train.seed, 0),
        train_idx,
        eval_idx,
        provenance: Provenance::new(weights_sha256(&store), cfg, spec.calibration, None),
        teacher_hidden: Mutex::new(HashMap::new()),
        teacher: model.inner(),
    };
    let mut run = if spec.resume {
        cx.resume()?
    } else {
        cx.start(&store)?
    };
    if peers.nodes.count > 1 {
        let link = peers.nodes.join(&cx.provenance.fingerprint(), run.step)?;
        cx.link = Some(Mutex::new(link));
    }
    let log_path = spec.run_dir.join(files::LOG);
    let mut log = open_log(&log_path)?;
    let mut last_checkpoint = run.step;
    while run.step < cfg.train.steps {
        if run.step == 0 || run.step == cfg.train.steps / 2 {
            cx.snapshot(&run)?;
        }
        let commit_from = cfg.train.steps - cfg.train.commit_steps;
        if cfg.train.commit_steps > 0 && run.step >= commit_from && run.state.committed.is_none() {
            let (best, _, _) = B::run(|| cx.best_extraction(&run))?;
            run.state.committed = Some(best.choice);
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
            MaskInit::Flap => self.activation_init(store, Method::Flap)?,
            MaskInit::WandaSp => self.activation_init(store, Method::WandaSp)?,
            MaskInit::Ones | MaskInit::Magnitude => initial_masks(store, c, cfg, &self.budget)?,
        };
        Ok(Progress {
            state: MinimaxState::new(init),
            adapters: Adapters::new(c, &cfg.lora, cfg.train.seed),
            step: 0,
            seconds: 0.0,
        })
    }

    /// The run directory's checkpoint, checked against this run's inputs; the log is cut
    /// back to it.
    fn resume(&self) -> Result<Progress, String> {
        let c = &self.model.config;
        let ckpt_dir = self.spec.run_dir.join(files::CHECKPOINT);
        let (s, adapters): (CheckpointState, Adapters) =
            read_checkpoint(&ckpt_dir, &self.provenance, c, &self.cfg().lora)?;
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
                .hidden_states(token_tensor(&rows, &self.teacher.device()), Extras::none())
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
    /// gradients for the batch of update `run.step`, on the backend's worker pool; for a
    /// data-parallel run, each peer's shard on its own device, summed over the peers, and
    /// over the nodes for a run of several processes.
    fn gradients(&self, run: &Progress) -> Result<Gradients, String> {
        let cfg = self.cfg();
        let batch = batch_rows(&self.train_idx, cfg.train.batch, cfg.train.seed, run.step);
        let len = Gradients::flat_len(&self.model.config, &self.budget, &run.adapters);
        let shards = self.peers.shards(&batch);
        let own = match &self.membership {
            None => B::run(|| self.gradients_here(self.model, shards[0].1, run)),
            Some(membership) => self.gradients_of_devices(membership, shards, len, run),
        };
        let Some(link) = &self.link else {
            return own;
        };
        // This node's share, summed with the other nodes'.
        let scale = if self.peers.is_parallel() {
            1.0 // the devices' sum is already scaled
        } else {
            self.peers.scale()
        };
        let values = Gradients::share(&own, scale, len);
        let summed = link.lock().expect("node link").sum(values)?;
        own.map(|g| g.unflatten(&summed))
    }

    /// This process's shards, one per device, each peer on its own thread, summed by
    /// burn-collective's all-reduce.
    fn gradients_of_devices(
        &self,
        membership: &Membership<B::InnerBackend>,
        shards: Vec<(usize, &[usize])>,
        len: usize,
        run: &Progress,
    ) -> Result<Gradients, String> {
        let scale = self.peers.scale();
        let results: Vec<Result<Gradients, String>> = std::thread::scope(|s| {
            let peers: Vec<_> = self
                .replicas
                .iter()
                .zip(shards)
                .map(|(model, (id, rows))| {
                    s.spawn(move || {
                        // The pool serves one caller at a time: leave it before the
                        // all-reduce, which waits for the other peers' shards.
                        let own = B::run(|| self.gradients_here(model, rows, run));
                        let values = Gradients::share(&own, scale, len);
                        let summed = membership.sum(id, values, &model.device())?;
                        own.map(|g| g.unflatten(&summed))
                    })
                })
                .collect();
            peers
                .into_iter()
                .map(|p| p.join().expect("peer thread"))
                .collect()
        });
        results
            .into_iter()
            .reduce(|a, b| a.and(b))
            .expect("at least one peer")
    }

    fn gradients_here(
        &self,
        model: &Llama<B>,
        batch: &[usize],
        run: &Progress,
    ) -> Result<Gradients, String> {
        let (cfg, c) = (self.cfg(), &self.model.config);
        let device = model.device();
        let rows: Vec<&[u32]> = batch
            .iter()
            .map(|&i| self.spec.calibration.samples[i].as_slice())
            .collect();
        let tokens = token_tensor::<B>(&rows, &device);
        let teacher = self.teacher_hidden(batch)?.to_device(&device);
        let unit = self
            .unit_masks(self.masks(&run.state), &device)
            .require_grad();
        let (lora, lora_flat) =
            run.adapters
                .to_tensors::<B>(c.num_hidden_layers, &device, Tensor::require_grad);
        let layer_masks = unit.layer_masks();
        let (student, hidden) = if cfg.train.hidden_distill_weight > 0.0 {
            let (student, term) = self.layer_distillation(model, &rows, &layer_masks, &lora)?;
            (student, Some(term))
        } else {
            let student = model
                .hidden_states(
                    tokens,
                    Extras {
                        masks: Some(&layer_masks),
                        lora: Some(&lora),
                    },
                )
                .map_err(|e| e.to_string())?;
            (student, None)
        };
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
        let (total, hidden) = match hidden {
            Some(term) => {
                let value: f64 = term.clone().into_scalar().elem();
                let w = cfg.train.hidden_distill_weight;
                (loss.loss + term.mul_scalar(w), Some(value))
            }
            None => (loss.loss, None),
        };
        let grads = total.backward();
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
            hidden,
            masks,
            lora,
        })
    }

    /// The student's final hidden states for `rows` and the layer-wise distillation term:
    /// the mean over layers of `mean((s_l − t_l)²) / mean(t_l²)`, `s_l` and `t_l` the
    /// student's and the dense teacher's outputs of layer `l` (the teacher's computed here,
    /// every update: 35 MB per batch of SmolLM2, too much to keep per window).
    fn layer_distillation(
        &self,
        model: &Llama<B>,
        rows: &[&[u32]],
        masks: &[LayerMask<B>],
        lora: &[maskprune_model::LayerLora<B>],
    ) -> Result<(Tensor<B, 3>, Tensor<B, 1>), String> {
        let mut teacher = Vec::new();
        self.teacher
            .hidden_states_observed(
                token_tensor(rows, &self.teacher.device()),
                Extras::none(),
                &mut layer_outputs(&mut teacher),
            )
            .map_err(|e| e.to_string())?;
        let mut student = Vec::new();
        let last = model
            .hidden_states_observed(
                token_tensor(rows, &model.device()),
                Extras {
                    masks: Some(masks),
                    lora: Some(lora),
                },
                &mut layer_outputs(&mut student),
            )
            .map_err(|e| e.to_string())?;
        let layers = student.len() as f64;
        let term = student
            .into_iter()
            .zip(teacher)
            .map(|(s, t)| {
                let t = Tensor::<B, 3>::from_inner(t).to_device(&model.device());
                let scale: f64 = t.clone().square().mean().into_scalar().elem();
                let error: Tensor<B, 1> = (s - t).square().mean();
                error.div_scalar(scale.max(f64::MIN_POSITIVE))
            })
            .reduce(|a, b| a + b)
            .expect("at least one layer")
            .div_scalar(layers);
        Ok((last, term))
    }

    /// The minimax and Adam updates; returns the log record.
    fn apply(&self, run: &mut Progress, g: &Gradients, t0: Instant) -> StepRecord {
        let (cfg, budget) = (self.cfg(), &self.budget);
        let scheduled =
            scheduled_target(budget.target_fraction(), run.step, cfg.train.warmup_steps);
        let stats = match run.state.committed {
            None => run.state.update(
                &g.masks,
                &budget.kinds,
                &cfg.minimax,
                scheduled - budget.fixed_share,
            ),
            Some(_) => {
                run.state.step_masks(&g.masks, &cfg.minimax);
                UpdateStats::committed(kept_counts(&self.masks(&run.state)), &budget.kinds)
            }
        };
        run.adapters.adam_step(&g.lora, cfg.train.lora_lr);
        run.step += 1;
        let dt = t0.elapsed().as_secs_f64();
        run.seconds += dt;
        let dense = budget.dense as f64;
        StepRecord {
            step: run.step,
            steps: cfg.train.steps,
            lagrangian: g.distill
                + g.ntp.map_or(0.0, |v| v * cfg.train.ntp_weight)
                + g.hidden
                    .map_or(0.0, |v| v * cfg.train.hidden_distill_weight)
                + stats.uniformity_term
                + stats.budget_term,
            distill: g.distill,
            ntp: g.ntp,
            hidden: g.hidden,
            uniformity_term: stats.uniformity_term,
            budget_term: stats.budget_term,
            s_attention: stats.s[ATTENTION],
            s_channels: stats.s[CHANNELS],
            params_s: dense * (stats.params_fraction + budget.fixed_share),
            params_achieved: dense * (stats.achieved_fraction + budget.fixed_share),
            params_target: dense * scheduled,
            params_final_target: budget.target,
            mu: run.state.mu,
            y_attention: OverLayers::of(&run.state.y[ATTENTION]),
            y_channels: OverLayers::of(&run.state.y[CHANNELS]),
            kept_attention: stats.kept[ATTENTION].clone(),
            kept_channels: stats.kept[CHANNELS].clone(),
            seconds: dt,
        }
    }

    /// Replaces the checkpoint directory (atomically).
    fn checkpoint(&self, run: &Progress) -> Result<(), String> {
        let state = CheckpointState {
            step: run.step,
            seconds: run.seconds,
            provenance: self.provenance.clone(),
            minimax: run.state.clone(),
        };
        let dir = self.spec.run_dir.join(files::CHECKPOINT);
        write_checkpoint(&dir, run.step, &state, &run.adapters)
    }

    /// Writes the current mask values to `snapshots/masks-stepNNNNN.json`.
    fn snapshot(&self, run: &Progress) -> Result<(), String> {
        let masks = self.masks(&run.state);
        let dir = self.spec.run_dir.join(files::SNAPSHOTS);
        std::fs::create_dir_all(&dir).map_err(|e| err(&dir, format!("cannot create: {e}")))?;
        let [m_attention, m_channels] = masks;
        let value = MaskSnapshot {
            step: run.step,
            m_attention,
            m_channels,
        };
        let path = dir.join(format!("masks-step{:05}.json", run.step));
        write_file_atomically(&path, &serde_json::to_vec(&value).expect("JSON serialises"))
            .map_err(|e| e.to_string())
    }

    /// The distillation loss on the held-out calibration windows with the run's adapters,
    /// under `masks` (none: the dense model with the adapters).
    fn held_out_loss(
        &self,
        adapters: &Adapters,
        masks: Option<&[LayerMask<B>]>,
    ) -> Result<f64, String> {
        let (cfg, c) = (self.cfg(), &self.model.config);
        let device = self.model.device();
        let (lora, _) = adapters.to_tensors::<B>(c.num_hidden_layers, &device, |t| t);
        let eval_rows: Vec<&[u32]> = self
            .eval_idx
            .iter()
            .map(|&i| self.spec.calibration.samples[i].as_slice())
            .collect();
        let mut total = 0.0;
        for chunk in eval_rows.chunks(cfg.train.batch) {
            let teacher = self
                .teacher
                .hidden_states(token_tensor(chunk, &self.teacher.device()), Extras::none())
                .map_err(|e| e.to_string())?;
            let [b, t, h] = teacher.dims();
            let student = self
                .model
                .hidden_states(
                    token_tensor(chunk, &device),
                    Extras {
                        masks,
                        lora: Some(&lora),
                    },
                )
                .map_err(|e| e.to_string())?;
            let teacher = Tensor::from_inner(teacher.reshape([b * t, h]));
            let terms = HeadTerms {
                teacher: Some((teacher, cfg.train.temperature)),
                targets: None,
            };
            let kl = self.model.head_loss(student, terms).distill;
            total += kl.expect("a teacher was given") * chunk.len() as f64;
        }
        Ok(total / eval_rows.len() as f64)
    }

    /// The integer widths the continuous `s` can round to: uniform, attention down or up
    /// with the MLP filling the budget; non-uniform, the attention total down or up.
    fn roundings(&self, state: &MinimaxState) -> Vec<Committed> {
        let (c, budget) = (&self.model.config, &self.budget);
        let s = std::array::from_fn(|t| state.width[t] * budget.kinds[t].units as f64);
        if self.cfg().minimax.uniform {
            budget
                .candidate_widths(c, s)
                .into_iter()
                .map(Committed::Uniform)
                .collect()
        } else {
            budget
                .nonuniform_candidates(c.num_hidden_layers, s)
                .into_iter()
                .map(|attention_total| Committed::Nonuniform { attention_total })
                .collect()
        }
    }

    /// The plan `choice` extracts from the accumulators `z`.
    fn extraction(&self, z: &[Vec<Vec<f32>>; 2], choice: Committed) -> Extraction {
        let c = &self.model.config;
        match choice {
            Committed::Uniform(widths) => Extraction {
                choice,
                widths,
                plan: self.budget.extract(c, z, widths, "maskprune"),
                nonuniform: None,
            },
            Committed::Nonuniform { attention_total } => {
                let (plan, counts, params) = self.budget.extract_nonuniform(c, z, attention_total);
                Extraction {
                    choice,
                    widths: mean_widths(c, &plan),
                    plan,
                    nonuniform: Some((counts, params)),
                }
            }
        }
    }

    /// The extraction with the lowest held-out loss among the roundings of `s` (the
    /// committed one alone once committed), its loss, and every rounding's loss.
    #[allow(clippy::type_complexity)]
    fn best_extraction(
        &self,
        run: &Progress,
    ) -> Result<(Extraction, f64, Vec<(Widths, f64)>), String> {
        let (c, device) = (&self.model.config, self.model.device());
        let choices = match run.state.committed {
            Some(choice) => vec![choice],
            None => self.roundings(&run.state),
        };
        let mut scored = Vec::new();
        for choice in choices {
            let e = self.extraction(&run.state.z, choice);
            let loss = self.held_out_loss(&run.adapters, Some(&e.plan.masks::<B>(c, &device)))?;
            scored.push((e, loss));
        }
        let rounding = scored.iter().map(|(e, l)| (e.widths, *l)).collect();
        let best = scored
            .iter()
            .enumerate()
            .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
            .map(|(i, _)| i)
            .expect("at least one rounding");
        let (e, loss) = scored.swap_remove(best);
        Ok((e, loss, rounding))
    }

    /// The masks of `state`: the thresholded `z`, or once committed, `z` on exactly the
    /// units the committed extraction keeps.
    fn masks(&self, state: &MinimaxState) -> [Vec<Vec<f32>>; 2] {
        let Some(choice) = state.committed else {
            return state.masks(&self.cfg().minimax);
        };
        let plan = self.extraction(&state.z, choice).plan;
        let granularity = self.budget.granularity;
        std::array::from_fn(|t| {
            state.z[t]
                .iter()
                .zip(&plan.layers)
                .map(|(z, layer)| {
                    let kept = match (t, granularity) {
                        (CHANNELS, _) => &layer.channels,
                        (_, Granularity::KvGroup) => &layer.kv_heads,
                        (_, Granularity::QueryHead) => &layer.query_heads,
                    };
                    let mut m = vec![0.0f32; z.len()];
                    for &i in kept {
                        // A kept unit's mask must be non-zero to count as kept.
                        m[i] = if z[i] == 0.0 { f32::MIN_POSITIVE } else { z[i] };
                    }
                    m
                })
                .collect()
        })
    }

    /// Mask values (as [`Context::masks`] gives them) as the model's unit masks on `device`.
    fn unit_masks(&self, masks: [Vec<Vec<f32>>; 2], device: &B::Device) -> UnitMasks<B> {
        let [attention, channels] = masks;
        UnitMasks::from_values(
            &self.model.config,
            self.budget.granularity,
            attention,
            channels,
            device,
        )
    }

    /// Extraction (exactly `round_to(s)` units in every layer, the top ones by |z|; or the
    /// committed widths), the extraction gap on the held-out windows, and the final files.
    fn finish(&self, run: &Progress) -> Result<TrainSummary, String> {
        let (cfg, c, budget) = (self.cfg(), &self.model.config, &self.budget);
        let device = self.model.device();
        let state = &run.state;
        let s = std::array::from_fn(|t| state.width[t] * budget.kinds[t].units as f64);
        let final_masks = self.masks(state);
        let train_masks = self.unit_masks(final_masks.clone(), &device).layer_masks();
        let (best, loss_after, rounding) = self.best_extraction(run)?;
        let Extraction {
            widths,
            plan,
            nonuniform,
            ..
        } = best;
        let (nonuniform_kept, decoder_linear_after) = match nonuniform {
            None => (None, maskprune_surgery::decoder_linear_params(c, widths)),
            Some((counts, params)) => (Some(counts), params),
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
            loss_before_extraction: self.held_out_loss(&run.adapters, Some(&train_masks))?,
            loss_after_extraction: loss_after,
            rounding,
            loss_dense_with_lora: self.held_out_loss(&run.adapters, None)?,
            nonuniform_kept,
            committed_steps: if state.committed.is_some() {
                cfg.train.commit_steps
            } else {
                0
            },
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

    /// Initial `z` from a one-shot method's activation-aware unit scores over `init_batches`
    /// training batches (run by the frozen teacher): FLAP's through a square root (a
    /// squared quantity, to the scale of the others), Wanda-SP's as they are; each layer
    /// divided by its mean.
    fn activation_init(
        &self,
        store: &WeightStore,
        method: Method,
    ) -> Result<[Vec<Vec<f32>>; 2], String> {
        let cfg = self.cfg();
        let windows: Vec<Vec<u32>> = (0..cfg.train.init_batches.max(1))
            .flat_map(|k| batch_rows(&self.train_idx, cfg.train.batch, cfg.train.seed, k))
            .map(|i| self.spec.calibration.samples[i].clone())
            .collect();
        let scores = B::InnerBackend::run(|| {
            activation_scores(
                method,
                &self.teacher,
                store,
                &windows,
                cfg.train.batch,
                &mut || {},
            )
        })
        .map_err(|e| e.to_string())?;
        let shape = |x: f64| if method == Method::Flap { x.sqrt() } else { x };
        let pick = |kind: usize| -> Vec<Vec<f64>> {
            scores
                .iter()
                .map(|s| {
                    let unit = match (kind, self.budget.granularity) {
                        (CHANNELS, _) => &s.channels,
                        (_, Granularity::KvGroup) => &s.kv_groups,
                        (_, Granularity::QueryHead) => &s.query_heads,
                    };
                    unit.iter().map(|&x| shape(x)).collect()
                })
                .collect()
        };
        Ok([
            normalise_layers(pick(ATTENTION)),
            normalise_layers(pick(CHANNELS)),
        ])
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
            let batch = batch_rows(&self.train_idx, cfg.train.batch, cfg.train.seed, k);
            let rows: Vec<&[u32]> = batch
                .iter()
                .map(|&i| self.spec.calibration.samples[i].as_slice())
                .collect();
            let tokens = token_tensor::<B>(&rows, &device);
            let ones = UnitMasks::<B>::ones(c, cfg.budget.granularity, &device).require_grad();
            let targets = next_token_targets(&rows);
            let grads = B::run(|| {
                let hidden = model.hidden_states(tokens, Extras::masks(&ones.layer_masks()))?;
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

/// An observer keeping every layer's output.
fn layer_outputs<Bk: burn::tensor::backend::Backend>(
    keep: &mut Vec<Tensor<Bk, 3>>,
) -> impl FnMut(usize, Site, &Tensor<Bk, 3>) + '_ {
    |_, site, x| {
        if site == Site::LayerOutput {
            keep.push(x.clone());
        }
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
    let masks_json = MaskState {
        granularity: budget.granularity,
        attention_units: budget.kinds[ATTENTION].units,
        s: summary.s,
        width_fraction: state.width,
        mu: state.mu,
        y_attention: state.y[ATTENTION].clone(),
        y_channels: state.y[CHANNELS].clone(),
        z_attention: state.z[ATTENTION].clone(),
        z_channels: state.z[CHANNELS].clone(),
        m_attention: masks[ATTENTION].clone(),
        m_channels: masks[CHANNELS].clone(),
    };
    write_file_atomically(
        &run.join(files::MASKS),
        &serde_json::to_vec_pretty(&masks_json).expect("masks serialise"),
    )
    .map_err(|e| e.to_string())?;
    adapters.save(&run.join(files::LORA), false)?;
    plan.write(&run.join(files::PLAN))?;
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
