//! The one-shot magnitude baseline: each unit scored by the L2 norm of all the weights that
//! belong to it, the top ones kept at the same widths in every layer.

use maskprune_model::{ModelConfig, Result, WeightStore};

use crate::plan::{Granularity, LayerPlan, PrunePlan};
use crate::widths::Widths;

/// Unit scores of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerScores {
    /// Per query head: its q rows and o columns.
    pub query_heads: Vec<f64>,
    /// Per KV group: its k and v rows plus its query heads' q rows and o columns.
    pub kv_groups: Vec<f64>,
    /// Per MLP channel: its gate and up rows and its down column.
    pub channels: Vec<f64>,
}

fn row_sq(w: &[f32], cols: usize, rows: std::ops::Range<usize>) -> f64 {
    w[rows.start * cols..rows.end * cols]
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum()
}

fn col_sq(w: &[f32], cols: usize, range: std::ops::Range<usize>) -> f64 {
    w.chunks_exact(cols)
        .map(|row| {
            row[range.clone()]
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
        })
        .sum()
}

/// L2-norm scores of every unit of every layer.
pub fn magnitude_scores(store: &WeightStore, c: &ModelConfig) -> Result<Vec<LayerScores>> {
    let (h, d, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (nq, nkv, group) = (c.num_attention_heads, c.num_key_value_heads, c.group_size());
    (0..c.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let q = store.read_f32(&format!("{p}.self_attn.q_proj.weight"), &[nq * d, h])?;
            let k = store.read_f32(&format!("{p}.self_attn.k_proj.weight"), &[nkv * d, h])?;
            let v = store.read_f32(&format!("{p}.self_attn.v_proj.weight"), &[nkv * d, h])?;
            let o = store.read_f32(&format!("{p}.self_attn.o_proj.weight"), &[h, nq * d])?;
            let gate = store.read_f32(&format!("{p}.mlp.gate_proj.weight"), &[f, h])?;
            let up = store.read_f32(&format!("{p}.mlp.up_proj.weight"), &[f, h])?;
            let down = store.read_f32(&format!("{p}.mlp.down_proj.weight"), &[h, f])?;
            let head_sq: Vec<f64> = (0..nq)
                .map(|i| row_sq(&q, h, i * d..(i + 1) * d) + col_sq(&o, nq * d, i * d..(i + 1) * d))
                .collect();
            let kv_groups = (0..nkv)
                .map(|j| {
                    let own = row_sq(&k, h, j * d..(j + 1) * d) + row_sq(&v, h, j * d..(j + 1) * d);
                    (own + head_sq[j * group..(j + 1) * group].iter().sum::<f64>()).sqrt()
                })
                .collect();
            // Down's columns, accumulated row by row for cache friendliness.
            let mut down_sq = vec![0.0f64; f];
            for row in down.chunks_exact(f) {
                for (acc, &x) in down_sq.iter_mut().zip(row) {
                    *acc += (x as f64) * (x as f64);
                }
            }
            let channels = (0..f)
                .map(|ch| {
                    (row_sq(&gate, h, ch..ch + 1) + row_sq(&up, h, ch..ch + 1) + down_sq[ch]).sqrt()
                })
                .collect();
            Ok(LayerScores {
                query_heads: head_sq.into_iter().map(f64::sqrt).collect(),
                kv_groups,
                channels,
            })
        })
        .collect()
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
            let (query_heads, kv_heads) = match granularity {
                Granularity::KvGroup => {
                    let kv = top_k(&s.kv_groups, widths.kv_heads);
                    let q = kv
                        .iter()
                        .flat_map(|&j| j * group..(j + 1) * group)
                        .collect();
                    (q, kv)
                }
                Granularity::QueryHead => {
                    let per_group = widths.query_heads / c.num_key_value_heads;
                    let q = (0..c.num_key_value_heads)
                        .flat_map(|j| {
                            top_k(&s.query_heads[j * group..(j + 1) * group], per_group)
                                .into_iter()
                                .map(move |i| j * group + i)
                        })
                        .collect();
                    (q, (0..c.num_key_value_heads).collect())
                }
            };
            LayerPlan {
                query_heads,
                kv_heads,
                channels: top_k(&s.channels, widths.channels),
            }
        })
        .collect();
    PrunePlan {
        method: method.to_string(),
        granularity,
        layers,
    }
}

/// The magnitude baseline plan at `widths`.
pub fn magnitude_plan(
    store: &WeightStore,
    c: &ModelConfig,
    granularity: Granularity,
    widths: Widths,
) -> Result<PrunePlan> {
    Ok(plan_from_scores(
        &magnitude_scores(store, c)?,
        c,
        granularity,
        widths,
        "magnitude",
    ))
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
