//! Causal grouped-query attention over the projections' own `[batch, len, heads, head_dim]`
//! layout, forward and backward.
//!
//! Forward: burn-flex's own attention runs one head after another on one thread and, below
//! 256K scores, fills the whole score matrix. Here a tile of queries (with the query heads of
//! one KV group stacked) is multiplied with only the keys it may see (about half the work):
//! one `gemm` for the keys all its tokens see, and its diagonal block in steps of 16 tokens,
//! each with the keys up to its last token (the masked half of the block was 12% of the
//! products at 512 positions); then a softmax, the same pieces for `P·V`, and the tiles are
//! spread over the rayon pool. The softmax writes unnormalised numerators and their row
//! sums in one pass; the division is applied to the output rows.
//!
//! Backward (flash-attention's): the probabilities are recomputed from the queries, keys
//! and each row's log-sum-exp saved by the forward, never stored; one task per (batch, KV
//! group) walks its query tiles and accumulates the group's key and value gradients, so K
//! and V are never expanded to the query heads.

use rayon::prelude::*;

use super::gemm::{multiply, Operand};
use super::{exp_clamped, lanes, larger, multiversion, MulAdd, OutPtr};

/// Query rows per tile.
const TILE: usize = 64;

/// Tokens per step of a tile's diagonal block (see [`forward`]).
const DIAGONAL_STEP: usize = 16;

/// Shapes of one attention call: queries `[batch, queries, heads, head_dim]`, keys and
/// values `[batch, keys, kv_heads, head_dim]`; the queries are the last `queries` of the
/// `keys` positions, and query head `i` reads KV head `i / (heads / kv_heads)`.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Sequences.
    pub batch: usize,
    /// Query positions per sequence.
    pub queries: usize,
    /// Query heads.
    pub heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Key positions per sequence (cached ones first).
    pub keys: usize,
    /// Key/value heads.
    pub kv_heads: usize,
}

impl Dims {
    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        let (t, h, d, len, kvh) = (
            self.queries,
            self.heads,
            self.head_dim,
            self.keys,
            self.kv_heads,
        );
        assert!(
            t <= len && kvh > 0 && h % kvh == 0 && t > 0,
            "attention shapes"
        );
        assert_eq!(q.len(), self.batch * t * h * d, "query size");
        assert_eq!(k.len(), self.batch * len * kvh * d, "key size");
        assert_eq!(v.len(), k.len(), "value size");
    }
}

/// The end of the diagonal step holding the tile's token `i` (of `tokens`): the diagonal
/// keys that step is multiplied with.
fn step_end(i: usize, tokens: usize) -> usize {
    ((i / DIAGONAL_STEP + 1) * DIAGONAL_STEP).min(tokens)
}

std::thread_local! {
    /// Each thread's attention buffers, kept between calls so that no tile allocates.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 6]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()])
    };
}

