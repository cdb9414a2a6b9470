//! Perplexity = exp(mean next-token negative log-likelihood over every predicted position of
//! every window). Windows are non-overlapping; the first token of each has no prediction.

use std::time::Instant;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use maskprune_model::Extras;
use maskprune_model::{Kernels, LayerMask, Llama, Result};
use serde::Serialize;

/// The outcome of a perplexity run.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityResult {
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Tokens fed to the model.
    pub tokens: usize,
    /// Positions scored (windows x (seq_len - 1)).
    pub predicted_tokens: usize,
    /// Mean negative log-likelihood (nats).
    pub mean_nll: f64,
    /// exp(mean_nll).
    pub ppl: f64,
    /// Wall time of the forward passes, in seconds.
    pub seconds: f64,
    /// Tokens fed per second.
    pub tokens_per_s: f64,
}

/// Token ids `[batch, len]` as an Int tensor.
pub fn token_tensor<B: Backend>(rows: &[&[u32]], device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows.first().map_or(0, |r| r.len());
    let data: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&t| t as i64))
        .collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), len]), device)
}

/// Per-position next-token log-likelihoods `[batch * (len - 1)]` of a batch of equal-length rows.
pub fn next_token_logprobs<B: Kernels>(
    model: &Llama<B>,
    rows: &[&[u32]],
    masks: Option<&[LayerMask<B>]>,
) -> Result<Vec<f32>> {
    let device = model.device();
    let [b, t] = [rows.len(), rows[0].len()];
    let hidden = model.hidden_states(token_tensor(rows, &device), Extras { masks, lora: None })?;
    let hidden = hidden
        .narrow(1, 0, t - 1)
        .reshape([b * (t - 1), model.config.hidden_size]);
    let targets: Vec<u32> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
    Ok(model.target_logprobs(hidden, &targets))
}

/// Perplexity of `model` over `windows` (all the same length), `batch` windows per forward.
/// `progress` receives the number of tokens done so far.
pub fn perplexity<B: Kernels>(
    model: &Llama<B>,
    windows: &[&[u32]],
    batch: usize,
    masks: Option<&[LayerMask<B>]>,
    progress: &mut dyn FnMut(usize),
) -> Result<PerplexityResult> {
    let seq_len = windows.first().map_or(0, |w| w.len());
    let start = Instant::now();
    let mut nll = 0.0f64;
    let mut count = 0usize;
    let mut done = 0usize;
    for chunk in windows.chunks(batch.max(1)) {
        for lp in next_token_logprobs(model, chunk, masks)? {
            nll -= lp as f64;
            count += 1;
        }
        done += chunk.len() * seq_len;
        progress(done);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mean_nll = if count > 0 {
        nll / count as f64
    } else {
        f64::NAN
    };
    Ok(PerplexityResult {
        windows: windows.len(),
        seq_len,
        tokens: done,
        predicted_tokens: count,
        mean_nll,
        ppl: mean_nll.exp(),
        seconds,
        tokens_per_s: done as f64 / seconds.max(1e-9),
    })
}
