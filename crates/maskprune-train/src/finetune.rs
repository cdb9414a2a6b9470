//! Recovery fine-tuning: LoRA adapters trained on a pruned checkpoint with the next-token
//! loss, plus distillation from the dense teacher when one is given, then merged into the
//! weights (by `maskprune_surgery::merge_adapters`). The run directory works as mask
//! training's: `config.toml`, `calibration.json`, `log.jsonl`, `checkpoint/` replaced
//! atomically every `checkpoint_every` updates (exact resume), `lora.safetensors`,
//! `summary.json`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use burn::tensor::Tensor;
use maskprune_data::CalibrationSet;
use maskprune_eval::perplexity::token_tensor;
use maskprune_mask::next_token_targets;
use maskprune_model::output::write_file_atomically;
use maskprune_model::Extras;
use maskprune_model::{weights_sha256, HeadTerms, LayerLora, Llama, TrainKernels, WeightStore};
use serde::{Deserialize, Serialize};

use crate::config::{lora_targets, CalibrationConfig, ConfigFile, LoraSettings};
use crate::run::{
    batch_rows, err, open_log, read_checkpoint, split_calibration, truncate_log, write_checkpoint,
    Checkpoint, Provenance,
};
use crate::trainer::files;
use maskprune_model::lora::Adapters;

/// A recovery configuration (`--config` TOML, `--set section.key=value` overrides).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// The training text: by default every calibration token of C4 once, in windows of 256.
    #[serde(default = "default_data")]
    pub data: CalibrationConfig,
    /// The loop.
    #[serde(default)]
    pub train: FinetuneSettings,
    /// The adapters: by default rank 8 on every projection (LLM-Pruner's recovery).
    #[serde(default = "default_lora")]
    pub lora: LoraSettings,
}

fn default_data() -> CalibrationConfig {
    CalibrationConfig {
        samples: 0,
        seq_len: 256,
        packed: true,
        ..CalibrationConfig::default()
    }
}

fn default_lora() -> LoraSettings {
    LoraSettings {
        targets: lora_targets().map(String::from).to_vec(),
        ..LoraSettings::default()
    }
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            data: default_data(),
            train: FinetuneSettings::default(),
            lora: default_lora(),
        }
    }
}

/// The recovery loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneSettings {
    /// Updates in all.
    pub steps: u64,
    /// Windows per update.
    pub batch: usize,
    /// Adam learning rate of the adapters.
    pub lr: f64,
    /// Weight of the next-token loss; with a teacher, `T² · KL(teacher ‖ student)` is added
    /// with weight 1.
    pub ntp_weight: f64,
    /// Distillation temperature.
    pub temperature: f64,
    /// Write a checkpoint every this many updates (and at the end).
    pub checkpoint_every: u64,
    /// Windows held out to measure the recovery.
    pub eval_samples: usize,
    /// Seed of the batch order and the adapters' initialisation.
    pub seed: u64,
}

impl Default for FinetuneSettings {
    fn default() -> Self {
        Self {
            steps: 200,
            batch: 4,
            lr: 2e-4,
            ntp_weight: 1.0,
            temperature: 1.0,
            checkpoint_every: 25,
            eval_samples: 16,
            seed: 0,
        }
    }
}

impl ConfigFile for FinetuneConfig {
    fn check(&self) -> Result<(), String> {
        let t = &self.train;
        for (name, v) in [
            ("train.steps", t.steps as f64),
            ("train.batch", t.batch as f64),
            ("train.lr", t.lr),
            ("train.temperature", t.temperature),
            ("train.checkpoint_every", t.checkpoint_every as f64),
            ("lora.rank", self.lora.rank as f64),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{name} = {v} must be positive"));
            }
        }
        for (name, v) in [
            ("train.ntp_weight", t.ntp_weight),
            ("lora.alpha", self.lora.alpha),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{name} = {v} must be non-negative"));
            }
        }
        if self.data.seq_len < 2 {
            return Err("data.seq_len must be at least 2".into());
        }
        if self.data.samples == 0 && !self.data.packed {
            return Err("data.samples = 0 takes every window only with data.packed = true".into());
        }
        self.lora.check_targets()?;
        if self.lora.targets.is_empty() {
            return Err("lora.targets is empty: nothing to train".into());
        }
        Ok(())
    }
}

/// Everything a recovery run needs.
pub struct FinetuneSpec<'a> {
    /// The pruned model's directory (provenance).
    pub model_dir: &'a Path,
    /// The dense teacher's directory, when distilling.
    pub teacher_dir: Option<&'a Path>,
    /// The resolved configuration.
    pub config: &'a FinetuneConfig,
    /// The training windows (the last `eval_samples` are held out).
    pub data: &'a CalibrationSet,
    /// The run directory.
    pub run_dir: &'a Path,
    /// Continue from the run directory's checkpoint.
    pub resume: bool,
}

