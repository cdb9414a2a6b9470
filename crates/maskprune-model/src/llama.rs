//! The LLaMA-family decoder on burn, numerically following transformers'
//! `LlamaForCausalLM`, with optional per-layer masks over query heads and MLP channels.

use std::path::Path;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::family::{
    layer_tensor_name, Activation, Projection, EMBEDDINGS, FINAL_NORM, HEAD_NORMS, LM_HEAD,
};
use crate::kernels::{HeadLoss, HeadTerms, Kernels};
use crate::lora::{LayerLora, Lora};
use crate::rope::{inverse_frequencies, local_inverse_frequencies, Rotary};
use crate::weights::WeightStore;

/// A linear layer stored input-major (`[in, out]`), so that `y = x · W + b`.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    /// Weight, `[in_features, out_features]` (the transpose of PyTorch's layout).
    pub weight: Tensor<B, 2>,
    /// Optional bias, `[out_features]`.
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Kernels> Linear<B> {
    /// Applies the layer to `[batch, len, in]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_lora(x, None)
    }

    /// Applies the layer plus an optional low-rank adapter: `x·W + b + scale·(x·A)·B`.
    pub fn forward_lora(&self, x: Tensor<B, 3>, lora: Option<&Lora<B>>) -> Tensor<B, 3> {
        let mut y = match lora {
            Some(l) => B::frozen_linear(x.clone(), &self.weight) + l.forward(x),
            None => B::frozen_linear(x, &self.weight),
        };
        if let Some(bias) = &self.bias {
            y = y + bias.clone().unsqueeze::<3>();
        }
        y
    }

    /// `residual + self.forward_lora(x, lora)`; without bias or adapter, the backend's
    /// [`Kernels::frozen_linear_add`] (on burn-flex the product is accumulated into the residual).
    pub fn forward_add(
        &self,
        x: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        lora: Option<&Lora<B>>,
    ) -> Tensor<B, 3> {
        if lora.is_none() && self.bias.is_none() {
            return B::frozen_linear_add(residual, x, &self.weight);
        }
        residual + self.forward_lora(x, lora)
    }
}

/// RMSNorm with a learned scale, computed in f32 like transformers' `LlamaRMSNorm`.
#[derive(Debug, Clone)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel scale, `[hidden]`.
    pub weight: Tensor<B, 1>,
    /// Added to the mean square before the square root.
    pub eps: f64,
}

impl<B: Kernels> RmsNorm<B> {
    /// Normalises `[batch, len, hidden]` over the last dimension.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        B::rms_norm(x, &self.weight, self.eps)
    }
}

/// Where an observer sees a layer's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The input of `o_proj`: the heads' outputs, `[batch, len, heads * head_dim]`.
    OProjInput,
    /// The input of `down_proj`: `silu(gate) * up`, `[batch, len, intermediate]`.
    DownProjInput,
    /// The layer's output (the residual stream after it), `[batch, len, hidden]`.
    LayerOutput,
}

/// A callback shown intermediate activations of one layer.
pub type Observer<'a, B> = dyn FnMut(Site, &Tensor<B, 3>) + 'a;

/// A callback shown intermediate activations of every layer (`layer, site, activation`).
pub type ModelObserver<'a, B> = dyn FnMut(usize, Site, &Tensor<B, 3>) + 'a;

/// Per-layer masks multiplied into the forward pass. `None` means all ones (and costs nothing).
#[derive(Debug, Clone)]
pub struct LayerMask<B: Backend> {
    /// One value per query head, multiplied into the head's attention output before `o_proj`.
    pub heads: Option<Tensor<B, 1>>,
    /// One value per MLP channel, multiplied into `silu(gate) * up` before `down_proj`.
    pub channels: Option<Tensor<B, 1>>,
}

impl<B: Backend> Default for LayerMask<B> {
    fn default() -> Self {
        Self {
            heads: None,
            channels: None,
        }
    }
}

/// What a forward pass adds to the dense model, one entry per layer each: masks multiplied
/// into the heads' and channels' outputs, and LoRA adapters on the projections.
#[derive(Debug)]
pub struct Extras<'a, B: Backend> {
    /// Per-layer masks.
    pub masks: Option<&'a [LayerMask<B>]>,
    /// Per-layer LoRA adapters.
    pub lora: Option<&'a [LayerLora<B>]>,
}

