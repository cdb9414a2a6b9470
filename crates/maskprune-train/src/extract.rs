//! The parameter budget of a model, the unit kinds the minimax works on, and the extraction
//! of a uniform prune plan from trained masks.

use maskprune_model::ModelConfig;
use maskprune_surgery::rank::plan_from_scores;
use maskprune_surgery::LayerScores;
use maskprune_surgery::{decoder_linear_params, Granularity, PrunePlan, Widths};
use serde::Serialize;

use crate::minimax::{UnitKind, ATTENTION, CHANNELS};

/// The budget in decoder-layer linear parameters and how the units share them.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    /// Attention unit granularity.
    pub granularity: Granularity,
    /// MLP widths are multiples of this.
    pub round_to: usize,
    /// Dense decoder-layer linear parameters.
    pub dense: usize,
    /// The target (decoder-layer linear parameters).
    pub target: usize,
    /// Parameters outside the decoder layers' linear weights (embeddings, norms, biases).
    pub other: usize,
    /// Share of the dense decoder-layer linear parameters no unit controls (k/v under
    /// `query_head`).
    pub fixed_share: f64,
    /// Attention units and MLP channels.
    #[serde(skip)]
    pub kinds: [UnitKind; 2],
}

fn widths_for(c: &ModelConfig, g: Granularity, attention_units: usize, channels: usize) -> Widths {
    match g {
        Granularity::KvGroup => Widths {
            query_heads: attention_units * c.group_size(),
            kv_heads: attention_units,
            channels,
        },
        Granularity::QueryHead => Widths {
            query_heads: attention_units,
            kv_heads: c.num_key_value_heads,
            channels,
        },
    }
}

impl Budget {
    /// The budget for `sparsity` (fraction of decoder-layer linear parameters removed) or
    /// `target_params` (all parameters of the pruned model). Errors when it cannot be met.
    pub fn new(
        c: &ModelConfig,
        granularity: Granularity,
        round_to: usize,
        sparsity: Option<f64>,
        target_params: Option<u64>,
    ) -> Result<Self, String> {
        let full = Widths {
            query_heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            channels: c.intermediate_size,
        };
        let dense = decoder_linear_params(c, full);
        let other = c.total_params() - dense;
        let target = match (sparsity, target_params) {
            (Some(s), None) if s > 0.0 && s < 1.0 => ((1.0 - s) * dense as f64).floor() as usize,
            (None, Some(n)) => {
                let n = n as usize;
                if n <= other || n >= c.total_params() {
                    return Err(format!(
                        "target_params {n} is impossible: the model has {} parameters, {other} of them outside the decoder layers' linear weights",
                        c.total_params()
                    ));
                }
                n - other
            }
            _ => return Err("give a sparsity in (0, 1) or target_params".into()),
        };
        let units = Self::attention_units(c, granularity);
        let min_units = match granularity {
            Granularity::KvGroup => 1,
            Granularity::QueryHead => c.num_key_value_heads,
        };
        let round_to = round_to.clamp(1, c.intermediate_size);
        let smallest = decoder_linear_params(c, widths_for(c, granularity, min_units, round_to));
        if target < smallest {
            return Err(format!(
                "the budget ({target} decoder-layer linear parameters, {:.1}% of {dense}) is below the smallest uniform model ({smallest}: {min_units} attention units and {round_to} MLP channels per layer)",
                100.0 * target as f64 / dense as f64
            ));
        }
        let attention_all =
            decoder_linear_params(c, widths_for(c, granularity, units, 0)) as f64 / dense as f64;
        let fixed_share =
            decoder_linear_params(c, widths_for(c, granularity, 0, 0)) as f64 / dense as f64;
        let kinds = [
            UnitKind {
                units,
                share: attention_all - fixed_share,
                min_fraction: min_units as f64 / units as f64,
            },
            UnitKind {
                units: c.intermediate_size,
                share: 1.0 - attention_all,
                min_fraction: round_to as f64 / c.intermediate_size as f64,
            },
        ];
        Ok(Self {
            granularity,
            round_to,
            dense,
            target,
            other,
            fixed_share,
            kinds,
        })
    }

    /// Attention units per layer: KV groups or query heads.
    pub fn attention_units(c: &ModelConfig, g: Granularity) -> usize {
        match g {
            Granularity::KvGroup => c.num_key_value_heads,
            Granularity::QueryHead => c.num_attention_heads,
        }
    }

    /// The target as a fraction of the dense decoder-layer linear parameters.
    pub fn target_fraction(&self) -> f64 {
        self.target as f64 / self.dense as f64
    }

