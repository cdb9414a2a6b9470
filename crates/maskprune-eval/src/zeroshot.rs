//! Zero-shot multiple choice, scored as lm-eval-harness 0.4 scores it.
//!
//! Each document has one (context, continuation) pair per choice. A pair is encoded as lm-eval
//! does: trailing spaces of the context move to the continuation; context+continuation is
//! encoded whole and the context alone; the continuation tokens are the whole encoding past
//! the context's length. The score of a choice is the summed log-probability of its
//! continuation tokens. `acc` picks the highest score, `acc_norm` the highest score divided by
//! the character length of the continuation without its leading space.

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use maskprune_model::Extras;
use maskprune_model::{Kernels, LayerMask, Llama, Result};
use serde::{Deserialize, Serialize};

/// One multiple-choice document of `zeroshot/<task>.jsonl`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Document {
    /// Context per choice (rendered prompt).
    pub contexts: Vec<String>,
    /// Continuation per choice, with its leading space.
    pub continuations: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
}

/// Reads a task file; errors name the file and line.
pub fn read_documents(
    path: &Path,
    limit: Option<usize>,
) -> std::result::Result<Vec<Document>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut docs = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if limit.is_some_and(|n| docs.len() >= n) {
            break;
        }
        let d: Document =
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        if d.contexts.len() != d.continuations.len()
            || d.contexts.is_empty()
            || d.gold >= d.contexts.len()
        {
            return Err(format!(
                "{}:{}: {} contexts, {} continuations and gold {} do not fit together",
                path.display(),
                i + 1,
                d.contexts.len(),
                d.continuations.len(),
                d.gold
            ));
        }
        docs.push(d);
    }
    if docs.is_empty() {
        return Err(format!("{}: no documents", path.display()));
    }
    Ok(docs)
}

/// A scored request: the tokens fed (context + continuation) and how many at the end are
/// the continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Document index.
    pub doc: usize,
    /// Choice index.
    pub choice: usize,
    /// Context then continuation token ids.
    pub tokens: Vec<u32>,
    /// Number of continuation tokens at the end of `tokens`.
    pub continuation_len: usize,
}

/// lm-eval's `_encode_pair`: (context ids, continuation ids).
pub fn encode_pair(
    context: &str,
    continuation: &str,
    encode: &dyn Fn(&str) -> std::result::Result<Vec<u32>, String>,
) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
    let trimmed = context.trim_end_matches(' ');
    let moved = &context[trimmed.len()..];
    let (context, continuation) = (trimmed.to_string(), format!("{moved}{continuation}"));
    let whole = encode(&format!("{context}{continuation}"))?;
    let ctx = encode(&context)?;
    let cont = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
    Ok((ctx, cont))
}

/// Summed continuation log-probabilities of `requests`, batched by similar length; requests
/// longer than `max_len` keep their last `max_len` tokens (as lm-eval does).
pub fn score_requests<B: Kernels>(
    model: &Llama<B>,
    requests: &[Request],
    batch: usize,
    max_len: usize,
    masks: Option<&[LayerMask<B>]>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f64>> {
    let device = model.device();
    let mut order: Vec<usize> = (0..requests.len()).collect();
    // Longest first: the first batch shows the peak memory, and padding stays small.
    order.sort_by_key(|&i| std::cmp::Reverse(requests[i].tokens.len()));
    let mut scores = vec![0.0f64; requests.len()];
    let mut done = 0;
    for chunk in order.chunks(batch.max(1)) {
        // Inputs are all tokens but the last; predictions for the continuation sit at the
        // last `continuation_len` input positions.
        let inputs: Vec<&[u32]> = chunk
            .iter()
            .map(|&i| {
                let t = &requests[i].tokens;
                let t = &t[t.len().saturating_sub(max_len + 1)..];
                &t[..t.len() - 1]
            })
            .collect();
        let width = inputs.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(chunk.len() * width);
        for r in &inputs {
            ids.extend(r.iter().map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(0i64, width - r.len()));
        }
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [chunk.len(), width]), &device);
        let hidden = model.hidden_states(tokens, Extras { masks, lora: None })?;
        let h = model.config.hidden_size;
        // Only the continuation positions go through the LM head.
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        let mut counts = Vec::with_capacity(chunk.len());
        for (row, &i) in chunk.iter().enumerate() {
            let r = &requests[i];
            let n_in = inputs[row].len();
            let n = r.continuation_len.min(n_in);
            counts.push(n);
            for k in 0..n {
                positions.push((row * width + n_in - n + k) as i64);
                targets.push(r.tokens[r.tokens.len() - n + k]);
            }
        }
        let picked = hidden.reshape([chunk.len() * width, h]).select(
            0,
            Tensor::<B, 1, Int>::from_data(
                TensorData::new(positions.clone(), [positions.len()]),
                &device,
            ),
        );
        let logp = model.target_logprobs(picked, &targets);
        let mut cursor = 0;
        for (&i, &n) in chunk.iter().zip(&counts) {
            scores[i] = logp[cursor..cursor + n].iter().map(|&v| v as f64).sum();
            cursor += n;
        }
        done += chunk.len();
        progress(done);
    }
    Ok(scores)
}