impl<B: Backend> Clone for Extras<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Extras<'_, B> {}

impl<'a, B: Backend> Extras<'a, B> {
    /// The dense model.
    pub fn none() -> Self {
        Self {
            masks: None,
            lora: None,
        }
    }

    /// Masks only.
    pub fn masks(masks: &'a [LayerMask<B>]) -> Self {
        Self {
            masks: Some(masks),
            lora: None,
        }
    }

    /// Layer `i`'s share.
    fn layer(self, i: usize) -> LayerExtras<'a, B> {
        LayerExtras {
            mask: self.masks.map(|m| &m[i]),
            lora: self.lora.map(|l| &l[i]),
        }
    }
}

/// One layer's share of [`Extras`].
#[derive(Debug)]
pub struct LayerExtras<'a, B: Backend> {
    /// The layer's mask.
    pub mask: Option<&'a LayerMask<B>>,
    /// The layer's LoRA adapters.
    pub lora: Option<&'a LayerLora<B>>,
}

impl<B: Backend> Default for LayerExtras<'_, B> {
    fn default() -> Self {
        Self {
            mask: None,
            lora: None,
        }
    }
}

/// Self-attention with grouped-query heads.
#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    /// Query projection, `[hidden, heads * head_dim]`.
    pub q_proj: Linear<B>,
    /// Key projection, `[hidden, kv_heads * head_dim]`.
    pub k_proj: Linear<B>,
    /// Value projection, `[hidden, kv_heads * head_dim]`.
    pub v_proj: Linear<B>,
    /// Output projection, `[heads * head_dim, hidden]`.
    pub o_proj: Linear<B>,
    /// RMSNorm over each query head before the rotary embedding (Qwen3), `[head_dim]`.
    pub q_norm: Option<RmsNorm<B>>,
    /// The same over each key head.
    pub k_norm: Option<RmsNorm<B>>,
    /// Factor on the queries after the rotary embedding, so scores are scaled by the
    /// family's constant rather than `head_dim^-1/2` (Gemma-3's `query_pre_attn_scalar`).
    pub query_scale: Option<f32>,
    /// The sliding window this layer attends through, if any.
    pub sliding_window: Option<usize>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl<B: Kernels> Attention<B> {
    /// Causal attention over `[batch, len, hidden]`; `head_mask` scales each query head's output.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        head_mask: Option<&Tensor<B, 1>>,
    ) -> Tensor<B, 3> {
        self.o_proj
            .forward(self.heads(x, rotary, head_mask, None, None))
    }

    /// Attention before `o_proj` (with the layer's LoRA adapters, if any): the heads'
    /// outputs, `[b, t, heads * d]`.
    fn heads(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        head_mask: Option<&Tensor<B, 1>>,
        lora: Option<&LayerLora<B>>,
        observe: Option<&mut Observer<'_, B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, d) = (self.num_heads, self.head_dim);
        let adapter = |pick: fn(&LayerLora<B>) -> Option<&Lora<B>>| lora.and_then(pick);
        let (q, k, v) = self.project(x, rotary, adapter);
        let out = self.attend(q, k, v);
        let out = match head_mask {
            Some(m) => B::scale_groups(out, m.clone(), d),
            None => out,
        };
        let out = out.reshape([b, t, h * d]);
        if let Some(f) = observe {
            f(Site::OProjInput, &out);
        }
        out
    }

    /// Queries `[b, t, heads, d]` and keys `[b, t, kv_heads, d]` with rotary positions, and
    /// values `[b, t, kv_heads, d]`; `adapter` gives each projection's LoRA, if any.
    fn project<'a>(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        adapter: impl Fn(fn(&LayerLora<B>) -> Option<&Lora<B>>) -> Option<&'a Lora<B>>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)
    where
        B: 'a,
    {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward_lora(x.clone(), adapter(|l| l.q_proj.as_ref()));
        let k = self
            .k_proj
            .forward_lora(x.clone(), adapter(|l| l.k_proj.as_ref()));
        let v = self.v_proj.forward_lora(x, adapter(|l| l.v_proj.as_ref()));
        // Per-head RMSNorm (Qwen3) normalises each `d`-wide head: rows of `[b, t·heads, d]`.
        let head_norm = |x: Tensor<B, 3>, norm: &Option<RmsNorm<B>>, heads: usize| match norm {
            Some(n) => n
                .forward(x.reshape([b, t * heads, d]))
                .reshape([b, t, heads, d]),
            None => x.reshape([b, t, heads, d]),
        };
        let q = rotary.apply(head_norm(q, &self.q_norm, h));
        let q = match self.query_scale {
            Some(s) => q * s,
            None => q,
        };
        let k = rotary.apply(head_norm(k, &self.k_norm, kvh));
        (q, k, v.reshape([b, t, kvh, d]))
    }

    /// Attention of `t` new positions over the cached keys and values plus their own; the
    /// cache grows by `t`.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        cache: &mut LayerCache<B>,
    ) -> Tensor<B, 3> {
        self.o_proj.forward(self.heads_cached(x, rotary, cache))
    }

    /// [`Attention::forward_cached`] before `o_proj`.
    fn heads_cached(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        cache: &mut LayerCache<B>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, d) = (self.num_heads, self.head_dim);
        let (q, k, v) = self.project(x, rotary, |_| None);
        let (k, v) = match cache.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 1), Tensor::cat(vec![pv, v], 1)),
            None => (k, v),
        };
        cache.kv = Some((k.clone(), v.clone()));
        self.attend(q, k, v).reshape([b, t, h * d])
    }

    /// Causal attention, through the sliding window where there are more keys than it spans.
    fn attend(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        match self.sliding_window.filter(|&w| k.dims()[1] > w) {
            Some(window) => B::windowed_attention(q, k, v, window),
            None => B::causal_attention(q, k, v),
        }
    }
}