    /// Decoder-layer linear parameters at widths `s` (units, may be fractional).
    pub fn params_at(&self, s: [f64; 2]) -> f64 {
        self.dense as f64
            * (self.fixed_share
                + (0..2)
                    .map(|t| self.kinds[t].share * s[t] / self.kinds[t].units as f64)
                    .sum::<f64>())
    }

    /// Integer widths for the continuous `s`: attention rounded to a whole unit (a multiple of
    /// the KV heads under `query_head`); the MLP then gets the largest multiple of `round_to`
    /// channels the budget leaves (the continuous `s_f` sits on the same budget, so this is
    /// its rounding, without the budget lost to rounding attention down). If even
    /// `round_to` channels do not fit, attention steps down.
    pub fn round_widths(&self, c: &ModelConfig, s: [f64; 2]) -> Widths {
        let step = match self.granularity {
            Granularity::KvGroup => 1,
            Granularity::QueryHead => c.num_key_value_heads,
        };
        let units = self.kinds[ATTENTION].units;
        let mut attention =
            ((s[ATTENTION] / step as f64).round() as usize * step).clamp(step, units);
        let r = self.round_to;
        let max_channels = c.intermediate_size / r * r;
        let per_channel = decoder_linear_params(c, widths_for(c, self.granularity, 0, 1))
            - decoder_linear_params(c, widths_for(c, self.granularity, 0, 0));
        loop {
            let attn = decoder_linear_params(c, widths_for(c, self.granularity, attention, 0));
            let room = self.target.saturating_sub(attn) / per_channel / r * r;
            if room >= r || attention == step {
                let channels = room.clamp(r, max_channels);
                return widths_for(c, self.granularity, attention, channels);
            }
            attention -= step;
        }
    }

    /// The plan keeping, in every layer, the top units by `|z|` at `widths` (within each KV
    /// group for `query_head`).
    pub fn extract(
        &self,
        c: &ModelConfig,
        z: &[Vec<Vec<f32>>; 2],
        widths: Widths,
        method: &str,
    ) -> PrunePlan {
        let abs = |v: &Vec<f32>| v.iter().map(|x| x.abs() as f64).collect::<Vec<f64>>();
        let scores: Vec<LayerScores> = z[ATTENTION]
            .iter()
            .zip(&z[CHANNELS])
            .map(|(a, f)| LayerScores {
                query_heads: abs(a),
                kv_groups: abs(a),
                channels: abs(f),
            })
            .collect();
        plan_from_scores(&scores, c, self.granularity, widths, method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,
                "num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,"tie_word_embeddings":true}"#,
        )
        .unwrap()
    }

    #[test]
    fn shares_add_up_and_rounding_meets_the_budget() {
        let c = smollm2();
        for g in [Granularity::KvGroup, Granularity::QueryHead] {
            let b = Budget::new(&c, g, 64, Some(0.5), None).unwrap();
            let total = b.fixed_share + b.kinds[0].share + b.kinds[1].share;
            assert!((total - 1.0).abs() < 1e-12);
            let dense_s = [b.kinds[0].units as f64, b.kinds[1].units as f64];
            assert!((b.params_at(dense_s) - b.dense as f64).abs() < 1.0);
            let w = b.round_widths(&c, [2.2, 800.0]);
            assert!(decoder_linear_params(&c, w) <= b.target);
            assert_eq!(w.channels % 64, 0);
            // No room for another 64 channels.
            let more = Widths {
                channels: w.channels + 64,
                ..w
            };
            assert!(decoder_linear_params(&c, more) > b.target);
        }
        let b = Budget::new(&c, Granularity::QueryHead, 64, Some(0.5), None).unwrap();
        let w = b.round_widths(&c, [5.0, 700.0]);
        assert_eq!((w.query_heads, w.kv_heads), (6, 3));
    }

    #[test]
    fn impossible_budgets_are_errors() {
        let c = smollm2();
        let e = Budget::new(&c, Granularity::KvGroup, 64, Some(0.99), None).unwrap_err();
        assert!(e.contains("smallest uniform model"), "{e}");
        let e = Budget::new(&c, Granularity::KvGroup, 64, None, Some(1000)).unwrap_err();
        assert!(e.contains("impossible"), "{e}");
        let b = Budget::new(&c, Granularity::KvGroup, 64, None, Some(100_000_000)).unwrap();
        assert_eq!(b.target + b.other, 100_000_000);
    }
}