/// One line of a recovery run's `log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneRecord {
    /// Updates done (1-based).
    pub step: u64,
    /// Of this many.
    pub steps: u64,
    /// The loss: `ntp_weight · ntp + distill`.
    pub loss: f64,
    /// Mean next-token cross-entropy of the batch.
    pub ntp: f64,
    /// `T² · mean KL(teacher ‖ student)`, with a teacher.
    pub distill: Option<f64>,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Seconds for this update.
    pub seconds: f64,
}

/// Held-out losses of the pruned model, with and without the adapters.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct HeldOut {
    /// Mean next-token cross-entropy.
    pub ntp: f64,
    /// `T² · mean KL(teacher ‖ student)`, with a teacher.
    pub distill: Option<f64>,
}

/// The end of a recovery run (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneSummary {
    /// Updates done.
    pub steps: u64,
    /// Tokens trained on (`steps × batch × seq_len`).
    pub tokens: u64,
    /// Wall time of the updates, in seconds (all sessions of a resumed run).
    pub train_seconds: f64,
    /// Held-out windows.
    pub eval_windows: usize,
    /// On them, before the recovery (the pruned model as it is).
    pub before: HeldOut,
    /// And after it.
    pub after: HeldOut,
    /// Whether a dense teacher was distilled from.
    pub teacher: Option<String>,
}

/// What a checkpoint holds besides the adapters.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    seconds: f64,
    provenance: Provenance,
}

impl Checkpoint for CheckpointState {
    fn provenance(&self) -> &Provenance {
        &self.provenance
    }
}

/// Trains the adapters and writes the run directory; `on_step` sees every update.
pub fn finetune<B: TrainKernels>(
    student: &Llama<B>,
    teacher: Option<&Llama<B::InnerBackend>>,
    spec: &FinetuneSpec,
    on_step: &mut dyn FnMut(&FinetuneRecord),
) -> Result<FinetuneSummary, String> {
    let cfg = &spec.config.train;
    let c = &student.config;
    if let Some(t) = teacher {
        check_teacher(student, t, spec)?;
    }
    let (train_idx, eval_idx) = split_calibration(spec.data, cfg.batch, cfg.eval_samples)?;
    let sha = |dir: &Path| -> Result<String, String> {
        Ok(weights_sha256(
            &WeightStore::open(dir).map_err(|e| e.to_string())?,
        ))
    };
    let provenance = Provenance::new(
        sha(spec.model_dir)?,
        spec.config,
        spec.data,
        spec.teacher_dir.map(sha).transpose()?,
    );
    let ckpt = spec.run_dir.join(files::CHECKPOINT);
    let (mut state, mut adapters) = if spec.resume {
        let (state, adapters): (CheckpointState, Adapters) =
            read_checkpoint(&ckpt, &provenance, c, &spec.config.lora)?;
        truncate_log(&spec.run_dir.join(files::LOG), state.step)?;
        (state, adapters)
    } else {
        let state = CheckpointState {
            step: 0,
            seconds: 0.0,
            provenance,
        };
        (state, Adapters::new(c, &spec.config.lora, cfg.seed))
    };
    let log_path = spec.run_dir.join(files::LOG);
    let mut log = open_log(&log_path)?;
    let device = student.device();
    let seq_len = spec.data.seq_len as u64;
    while state.step < cfg.steps {
        let t0 = Instant::now();
        let batch = batch_rows(&train_idx, cfg.batch, cfg.seed, state.step);
        let rows: Vec<&[u32]> = batch
            .iter()
            .map(|&i| spec.data.samples[i].as_slice())
            .collect();
        let (loss, ntp, distill, grads) = B::run(|| -> Result<_, String> {
            let (lora, flat) =
                adapters.to_tensors::<B>(c.num_hidden_layers, &device, Tensor::require_grad);
            let out = losses(student, teacher, &rows, Some(&lora), spec.config)?;
            let grads = out.loss.backward();
            let grads: Vec<Vec<f32>> = flat
                .iter()
                .zip(&adapters.matrices)
                .map(|(t, m)| {
                    t.grad(&grads)
                        .map(|g| g.into_data().convert::<f32>().to_vec().expect("f32"))
                        .unwrap_or_else(|| vec![0.0; m.value.len()])
                })
                .collect();
            let ntp = out.ntp.expect("the next-token term is always computed");
            let loss = cfg.ntp_weight * ntp + out.distill.unwrap_or(0.0);
            Ok((loss, ntp, out.distill, grads))
        })?;
        if !loss.is_finite() {
            return Err(format!(
                "{}: step {}: the loss is {loss}; training stopped. The last good checkpoint is {}; lower train.lr and continue with --resume",
                spec.run_dir.display(),
                state.step + 1,
                ckpt.display()
            ));
        }
        adapters.adam_step(&grads, cfg.lr);
        state.step += 1;
        let seconds = t0.elapsed().as_secs_f64();
        state.seconds += seconds;
        let record = FinetuneRecord {
            step: state.step,
            steps: cfg.steps,
            loss,
            ntp,
            distill,
            tokens: state.step * cfg.batch as u64 * seq_len,
            seconds,
        };
        let line = serde_json::to_string(&record).expect("record serialises");
        writeln!(log, "{line}").map_err(|e| err(&log_path, format!("cannot write: {e}")))?;
        on_step(&record);
        if state.step % cfg.checkpoint_every == 0 || state.step == cfg.steps {
            log.flush()
                .map_err(|e| err(&log_path, format!("cannot write: {e}")))?;
            write_checkpoint(&ckpt, state.step, &state, &adapters)?;
        }
    }
    let eval_rows: Vec<&[u32]> = eval_idx
        .iter()
        .map(|&i| spec.data.samples[i].as_slice())
        .collect();
    let (lora, _) = adapters.to_tensors::<B>(c.num_hidden_layers, &device, |t| t);
    let held_out = |lora: Option<&[LayerLora<B>]>| -> Result<HeldOut, String> {
        B::run(|| {
            let (mut ntp, mut distill) = (0.0, None::<f64>);
            for chunk in eval_rows.chunks(cfg.batch) {
                let out = losses(student, teacher, chunk, lora, spec.config)?;
                let w = chunk.len() as f64 / eval_rows.len() as f64;
                ntp += w * out.ntp.expect("always computed");
                if let Some(d) = out.distill {
                    *distill.get_or_insert(0.0) += w * d;
                }
            }
            Ok(HeldOut { ntp, distill })
        })
    };
    let summary = FinetuneSummary {
        steps: state.step,
        tokens: state.step * cfg.batch as u64 * seq_len,
        train_seconds: state.seconds,
        eval_windows: eval_rows.len(),
        before: held_out(None)?,
        after: held_out(Some(&lora))?,
        teacher: spec.teacher_dir.map(|p| p.display().to_string()),
    };
    adapters.save(&spec.run_dir.join(files::LORA), false)?;
    write_file_atomically(
        &spec.run_dir.join(files::SUMMARY),
        &serde_json::to_vec_pretty(&summary).expect("summary serialises"),
    )
    .map_err(|e| e.to_string())?;
    Ok(summary)
}