/// `buffer[..len]`, grown when needed and never cleared (the users overwrite what they read).
fn part(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// Causal softmax attention, `[batch, queries, heads, head_dim]` out. With `lse`, each
/// query row's log-sum-exp of its scaled scores is written there (`[batch, queries,
/// heads]`), for [`backward`].
pub fn forward(q: &[f32], k: &[f32], v: &[f32], n: &Dims, lse: Option<&mut [f32]>) -> Vec<f32> {
    n.check(q, k, v);
    let (t, h, d, len, kvh) = (n.queries, n.heads, n.head_dim, n.keys, n.kv_heads);
    let (rep, past) = (h / kvh, len - t);
    let scale = 1.0 / (d as f32).sqrt();
    let tiles = t.div_ceil(TILE);
    let mut out = vec![0.0f32; q.len()];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let lse_ptr = lse.map(|l| {
        assert_eq!(l.len(), n.batch * t * h, "log-sum-exp size");
        OutPtr(l.as_mut_ptr())
    });
    // One task per (batch, KV group, tile of queries): the group's `rep` query heads are
    // stacked as rows `i * rep + r` (token-major, so each token's heads are one contiguous
    // block to copy in and out), and share one pass over their keys and values.
    (0..n.batch * kvh * tiles).into_par_iter().for_each(|task| {
        SCRATCH.with_borrow_mut(|[queries, scores, values, inv_sums, maxes, _]| {
            // The largest tiles (the last queries see the most keys) first, so the threads
            // finish together.
            let (b, group, tile) = (
                task / (kvh * tiles),
                task / tiles % kvh,
                tiles - 1 - task % tiles,
            );
            let first = tile * TILE;
            let tokens = TILE.min(t - first);
            let rows = tokens * rep;
            // Keys every token of the tile sees; the tile's own `tokens` keys after them
            // form the diagonal block, where each token sees only those up to itself.
            let shared = past + first;
            let keys = shared + tokens;
            let q_at = |i: usize| ((b * t + i) * h + group * rep) * d;
            let kv_at = |j: usize| ((b * len + j) * kvh + group) * d;
            queries.clear();
            for i in first..first + tokens {
                queries.extend_from_slice(&q[q_at(i)..q_at(i) + rep * d]);
            }
            let (scores, values) = (part(scores, rows * keys), part(values, rows * d));
            let (inv_sums, maxes) = (part(inv_sums, rows), part(maxes, rows));
            // The diagonal block in steps of `DIAGONAL_STEP` tokens, each multiplied only
            // with the diagonal keys up to its last token: (token range, keys it needs).
            let steps = (0..tokens).step_by(DIAGONAL_STEP).map(|from| {
                let to = step_end(from, tokens);
                (from..to, to)
            });
            // Keys transposed (`d x keys`), values as they are (`keys x d`).
            let keys_t = Operand::rows(k, kvh * d).transposed();
            let values_in = Operand::rows(v, kvh * d);
            // scores = scale · Q · K^T: the shared keys for all rows, then the steps.
            if shared > 0 {
                multiply(
                    scores,
                    keys,
                    Operand::rows(queries, d),
                    keys_t.skip(kv_at(0)),
                    [rows, shared, d],
                    false,
                    scale,
                );
            }
            for (step, diagonal) in steps.clone() {
                let r = step.start * rep..step.end * rep;
                multiply(
                    &mut scores[r.start * keys + shared..],
                    keys,
                    Operand::rows(&queries[r.start * d..], d),
                    keys_t.skip(kv_at(shared)),
                    [r.len(), diagonal, d],
                    false,
                    scale,
                );
            }
            // Unnormalised: each row is divided by its sum on the way out.
            causal_exp(scores, keys, shared, rep, inv_sums, maxes);
            // values = P · V, in the same pieces.
            if shared > 0 {
                multiply(
                    values,
                    d,
                    Operand::rows(scores, keys),
                    values_in.skip(kv_at(0)),
                    [rows, d, shared],
                    false,
                    1.0,
                );
            }
            for (step, diagonal) in steps {
                let r = step.start * rep..step.end * rep;
                multiply(
                    &mut values[r.start * d..],
                    d,
                    Operand::rows(&scores[r.start * keys + shared..], keys),
                    values_in.skip(kv_at(shared)),
                    [r.len(), d, diagonal],
                    shared > 0,
                    1.0,
                );
            }
            for (k, i) in (first..first + tokens).enumerate() {
                let rows = k * rep..(k + 1) * rep;
                // SAFETY: the task owns the heads of `group` at the tile's tokens in batch
                // `b` (`rep * d` values from `q_at(i)`, `rep` log-sum-exps from
                // `q_at(i) / d`); no other task writes them.
                let heads =
                    unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(q_at(i)), rep * d) };
                scale_rows(
                    heads,
                    &values[rows.start * d..rows.end * d],
                    &inv_sums[rows.clone()],
                );
                if let Some(lse) = lse_ptr {
                    let lse =
                        unsafe { std::slice::from_raw_parts_mut(lse.get().add(q_at(i) / d), rep) };
                    for ((l, &m), &inv) in lse
                        .iter_mut()
                        .zip(&maxes[rows.clone()])
                        .zip(&inv_sums[rows])
                    {
                        *l = m - inv.ln();
                    }
                }
            }
        })
    });
    out
}

