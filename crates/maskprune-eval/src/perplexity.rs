//! Perplexity = exp(mean next-token negative log-likelihood over every predicted position of
//! every window). Windows are non-overlapping; the first token of each has no prediction.

use std::time::Instant;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use maskprune_model::{LayerMask, Llama, Result};
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

/// `log softmax(logits)[target]` per row of `[rows, vocab]` logits.
///
/// The normaliser is summed in two levels (blocks of 128, then the blocks): a flat f32 sum
/// over a 49k vocabulary drifts by ~1e-4 nats, which showed as a systematic offset against
/// transformers at seq-len 1024.
pub fn target_logprobs<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
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

/// Per-position next-token log-likelihoods `[batch * (len - 1)]` of a batch of equal-length rows.
pub fn next_token_logprobs<B: Backend>(
    model: &Llama<B>,
    rows: &[&[u32]],
    masks: Option<&[LayerMask<B>]>,
) -> Result<Vec<f32>> {
    let device = model.device();
    let [b, t] = [rows.len(), rows[0].len()];
    let hidden = model.hidden_states(token_tensor(rows, &device), masks, None)?;
    let logits = model.logits(hidden.narrow(1, 0, t - 1));
    let targets: Vec<&[u32]> = rows.iter().map(|r| &r[1..]).collect();
    let targets = token_tensor::<B>(&targets, &device).reshape([b * (t - 1), 1]);
    let picked = target_logprobs(
        logits.reshape([b * (t - 1), model.config.vocab_size]),
        targets,
    );
    Ok(picked
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 data"))
}

/// Perplexity of `model` over `windows` (all the same length), `batch` windows per forward.
/// `progress` receives the number of tokens done so far.
pub fn perplexity<B: Backend>(
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
