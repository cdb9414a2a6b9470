//! Rotary position embedding in transformers' rotate-half layout, with the `linear` and
//! `llama3` frequency scalings.

use std::sync::Arc;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::config::{ModelConfig, RopeScaling};
use crate::kernels::Kernels;

/// Inverse frequencies of the rotary embedding, computed in f32 as transformers does.
pub fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    frequencies(
        config.head_dim,
        config.rope_theta,
        config.rope_scaling.as_ref(),
    )
}

/// Inverse frequencies of the sliding-window layers when they have their own (unscaled)
/// base (Gemma-3), else `None`: those layers use [`inverse_frequencies`].
pub fn local_inverse_frequencies(config: &ModelConfig) -> Option<Vec<f32>> {
    config
        .local_rope_theta
        .map(|theta| frequencies(config.head_dim, theta, None))
}

fn frequencies(dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let base = theta as f32;
    let inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match scaling {
        None => inv,
        Some(RopeScaling::Linear { factor }) => inv.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, low, high, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            inv.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Cosine and sine tables for positions `start..start+len`, each `[len, head_dim]`
/// (the frequencies repeated twice, as in `torch.cat((freqs, freqs), -1)`).
pub fn cos_sin_tables(inv_freq: &[f32], start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = vec![0.0f32; len * 2 * half];
    let mut sin = vec![0.0f32; len * 2 * half];
    for t in 0..len {
        let pos = (start + t) as f32;
        for (i, f) in inv_freq.iter().enumerate() {
            let angle = pos * f;
            let (s, c) = angle.sin_cos();
            let row = t * 2 * half;
            cos[row + i] = c;
            cos[row + half + i] = c;
            sin[row + i] = s;
            sin[row + half + i] = s;
        }
    }
    (cos, sin)
}

/// Rotary tables for positions `start..start + len`: host copies `[len, head_dim]` for the
/// CPU kernels (with the negated sines their backward pass rotates by), and device tensors
/// `[1, len, 1, head_dim]` with the `rotate_half` matrix for the composed ops.
#[derive(Debug, Clone)]
pub struct Rotary<B: Backend> {
    cos_sin: (Vec<f32>, Vec<f32>),
    /// Cosines and negated sines: the inverse rotation.
    inverse: Arc<(Vec<f32>, Vec<f32>)>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    /// `[head_dim, head_dim]` with `x · R = rotate_half(x) = [-x2, x1]`: one small matmul
    /// instead of slicing and concatenating strided halves.
    rotate_half: Tensor<B, 2>,
}

impl<B: Backend> Rotary<B> {
    /// Builds the tables for positions `start..start+len`.
    pub fn new(inv_freq: &[f32], start: usize, len: usize, device: &B::Device) -> Self {
        let dim = inv_freq.len() * 2;
        let half = inv_freq.len();
        let (cos, sin) = cos_sin_tables(inv_freq, start, len);
        let mut r = vec![0.0f32; dim * dim];
        for j in 0..half {
            r[(half + j) * dim + j] = -1.0; // output j < half takes -x[half + j]
            r[j * dim + half + j] = 1.0; // output half + j takes x[j]
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos.clone(), [1, len, 1, dim]), device),
            sin: Tensor::from_data(TensorData::new(sin.clone(), [1, len, 1, dim]), device),
            inverse: Arc::new((cos.clone(), sin.iter().map(|s| -s).collect())),
            cos_sin: (cos, sin),
            rotate_half: Tensor::from_data(TensorData::new(r, [dim, dim]), device),
        }
    }

    /// The host tables `(cos, sin)`, `[len, head_dim]` each.
    pub fn host(&self) -> (&[f32], &[f32]) {
        (&self.cos_sin.0, &self.cos_sin.1)
    }

    /// The host tables of the inverse rotation, `(cos, -sin)`.
    pub fn inverse(&self) -> Arc<(Vec<f32>, Vec<f32>)> {
        self.inverse.clone()
    }

    /// The device tables `cos`, `sin` (`[1, len, 1, head_dim]`) and the `rotate_half` matrix.
    pub fn tensors(&self) -> (&Tensor<B, 4>, &Tensor<B, 4>, &Tensor<B, 2>) {
        (&self.cos, &self.sin, &self.rotate_half)
    }
}