/// One layer's cached keys and values, `[batch, past, kv_heads, head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

/// The key/value cache of a whole model for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    /// Positions already in the cache.
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| LayerCache { kv: None }).collect(),
            len: 0,
        }
    }

    /// The cache of a batch of one, repeated for a batch of `n` (continuations of one
    /// shared prefix).
    pub fn repeat(&self, n: usize) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerCache {
                kv: l
                    .kv
                    .as_ref()
                    .map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n))),
            })
            .collect();
        Self {
            layers,
            len: self.len,
        }
    }
}

/// The gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU with `silu`, GeGLU with GELU).
#[derive(Debug, Clone)]
pub struct Mlp<B: Backend> {
    /// The gate's activation.
    pub activation: Activation,
    /// Gate projection, `[hidden, intermediate]`.
    pub gate_proj: Linear<B>,
    /// Up projection, `[hidden, intermediate]`.
    pub up_proj: Linear<B>,
    /// Down projection, `[intermediate, hidden]`.
    pub down_proj: Linear<B>,
}

impl<B: Kernels> Mlp<B> {
    /// Applies the MLP; `channel_mask` scales each intermediate channel.
    pub fn forward(&self, x: Tensor<B, 3>, channel_mask: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        self.down_proj
            .forward(self.activations(x, channel_mask, None, None))
    }

    /// The MLP before `down_proj` (with the layer's LoRA adapters, if any): `act(gate) * up`,
    /// masked.
    fn activations(
        &self,
        x: Tensor<B, 3>,
        channel_mask: Option<&Tensor<B, 1>>,
        lora: Option<&LayerLora<B>>,
        observe: Option<&mut Observer<'_, B>>,
    ) -> Tensor<B, 3> {
        // Without adapters or biases: both projections and the product in one operation (one
        // kernel on burn-flex).
        let fused = lora.is_none()
            && self.activation == Activation::Silu
            && self.gate_proj.bias.is_none()
            && self.up_proj.bias.is_none();
        let act = if fused {
            B::swiglu_projections(x, &self.gate_proj.weight, &self.up_proj.weight)
        } else {
            self.gated(x, lora)
        };
        let act = match channel_mask {
            Some(m) => B::scale_groups(act, m.clone(), 1),
            None => act,
        };
        if let Some(f) = observe {
            f(Site::DownProjInput, &act);
        }
        act
    }

