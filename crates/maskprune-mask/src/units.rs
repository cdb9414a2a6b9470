//! Real-valued unit masks and their straight-through binary forward.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use maskprune_model::{LayerMask, ModelConfig};

use crate::Granularity;

/// `1[m != 0]` in the forward pass; the gradient reaching it flows to `m` unchanged.
pub fn binary_ste<B: Backend>(m: Tensor<B, 1>) -> Tensor<B, 1> {
    let b = m.clone().not_equal_elem(0.0).float();
    // m - m.detach() is exactly 0 in value and 1 in gradient.
    b + (m.clone() - m.detach())
}

/// Mask values for every layer: attention units and MLP channels.
#[derive(Debug, Clone)]
pub struct UnitMasks<B: Backend> {
    /// What an attention unit is.
    pub granularity: Granularity,
    /// Per layer, one value per attention unit (`[units]`).
    pub attention: Vec<Tensor<B, 1>>,
    /// Per layer, one value per MLP channel (`[intermediate]`).
    pub channels: Vec<Tensor<B, 1>>,
    group_size: usize,
}

impl<B: Backend> UnitMasks<B> {
    /// Attention units per layer for a granularity.
    pub fn attention_units(config: &ModelConfig, granularity: Granularity) -> usize {
        match granularity {
            Granularity::KvGroup => config.num_key_value_heads,
            Granularity::QueryHead => config.num_attention_heads,
        }
    }

    /// Masks from explicit values (`attention[l]` has one value per unit, `channels[l]` one
    /// per MLP channel).
    pub fn from_values(
        config: &ModelConfig,
        granularity: Granularity,
        attention: Vec<Vec<f32>>,
        channels: Vec<Vec<f32>>,
        device: &B::Device,
    ) -> Self {
        let units = Self::attention_units(config, granularity);
        let t = |v: Vec<f32>, n: usize| {
            assert_eq!(v.len(), n, "mask length");
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), device)
        };
        Self {
            granularity,
            attention: attention.into_iter().map(|v| t(v, units)).collect(),
            channels: channels
                .into_iter()
                .map(|v| t(v, config.intermediate_size))
                .collect(),
            group_size: config.group_size(),
        }
    }

    /// All-ones masks (the dense model).
    pub fn ones(config: &ModelConfig, granularity: Granularity, device: &B::Device) -> Self {
        let units = Self::attention_units(config, granularity);
        let n = config.num_hidden_layers;
        Self::from_values(
            config,
            granularity,
            vec![vec![1.0; units]; n],
            vec![vec![1.0; config.intermediate_size]; n],
            device,
        )
    }

    /// The same masks with every tensor marked as requiring gradients.
    pub fn require_grad(self) -> Self {
        Self {
            attention: self
                .attention
                .into_iter()
                .map(Tensor::require_grad)
                .collect(),
            channels: self
                .channels
                .into_iter()
                .map(Tensor::require_grad)
                .collect(),
            ..self
        }
    }

    /// The model's per-layer masks: binary (straight-through) values expanded to query heads.
    pub fn layer_masks(&self) -> Vec<LayerMask<B>> {
        self.attention
            .iter()
            .zip(&self.channels)
            .map(|(a, c)| {
                let heads = binary_ste(a.clone());
                let heads = match self.granularity {
                    Granularity::QueryHead => heads,
                    Granularity::KvGroup => {
                        let units = heads.dims()[0];
                        heads
                            .reshape([units, 1])
                            .repeat_dim(1, self.group_size)
                            .reshape([units * self.group_size])
                    }
                };
                LayerMask {
                    heads: Some(heads),
                    channels: Some(binary_ste(c.clone())),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    type AD = Autodiff<NdArray>;

    #[test]
    fn ste_forward_is_binary_and_backward_is_identity() {
        let device = Default::default();
        let m =
            Tensor::<AD, 1>::from_data(TensorData::new(vec![0.0f32, 0.3, -2.0, 0.0], [4]), &device)
                .require_grad();
        let b = binary_ste(m.clone());
        assert_eq!(
            b.clone().into_data().to_vec::<f32>().unwrap(),
            vec![0.0, 1.0, 1.0, 0.0]
        );
        let w =
            Tensor::<AD, 1>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [4]), &device);
        let loss = (b * w).sum();
        let grads = loss.backward();
        let g: Vec<f32> = m.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert_eq!(
            g,
            vec![1.0, 2.0, 3.0, 4.0],
            "zeroed units get gradients too, so they can come back"
        );
    }

    #[test]
    fn kv_group_units_expand_to_their_query_heads() {
        let config = ModelConfig::from_json_str(
            r#"{"model_type":"llama","hidden_size":48,"intermediate_size":4,"num_hidden_layers":1,
                "num_attention_heads":6,"num_key_value_heads":2,"vocab_size":10}"#,
        )
        .unwrap();
        let device = Default::default();
        let masks = UnitMasks::<NdArray>::from_values(
            &config,
            Granularity::KvGroup,
            vec![vec![0.5, 0.0]],
            vec![vec![1.0, 0.0, 2.0, 0.0]],
            &device,
        );
        let lm = &masks.layer_masks()[0];
        let heads: Vec<f32> = lm.heads.clone().unwrap().into_data().to_vec().unwrap();
        assert_eq!(heads, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        let ch: Vec<f32> = lm.channels.clone().unwrap().into_data().to_vec().unwrap();
        assert_eq!(ch, vec![1.0, 0.0, 1.0, 0.0]);
    }
}
