//! LoRA, in one place: the adapter a layer adds in the forward pass ([`Lora`], per layer
//! [`LayerLora`]), the settings ([`LoraSettings`]), the adapters kept on the host with their
//! Adam state ([`Adapters`]: seeded initialisation, tensors for a step, the update, exact
//! save/load), and the dense deltas surgery merges into the weights ([`read_deltas`]).
//!
//! Files are safetensors with `model.layers.{l}.{self_attn|mlp}.{proj}.lora_{a|b}`
//! (`a`: `[in, rank]`, `b`: `[rank, out]`) and metadata `scale`, `targets`, `adam_steps`.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use maskprune_data::SplitMix64;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::family::{layer_tensor_name, Projection};

/// A low-rank adapter `scale·A·B` added to a linear layer (LoRA).
#[derive(Debug, Clone)]
pub struct Lora<B: Backend> {
    /// Down projection, `[in, rank]`.
    pub a: Tensor<B, 2>,
    /// Up projection, `[rank, out]`.
    pub b: Tensor<B, 2>,
    /// `alpha / rank`.
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// `scale·(x·A)·B` for `x` `[batch, len, in]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d_in] = x.dims();
        let d_out = self.b.dims()[1];
        x.reshape([b * t, d_in])
            .matmul(self.a.clone())
            .matmul(self.b.clone())
            .mul_scalar(self.scale)
            .reshape([b, t, d_out])
    }
}

/// Optional LoRA adapters of one decoder layer, by projection.
#[derive(Debug, Clone)]
pub struct LayerLora<B: Backend> {
    /// On `q_proj`.
    pub q_proj: Option<Lora<B>>,
    /// On `k_proj`.
    pub k_proj: Option<Lora<B>>,
    /// On `v_proj`.
    pub v_proj: Option<Lora<B>>,
    /// On `o_proj`.
    pub o_proj: Option<Lora<B>>,
    /// On `gate_proj`.
    pub gate_proj: Option<Lora<B>>,
    /// On `up_proj`.
    pub up_proj: Option<Lora<B>>,
    /// On `down_proj`.
    pub down_proj: Option<Lora<B>>,
}

impl<B: Backend> LayerLora<B> {
    /// The adapter slot of projection `p`.
    pub fn slot_mut(&mut self, p: Projection) -> &mut Option<Lora<B>> {
        match p {
            Projection::Q => &mut self.q_proj,
            Projection::K => &mut self.k_proj,
            Projection::V => &mut self.v_proj,
            Projection::O => &mut self.o_proj,
            Projection::Gate => &mut self.gate_proj,
            Projection::Up => &mut self.up_proj,
            Projection::Down => &mut self.down_proj,
        }
    }
}

impl<B: Backend> Default for LayerLora<B> {
    fn default() -> Self {
        Self {
            q_proj: None,
            k_proj: None,
            v_proj: None,
            o_proj: None,
            gate_proj: None,
            up_proj: None,
            down_proj: None,
        }
    }
}

/// LoRA adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSettings {
    /// Rank (0 turns LoRA off).
    pub rank: usize,
    /// Scale numerator: updates are multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Projections that get adapters.
    pub targets: Vec<String>,
}

impl LoraSettings {
    /// Every target must be a projection adapters can attach to.
    pub fn check_targets(&self) -> Result<(), String> {
        match self
            .targets
            .iter()
            .find(|x| Projection::from_short(x).is_none())
        {
            Some(bad) => Err(format!(
                "lora.targets: unknown projection `{bad}` (one of {})",
                lora_targets().join(", ")
            )),
            None => Ok(()),
        }
    }
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

/// Every projection adapters can attach to (short names: `q_proj`, ..., `down_proj`).
pub fn lora_targets() -> [&'static str; 7] {
    Projection::ALL.map(Projection::short)
}

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
                    let p = Projection::from_short(proj).expect("targets are checked");
                    let [d_out, d_in] = c.projection_shape(p);
                    let base = layer_tensor_name(l, p.module());
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
                let p = Projection::from_short(proj).expect("targets are checked");
                *layer.slot_mut(p) = Some(lora);
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
        crate::output::write_file_atomically(path, &data).map_err(|e| e.to_string())
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

/// Dense `[out, in]` LoRA deltas (shape, values) keyed by the weight they add to.
pub type LoraDeltas = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// LoRA updates read from an adapters file (`maskprune train-masks` writes `lora.safetensors`:
/// `NAME.lora_a` `[in, rank]`, `NAME.lora_b` `[rank, out]`, metadata `scale`), as dense
/// `[out, in]` deltas keyed by the weight they add to (`NAME.weight`).
pub fn read_deltas(path: &Path) -> crate::Result<LoraDeltas> {
    let bad = |m: String| ModelError::new(path, m);
    let data = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&data)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let scale: f64 = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("scale"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no `scale` in the metadata: not a maskprune adapters file".into()))?;
    let f32s = |name: &str| -> crate::Result<(Vec<usize>, Vec<f32>)> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("`{name}` is missing")))?;
        if t.dtype() != safetensors::Dtype::F32 || t.shape().len() != 2 {
            return Err(bad(format!("`{name}` must be a 2-D F32 tensor")));
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((t.shape().to_vec(), v))
    };
    let mut out = HashMap::new();
    for name in st.names() {
        let Some(base) = name.strip_suffix(".lora_a") else {
            continue;
        };
        let (sa, a) = f32s(name)?;
        let (sb, b) = f32s(&format!("{base}.lora_b"))?;
        let (d_in, rank, d_out) = (sa[0], sa[1], sb[1]);
        if sb[0] != rank {
            return Err(bad(format!(
                "`{base}`: lora_a is {sa:?} but lora_b is {sb:?}"
            )));
        }
        // delta[o][i] = scale · Σ_k a[i][k] · b[k][o]  (transformers' [out, in] layout)
        let mut delta = vec![0.0f32; d_out * d_in];
        for i in 0..d_in {
            for k in 0..rank {
                let aik = a[i * rank + k] as f64 * scale;
                if aik == 0.0 {
                    continue;
                }
                for o in 0..d_out {
                    delta[o * d_in + i] += (aik * b[k * d_out + o] as f64) as f32;
                }
            }
        }
        out.insert(format!("{base}.weight"), (vec![d_out, d_in], delta));
    }
    Ok(out)
}
