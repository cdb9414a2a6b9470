//! The mask-training configuration (`configs/*.toml`), with `section.key=value` overrides.

use maskprune_surgery::Granularity;
use serde::{Deserialize, Serialize};

pub use maskprune_model::lora::{lora_targets, LoraSettings};

use crate::minimax::MinimaxRates;

/// A whole training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// What to prune to.
    pub budget: BudgetConfig,
    /// The calibration set drawn when none is given.
    #[serde(default)]
    pub calibration: CalibrationConfig,
    /// The training loop.
    #[serde(default)]
    pub train: TrainSettings,
    /// Step sizes of the minimax updates.
    #[serde(default)]
    pub minimax: MinimaxRates,
    /// LoRA adapters trained with the masks.
    #[serde(default)]
    pub lora: LoraSettings,
}

/// The budget: exactly one of `sparsity` and `target_params`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Fraction of the decoder layers' linear parameters to remove.
    pub sparsity: Option<f64>,
    /// Parameters of the whole pruned model (embeddings and norms included).
    pub target_params: Option<u64>,
    /// Attention unit: `kv_group` or `query_head`.
    #[serde(default = "default_granularity")]
    pub granularity: Granularity,
    /// MLP widths are multiples of this.
    #[serde(default = "default_round_to")]
    pub round_to: usize,
}

fn default_granularity() -> Granularity {
    Granularity::KvGroup
}

fn default_round_to() -> usize {
    64
}

/// How the calibration set is drawn (see `maskprune calib`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrationConfig {
    /// A dataset manifest of role `calibration`.
    pub dataset: String,
    /// Number of windows.
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Random seed of the draw.
    pub seed: u64,
    /// Consecutive windows of the documents' concatenation (every token once) instead of
    /// random windows; `samples = 0` then takes them all.
    pub packed: bool,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            dataset: "c4".into(),
            samples: 128,
            seq_len: 128,
            seed: 0,
            packed: false,
        }
    }
}

/// How the masks are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskInit {
    /// Every unit at 1.
    Ones,
    /// The L2 norm of each unit's weights, divided by the layer's mean.
    Magnitude,
    /// Fisher information of each unit's mask under the next-token loss on calibration
    /// windows (root of the summed squared gradients, divided by the layer's mean).
    Fisher,
    /// FLAP's activation-aware score on calibration windows (`Σ Var(X_j)·‖W_:,j‖²` over the
    /// unit's output-projection columns), its square root divided by the layer's mean.
    Flap,
    /// Wanda-SP's score on calibration windows (`Σ |W_ij|·‖X_j‖`), divided by the layer's
    /// mean.
    WandaSp,
}

/// The training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Updates in all.
    pub steps: u64,
    /// Calibration windows per update.
    pub batch: usize,
    /// Updates over which the budget moves from dense to the target.
    pub warmup_steps: u64,
    /// The last this many updates train at the extraction's integer widths: the rounding of
    /// `s` is chosen then (as at the end, on the held-out windows) and every layer keeps
    /// exactly the units extraction would keep, so masks and adapters adapt to the model
    /// surgery cuts. 0: extract only at the end.
    pub commit_steps: u64,
    /// Distillation temperature.
    pub temperature: f64,
    /// Weight of the next-token loss added to the distillation loss.
    pub ntp_weight: f64,
    /// Weight of the layer-wise distillation term (each layer's output against the dense
    /// model's, normalised mean squared error averaged over layers); 0 turns it off.
    pub hidden_distill_weight: f64,
    /// Adam learning rate of the LoRA adapters.
    pub lora_lr: f64,
    /// Mask initialisation.
    pub mask_init: MaskInit,
    /// Calibration batches the Fisher initialisation looks at.
    pub init_batches: u64,
    /// Write a checkpoint every this many updates (and at the end).
    pub checkpoint_every: u64,
    /// Calibration windows held out of training to measure the extraction gap.
    pub eval_samples: usize,
    /// Seed of the batch order and the LoRA initialisation.
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            steps: 300,
            batch: 4,
            warmup_steps: 150,
            commit_steps: 0,
            temperature: 1.0,
            ntp_weight: 0.0,
            hidden_distill_weight: 0.0,
            lora_lr: 5e-4,
            mask_init: MaskInit::Fisher,
            init_batches: 16,
            checkpoint_every: 25,
            eval_samples: 8,
            seed: 0,
        }
    }
}

/// A TOML configuration with `section.key=value` overrides applied (values in TOML syntax;
/// bare words are strings), deserialised.
pub(crate) fn parse_with_overrides<T: serde::de::DeserializeOwned>(
    text: &str,
    overrides: &[String],
) -> Result<T, String> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.to_string().lines().next().unwrap_or("").to_string())?;
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| format!("override `{o}` is not section.key=value"))?;
        let (section, field) = key
            .trim()
            .split_once('.')
            .ok_or_else(|| format!("override `{o}`: the key must be section.key"))?;
        let value = value.trim();
        let parsed: toml::Value = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| format!("override `{o}`: `{section}` is not a section"))?
            .insert(field.to_string(), parsed);
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())
}

/// A configuration file: TOML text with `section.key=value` overrides (values in TOML
/// syntax; bare words are strings), parsed into its typed form and checked.
pub trait ConfigFile: serde::de::DeserializeOwned {
    /// Range and consistency checks, one message per problem.
    fn check(&self) -> Result<(), String>;

    /// Parses `text`, applies `overrides` and checks every value.
    fn parse(text: &str, overrides: &[String]) -> Result<Self, String> {
        Self::parse_with(text, overrides, |_| {})
    }