    /// `act(gate(x)) * up(x)` from the two projections (with their adapters).
    fn gated(&self, x: Tensor<B, 3>, lora: Option<&LayerLora<B>>) -> Tensor<B, 3> {
        let adapter = |pick: fn(&LayerLora<B>) -> Option<&Lora<B>>| lora.and_then(pick);
        let gate = self
            .gate_proj
            .forward_lora(x.clone(), adapter(|l| l.gate_proj.as_ref()));
        let up = self
            .up_proj
            .forward_lora(x, adapter(|l| l.up_proj.as_ref()));
        match self.activation {
            Activation::Silu => B::swiglu(gate, up),
            Activation::GeluTanh => B::geglu(gate, up),
        }
    }
}

/// One pre-norm decoder block (with Gemma's sandwich norms: also on each branch's output).
#[derive(Debug, Clone)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub attention_norm: RmsNorm<B>,
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// Norm on the attention output before the residual add (Gemma).
    pub attention_output_norm: Option<RmsNorm<B>>,
    /// Norm before the MLP.
    pub mlp_norm: RmsNorm<B>,
    /// The MLP.
    pub mlp: Mlp<B>,
    /// Norm on the MLP output before the residual add (Gemma).
    pub mlp_output_norm: Option<RmsNorm<B>>,
}

/// `residual + out_norm(linear(x))`: without an output norm, [`Linear::forward_add`].
fn branch_add<B: Kernels>(
    linear: &Linear<B>,
    out_norm: &Option<RmsNorm<B>>,
    x: Tensor<B, 3>,
    residual: Tensor<B, 3>,
    lora: Option<&Lora<B>>,
) -> Tensor<B, 3> {
    match out_norm {
        Some(norm) => residual + norm.forward(linear.forward_lora(x, lora)),
        None => linear.forward_add(x, residual, lora),
    }
}

impl<B: Kernels> DecoderLayer<B> {
    /// The block over `t` new positions after those in `cache` (dense, no adapters); the
    /// cache grows by `t`.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        cache: &mut LayerCache<B>,
    ) -> Tensor<B, 3> {
        let heads =
            self.self_attn
                .heads_cached(self.attention_norm.forward(x.clone()), rotary, cache);
        let x = branch_add(
            &self.self_attn.o_proj,
            &self.attention_output_norm,
            heads,
            x,
            None,
        );
        let act = self
            .mlp
            .activations(self.mlp_norm.forward(x.clone()), None, None, None);
        branch_add(&self.mlp.down_proj, &self.mlp_output_norm, act, x, None)
    }

    /// Applies the block with the layer's mask and LoRA adapters, if any, showing `observe`
    /// the inputs of `o_proj` and `down_proj` (for activation-based importance scores and
    /// layer-wise distillation).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rotary: &Rotary<B>,
        extras: LayerExtras<'_, B>,
        mut observe: Option<&mut Observer<'_, B>>,
    ) -> Tensor<B, 3> {
        let LayerExtras { mask, lora } = extras;
        let heads = mask.and_then(|m| m.heads.as_ref());
        let channels = mask.and_then(|m| m.channels.as_ref());
        let out = self.self_attn.heads(
            self.attention_norm.forward(x.clone()),
            rotary,
            heads,
            lora,
            observe.as_deref_mut(),
        );
        let x = branch_add(
            &self.self_attn.o_proj,
            &self.attention_output_norm,
            out,
            x,
            lora.and_then(|l| l.o_proj.as_ref()),
        );
        let act = self
            .mlp
            .activations(self.mlp_norm.forward(x.clone()), channels, lora, observe);
        branch_add(
            &self.mlp.down_proj,
            &self.mlp_output_norm,
            act,
            x,
            lora.and_then(|l| l.down_proj.as_ref()),
        )
    }
}

/// A LLaMA-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    /// The architecture it was built from.
    pub config: ModelConfig,
    /// Token embeddings, `[vocab, hidden]`.
    pub embed_tokens: Tensor<B, 2>,
    /// The decoder blocks.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// LM head, `[hidden, vocab]` (a transposed copy of the embeddings when tied).
    pub lm_head: Tensor<B, 2>,
    /// Factor on the embeddings on the way in (Gemma: `sqrt(hidden)`).
    pub embed_scale: Option<f32>,
    inv_freq: Vec<f32>,
    /// Frequencies of the sliding-window layers when they have their own base (Gemma-3).
    local_inv_freq: Option<Vec<f32>>,
}

