//! Per-weight importances summed over the weights each unit owns: the magnitude baseline
//! (the L2 norm of a unit's weights) and the shared step of FLAP, Wanda-SP and Taylor.

use maskprune_model::{ModelConfig, Projection, Result, WeightStore};
use maskprune_surgery::LayerScores;

/// Non-negative per-weight importances of one layer's projections in PyTorch layout
/// (`[out, in]`); `None` counts as zero. A unit's score is the sum over its weights.
#[derive(Debug, Clone, Default)]
pub struct LayerImportance {
    /// `q_proj`, `[heads * head_dim, hidden]`.
    pub q: Option<Vec<f32>>,
    /// `k_proj`, `[kv_heads * head_dim, hidden]`.
    pub k: Option<Vec<f32>>,
    /// `v_proj`, `[kv_heads * head_dim, hidden]`.
    pub v: Option<Vec<f32>>,
    /// `o_proj`, `[hidden, heads * head_dim]`.
    pub o: Option<Vec<f32>>,
    /// `gate_proj`, `[intermediate, hidden]`.
    pub gate: Option<Vec<f32>>,
    /// `up_proj`, `[intermediate, hidden]`.
    pub up: Option<Vec<f32>>,
    /// `down_proj`, `[hidden, intermediate]`.
    pub down: Option<Vec<f32>>,
}

fn row_sum(w: &Option<Vec<f32>>, cols: usize, rows: std::ops::Range<usize>) -> f64 {
    w.as_ref().map_or(0.0, |w| {
        w[rows.start * cols..rows.end * cols]
            .iter()
            .map(|&x| x as f64)
            .sum()
    })
}

/// Column sums of a row-major `[rows, cols]` matrix (zeros when absent).
fn col_sums(w: &Option<Vec<f32>>, cols: usize) -> Vec<f64> {
    let mut acc = vec![0.0f64; cols];
    if let Some(w) = w {
        for row in w.chunks_exact(cols) {
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += x as f64;
            }
        }
    }
    acc
}

/// Sums the importances over each unit's weights: a query head owns its `q_proj` rows and
/// `o_proj` columns; a KV group its `k_proj`/`v_proj` rows plus its query heads; an MLP
/// channel its `gate_proj`/`up_proj` rows and its `down_proj` column.
pub fn unit_sums(imp: &LayerImportance, c: &ModelConfig) -> LayerScores {
    let (h, d, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (nq, nkv, group) = (c.num_attention_heads, c.num_key_value_heads, c.group_size());
    let o_cols = col_sums(&imp.o, nq * d);
    let query_heads: Vec<f64> = (0..nq)
        .map(|i| {
            row_sum(&imp.q, h, i * d..(i + 1) * d) + o_cols[i * d..(i + 1) * d].iter().sum::<f64>()
        })
        .collect();
    let kv_groups = (0..nkv)
        .map(|j| {
            row_sum(&imp.k, h, j * d..(j + 1) * d)
                + row_sum(&imp.v, h, j * d..(j + 1) * d)
                + query_heads[j * group..(j + 1) * group].iter().sum::<f64>()
        })
        .collect();
    let down_cols = col_sums(&imp.down, f);
    let channels = (0..f)
        .map(|ch| {
            row_sum(&imp.gate, h, ch..ch + 1) + row_sum(&imp.up, h, ch..ch + 1) + down_cols[ch]
        })
        .collect();
    LayerScores {
        query_heads,
        kv_groups,
        channels,
    }
}

/// Reads one layer's seven projection weights (PyTorch layout) as f32.
fn layer_weights(store: &WeightStore, c: &ModelConfig, l: usize) -> Result<LayerImportance> {
    let read = |p: Projection| store.read_projection(c, l, p).map(Some);
    Ok(LayerImportance {
        q: read(Projection::Q)?,
        k: read(Projection::K)?,
        v: read(Projection::V)?,
        o: read(Projection::O)?,
        gate: read(Projection::Gate)?,
        up: read(Projection::Up)?,
        down: read(Projection::Down)?,
    })
}

/// L2-norm scores of every unit of every layer.
pub fn magnitude_scores(store: &WeightStore, c: &ModelConfig) -> Result<Vec<LayerScores>> {
    (0..c.num_hidden_layers)
        .map(|l| {
            let mut w = layer_weights(store, c, l)?;
            for m in [
                &mut w.q,
                &mut w.k,
                &mut w.v,
                &mut w.o,
                &mut w.gate,
                &mut w.up,
                &mut w.down,
            ]
            .into_iter()
            .flatten()
            {
                m.iter_mut().for_each(|x| *x *= *x);
            }
            let s = unit_sums(&w, c);
            let sqrt = |v: Vec<f64>| v.into_iter().map(f64::sqrt).collect();
            Ok(LayerScores {
                query_heads: sqrt(s.query_heads),
                kv_groups: sqrt(s.kv_groups),
                channels: sqrt(s.channels),
            })
        })
        .collect()
}
