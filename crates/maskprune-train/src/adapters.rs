//! LoRA adapters kept on the host (exact checkpoints, a seeded initialisation) with their Adam
//! state, turned into burn tensors for each step; saved as safetensors under the names
//! `model.layers.{l}.{self_attn|mlp}.{proj}.lora_{a|b}` (`a`: `[in, rank]`, `b`: `[rank, out]`).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use maskprune_data::SplitMix64;
use maskprune_model::{LayerLora, Lora, ModelConfig};
use safetensors::tensor::TensorView;

use crate::config::LoraSettings;

/// One adapter matrix and its Adam moments.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMatrix {
    /// Tensor name.
    pub name: String,
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    /// Values, row-major.
    pub value: Vec<f32>,
    /// Adam first moment.
    pub m: Vec<f32>,
    /// Adam second moment.
    pub v: Vec<f32>,
}

/// All adapters of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapters {
    /// `alpha / rank`.
    pub scale: f64,
    /// Per layer, per target projection (in `settings.targets` order): the `a` and `b` matrices.
    pub matrices: Vec<AdapterMatrix>,
    /// Target projections.
    pub targets: Vec<String>,
    /// Adam steps taken.
    pub adam_steps: u64,
}

fn dims(c: &ModelConfig, proj: &str) -> (usize, usize) {
    let (h, q, kv, f) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    match proj {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, f),
        _ => (f, h), // down_proj; the config check refuses anything else
    }
}

/// The module path of a projection (`self_attn` or `mlp`).
pub fn module_of(proj: &str) -> &'static str {
    if ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&proj) {
        "self_attn"
    } else {
        "mlp"
    }
}

