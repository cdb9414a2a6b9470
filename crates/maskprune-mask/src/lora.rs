//! LoRA adapters for every layer, trained while the masks are learned.

use burn::tensor::{backend::Backend, Distribution, Tensor};
use maskprune_model::{LayerLora, Lora, ModelConfig};

/// Which projections get adapters, their rank and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank of every adapter.
    pub rank: usize,
    /// `alpha`; the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Projection names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

/// Adapters for every layer.
#[derive(Debug, Clone)]
pub struct LoraSet<B: Backend> {
    /// One entry per layer.
    pub layers: Vec<LayerLora<B>>,
}

impl<B: Backend> LoraSet<B> {
    /// Fresh adapters: `A` Gaussian (std 1/rank), `B = 0`, so training starts at the base model.
    pub fn new(
        config: &ModelConfig,
        lora: &LoraConfig,
        device: &B::Device,
    ) -> Result<Self, String> {
        let (h, q, kv, f) = (
            config.hidden_size,
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
            config.intermediate_size,
        );
        let make = |d_in: usize, d_out: usize| Lora {
            a: Tensor::random(
                [d_in, lora.rank],
                Distribution::Normal(0.0, 1.0 / lora.rank as f64),
                device,
            ),
            b: Tensor::zeros([lora.rank, d_out], device),
            scale: lora.alpha / lora.rank as f64,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let mut l = LayerLora::default();
            for t in &lora.targets {
                let slot = match t.as_str() {
                    "q_proj" => (&mut l.q_proj, h, q),
                    "k_proj" => (&mut l.k_proj, h, kv),
                    "v_proj" => (&mut l.v_proj, h, kv),
                    "o_proj" => (&mut l.o_proj, q, h),
                    "gate_proj" => (&mut l.gate_proj, h, f),
                    "up_proj" => (&mut l.up_proj, h, f),
                    "down_proj" => (&mut l.down_proj, f, h),
                    other => return Err(format!("unknown LoRA target `{other}`")),
                };
                *slot.0 = Some(make(slot.1, slot.2));
            }
            layers.push(l);
        }
        Ok(Self { layers })
    }

    /// Every adapter matrix, for optimisers and checkpoints (layer order, then a before b).
    pub fn tensors(&self) -> Vec<&Tensor<B, 2>> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .into_iter()
                .flatten()
                .flat_map(|a| [&a.a, &a.b])
            })
            .collect()
    }

    /// The same adapters with every matrix marked as requiring gradients.
    pub fn require_grad(self) -> Self {
        let g = |o: Option<Lora<B>>| {
            o.map(|l| Lora {
                a: l.a.require_grad(),
                b: l.b.require_grad(),
                scale: l.scale,
            })
        };
        Self {
            layers: self
                .layers
                .into_iter()
                .map(|l| LayerLora {
                    q_proj: g(l.q_proj),
                    k_proj: g(l.k_proj),
                    v_proj: g(l.v_proj),
                    o_proj: g(l.o_proj),
                    gate_proj: g(l.gate_proj),
                    up_proj: g(l.up_proj),
                    down_proj: g(l.down_proj),
                })
                .collect(),
        }
    }
}
