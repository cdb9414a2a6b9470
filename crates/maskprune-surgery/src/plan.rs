//! Prune plans: the units each layer keeps, validated to give a standard architecture.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use maskprune_model::{LayerMask, ModelConfig};
use serde::{Deserialize, Serialize};

pub use maskprune_records::Granularity;

/// The units one layer keeps (sorted indices into the original model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// Kept query heads.
    pub query_heads: Vec<usize>,
    /// Kept key/value heads.
    pub kv_heads: Vec<usize>,
    /// Kept MLP channels.
    pub channels: Vec<usize>,
}

/// Kept units for every layer, and how they were chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrunePlan {
    /// Ranking method that produced the plan (`magnitude`, `maskprune`, ...).
    pub method: String,
    /// Attention unit granularity.
    pub granularity: Granularity,
    /// One entry per decoder layer.
    pub layers: Vec<LayerPlan>,
}

/// The architecture a valid plan produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PrunedShape {
    /// `num_attention_heads` after pruning.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` after pruning.
    pub num_key_value_heads: usize,
    /// `intermediate_size` after pruning.
    pub intermediate_size: usize,
}

fn check_indices(what: &str, layer: usize, idx: &[usize], bound: usize) -> Result<(), String> {
    if idx.is_empty() {
        return Err(format!("layer {layer}: no {what} kept"));
    }
    if idx.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "layer {layer}: {what} indices must be sorted and distinct"
        ));
    }
    if let Some(bad) = idx.iter().find(|&&i| i >= bound) {
        return Err(format!(
            "layer {layer}: {what} index {bad} is out of range (model has {bound})"
        ));
    }
    Ok(())
}

impl LayerPlan {
    /// A layer keeping the attention units `attention` (KV groups, each with its query
    /// heads, or query heads, each with its KV head, as `granularity` says) and `channels`;
    /// both sorted.
    pub fn from_units(
        c: &ModelConfig,
        granularity: Granularity,
        attention: Vec<usize>,
        channels: Vec<usize>,
    ) -> Self {
        let group = c.group_size();
        let (query_heads, kv_heads) = match granularity {
            Granularity::KvGroup => (
                attention
                    .iter()
                    .flat_map(|&j| j * group..(j + 1) * group)
                    .collect(),
                attention,
            ),
            Granularity::QueryHead => {
                let mut kv: Vec<usize> = attention.iter().map(|&q| q / group).collect();
                kv.dedup();
                (attention, kv)
            }
        };
        Self {
            query_heads,
            kv_heads,
            channels,
        }
    }

    /// Every kept query head's KV head (`group` query heads per KV head) is kept too.
    fn check_kv_heads_kept(&self, layer: usize, group: usize) -> Result<(), String> {
        match self
            .query_heads
            .iter()
            .find(|&&q| !self.kv_heads.contains(&(q / group)))
        {
            Some(q) => Err(format!(
                "layer {layer}: query head {q} is kept but its KV head {} is not",
                q / group
            )),
            None => Ok(()),
        }
    }
}

impl PrunePlan {
    /// Reads a plan file (`maskprune rank`, `train-masks`); errors name the file.
    pub fn read(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{}: invalid prune plan: {e}", path.display()))
    }