impl<B: Kernels> Llama<B> {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(dir)?;
        Self::from_store(config, &store, device)
    }

    /// Builds the model from a parsed config and an opened weight store.
    pub fn from_store(
        config: ModelConfig,
        store: &WeightStore,
        device: &B::Device,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let vector = |name: &str, len: usize| -> Result<Tensor<B, 1>> {
            let data = store.read_f32(name, &[len])?;
            Ok(Tensor::from_data(TensorData::new(data, [len]), device))
        };
        // A `[rows, cols]` matrix, transposed to `[cols, rows]` when asked, in the checkpoint's
        // dtype where the backend computes from it (see `Kernels::keeps_stored_dtype`).
        let matrix = |name: &str, shape: [usize; 2], transposed: bool| -> Result<Tensor<B, 2>> {
            let data = if B::keeps_stored_dtype() {
                store.read_stored(name, &shape, transposed)?
            } else {
                let [rows, cols] = shape;
                let v = store.read_f32(name, &shape)?;
                if transposed {
                    TensorData::new(transpose(&v, rows, cols), [cols, rows])
                } else {
                    TensorData::new(v, shape)
                }
            };
            Ok(in_its_dtype(data, device))
        };
        let linear = |layer: usize, p: Projection, bias: bool| -> Result<Linear<B>> {
            let [d_out, _] = c.projection_shape(p);
            let weight_name = layer_tensor_name(layer, &format!("{}.weight", p.module()));
            let bias_name = layer_tensor_name(layer, &format!("{}.bias", p.module()));
            Ok(Linear {
                // PyTorch stores Linear weights as [out, in]; we keep [in, out].
                weight: matrix(&weight_name, c.projection_shape(p), true)?,
                bias: bias.then(|| vector(&bias_name, d_out)).transpose()?,
            })
        };
        // Gemma stores `w` and scales by `1 + w`: the offset is added once, here.
        let offset = c.family.norm_weight_offset();
        let norm_of = |name: &str, len: usize| -> Result<RmsNorm<B>> {
            let mut w = store.read_f32(name, &[len])?;
            w.iter_mut().for_each(|v| *v += offset);
            Ok(RmsNorm {
                weight: Tensor::from_data(TensorData::new(w, [len]), device),
                eps: c.rms_norm_eps,
            })
        };
        let norm = |name: &str| norm_of(name, h);
        let head_norm = |name: &str| -> Result<Option<RmsNorm<B>>> {
            c.family
                .qk_norm()
                .then(|| norm_of(name, c.head_dim))
                .transpose()
        };
        let names = c.family.layer_norms();
        let query_scale = c.query_scale.map(|s| s as f32);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let b = c.biases;
            let name = |tail: &str| layer_tensor_name(i, tail);
            let optional_norm = |tail: Option<&str>| tail.map(|t| norm(&name(t))).transpose();
            layers.push(DecoderLayer {
                attention_norm: norm(&name(names.attention_input))?,
                self_attn: Attention {
                    q_proj: linear(i, Projection::Q, b.qkv)?,
                    k_proj: linear(i, Projection::K, b.qkv)?,
                    v_proj: linear(i, Projection::V, b.qkv)?,
                    o_proj: linear(i, Projection::O, b.o)?,
                    q_norm: head_norm(&name(HEAD_NORMS[0]))?,
                    k_norm: head_norm(&name(HEAD_NORMS[1]))?,
                    query_scale,
                    sliding_window: c.sliding_window.filter(|_| c.sliding_layers[i]),
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                attention_output_norm: optional_norm(names.attention_output)?,
                mlp_norm: norm(&name(names.mlp_input))?,
                mlp: Mlp {
                    activation: c.activation,
                    gate_proj: linear(i, Projection::Gate, b.mlp)?,
                    up_proj: linear(i, Projection::Up, b.mlp)?,
                    down_proj: linear(i, Projection::Down, b.mlp)?,
                },
                mlp_output_norm: optional_norm(names.mlp_output)?,
            });
        }
        // The LM head stays f32: the head kernels stream it once per call.
        let head_name = if c.tie_word_embeddings {
            EMBEDDINGS
        } else {
            LM_HEAD
        };
        let lm_head = transpose(
            &store.read_f32(head_name, &[c.vocab_size, h])?,
            c.vocab_size,
            h,
        );
        Ok(Self {
            embed_tokens: matrix(EMBEDDINGS, [c.vocab_size, h], false)?,
            lm_head: Tensor::from_data(TensorData::new(lm_head, [h, c.vocab_size]), device),
            norm: norm(FINAL_NORM)?,
            layers,
            embed_scale: c.family.embedding_scale(h),
            inv_freq: inverse_frequencies(c),
            local_inv_freq: local_inverse_frequencies(c),
            config,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.embed_tokens.device()
    }
}

impl<B: Kernels> Llama<B> {
    /// Logits `[batch, len, vocab]` of the dense model.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        self.forward_with(tokens, Extras::none())
    }

    /// Logits `[batch, len, vocab]` with the masks and LoRA adapters of `extras`.
    pub fn forward_with(
        &self,
        tokens: Tensor<B, 2, Int>,
        extras: Extras<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        let hidden = self.hidden_states(tokens, extras)?;
        Ok(self.logits(hidden))
    }

    /// Final-norm hidden states `[batch, len, hidden]`, before the LM head.
    pub fn hidden_states(
        &self,
        tokens: Tensor<B, 2, Int>,
        extras: Extras<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        B::run(|| self.run_layers(tokens, extras, None))
    }

    fn run_layers(
        &self,
        tokens: Tensor<B, 2, Int>,
        extras: Extras<'_, B>,
        mut observe: Option<&mut ModelObserver<'_, B>>,
    ) -> Result<Tensor<B, 3>> {
        let t = tokens.dims()[1];
        for (what, n) in [
            ("masks", extras.masks.map(<[_]>::len)),
            ("LoRA adapters", extras.lora.map(<[_]>::len)),
        ] {
            if let Some(n) = n.filter(|&n| n != self.layers.len()) {
                return Err(ModelError::new(
                    what,
                    format!(
                        "{n} layer {what} given for a model of {} layers",
                        self.layers.len()
                    ),
                ));
            }
        }
        let rotaries = self.rotaries(0, t);
        let mut x = self.embed(tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let mut observe_layer = |site: Site, t: &Tensor<B, 3>| {
                if let Some(f) = observe.as_deref_mut() {
                    f(i, site, t)
                }
            };
            x = layer.forward(
                x,
                self.rotary_of(&rotaries, i),
                extras.layer(i),
                Some(&mut observe_layer),
            );
            observe_layer(Site::LayerOutput, &x);
        }
        Ok(self.norm.forward(x))
    }

    /// [`Llama::hidden_states`] that also shows `observe(layer, site, activation)` the inputs
    /// of every layer's `o_proj` and `down_proj` and its output (for layer-wise
    /// distillation: under autodiff the tensors it keeps stay in the graph).
    pub fn hidden_states_observed(
        &self,
        tokens: Tensor<B, 2, Int>,
        extras: Extras<'_, B>,
        observe: &mut ModelObserver<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        self.run_layers(tokens, extras, Some(observe))
    }

    /// Runs the dense model over `tokens` and shows `observe(layer, site, input)` the inputs
    /// of every layer's `o_proj` and `down_proj` (`[batch, len, width]`) and its output; no
    /// logits.
    pub fn observe(
        &self,
        tokens: Tensor<B, 2, Int>,
        observe: &mut ModelObserver<'_, B>,
    ) -> Result<()> {
        self.run_layers(tokens, Extras::none(), Some(observe))
            .map(|_| ())
    }

    /// Logits `[batch, t, vocab]` of `t` new tokens after the `cache.len` cached positions
    /// (dense model, no masks); the cache grows by `t`. Prefill with an empty cache, then
    /// feed one token at a time.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let hidden = self.hidden_states_cached(tokens, cache)?;
        Ok(self.logits(hidden))
    }

    /// [`Llama::forward_cached`] up to the final norm: hidden states `[batch, t, hidden]`.
    pub fn hidden_states_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        B::run(|| self.run_layers_cached(tokens, cache))
    }

    fn run_layers_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let t = tokens.dims()[1];
        let past = cache.len;
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::new(
                "KV cache",
                format!(
                    "cache of {} layers for a model of {}",
                    cache.layers.len(),
                    self.layers.len()
                ),
            ));
        }
        let rotaries = self.rotaries(past, t);
        let mut x = self.embed(tokens);
        for (i, (layer, lc)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            x = layer.forward_cached(x, self.rotary_of(&rotaries, i), lc);
        }
        cache.len += t;
        Ok(self.norm.forward(x))
    }

    /// Token embeddings `[batch, len, hidden]` in f32, scaled where the family scales them.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let x = self
            .embed_tokens
            .clone()
            .select(0, tokens.reshape([b * t]))
            .reshape([b, t, self.config.hidden_size]);
        let x = if x.dtype() == DType::F32 {
            x
        } else {
            x.cast(FloatDType::F32)
        };
        match self.embed_scale {
            Some(s) => x * s,
            None => x,
        }
    }

    /// Rotary tables for positions `start..start + len`: the global ones, and the
    /// sliding-window layers' own when they have their own base.
    fn rotaries(&self, start: usize, len: usize) -> (Rotary<B>, Option<Rotary<B>>) {
        let device = self.device();
        (
            Rotary::new(&self.inv_freq, start, len, &device),
            self.local_inv_freq
                .as_ref()
                .map(|f| Rotary::new(f, start, len, &device)),
        )
    }

    /// Layer `i`'s rotary tables out of [`Llama::rotaries`].
    fn rotary_of<'r>(
        &self,
        (global, local): &'r (Rotary<B>, Option<Rotary<B>>),
        i: usize,
    ) -> &'r Rotary<B> {
        match local {
            Some(local) if self.config.sliding_layers[i] => local,
            _ => global,
        }
    }

    /// Applies the LM head to hidden states.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        B::run(|| B::frozen_linear(hidden, &self.lm_head))
    }

    /// `log p(target)` of each row of final hidden states `[rows, hidden]` (perplexity and
    /// zero-shot scoring): the logits are reduced as they are computed, never kept whole.
    pub fn target_logprobs(&self, hidden: Tensor<B, 2>, targets: &[u32]) -> Vec<f32> {
        B::run(|| B::target_logprobs(hidden, &self.lm_head, targets))
    }

    /// The distillation and next-token losses of final hidden states `[batch, len, hidden]`
    /// (rows in order: batch-major), computed through the LM head.
    pub fn head_loss(&self, hidden: Tensor<B, 3>, terms: HeadTerms<B>) -> HeadLoss<B> {
        let [b, t, h] = hidden.dims();
        B::run(|| B::head_loss(hidden.reshape([b * t, h]), &self.lm_head, terms))
    }
}