/// Summed continuation log-probabilities of every request, computing a context shared by all
/// choices of a document once: the context fills a KV cache, and the choices' continuations
/// run on copies of it as one batch (right-padded). Documents whose choices have different
/// contexts, whose shared context is shorter than their continuations (nothing to gain), or
/// that are longer than `max_len`, and every request when `masks` are given, go through
/// [`score_requests`].
pub fn score_documents<B: Kernels>(
    model: &Llama<B>,
    requests: &[Request],
    batch: usize,
    max_len: usize,
    masks: Option<&[LayerMask<B>]>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f64>> {
    let mut scores = vec![0.0f64; requests.len()];
    let mut by_doc: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, r) in requests.iter().enumerate() {
        by_doc.entry(r.doc).or_default().push(i);
    }
    let mut rest = Vec::new();
    let mut shared = Vec::new();
    for ids in by_doc.into_values() {
        let first = context(&requests[ids[0]]);
        let fits = ids.iter().all(|&i| {
            let r = &requests[i];
            context(r) == first && r.tokens.len() <= max_len + 1 && r.continuation_len > 0
        });
        // Worth it when the context tokens saved outnumber the continuation tokens (a
        // document alone loses the batching across documents).
        let continuation_tokens: usize = ids.iter().map(|&i| requests[i].continuation_len).sum();
        let saved = (ids.len() - 1) * first.len();
        if masks.is_none() && !first.is_empty() && fits && saved >= continuation_tokens {
            shared.push(ids);
        } else {
            rest.extend(ids);
        }
    }
    let mut done = 0;
    for ids in &shared {
        let r0 = &requests[ids[0]];
        let conts: Vec<&[u32]> = ids
            .iter()
            .map(|&i| {
                &requests[i].tokens[requests[i].tokens.len() - requests[i].continuation_len..]
            })
            .collect();
        for (&i, s) in ids
            .iter()
            .zip(shared_context_scores(model, context(r0), &conts)?)
        {
            scores[i] = s;
        }
        done += ids.len();
        progress(done);
    }
    let subset: Vec<Request> = rest.iter().map(|&i| requests[i].clone()).collect();
    let base = done;
    let rest_scores = score_requests(model, &subset, batch, max_len, masks, &mut |d| {
        progress(base + d)
    })?;
    for (&i, s) in rest.iter().zip(rest_scores) {
        scores[i] = s;
    }
    Ok(scores)
}

/// The context tokens of a request.
fn context(r: &Request) -> &[u32] {
    &r.tokens[..r.tokens.len() - r.continuation_len]
}