    /// Writes the plan as pretty JSON, atomically.
    pub fn write(&self, path: &std::path::Path) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(self).expect("plans serialise");
        maskprune_model::output::write_file_atomically(path, &json).map_err(|e| e.to_string())
    }

    /// The plan that keeps every unit of every layer (a surgery that only merges adapters).
    pub fn keep_all(config: &ModelConfig, method: &str) -> Self {
        let layer = LayerPlan {
            query_heads: (0..config.num_attention_heads).collect(),
            kv_heads: (0..config.num_key_value_heads).collect(),
            channels: (0..config.intermediate_size).collect(),
        };
        Self {
            method: method.into(),
            granularity: Granularity::KvGroup,
            layers: vec![layer; config.num_hidden_layers],
        }
    }

    /// Checks the plan fits `config` and is uniform; returns the pruned architecture.
    pub fn validate(&self, config: &ModelConfig) -> Result<PrunedShape, String> {
        self.check_layer_count(config)?;
        let group = config.group_size();
        let first = &self.layers[0];
        for (l, p) in self.layers.iter().enumerate() {
            check_indices("query head", l, &p.query_heads, config.num_attention_heads)?;
            check_indices("KV head", l, &p.kv_heads, config.num_key_value_heads)?;
            check_indices("channel", l, &p.channels, config.intermediate_size)?;
            if (p.query_heads.len(), p.kv_heads.len(), p.channels.len())
                != (
                    first.query_heads.len(),
                    first.kv_heads.len(),
                    first.channels.len(),
                )
            {
                return Err(format!(
                    "layer {l} keeps {}/{}/{} query heads/KV heads/channels but layer 0 keeps {}/{}/{}: the plan is not uniform",
                    p.query_heads.len(), p.kv_heads.len(), p.channels.len(),
                    first.query_heads.len(), first.kv_heads.len(), first.channels.len()
                ));
            }
            let per_group = p.query_heads.len() / p.kv_heads.len();
            for &kv in &p.kv_heads {
                let n = p.query_heads.iter().filter(|&&q| q / group == kv).count();
                if n != per_group || p.query_heads.len() % p.kv_heads.len() != 0 {
                    return Err(format!(
                        "layer {l}: KV head {kv} keeps {n} query heads; every kept KV head must keep the same number"
                    ));
                }
            }
            p.check_kv_heads_kept(l, group)?;
            if self.granularity == Granularity::QueryHead
                && p.kv_heads.len() != config.num_key_value_heads
            {
                return Err(format!(
                    "layer {l}: query_head granularity keeps every KV head"
                ));
            }
            if self.granularity == Granularity::KvGroup && per_group != group {
                return Err(format!("layer {l}: kv_group granularity keeps all {group} query heads of a kept KV head"));
            }
        }
        Ok(PrunedShape {
            num_attention_heads: first.query_heads.len(),
            num_key_value_heads: first.kv_heads.len(),
            intermediate_size: first.channels.len(),
        })
    }

    fn check_layer_count(&self, config: &ModelConfig) -> Result<(), String> {
        if self.layers.len() != config.num_hidden_layers {
            return Err(format!(
                "plan has {} layers but the model has {} (masks from another model?)",
                self.layers.len(),
                config.num_hidden_layers
            ));
        }
        Ok(())
    }

    /// Checks a plan that is applied as masks (`mask_checkpoint_with_lora`): layer count,
    /// index ranges, and query heads only under kept KV heads; layers may keep different
    /// numbers of units (or none). Returns the units kept per layer.
    pub fn validate_masked(&self, config: &ModelConfig) -> Result<Vec<[usize; 3]>, String> {
        self.check_layer_count(config)?;
        let group = config.group_size();
        self.layers
            .iter()
            .enumerate()
            .map(|(l, p)| {
                for (what, idx, bound) in [
                    ("query head", &p.query_heads, config.num_attention_heads),
                    ("KV head", &p.kv_heads, config.num_key_value_heads),
                    ("channel", &p.channels, config.intermediate_size),
                ] {
                    if !idx.is_empty() {
                        check_indices(what, l, idx, bound)?;
                    }
                }
                p.check_kv_heads_kept(l, group)?;
                Ok([p.query_heads.len(), p.kv_heads.len(), p.channels.len()])
            })
            .collect()
    }

    /// 0/1 masks on the original model that have the effect of this plan (kept = 1).
    pub fn masks<B: Backend>(&self, config: &ModelConfig, device: &B::Device) -> Vec<LayerMask<B>> {
        let indicator = |kept: &[usize], n: usize| {
            let mut v = vec![0.0f32; n];
            for &i in kept {
                v[i] = 1.0;
            }
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), device)
        };
        self.layers
            .iter()
            .map(|p| LayerMask {
                heads: Some(indicator(&p.query_heads, config.num_attention_heads)),
                channels: Some(indicator(&p.channels, config.intermediate_size)),
            })
            .collect()
    }
}