    /// [`ConfigFile::parse`] with `edit` applied to the typed configuration before the
    /// checks (how command-line flags set fields).
    fn parse_with(
        text: &str,
        overrides: &[String],
        edit: impl FnOnce(&mut Self),
    ) -> Result<Self, String> {
        let mut config: Self = parse_with_overrides(text, overrides)?;
        edit(&mut config);
        config.check()?;
        Ok(config)
    }
}

impl TrainConfig {
    /// Reads and parses a configuration file.
    pub fn from_file(path: &std::path::Path, overrides: &[String]) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::parse(&text, overrides).map_err(|m| format!("{}: {m}", path.display()))
    }

    /// Cuts the schedule to `max_steps` updates; the warm-up and the committed updates
    /// shrink in proportion.
    pub fn cut_to(&mut self, max_steps: u64) {
        if max_steps < self.train.steps {
            let scale = |n: u64| (n as u128 * max_steps as u128 / self.train.steps as u128) as u64;
            self.train.warmup_steps = scale(self.train.warmup_steps);
            self.train.commit_steps = scale(self.train.commit_steps);
            self.train.steps = max_steps;
        }
    }
}

impl ConfigFile for TrainConfig {
    fn check(&self) -> Result<(), String> {
        let b = &self.budget;
        match (b.sparsity, b.target_params) {
            (Some(_), Some(_)) => {
                return Err("budget: give `sparsity` or `target_params`, not both".into())
            }
            (None, None) => return Err("budget: `sparsity` or `target_params` is required".into()),
            (Some(s), None) if !(s > 0.0 && s < 1.0) => {
                return Err(format!("budget.sparsity = {s} must be in (0, 1)"))
            }
            _ => {}
        }
        if b.round_to == 0 {
            return Err("budget.round_to must be at least 1".into());
        }
        let t = &self.train;
        let positive = [
            ("train.steps", t.steps as f64),
            ("train.batch", t.batch as f64),
            ("train.temperature", t.temperature),
            ("train.checkpoint_every", t.checkpoint_every as f64),
            ("minimax.mask_lr", self.minimax.mask_lr),
        ];
        for (name, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{name} = {v} must be positive"));
            }
        }
        let non_negative = [
            ("train.ntp_weight", t.ntp_weight),
            ("train.hidden_distill_weight", t.hidden_distill_weight),
            ("train.lora_lr", t.lora_lr),
            ("minimax.dual_lr", self.minimax.dual_lr),
            ("minimax.budget_lr", self.minimax.budget_lr),
            ("minimax.width_lr", self.minimax.width_lr),
            ("minimax.penalty", self.minimax.penalty),
            ("lora.alpha", self.lora.alpha),
        ];
        for (name, v) in non_negative {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{name} = {v} must be non-negative"));
            }
        }
        if !(0.0..1.0).contains(&self.minimax.mask_momentum) {
            return Err(format!(
                "minimax.mask_momentum = {} must be in [0, 1)",
                self.minimax.mask_momentum
            ));
        }
        if self.calibration.samples == 0 && !self.calibration.packed {
            return Err(
                "calibration.samples = 0 must be positive (0 means all windows only with packed = true)"
                    .into(),
            );
        }
        if self.calibration.seq_len < 2 {
            return Err("calibration.seq_len must be at least 2".into());
        }
        if t.warmup_steps > t.steps {
            return Err(format!(
                "train.warmup_steps ({}) is longer than train.steps ({})",
                t.warmup_steps, t.steps
            ));
        }
        if t.commit_steps > 0 && t.warmup_steps + t.commit_steps > t.steps {
            return Err(format!(
                "train.commit_steps ({}) overlaps the warm-up: it must be at most train.steps - train.warmup_steps ({})",
                t.commit_steps,
                t.steps - t.warmup_steps
            ));
        }
        self.lora.check_targets()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = TrainConfig::parse(
            "[budget]\nsparsity = 0.5\n",
            &[
                "train.steps=400".into(),
                "train.commit_steps=100".into(),
                "budget.granularity=query_head".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.steps, 400);
        assert_eq!(c.budget.granularity, Granularity::QueryHead);
        assert_eq!(c.lora.rank, 8);
        let mut c = c;
        c.cut_to(100);
        assert_eq!(
            (c.train.steps, c.train.warmup_steps, c.train.commit_steps),
            (100, 37, 25)
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, overrides, needle) in [
            ("[budget]\n", vec![], "is required"),
            ("[budget]\nsparsity = 1.5\n", vec![], "budget.sparsity"),
            (
                "[budget]\nsparsity = 0.5\ntarget_params = 10\n",
                vec![],
                "not both",
            ),
            ("[budget]\nsparsity = 0.5\n", vec!["train.stepz=3"], "stepz"),
            (
                "[budget]\nsparsity = 0.5\n",
                vec!["train.batch=0"],
                "train.batch",
            ),
            (
                "[budget]\nsparsity = 0.5\n",
                vec!["steps"],
                "section.key=value",
            ),
            (
                "[budget]\nsparsity = 0.5\n",
                vec!["lora.targets=[\"qq\"]"],
                "unknown projection",
            ),
            (
                "[budget]\nsparsity = 0.5\n",
                vec!["budget.granularity=heads"],
                "`heads`",
            ),
            (
                "[budget]\nsparsity = 0.5\n",
                vec!["train.commit_steps=200"],
                "train.commit_steps (200) overlaps the warm-up",
            ),
            ("[budget\n", vec![], ""),
        ] {
            let overrides: Vec<String> = overrides.into_iter().map(String::from).collect();
            let e = TrainConfig::parse(text, &overrides).unwrap_err();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