/// Scores of `continuations` after one shared `context` (both non-empty).
fn shared_context_scores<B: Kernels>(
    model: &Llama<B>,
    context: &[u32],
    continuations: &[&[u32]],
) -> Result<Vec<f64>> {
    let device = model.device();
    let ids = |rows: Vec<Vec<i64>>, width: usize| {
        let n = rows.len();
        let flat: Vec<i64> = rows.into_iter().flatten().collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [n, width]), &device)
    };
    let mut cache = maskprune_model::KvCache::new(model.config.num_hidden_layers);
    let ctx = ids(
        vec![context.iter().map(|&t| t as i64).collect()],
        context.len(),
    );
    let hidden = model.hidden_states_cached(ctx, &mut cache)?;
    let h = model.config.hidden_size;
    let last = hidden.narrow(1, context.len() - 1, 1).reshape([1, h]);
    // Inputs after the context: every continuation token but the last, right-padded.
    let n = continuations.len();
    let width = continuations.iter().map(|c| c.len() - 1).max().unwrap_or(0);
    let mut picked = vec![last.repeat_dim(0, n)];
    if width > 0 {
        let rows = continuations
            .iter()
            .map(|c| {
                let mut r: Vec<i64> = c[..c.len() - 1].iter().map(|&t| t as i64).collect();
                r.resize(width, 0);
                r
            })
            .collect();
        let mut batch_cache = cache.repeat(n);
        let hidden = model.hidden_states_cached(ids(rows, width), &mut batch_cache)?;
        let mut positions = Vec::new();
        for (row, c) in continuations.iter().enumerate() {
            positions.extend((0..c.len() - 1).map(|k| (row * width + k) as i64));
        }
        let count = positions.len();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [count]), &device);
        picked.push(hidden.reshape([n * width, h]).select(0, index));
    }
    // Row order of `picked`: the first token of every choice, then the rest choice by choice.
    let mut targets: Vec<u32> = continuations.iter().map(|c| c[0]).collect();
    for c in continuations {
        targets.extend(&c[1..]);
    }
    let logp = model.target_logprobs(Tensor::cat(picked, 0), &targets);
    let mut scores: Vec<f64> = logp[..n].iter().map(|&v| v as f64).collect();
    let mut cursor = n;
    for (s, c) in scores.iter_mut().zip(continuations) {
        *s += logp[cursor..cursor + c.len() - 1]
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>();
        cursor += c.len() - 1;
    }
    Ok(scores)
}

/// Accuracy of one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskResult {
    /// Documents scored.
    pub n: usize,
    /// Fraction where the highest summed log-likelihood is the gold choice.
    pub acc: f64,
    /// Standard error of `acc`.
    pub acc_stderr: f64,
    /// Same with scores divided by the choice's character length.
    pub acc_norm: f64,
    /// Standard error of `acc_norm`.
    pub acc_norm_stderr: f64,
}

fn mean_stderr(hits: &[f64]) -> (f64, f64) {
    let n = hits.len() as f64;
    let mean = hits.iter().sum::<f64>() / n;
    if hits.len() < 2 {
        return (mean, 0.0);
    }
    let var = hits.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

fn argmax(values: impl Iterator<Item = f64>) -> usize {
    values
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// `acc` and `acc_norm` from per-choice scores (`scores[doc][choice]`).
pub fn task_metrics(docs: &[Document], scores: &[Vec<f64>]) -> TaskResult {
    let mut acc = Vec::with_capacity(docs.len());
    let mut acc_norm = Vec::with_capacity(docs.len());
    for (d, s) in docs.iter().zip(scores) {
        acc.push((argmax(s.iter().copied()) == d.gold) as u8 as f64);
        let norm = s.iter().zip(&d.continuations).map(|(v, c)| {
            let chars = c.strip_prefix(' ').unwrap_or(c).chars().count().max(1);
            v / chars as f64
        });
        acc_norm.push((argmax(norm) == d.gold) as u8 as f64);
    }
    let (a, ae) = mean_stderr(&acc);
    let (n, ne) = mean_stderr(&acc_norm);
    TaskResult {
        n: docs.len(),
        acc: a,
        acc_stderr: ae,
        acc_norm: n,
        acc_norm_stderr: ne,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> std::result::Result<Vec<u32>, String> {
        Ok(s.chars().map(|c| c as u32).collect())
    }

    #[test]
    fn trailing_context_spaces_move_to_the_continuation() {
        let (ctx, cont) = encode_pair("Answer: ", "yes", &chars).unwrap();
        assert_eq!(ctx, chars("Answer:").unwrap());
        assert_eq!(cont, chars(" yes").unwrap());
        let (ctx, cont) = encode_pair("Q", " a", &chars).unwrap();
        assert_eq!((ctx.len(), cont.len()), (1, 2));
    }

    #[test]
    fn metrics_follow_lm_eval() {
        let doc = |gold| Document {
            contexts: vec!["c".into(), "c".into()],
            continuations: vec![" a".into(), " bbbb".into()],
            gold,
        };
        let docs = vec![doc(0), doc(1), doc(1)];
        // Choice 1 has the larger sum but the smaller per-character score.
        let scores = vec![vec![-2.0, -1.0], vec![-2.0, -1.0], vec![-1.0, -3.0]];
        let r = task_metrics(&docs, &scores);
        assert!((r.acc - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.acc_norm - 2.0 / 3.0).abs() < 1e-12);
        // sample std (n-1) / sqrt(n): for hits (0,1,0): sqrt(1/3)/sqrt(3)
        assert!((r.acc_stderr - (1.0f64 / 3.0).sqrt() / 3f64.sqrt()).abs() < 1e-12);
    }
}