/// The head loss of `rows` for the student with `lora`: the next-token term, and the
/// distillation term when there is a teacher.
fn losses<B: TrainKernels>(
    student: &Llama<B>,
    teacher: Option<&Llama<B::InnerBackend>>,
    rows: &[&[u32]],
    lora: Option<&[LayerLora<B>]>,
    config: &FinetuneConfig,
) -> Result<maskprune_model::HeadLoss<B>, String> {
    let t = &config.train;
    let teacher = match teacher {
        Some(teacher) => {
            let hidden = teacher
                .hidden_states(token_tensor(rows, &teacher.device()), Extras::none())
                .map_err(|e| e.to_string())?;
            let [b, len, h] = hidden.dims();
            let hidden = Tensor::from_inner(hidden.reshape([b * len, h]));
            Some((hidden, t.temperature))
        }
        None => None,
    };
    let hidden = student
        .hidden_states(
            token_tensor(rows, &student.device()),
            Extras { masks: None, lora },
        )
        .map_err(|e| e.to_string())?;
    let targets = next_token_targets(rows);
    Ok(student.head_loss(
        hidden,
        HeadTerms {
            teacher,
            targets: Some((&targets[..], t.ntp_weight)),
        },
    ))
}

/// The teacher must share the student's vocabulary, width and LM head (a pruned model keeps
/// its original's): the distillation term takes both logits from the student's head.
fn check_teacher<B: TrainKernels>(
    student: &Llama<B>,
    teacher: &Llama<B::InnerBackend>,
    spec: &FinetuneSpec,
) -> Result<(), String> {
    let dir = spec.teacher_dir.unwrap_or(spec.model_dir);
    let (s, t) = (&student.config, &teacher.config);
    if (s.vocab_size, s.hidden_size) != (t.vocab_size, t.hidden_size) {
        return Err(err(
            dir,
            format!(
                "the teacher has vocabulary {} and width {}, the model {} and {}: not the model it was pruned from",
                t.vocab_size, t.hidden_size, s.vocab_size, s.hidden_size
            ),
        ));
    }
    let values = |x: Tensor<B::InnerBackend, 2>| -> Vec<f32> {
        x.into_data().convert::<f32>().to_vec().expect("f32")
    };
    if values(student.lm_head.clone().inner()) != values(teacher.lm_head.clone()) {
        return Err(err(
            dir,
            "the teacher's LM head differs from the model's: not the model it was pruned from",
        ));
    }
    Ok(())
}
