//! A mask-training run directory's records: `log.jsonl` (one [`StepRecord`] per update),
//! `summary.json` ([`TrainSummary`]), `masks.json` ([`MaskState`]) and
//! `snapshots/*.json` ([`MaskSnapshot`]).

use serde::{Deserialize, Serialize};

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

/// What an attention unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// A KV head with its query heads: `num_key_value_heads` shrinks.
    #[serde(rename = "kv_group")]
    KvGroup,
    /// Query heads, the same number kept in every KV group: `num_key_value_heads` stays.
    #[serde(rename = "query_head")]
    QueryHead,
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kv_group" => Ok(Granularity::KvGroup),
            "query_head" => Ok(Granularity::QueryHead),
            _ => Err(format!(
                "unknown granularity `{s}` (kv_group or query_head)"
            )),
        }
    }
}

/// Per-layer widths of a uniformly pruned model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Widths {
    /// Query heads kept per layer.
    pub query_heads: usize,
    /// KV heads kept per layer.
    pub kv_heads: usize,
    /// MLP channels kept per layer.
    pub channels: usize,
}

/// Kept units per layer of a non-uniform extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerCounts {
    /// Attention units (KV groups or query heads) kept.
    pub attention: usize,
    /// MLP channels kept.
    pub channels: usize,
}

/// The mean and the largest value of a per-layer quantity (written as `[mean, max]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "[f64; 2]", into = "[f64; 2]")]
pub struct OverLayers {
    /// Mean over layers.
    pub mean: f64,
    /// Largest over layers.
    pub max: f64,
}

impl OverLayers {
    /// The mean and max of `values` (0 for none).
    pub fn of(values: &[f64]) -> Self {
        Self {
            mean: values.iter().sum::<f64>() / values.len().max(1) as f64,
            max: values.iter().cloned().fold(0.0, f64::max),
        }
    }
}

impl From<[f64; 2]> for OverLayers {
    fn from([mean, max]: [f64; 2]) -> Self {
        Self { mean, max }
    }
}

impl From<OverLayers> for [f64; 2] {
    fn from(o: OverLayers) -> Self {
        [o.mean, o.max]
    }
}

/// One line of `log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The layer-wise distillation term (weighted by `hidden_distill_weight`), when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<f64>,
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
    /// The uniformity multipliers `y` of the attention units, over layers.
    pub y_attention: OverLayers,
    /// The same for the MLP channels.
    pub y_channels: OverLayers,
    /// Kept units per layer, per kind.
    pub kept_attention: Vec<usize>,
    /// See `kept_attention`.
    pub kept_channels: Vec<usize>,
    /// Seconds for this update.
    pub seconds: f64,
}

/// The end of a run (`summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Updates trained at the extracted widths (`train.commit_steps`); then `rounding` holds
    /// the committed rounding alone and the extraction gap is zero by construction.
    #[serde(default)]
    pub committed_steps: u64,
}

/// The final minimax state (`masks.json`): per kind, layer and unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskState {
    /// What an attention unit is.
    pub granularity: Granularity,
    /// Attention units per layer.
    pub attention_units: usize,
    /// Final continuous widths `s` (attention units, channels).
    pub s: [f64; 2],
    /// `s` as a fraction of the units.
    pub width_fraction: [f64; 2],
    /// The budget's multiplier.
    pub mu: f64,
    /// The uniformity multipliers per layer.
    pub y_attention: Vec<f64>,
    /// See `y_attention`.
    pub y_channels: Vec<f64>,
    /// The mask logits.
    pub z_attention: Vec<Vec<f32>>,
    /// See `z_attention`.
    pub z_channels: Vec<Vec<f32>>,
    /// The masks (0 = pruned).
    pub m_attention: Vec<Vec<f32>>,
    /// See `m_attention`.
    pub m_channels: Vec<Vec<f32>>,
}

/// The masks at one update (`snapshots/masks-stepNNNNN.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskSnapshot {
    /// Updates done.
    pub step: u64,
    /// The attention masks per layer and unit.
    pub m_attention: Vec<Vec<f32>>,
    /// The channel masks.
    pub m_channels: Vec<Vec<f32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_layers_is_written_as_mean_then_max() {
        let o = OverLayers::of(&[1.0, 3.0, 2.0]);
        assert_eq!(
            o,
            OverLayers {
                mean: 2.0,
                max: 3.0
            }
        );
        assert_eq!(serde_json::to_string(&o).unwrap(), "[2.0,3.0]");
        let back: OverLayers = serde_json::from_str("[0.5,4.0]").unwrap();
        assert_eq!((back.mean, back.max), (0.5, 4.0));
    }

    #[test]
    fn granularity_parses_its_file_names() {
        assert_eq!("kv_group".parse(), Ok(Granularity::KvGroup));
        assert_eq!("query_head".parse(), Ok(Granularity::QueryHead));
        assert!("heads"
            .parse::<Granularity>()
            .unwrap_err()
            .contains("heads"));
    }
}