/// The gradients of [`forward`] for `q`, `k` and `v` given the output `o`, the log-sum-exps
/// `lse` the forward wrote and the output gradient `d_out` (no cached positions: `queries
/// == keys`). With `P = exp(S − lse)` and `D = rowsum(dO ⊙ O)`: `dV = Pᵀ·dO`,
/// `dS = P ⊙ (dO·Vᵀ − D)`, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`.
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_out: &[f32],
    n: &Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    n.check(q, k, v);
    let (t, h, d, len, kvh) = (n.queries, n.heads, n.head_dim, n.keys, n.kv_heads);
    assert_eq!(t, len, "attention backward without cached positions");
    assert!(o.len() == q.len() && d_out.len() == q.len() && lse.len() == n.batch * t * h);
    let rep = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let tiles = t.div_ceil(TILE);
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        OutPtr(dq.as_mut_ptr()),
        OutPtr(dk.as_mut_ptr()),
        OutPtr(dv.as_mut_ptr()),
    );
    (0..n.batch * kvh).into_par_iter().for_each(|task| {
        SCRATCH.with_borrow_mut(|[queries, grads, probs, d_scores, d_queries, row_terms]| {
            let (b, group) = (task / kvh, task % kvh);
            let q_at = |i: usize| ((b * t + i) * h + group * rep) * d;
            let kv_at = |j: usize| ((b * len + j) * kvh + group) * d;
            let keys_in = Operand::rows(k, kvh * d).skip(kv_at(0));
            let values_in = Operand::rows(v, kvh * d).skip(kv_at(0));
            // The group's key and value gradients, `[len, d]`, summed over the tiles.
            let mut d_keys = vec![0.0f32; len * d];
            let mut d_values = vec![0.0f32; len * d];
            for tile in 0..tiles {
                let first = tile * TILE;
                let tokens = TILE.min(t - first);
                let (rows, keys) = (tokens * rep, first + tokens);
                queries.clear();
                grads.clear();
                let row_terms = part(row_terms, 2 * rows);
                for i in first..first + tokens {
                    let at = q_at(i)..q_at(i) + rep * d;
                    queries.extend_from_slice(&q[at.clone()]);
                    grads.extend_from_slice(&d_out[at.clone()]);
                    for r in 0..rep {
                        let row = (i - first) * rep + r;
                        let head = at.start + r * d..at.start + (r + 1) * d;
                        row_terms[2 * row] = lse[q_at(i) / d + r];
                        row_terms[2 * row + 1] = dot(&d_out[head.clone()], &o[head]);
                    }
                }
                let probs = part(probs, rows * keys);
                let d_scores = part(d_scores, rows * keys);
                let d_queries = part(d_queries, rows * d);
                // S = scale · Q · Kᵀ, then P in place.
                multiply(
                    probs,
                    keys,
                    Operand::rows(queries, d),
                    keys_in.transposed(),
                    [rows, keys, d],
                    false,
                    scale,
                );
                // dP = dO · Vᵀ
                multiply(
                    d_scores,
                    keys,
                    Operand::rows(grads, d),
                    values_in.transposed(),
                    [rows, keys, d],
                    false,
                    1.0,
                );
                causal_probabilities_and_score_gradients(
                    probs, d_scores, keys, first, rep, row_terms,
                );
                // dQ = scale · dS · K (the tile's rows: this task's alone).
                multiply(
                    d_queries,
                    d,
                    Operand::rows(d_scores, keys),
                    keys_in,
                    [rows, d, keys],
                    false,
                    scale,
                );
                // dK += scale · dSᵀ · Q, dV += Pᵀ · dO over the keys this tile sees.
                multiply(
                    &mut d_keys,
                    d,
                    Operand::rows(d_scores, keys).transposed(),
                    Operand::rows(queries, d),
                    [keys, d, rows],
                    true,
                    scale,
                );
                multiply(
                    &mut d_values,
                    d,
                    Operand::rows(probs, keys).transposed(),
                    Operand::rows(grads, d),
                    [keys, d, rows],
                    true,
                    1.0,
                );
                for i in first..first + tokens {
                    let row = (i - first) * rep;
                    // SAFETY: the heads of `group` at token `i` of batch `b` are this task's.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(dq_ptr.get().add(q_at(i)), rep * d)
                    };
                    out.copy_from_slice(&d_queries[row * d..(row + rep) * d]);
                }
            }
            for j in 0..len {
                // SAFETY: KV head `group` of batch `b` is this task's, at every position.
                unsafe {
                    let (dk, dv) = (dk_ptr.get().add(kv_at(j)), dv_ptr.get().add(kv_at(j)));
                    std::slice::from_raw_parts_mut(dk, d).copy_from_slice(&d_keys[j * d..][..d]);
                    std::slice::from_raw_parts_mut(dv, d).copy_from_slice(&d_values[j * d..][..d]);
                }
            }
        })
    });
    (dq, dk, dv)
}

/// `Σ a·b` over 16 lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + rest
}

