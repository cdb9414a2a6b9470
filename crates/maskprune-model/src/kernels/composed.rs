//! The decoder's operations and losses as compositions of burn's tensor ops: the definitions
//! the fused kernels are tested against, and what every backend without kernels of its own
//! runs (differentiable under autodiff).

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, ElementConversion, Int, Tensor, TensorData};

use super::{HeadLoss, HeadTerms};
use crate::rope::Rotary;

/// `x · weight` for `x` `[b, t, in]`, `weight` `[in, out]`.
pub fn linear<B: Backend>(x: Tensor<B, 3>, weight: &Tensor<B, 2>) -> Tensor<B, 3> {
    let [b, t, d_in] = x.dims();
    let d_out = weight.dims()[1];
    x.reshape([b * t, d_in])
        .matmul(weight.clone())
        .reshape([b, t, d_out])
}

/// SiLU as `x / (1 + exp(-x))`: four elementwise passes where burn's generic
/// `exp(-log(1 + exp(-x)))` sigmoid takes seven (same values to float rounding).
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() / x.neg().exp().add_scalar(1.0)
}

/// `silu(gate) * up`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// `gelu_tanh(gate) * up` (GeGLU), with PyTorch's tanh approximation of GELU:
/// `0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))`.
pub fn geglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let inner = (gate.clone() + gate.clone().powi_scalar(3) * 0.044715)
        * (2.0f64 / std::f64::consts::PI).sqrt();
    (gate * 0.5) * (inner.tanh() + 1.0) * up
}

/// `x` with each run of `group` values of its last dimension scaled by `m[i]`.
pub fn scale_groups<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    m: Tensor<B, 1>,
    group: usize,
) -> Tensor<B, D> {
    let shape = x.dims();
    let n = m.dims()[0];
    let rows = shape.iter().product::<usize>() / (n * group);
    (x.reshape([rows, n, group]) * m.reshape([1, n, 1])).reshape(shape)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: &Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    // A true division: burn-ndarray's SIMD `recip` is an approximation (~1e-4 relative),
    // which alone put the logits 2e-3 away from transformers.
    let rms = x.clone().square().mean_dim(2).add_scalar(eps).sqrt();
    x / rms * weight.clone().unsqueeze::<3>()
}

/// The rotary embedding `x·cos + rotate_half(x)·sin` of `x` `[b, t, h, d]`.
pub fn rotary<B: Backend>(x: Tensor<B, 4>, tables: &Rotary<B>) -> Tensor<B, 4> {
    let [b, t, h, d] = x.dims();
    let (cos, sin, rotate_half) = tables.tensors();
    // Tables at `x`'s full shape: products of equal shapes take every backend's fast
    // path, forwards and backwards (a broadcast product walks strides and its backward
    // sums over the broadcast axes).
    let cos = cos.clone().repeat_dim(2, h).repeat_dim(0, b);
    let sin = sin.clone().repeat_dim(2, h).repeat_dim(0, b);
    let rotated = x
        .clone()
        .reshape([b * t * h, d])
        .matmul(rotate_half.clone())
        .reshape([b, t, h, d]);
    x * cos + rotated * sin
}

/// Causal grouped-query attention with burn's `attention` op (a flash kernel on CUDA), the
/// KV heads expanded to their query heads; with `window`, a query
/// also ignores keys `window` or more positions behind it (sliding-window layers, as
/// transformers' `sliding_window_overlay`).
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    window: Option<usize>,
) -> Tensor<B, 4> {
    let [b, len, kvh, d] = k.dims();
    let [_, t, h, _] = q.dims();
    let rep = h / kvh;
    // Grouped-query attention: each KV head serves `rep` consecutive query heads.
    let heads_first = |x: Tensor<B, 4>| {
        let x = x.swap_dims(1, 2);
        if rep == 1 {
            x
        } else {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kvh, rep, len, d])
                .reshape([b, kvh * rep, len, d])
        }
    };
    // `true` hides a key: query `i` sits at position `len - t + i`.
    let mask = window.map(|w| {
        let hidden: Vec<bool> = (0..t)
            .flat_map(|i| (0..len).map(move |j| j + w <= len - t + i))
            .collect();
        Tensor::<B, 2, Bool>::from_data(TensorData::new(hidden, [t, len]), &q.device())
            .reshape([1, 1, t, len])
            .expand([b, h, t, len])
    });
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    burn_attention(
        q.swap_dims(1, 2),
        heads_first(k),
        heads_first(v),
        mask,
        None,
        options,
    )
    .swap_dims(1, 2)
}

