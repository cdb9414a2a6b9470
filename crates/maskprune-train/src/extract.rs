//! The parameter budget of a model, the unit kinds the minimax works on, and the extraction
//! of a uniform prune plan from trained masks.

use maskprune_model::ModelConfig;
use maskprune_surgery::rank::plan_from_scores;
use maskprune_surgery::LayerScores;
use maskprune_surgery::{decoder_linear_params, Granularity, LayerPlan, PrunePlan, Widths};
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

    /// The integer widths a continuous `s` can round to: attention rounded down and up to a
    /// whole unit (a multiple of the KV heads under `query_head`); for each, the MLP gets the
    /// largest multiple of `round_to` channels the budget leaves (the continuous `s_f` sits on
    /// the same budget, so this is its rounding, without the budget lost to rounding
    /// attention down). Attention widths that leave no room for `round_to` channels are
    /// dropped; the smallest attention width always remains.
    pub fn candidate_widths(&self, c: &ModelConfig, s: [f64; 2]) -> Vec<Widths> {
        let step = match self.granularity {
            Granularity::KvGroup => 1,
            Granularity::QueryHead => c.num_key_value_heads,
        };
        let units = self.kinds[ATTENTION].units;
        let r = self.round_to;
        let max_channels = c.intermediate_size / r * r;
        let per_channel = decoder_linear_params(c, widths_for(c, self.granularity, 0, 1))
            - decoder_linear_params(c, widths_for(c, self.granularity, 0, 0));
        let down = ((s[ATTENTION] / step as f64).floor() as usize * step).clamp(step, units);
        let up = ((s[ATTENTION] / step as f64).ceil() as usize * step).clamp(step, units);
        let mut out = Vec::new();
        for attention in [down, up] {
            let attn = decoder_linear_params(c, widths_for(c, self.granularity, attention, 0));
            let room = self.target.saturating_sub(attn) / per_channel / r * r;
            let w = widths_for(c, self.granularity, attention, room.clamp(r, max_channels));
            if (room >= r || attention == step) && !out.contains(&w) {
                out.push(w);
            }
        }
        if out.is_empty() {
            // Budget::new refused targets below one unit and round_to channels.
            out.push(widths_for(c, self.granularity, step, r));
        }
        out
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

pub use maskprune_records::LayerCounts;

impl Budget {
    /// Decoder-layer linear parameters of one attention unit and of one MLP channel (one layer).
    fn unit_params(&self, layers: usize) -> [f64; 2] {
        std::array::from_fn(|t| {
            self.dense as f64 * self.kinds[t].share / self.kinds[t].units as f64 / layers as f64
        })
    }

    /// Candidate attention totals (over all layers) for a non-uniform extraction: `s_a · L`
    /// rounded down and up.
    pub fn nonuniform_candidates(&self, layers: usize, s: [f64; 2]) -> Vec<usize> {
        let total = s[ATTENTION] * layers as f64;
        let max = self.kinds[ATTENTION].units * layers;
        let mut out = vec![(total.floor() as usize).min(max)];
        let up = (total.ceil() as usize).min(max);
        if up != out[0] {
            out.push(up);
        }
        out
    }

    /// A non-uniform plan: the top `attention_total` attention units by `|z|` over all layers,
    /// then the top MLP channels over all layers that the budget leaves room for. Returns the
    /// plan (not a valid uniform plan: apply it as masks), its per-layer counts and its
    /// decoder-layer linear parameters.
    pub fn extract_nonuniform(
        &self,
        c: &ModelConfig,
        z: &[Vec<Vec<f32>>; 2],
        attention_total: usize,
    ) -> (PrunePlan, Vec<LayerCounts>, usize) {
        let layers = c.num_hidden_layers;
        let [per_unit, per_channel] = self.unit_params(layers);
        let fixed = self.dense as f64 * self.fixed_share;
        let room = self.target as f64 - fixed - attention_total as f64 * per_unit;
        let channel_total =
            ((room / per_channel).floor().max(0.0) as usize).min(c.intermediate_size * layers);
        let global_top = |z: &Vec<Vec<f32>>, k: usize| -> Vec<Vec<usize>> {
            let mut all: Vec<(f32, usize, usize)> = z
                .iter()
                .enumerate()
                .flat_map(|(l, v)| v.iter().enumerate().map(move |(i, x)| (x.abs(), l, i)))
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
            let mut kept = vec![Vec::new(); z.len()];
            for &(_, l, i) in all.iter().take(k) {
                kept[l].push(i);
            }
            kept.iter_mut().for_each(|v| v.sort_unstable());
            kept
        };
        let attention = global_top(&z[ATTENTION], attention_total);
        let channels = global_top(&z[CHANNELS], channel_total);
        let plan_layers: Vec<LayerPlan> = attention
            .iter()
            .zip(&channels)
            .map(|(a, ch)| LayerPlan::from_units(c, self.granularity, a.clone(), ch.clone()))
            .collect();
        let counts = attention
            .iter()
            .zip(&channels)
            .map(|(a, ch)| LayerCounts {
                attention: a.len(),
                channels: ch.len(),
            })
            .collect();
        let params = fixed + attention_total as f64 * per_unit + channel_total as f64 * per_channel;
        (
            PrunePlan {
                method: "maskprune-nonuniform".into(),
                granularity: self.granularity,
                layers: plan_layers,
            },
            counts,
            params.round() as usize,
        )
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
            for w in b.candidate_widths(&c, [2.2, 800.0]) {
                assert!(decoder_linear_params(&c, w) <= b.target);
                assert_eq!(w.channels % 64, 0);
                // No room for another 64 channels.
                let more = Widths {
                    channels: w.channels + 64,
                    ..w
                };
                assert!(decoder_linear_params(&c, more) > b.target);
            }
        }
        let b = Budget::new(&c, Granularity::KvGroup, 64, Some(0.5), None).unwrap();
        let kv: Vec<usize> = b
            .candidate_widths(&c, [2.5, 600.0])
            .iter()
            .map(|w| w.kv_heads)
            .collect();
        assert_eq!(kv, vec![2, 3]);
        assert_eq!(b.candidate_widths(&c, [2.0, 600.0]).len(), 1);
        let b = Budget::new(&c, Granularity::QueryHead, 64, Some(0.5), None).unwrap();
        let w = b.candidate_widths(&c, [5.0, 700.0]);
        assert_eq!((w[0].query_heads, w[0].kv_heads), (3, 3));
        assert_eq!((w[1].query_heads, w[1].kv_heads), (6, 3));
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