multiversion! {
    /// Turns the scores of a tile's rows into probabilities `exp(S − lse)` (0 for the keys
    /// a row's token may not see) and `d_scores` (holding `dO·Vᵀ`) into `P ⊙ (dP − D)`.
    /// Row `r` is token `first + r / rep`; `row_terms` holds `(lse, D)` per row.
    fn causal_probabilities_and_score_gradients(
        probs: &mut [f32],
        d_scores: &mut [f32],
        keys: usize,
        first: usize,
        rep: usize,
        row_terms: &[f32],
    ) {
        for (row, (p, ds)) in probs
            .chunks_exact_mut(keys)
            .zip(d_scores.chunks_exact_mut(keys))
            .enumerate()
        {
            let seen = first + row / rep + 1;
            let (lse, delta) = (row_terms[2 * row], row_terms[2 * row + 1]);
            for (p, ds) in p[..seen].iter_mut().zip(&mut ds[..seen]) {
                *p = exp_clamped::<M>(*p - lse);
                *ds = *p * (*ds - delta);
            }
            p[seen..].fill(0.0);
            ds[seen..].fill(0.0);
        }
    }
}

multiversion! {
    /// `out` row `r` (`x.len() / s.len()` values) = `x` row `r` times `s[r]`.
    fn scale_rows(out: &mut [f32], x: &[f32], s: &[f32]) {
        let width = x.len() / s.len();
        for ((o, x), &s) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)).zip(s) {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x * s;
            }
        }
    }
}

multiversion! {
    /// Softmax numerators of each row of `scores` (`keys` wide) over the keys its token
    /// sees, `inv_sums[row]` = 1 / the row's sum and `maxes[row]` the row's largest score:
    /// row `r` (token `i = r / rep`) sees the first `shared + i + 1` keys. Only the part of
    /// the row that the products read (up to the end of the token's diagonal step) is
    /// written; its unseen keys are zeroed.
    fn causal_exp(
        scores: &mut [f32],
        keys: usize,
        shared: usize,
        rep: usize,
        inv_sums: &mut [f32],
        maxes: &mut [f32],
    ) {
        let tokens = keys - shared;
        for (row, s) in scores.chunks_exact_mut(keys).enumerate() {
            let i = row / rep;
            let read = shared + step_end(i, tokens);
            let (max, sum) = exp_seen::<M>(&mut s[..read], shared + i + 1);
            inv_sums[row] = 1.0 / sum;
            maxes[row] = max;
        }
    }
}