impl<B: AutodiffBackend> Llama<B> {
    /// The same weights on the inner backend, outside gradient tracking (no copy): a frozen
    /// teacher runs there, with the inner backend's inference kernels.
    pub fn inner(&self) -> Llama<B::InnerBackend> {
        let linear = |l: &Linear<B>| Linear {
            weight: l.weight.clone().inner(),
            bias: l.bias.clone().map(Tensor::inner),
        };
        let norm = |n: &RmsNorm<B>| RmsNorm {
            weight: n.weight.clone().inner(),
            eps: n.eps,
        };
        Llama {
            config: self.config.clone(),
            embed_tokens: self.embed_tokens.clone().inner(),
            layers: self
                .layers
                .iter()
                .map(|l| DecoderLayer {
                    attention_norm: norm(&l.attention_norm),
                    self_attn: Attention {
                        q_proj: linear(&l.self_attn.q_proj),
                        k_proj: linear(&l.self_attn.k_proj),
                        v_proj: linear(&l.self_attn.v_proj),
                        o_proj: linear(&l.self_attn.o_proj),
                        q_norm: l.self_attn.q_norm.as_ref().map(norm),
                        k_norm: l.self_attn.k_norm.as_ref().map(norm),
                        query_scale: l.self_attn.query_scale,
                        sliding_window: l.self_attn.sliding_window,
                        num_heads: l.self_attn.num_heads,
                        num_kv_heads: l.self_attn.num_kv_heads,
                        head_dim: l.self_attn.head_dim,
                    },
                    attention_output_norm: l.attention_output_norm.as_ref().map(norm),
                    mlp_norm: norm(&l.mlp_norm),
                    mlp: Mlp {
                        activation: l.mlp.activation,
                        gate_proj: linear(&l.mlp.gate_proj),
                        up_proj: linear(&l.mlp.up_proj),
                        down_proj: linear(&l.mlp.down_proj),
                    },
                    mlp_output_norm: l.mlp_output_norm.as_ref().map(norm),
                })
                .collect(),
            norm: norm(&self.norm),
            lm_head: self.lm_head.clone().inner(),
            embed_scale: self.embed_scale,
            inv_freq: self.inv_freq.clone(),
            local_inv_freq: self.local_inv_freq.clone(),
        }
    }
}