/// `log softmax(logits)[target]` per row of `[rows, vocab]` logits.
///
/// The normaliser is summed in two levels (blocks of 128, then the blocks): a flat f32 sum
/// over a 49k vocabulary drifts by ~1e-4 nats, which showed as a systematic offset against
/// transformers at seq-len 1024.
pub fn logprobs_of<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [rows, vocab] = logits.dims();
    let shifted = logits.clone() - logits.max_dim(1);
    let picked = shifted.clone().gather(1, targets);
    let exp = shifted.exp();
    const BLOCK: usize = 128;
    let sum = if vocab % BLOCK == 0 {
        exp.reshape([rows, vocab / BLOCK, BLOCK])
            .sum_dim(2)
            .sum_dim(1)
            .reshape([rows, 1])
    } else {
        exp.sum_dim(1)
    };
    (picked - sum.log()).reshape([rows])
}

/// Target ids `[rows, 1]`.
fn target_column<B: Backend>(targets: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(ids, [targets.len(), 1]), device)
}

/// [`super::Kernels::target_logprobs`]: the logits, then [`logprobs_of`].
pub fn target_logprobs<B: Backend>(
    hidden: Tensor<B, 2>,
    head: &Tensor<B, 2>,
    targets: &[u32],
) -> Vec<f32> {
    let device = hidden.device();
    let logits = hidden.matmul(head.clone());
    logprobs_of(logits, target_column(targets, &device))
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data")
}

/// Mean over rows of KL(teacher ‖ student) on logits `[rows, vocab]` softened by
/// `temperature`, times `temperature²` (Hinton et al.) so gradients keep their scale. The
/// teacher's logits are detached.
pub fn distillation_kl<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 1> {
    let rows = student.dims()[0];
    let teacher = teacher.detach().div_scalar(temperature);
    let log_p_t = log_softmax(teacher.clone(), 1);
    let p_t = softmax(teacher, 1);
    let log_p_s = log_softmax(student.div_scalar(temperature), 1);
    (p_t * (log_p_t - log_p_s))
        .sum()
        .div_scalar(rows as f64)
        .mul_scalar(temperature * temperature)
}

/// Mean cross-entropy of logits `[rows, vocab]` for one target per row.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: &[u32]) -> Tensor<B, 1> {
    let rows = logits.dims()[0];
    let device = logits.device();
    log_softmax(logits, 1)
        .gather(1, target_column(targets, &device))
        .sum()
        .neg()
        .div_scalar(rows as f64)
}

/// [`super::Kernels::head_loss`]: the logits, [`distillation_kl`] and [`cross_entropy`] over
/// the rows that have a target.
pub fn head_loss<B: Backend>(
    student: Tensor<B, 2>,
    head: &Tensor<B, 2>,
    terms: HeadTerms<B>,
) -> HeadLoss<B> {
    let device = student.device();
    let logits = student.matmul(head.clone());
    let value = |t: &Tensor<B, 1>| -> f64 { t.clone().into_scalar().elem() };
    let mut loss = Tensor::<B, 1>::zeros([1], &device);
    let mut distill = None;
    if let Some((teacher, temperature)) = terms.teacher {
        let teacher_logits = teacher.detach().matmul(head.clone());
        let kl = distillation_kl(logits.clone(), teacher_logits, temperature);
        distill = Some(value(&kl));
        loss = loss + kl;
    }
    let mut ntp = None;
    if let Some((targets, weight)) = terms.targets {
        let (rows, ids): (Vec<i64>, Vec<u32>) = targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i as i64, t)))
            .unzip();
        let count = rows.len();
        let picked = logits.select(
            0,
            Tensor::from_data(TensorData::new(rows, [count]), &device),
        );
        let ce = cross_entropy(picked, &ids);
        ntp = Some(value(&ce));
        loss = loss + ce.mul_scalar(weight);
    }
    HeadLoss { loss, distill, ntp }
}
