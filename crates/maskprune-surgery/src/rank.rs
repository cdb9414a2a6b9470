//! From unit scores to plans: the one builder of a uniform plan that keeps the top units at
//! the same widths in every layer (the scores come from `maskprune-baselines` or from the
//! learned masks).

use maskprune_model::ModelConfig;

use crate::plan::{Granularity, LayerPlan, PrunePlan};
use crate::widths::Widths;

/// Unit scores of one layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerScores {
    /// Per query head: its q rows and o columns.
    pub query_heads: Vec<f64>,
    /// Per KV group: its k and v rows plus its query heads' q rows and o columns.
    pub kv_groups: Vec<f64>,
    /// Per MLP channel: its gate and up rows and its down column.
    pub channels: Vec<f64>,
}

/// Indices of the `k` largest scores, sorted ascending (ties broken by lower index).
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// A plan keeping, in every layer, the highest-scoring units at `widths`.
pub fn plan_from_scores(
    scores: &[LayerScores],
    c: &ModelConfig,
    granularity: Granularity,
    widths: Widths,
    method: &str,
) -> PrunePlan {
    let group = c.group_size();
    let layers = scores
        .iter()
        .map(|s| {
            let attention = match granularity {
                Granularity::KvGroup => top_k(&s.kv_groups, widths.kv_heads),
                // The same number of query heads in every KV group.
                Granularity::QueryHead => {
                    let per_group = widths.query_heads / c.num_key_value_heads;
                    (0..c.num_key_value_heads)
                        .flat_map(|j| {
                            top_k(&s.query_heads[j * group..(j + 1) * group], per_group)
                                .into_iter()
                                .map(move |i| j * group + i)
                        })
                        .collect()
                }
            };
            LayerPlan::from_units(
                c,
                granularity,
                attention,
                top_k(&s.channels, widths.channels),
            )
        })
        .collect();
    PrunePlan {
        method: method.to_string(),
        granularity,
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_in_index_order() {
        assert_eq!(top_k(&[0.1, 5.0, 3.0, 5.0, 0.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
    }
}