pub use crate::weights::transpose;

/// A tensor of `data` in `data`'s own dtype (`from_data` alone would convert it to the
/// backend's default float type).
fn in_its_dtype<B: Backend, const D: usize>(data: TensorData, device: &B::Device) -> Tensor<B, D> {
    let dtype = data.dtype;
    Tensor::from_data(data, (device, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo_random;
    use burn::backend::NdArray;

    type B = NdArray;

    fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn rms_norm_divides_by_the_root_mean_square() {
        let norm = RmsNorm {
            weight: tensor(vec![1.0, 2.0], [2]),
            eps: 0.0,
        };
        let y = values(norm.forward(tensor(vec![3.0, 4.0, -1.0, 1.0], [1, 2, 2])));
        let rms = (12.5f32).sqrt();
        let expected = [3.0 / rms, 8.0 / rms, -1.0, 2.0];
        for (a, b) in y.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    fn linear(d_in: usize, d_out: usize, seed: u64) -> Linear<B> {
        Linear {
            weight: tensor(pseudo_random(d_in * d_out, seed), [d_in, d_out]),
            bias: None,
        }
    }

    #[test]
    fn grouped_query_attention_equals_attention_with_repeated_kv_heads() {
        let (hidden, heads, kv_heads, d, t) = (16, 4, 2, 4, 5);
        let gqa = Attention {
            q_proj: linear(hidden, heads * d, 1),
            k_proj: linear(hidden, kv_heads * d, 2),
            v_proj: linear(hidden, kv_heads * d, 3),
            q_norm: None,
            k_norm: None,
            query_scale: None,
            sliding_window: None,
            o_proj: linear(heads * d, hidden, 4),
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
        };
        // Multi-head attention whose k/v columns repeat each KV head for its query heads,
        // as transformers' repeat_kv does: query head h reads KV head h / (heads / kv_heads).
        let repeat = |w: &Tensor<B, 2>| {
            let cols: Vec<Tensor<B, 2>> = (0..heads)
                .map(|h| w.clone().narrow(1, (h / 2) * d, d))
                .collect();
            Linear {
                weight: Tensor::cat(cols, 1),
                bias: None,
            }
        };
        let mha = Attention {
            k_proj: repeat(&gqa.k_proj.weight),
            v_proj: repeat(&gqa.v_proj.weight),
            num_kv_heads: heads,
            ..gqa.clone()
        };
        let device = Default::default();
        let rotary = Rotary::new(&[1.0, 0.1], 0, t, &device);
        let x = tensor(pseudo_random(2 * t * hidden, 5), [2, t, hidden]);
        let a = values(gqa.forward(x.clone(), &rotary, None));
        let b = values(mha.forward(x, &rotary, None));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-6,
            "GQA differs from repeated-KV attention by {diff}"
        );
    }

    #[test]
    fn attention_is_causal() {
        let (hidden, d, t) = (8, 4, 6);
        let attn = Attention {
            q_proj: linear(hidden, 2 * d, 1),
            k_proj: linear(hidden, d, 2),
            v_proj: linear(hidden, d, 3),
            q_norm: None,
            k_norm: None,
            query_scale: None,
            sliding_window: None,
            o_proj: linear(2 * d, hidden, 4),
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: d,
        };
        let device = Default::default();
        let rotary = Rotary::new(&[1.0, 0.1], 0, t, &device);
        let x = pseudo_random(t * hidden, 9);
        let mut changed = x.clone();
        for v in &mut changed[(t - 1) * hidden..] {
            *v += 1.0; // only the last position changes
        }
        let a = values(attn.forward(tensor(x, [1, t, hidden]), &rotary, None));
        let b = values(attn.forward(tensor(changed, [1, t, hidden]), &rotary, None));
        assert_eq!(&a[..(t - 1) * hidden], &b[..(t - 1) * hidden]);
        assert_ne!(&a[(t - 1) * hidden..], &b[(t - 1) * hidden..]);
    }

    #[test]
    fn transpose_is_row_major() {
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
    }
}
