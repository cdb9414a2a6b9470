//! The operations of a decoder that a backend may run as fused kernels, chosen once per
//! backend by its `impl Kernels` (the CLI picks the backend; the model never asks which
//! one it runs on).
//!
//! The provided methods compose burn's tensor ops ([`composed`]): the path burn-cuda and
//! burn-ndarray take, differentiable under autodiff. burn-flex overrides them with the
//! one-pass CPU kernels of [`crate::cpu_kernels`] ([`flex`]), and `Autodiff<Flex>` with the
//! same kernels plus hand-written backward passes ([`flex_autodiff`]): a training step then
//! runs tiled attention without expanding K/V, RMSNorm, RoPE, SwiGLU and the LM head with
//! its loss each as one forward and one backward kernel, and never computes a gradient for
//! the frozen weights.

pub mod composed;
mod flex;
mod flex_autodiff;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{backend::Backend, Tensor};

use crate::rope::Rotary;

/// The losses computed from the student's final hidden states through the LM head.
#[derive(Debug, Clone)]
pub struct HeadTerms<'a, B: Backend> {
    /// The teacher's final hidden states (`[rows, hidden]`, constant) and the temperature
    /// `T`: the loss gains `T² · mean over rows of KL(softmax(t/T) ‖ softmax(s/T))` of the
    /// teacher's and student's logits.
    pub teacher: Option<(Tensor<B, 2>, f64)>,
    /// Each row's next token (`None` where the row predicts nothing) and a weight: the loss
    /// gains the weight times the mean next-token cross-entropy over the rows with a target.
    pub targets: Option<(&'a [Option<u32>], f64)>,
}

/// A head loss and the values of its terms.
#[derive(Debug, Clone)]
pub struct HeadLoss<B: Backend> {
    /// The loss, `[1]` (differentiable for the student's hidden states under autodiff).
    pub loss: Tensor<B, 1>,
    /// `T² · mean KL`, when there is a teacher.
    pub distill: Option<f64>,
    /// The mean next-token cross-entropy (unweighted), when there are targets.
    pub ntp: Option<f64>,
}

/// A backend's way of running the decoder's operations (see the module documentation).
/// Tensors are in the projections' layouts: activations `[batch, len, width]`, queries
/// `[batch, len, heads, head_dim]`, keys and values `[batch, keys, kv_heads, head_dim]`,
/// weights `[in, out]`.
pub trait Kernels: Backend {
    /// Runs a forward pass or a training step: on burn-flex on a thread of the rayon pool
    /// ([`crate::cpu_kernels::on_pool`]), elsewhere right here.
    fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Whether the model keeps its linear weights and embeddings in the checkpoint's dtype
    /// (bf16, f16) on this backend, its kernels widening them to f32 operation by operation
    /// (the same values as widening at load, in half the memory). The composed ops compute
    /// in f32 only, so the default is no.
    fn keeps_stored_dtype() -> bool {
        false
    }

    /// `x · weight` (the weight frozen: no gradient is computed for it).
    fn frozen_linear(x: Tensor<Self, 3>, weight: &Tensor<Self, 2>) -> Tensor<Self, 3> {
        composed::linear(x, weight)
    }

    /// `residual + x · weight` (the weight frozen).
    fn frozen_linear_add(
        residual: Tensor<Self, 3>,
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        residual + Self::frozen_linear(x, weight)
    }

    /// `silu(x · gate) * (x · up)` (SwiGLU's input to `down_proj`; weights frozen).
    fn swiglu_projections(
        x: Tensor<Self, 3>,
        gate: &Tensor<Self, 2>,
        up: &Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        Self::swiglu(
            Self::frozen_linear(x.clone(), gate),
            Self::frozen_linear(x, up),
        )
    }

    /// `silu(gate) * up` elementwise.
    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        composed::swiglu(gate, up)
    }

    /// `gelu_tanh(gate) * up` elementwise (GeGLU's input to `down_proj`).
    fn geglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        composed::geglu(gate, up)
    }

    /// `x` with each run of `group` values of its last dimension (`m.len() · group` wide)
    /// scaled by `m[i]`: a query head's `head_dim` outputs, or one MLP channel (`group = 1`).
    fn scale_groups<const D: usize>(
        x: Tensor<Self, D>,
        m: Tensor<Self, 1>,
        group: usize,
    ) -> Tensor<Self, D> {
        composed::scale_groups(x, m, group)
    }

    /// RMSNorm over the last dimension, computed in f32 like transformers' `LlamaRMSNorm`
    /// (the weight frozen).
    fn rms_norm(x: Tensor<Self, 3>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        composed::rms_norm(x, weight, eps)
    }

    /// The rotary position embedding of `x` `[batch, len, heads, head_dim]` at the
    /// positions of `tables`.
    fn rotary(x: Tensor<Self, 4>, tables: &Rotary<Self>) -> Tensor<Self, 4> {
        composed::rotary(x, tables)
    }

    /// Causal softmax attention of `q` `[b, t, h, d]` over `k`, `v` `[b, T, kv_heads, d]`,
    /// the `t` queries being the last `t` of the `T` positions; query head `i` reads KV
    /// head `i / (h / kv_heads)`. Returns `[b, t, h, d]`.
    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        composed::attention(q, k, v, None)
    }

    /// [`Kernels::causal_attention`] where each query also ignores the keys `window` or
    /// more positions behind it (sliding-window layers longer than their window).
    fn windowed_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        window: usize,
    ) -> Tensor<Self, 4> {
        composed::attention(q, k, v, Some(window))
    }

    /// `log softmax(hidden · head)[target]` per row of `hidden` `[rows, width]`.
    fn target_logprobs(
        hidden: Tensor<Self, 2>,
        head: &Tensor<Self, 2>,
        targets: &[u32],
    ) -> Vec<f32> {
        composed::target_logprobs(hidden, head, targets)
    }

    /// The losses of `terms` for the student's final hidden states `[rows, width]` through
    /// the LM head `head` (frozen).
    fn head_loss(
        student: Tensor<Self, 2>,
        head: &Tensor<Self, 2>,
        terms: HeadTerms<Self>,
    ) -> HeadLoss<Self> {
        composed::head_loss(student, head, terms)
    }
}

/// burn-ndarray: the composed ops (the unit tests' backend, and the generic path burn-cuda
/// takes, run on the CPU).
impl Kernels for NdArray {}
impl Kernels for Autodiff<NdArray> {}

#[cfg(feature = "cuda")]
impl Kernels for burn::backend::Cuda {}
#[cfg(feature = "cuda")]
impl Kernels for Autodiff<burn::backend::Cuda> {}

#[cfg(feature = "wgpu")]
impl Kernels for burn::backend::Wgpu {}
#[cfg(feature = "wgpu")]
impl Kernels for Autodiff<burn::backend::Wgpu> {}

/// A backend that trains: its autodiff wrapper and the inner backend (where the frozen
/// teacher runs, outside gradient tracking) both have their kernels.
pub trait TrainKernels:
    burn::tensor::backend::AutodiffBackend<InnerBackend: Kernels> + Kernels
{
}
impl<B> TrainKernels for B where
    B: burn::tensor::backend::AutodiffBackend<InnerBackend: Kernels> + Kernels
{
}