impl<B: Kernels> Rotary<B> {
    /// Applies the rotation to `x` of shape `[batch, len, heads, head_dim]` (the projection's
    /// own layout, so every elementwise pass reads contiguous memory).
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::rotary(x, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    fn config(scaling: Option<RopeScaling>) -> ModelConfig {
        let mut c = ModelConfig::from_json_str(
            r#"{"model_type":"llama","hidden_size":64,"intermediate_size":8,"num_hidden_layers":1,
                "num_attention_heads":4,"vocab_size":10,"rope_theta":10000.0}"#,
        )
        .unwrap();
        c.rope_scaling = scaling;
        c
    }

    #[test]
    fn default_frequencies_follow_the_formula() {
        let inv = inverse_frequencies(&config(None));
        assert_eq!(inv.len(), 8);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 10000f32.powf(-2.0 / 16.0)).abs() < 1e-7);
        let linear = inverse_frequencies(&config(Some(RopeScaling::Linear { factor: 4.0 })));
        assert!(linear
            .iter()
            .zip(&inv)
            .all(|(l, d)| (l * 4.0 - d).abs() < 1e-7));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        // Values from transformers' _compute_llama3_parameters with theta 10000, head_dim 16,
        // factor 8, low 1, high 4, original context 64.
        let scaled = inverse_frequencies(&config(Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        })));
        let inv = inverse_frequencies(&config(None));
        // wavelength 2*pi/f: below 16 kept, above 64 divided by 8, between smoothed.
        for (s, f) in scaled.iter().zip(&inv) {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < 16.0 {
                assert_eq!(s, f);
            } else if wavelen > 64.0 {
                assert!((s * 8.0 - f).abs() < 1e-7);
            } else {
                assert!(
                    *s < *f && *s > f / 8.0,
                    "smoothed {s} not between {} and {f}",
                    f / 8.0
                );
            }
        }
        assert!(scaled.iter().zip(&inv).any(|(s, f)| s == f));
        // transformers 5.24 `_compute_llama3_parameters` for the same config.
        let expected = [
            1.0,
            0.244_384_59,
            0.013_042_256,
            0.003_952_847_3,
            0.001_25,
            0.000_395_284_73,
            0.000_125,
            3.952_847_3e-5,
        ];
        for (s, e) in scaled.iter().zip(expected) {
            assert!((s - e).abs() <= 1e-6 * e, "{s} vs transformers {e}");
        }
        assert!(scaled
            .iter()
            .zip(&inv)
            .any(|(s, f)| (s * 8.0 - f).abs() < 1e-9));
    }

    #[test]
    fn rotation_is_rotate_half_and_preserves_norm() {
        let device = Default::default();
        let inv = vec![1.0f32, 0.1];
        let rot = Rotary::<NdArray>::new(&inv, 0, 3, &device);
        let x = Tensor::<NdArray, 4>::from_data(
            TensorData::new(
                (0..12).map(|v| v as f32 + 1.0).collect::<Vec<_>>(),
                [1, 3, 1, 4],
            ),
            &device,
        );
        let y: Vec<f32> = rot.apply(x.clone()).into_data().to_vec().unwrap();
        let x: Vec<f32> = x.into_data().to_vec().unwrap();
        // Position 0 is the identity.
        assert_eq!(&y[0..4], &x[0..4]);
        // Position 2, pair (0, 2) rotated by angle 2 * inv[0].
        let a = 2.0f32 * inv[0];
        let (x0, x2) = (x[8], x[10]);
        assert!((y[8] - (x0 * a.cos() - x2 * a.sin())).abs() < 1e-5);
        assert!((y[10] - (x2 * a.cos() + x0 * a.sin())).abs() < 1e-5);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&y[4..8]) - norm(&x[4..8])).abs() < 1e-3);
    }
}