/// `x[..seen] ← exp(x − max x[..seen])`, the rest of `x` zeroed, returning the max and the
/// sum of the exponentials. Whole chunks of 16 that the compiler vectorises; the chunk
/// holding the last seen key is computed whole and its unseen lanes zeroed (a scalar tail
/// cost a fifth of the time), or done one by one when it would run past the end of `x`.
#[inline(always)]
fn exp_seen<M: MulAdd>(x: &mut [f32], seen: usize) -> (f32, f32) {
    let whole = seen / 16 * 16;
    let tail = if seen > whole && whole + 16 <= x.len() {
        Some(whole)
    } else {
        None
    };
    let mut max = lanes(&x[..whole], f32::NEG_INFINITY, larger);
    match tail {
        Some(at) => {
            let mut m = [f32::NEG_INFINITY; 16];
            for (lane, (m, &v)) in m.iter_mut().zip(&x[at..at + 16]).enumerate() {
                *m = if at + lane < seen {
                    v
                } else {
                    f32::NEG_INFINITY
                };
            }
            max = m.iter().fold(max, |a, &b| larger(a, b));
        }
        None => max = x[whole..seen].iter().fold(max, |a, &b| larger(a, b)),
    }
    // The sum over 16 lanes as in `lanes`, accumulated in the same pass as the exponentials.
    let mut acc = [0.0f32; 16];
    for c in x[..whole].chunks_exact_mut(16) {
        for (a, v) in acc.iter_mut().zip(c) {
            *v = exp_clamped::<M>(*v - max);
            *a += *v;
        }
    }
    let mut rest = 0.0;
    let zeroed_from = match tail {
        Some(at) => {
            for (lane, (a, v)) in acc.iter_mut().zip(&mut x[at..at + 16]).enumerate() {
                let e = exp_clamped::<M>(*v - max);
                *v = if at + lane < seen { e } else { 0.0 };
                *a += *v;
            }
            at + 16
        }
        None => {
            for v in &mut x[whole..seen] {
                *v = exp_clamped::<M>(*v - max);
                rest += *v;
            }
            seen
        }
    };
    x[zeroed_from..].fill(0.0);
    (max, acc.iter().fold(rest, |a, &b| a + b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::test_util::{max_abs_diff, numeric_partial, pseudo_random};

    /// Attention by its definition, in f64, one query at a time; also each row's
    /// log-sum-exp.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: &Dims) -> (Vec<f32>, Vec<f32>) {
        let (t, h, d, len, kvh) = (n.queries, n.heads, n.head_dim, n.keys, n.kv_heads);
        let mut out = vec![0.0f32; q.len()];
        let mut lse = vec![0.0f32; n.batch * t * h];
        for b in 0..n.batch {
            for head in 0..h {
                let g = head / (h / kvh);
                for i in 0..t {
                    let qi = &q[((b * t + i) * h + head) * d..][..d];
                    let seen = len - t + i + 1;
                    let logits: Vec<f64> = (0..seen)
                        .map(|j| {
                            let kj = &k[((b * len + j) * kvh + g) * d..][..d];
                            qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    lse[(b * t + i) * h + head] = (max + sum.ln()) as f32;
                    for c in 0..d {
                        let o: f64 = (0..seen)
                            .map(|j| w[j] / sum * v[((b * len + j) * kvh + g) * d + c] as f64)
                            .sum();
                        out[((b * t + i) * h + head) * d + c] = o as f32;
                    }
                }
            }
        }
        (out, lse)
    }

    fn dims(batch: usize, t: usize, past: usize) -> Dims {
        Dims {
            batch,
            queries: t,
            heads: 4,
            head_dim: 8,
            keys: t + past,
            kv_heads: 2,
        }
    }

    #[test]
    fn tiled_attention_matches_the_definition() {
        // Two or three tiles of queries (70, 150 > 64; the last tile's diagonal in steps of
        // 16 with a remainder), caches of earlier positions (also ones that leave rows
        // ending mid-chunk), 2 query heads per KV head, batch of 2.
        for (t, past) in [(70, 0), (70, 9), (150, 0), (37, 21), (1, 30), (5, 0)] {
            let n = dims(2, t, past);
            let q = pseudo_random(2 * t * 4 * 8, 1);
            let k = pseudo_random(2 * (t + past) * 2 * 8, 2);
            let v = pseudo_random(k.len(), 3);
            let mut lse = vec![0.0; 2 * t * 4];
            let out = forward(&q, &k, &v, &n, Some(&mut lse));
            let (expected, expected_lse) = reference(&q, &k, &v, &n);
            let diff = max_abs_diff(&out, &expected);
            assert!(diff < 2e-6, "t {t}, past {past}: differs by {diff}");
            let diff = max_abs_diff(&lse, &expected_lse);
            assert!(
                diff < 2e-5,
                "t {t}, past {past}: log-sum-exp differs by {diff}"
            );
            assert_eq!(out, forward(&q, &k, &v, &n, None), "lse changes the output");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Two tiles (70 > 64) for the accumulation of key and value gradients over tiles.
        for t in [5, 70] {
            let n = dims(2, t, 0);
            let q = pseudo_random(2 * t * 4 * 8, 4);
            let k = pseudo_random(2 * t * 2 * 8, 5);
            let v = pseudo_random(k.len(), 6);
            let dy = pseudo_random(q.len(), 7);
            let mut lse = vec![0.0; 2 * t * 4];
            let o = forward(&q, &k, &v, &n, Some(&mut lse));
            let (dq, dk, dv) = backward(&q, &k, &v, &o, &lse, &dy, &n);
            // Checked on a sample of coordinates (every one at t = 5).
            let step = if t > 5 { 37 } else { 1 };
            let f = |q: &[f32], k: &[f32], v: &[f32]| forward(q, k, v, &n, None);
            type Check<'a> = (
                &'a str,
                &'a [f32],
                &'a dyn Fn(&[f32]) -> Vec<f32>,
                &'a [f32],
            );
            let checks: [Check; 3] = [
                ("q", &dq, &|x| f(x, &k, &v), &q),
                ("k", &dk, &|x| f(&q, x, &v), &k),
                ("v", &dv, &|x| f(&q, &k, x), &v),
            ];
            for (name, got, f, x) in checks {
                for i in (0..got.len()).step_by(step) {
                    let numeric = numeric_partial(x, &dy, &f, i);
                    let tol = 2e-3 * numeric.abs().max(1.0);
                    assert!(
                        (got[i] - numeric).abs() < tol,
                        "t {t}: d{name}[{i}] = {} vs {numeric}",
                        got[i]
                    );
                }
            }
        }
    }
}