impl Adapters {
    /// Fresh adapters: `a` Gaussian with std `1/rank` (seeded), `b = 0`, so the student starts
    /// as the base model.
    pub fn new(c: &ModelConfig, s: &LoraSettings, seed: u64) -> Self {
        let mut rng = SplitMix64(seed ^ 0x4C6F_5241);
        let mut gauss = move || {
            // Box-Muller from two uniform draws.
            let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let u2 = ((rng.next_u64() >> 11) as f64) / (1u64 << 53) as f64;
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let mut matrices = Vec::new();
        if s.rank > 0 {
            for l in 0..c.num_hidden_layers {
                for proj in &s.targets {
                    let (d_in, d_out) = dims(c, proj);
                    let base = format!("model.layers.{l}.{}.{proj}", module_of(proj));
                    let a: Vec<f32> = (0..d_in * s.rank)
                        .map(|_| (gauss() / s.rank as f64) as f32)
                        .collect();
                    for (suffix, shape, value) in [
                        ("lora_a", [d_in, s.rank], a),
                        ("lora_b", [s.rank, d_out], vec![0.0; s.rank * d_out]),
                    ] {
                        let n = value.len();
                        matrices.push(AdapterMatrix {
                            name: format!("{base}.{suffix}"),
                            shape,
                            value,
                            m: vec![0.0; n],
                            v: vec![0.0; n],
                        });
                    }
                }
            }
        }
        Self {
            scale: if s.rank > 0 {
                s.alpha / s.rank as f64
            } else {
                0.0
            },
            matrices,
            targets: s.targets.clone(),
            adam_steps: 0,
        }
    }

    /// Per-layer adapters as burn tensors (marked as requiring gradients when `grad`), and the
    /// flat list of the same tensors in `matrices` order.
    pub fn to_tensors<B: Backend>(
        &self,
        layers: usize,
        device: &B::Device,
        grad: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>,
    ) -> (Vec<LayerLora<B>>, Vec<Tensor<B, 2>>) {
        let mut flat = Vec::with_capacity(self.matrices.len());
        for m in &self.matrices {
            let t = Tensor::<B, 2>::from_data(TensorData::new(m.value.clone(), m.shape), device);
            flat.push(grad(t));
        }
        let mut out: Vec<LayerLora<B>> = (0..layers).map(|_| LayerLora::default()).collect();
        if self.matrices.is_empty() {
            return (out, flat);
        }
        let per_layer = self.targets.len() * 2;
        for (l, layer) in out.iter_mut().enumerate() {
            for (k, proj) in self.targets.iter().enumerate() {
                let i = l * per_layer + 2 * k;
                let lora = Lora {
                    a: flat[i].clone(),
                    b: flat[i + 1].clone(),
                    scale: self.scale,
                };
                let slot = match proj.as_str() {
                    "q_proj" => &mut layer.q_proj,
                    "k_proj" => &mut layer.k_proj,
                    "v_proj" => &mut layer.v_proj,
                    "o_proj" => &mut layer.o_proj,
                    "gate_proj" => &mut layer.gate_proj,
                    "up_proj" => &mut layer.up_proj,
                    _ => &mut layer.down_proj,
                };
                *slot = Some(lora);
            }
        }
        (out, flat)
    }

    /// One Adam step (β = 0.9, 0.999, ε = 1e-8) from gradients in `matrices` order.
    pub fn adam_step(&mut self, grads: &[Vec<f32>], lr: f64) {
        self.adam_steps += 1;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let c1 = 1.0 - b1.powi(self.adam_steps.min(100_000) as i32);
        let c2 = 1.0 - b2.powi(self.adam_steps.min(100_000) as i32);
        for (mat, g) in self.matrices.iter_mut().zip(grads) {
            for (i, &gi) in g.iter().enumerate().take(mat.value.len()) {
                let gi = gi as f64;
                let m = b1 * mat.m[i] as f64 + (1.0 - b1) * gi;
                let v = b2 * mat.v[i] as f64 + (1.0 - b2) * gi * gi;
                mat.m[i] = m as f32;
                mat.v[i] = v as f32;
                let step = lr * (m / c1) / ((v / c2).sqrt() + eps);
                mat.value[i] = (mat.value[i] as f64 - step) as f32;
            }
        }
    }

    /// Writes the adapters (and, with `with_moments`, the Adam moments as `.adam_m` / `.adam_v`).
    pub fn save(&self, path: &Path, with_moments: bool) -> Result<(), String> {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for m in &self.matrices {
            owned.push((m.name.clone(), m.shape.to_vec(), bytes(&m.value)));
            if with_moments {
                owned.push((format!("{}.adam_m", m.name), m.shape.to_vec(), bytes(&m.m)));
                owned.push((format!("{}.adam_v", m.name), m.shape.to_vec(), bytes(&m.v)));
            }
        }
        let views: Vec<(String, TensorView)> = owned
            .iter()
            .map(|(n, s, b)| {
                TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| format!("{n}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let meta = HashMap::from([
            ("scale".to_string(), self.scale.to_string()),
            ("targets".to_string(), self.targets.join(",")),
            ("adam_steps".to_string(), self.adam_steps.to_string()),
        ]);
        let data = safetensors::serialize(views, Some(meta))
            .map_err(|e| format!("{}: cannot serialise: {e}", path.display()))?;
        maskprune_model::output::write_file_atomically(path, &data).map_err(|e| e.to_string())
    }

    /// Reads adapters written by [`Adapters::save`], checking they fit `c` and `s`.
    pub fn load(path: &Path, c: &ModelConfig, s: &LoraSettings) -> Result<Self, String> {
        let bad = |m: String| format!("{}: {m}", path.display());
        let data = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&data)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&data)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let info = meta.metadata().clone().unwrap_or_default();
        let mut out = Self::new(c, s, 0);
        out.adam_steps = info
            .get("adam_steps")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let read = |name: &str, shape: [usize; 2]| -> Result<Option<Vec<f32>>, String> {
            match st.tensor(name) {
                Err(_) => Ok(None),
                Ok(t) => {
                    if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                        return Err(bad(format!(
                            "`{name}` is {:?} {:?}, expected F32 {shape:?} (adapters from another model or rank?)",
                            t.dtype(),
                            t.shape()
                        )));
                    }
                    Ok(Some(
                        t.data()
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                    ))
                }
            }
        };
        for m in &mut out.matrices {
            m.value = read(&m.name, m.shape)?
                .ok_or_else(|| bad(format!("missing adapter `{}`", m.name)))?;
            if let Some(v) = read(&format!("{}.adam_m", m.name), m.shape)? {
                m.m = v;
            }
            if let Some(v) = read(&format!("{}.adam_v", m.name), m.shape)? {
                m.v = v;
            }
        }
        Ok(out)
    }
}
