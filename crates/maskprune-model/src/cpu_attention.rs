//! Causal grouped-query attention for inference on the CPU backend (burn-flex).
//!
//! burn-flex's own attention runs one head after another on one thread and, below 256K
//! scores, fills the whole score matrix. Here tiles of query rows are multiplied with only
//! the keys they may see (about half the work), each tile is two `gemm` calls and a
//! softmax, and the tiles are spread over the rayon pool. Queries, keys and values are read
//! in the projections' own `[batch, len, heads, head_dim]` layout and the output is written
//! in it, so no transposes are needed around the kernel.

use std::any::TypeId;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Query rows per tile.
const TILE: usize = 64;

/// Whether this kernel serves backend `B` (burn-flex; under autodiff the composed
/// differentiable attention is used instead).
pub fn serves<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<burn::backend::Flex>()
}

/// Causal attention of `q` `[b, t, heads, d]` over `k`, `v` `[b, T, kv_heads, d]`, the `t`
/// queries being the last `t` of the `T` positions; query head `i` reads KV head
/// `i / (heads / kv_heads)`. Returns `[b, t, heads, d]`.
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let device = q.device();
    let [b, t, h, d] = q.dims();
    let [_, len, kvh, _] = k.dims();
    let (q, k, v) = (q.into_data(), k.into_data(), v.into_data());
    let slice = |x: &TensorData| x.as_slice::<f32>().expect("f32 activations").to_vec();
    let mut out = vec![0.0f32; b * t * h * d];
    let dims = Dims {
        batch: b,
        queries: t,
        heads: h,
        head_dim: d,
        keys: len,
        kv_heads: kvh,
    };
    attend_slices(&slice(&q), &slice(&k), &slice(&v), &mut out, &dims);
    Tensor::from_data(TensorData::new(out, [b, t, h, d]), &device)
}

/// Shapes of one attention call.
struct Dims {
    batch: usize,
    queries: usize,
    heads: usize,
    head_dim: usize,
    keys: usize,
    kv_heads: usize,
}

/// A pointer the tiles write through; each tile writes rows no other tile touches.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tiles write disjoint rows (see `attend_slices`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Send + Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn attend_slices(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], n: &Dims) {
    let (t, h, d, len, kvh) = (n.queries, n.heads, n.head_dim, n.keys, n.kv_heads);
    assert!(t <= len && h % kvh == 0, "attention shapes");
    assert_eq!(q.len(), n.batch * t * h * d);
    assert_eq!(k.len(), n.batch * len * kvh * d);
    assert_eq!(v.len(), k.len());
    assert_eq!(out.len(), q.len());
    let (rep, past) = (h / kvh, len - t);
    let scale = 1.0 / (d as f32).sqrt();
    let tiles = t.div_ceil(TILE);
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..n.batch * h * tiles).into_par_iter().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, task| {
            let (b, head, tile) = (task / (h * tiles), task / tiles % h, task % tiles);
            let group = head / rep;
            let first = tile * TILE;
            let rows = TILE.min(t - first);
            // Keys the tile's last row sees; earlier rows see fewer (zeroed below).
            let keys = past + first + rows;
            let q_at = |i: usize| ((b * t + i) * h + head) * d;
            let kv_at = |j: usize| ((b * len + j) * kvh + group) * d;
            scores.clear();
            scores.resize(rows * keys, 0.0);
            // SAFETY: every index stays inside the slices (asserted shapes above); `gemm`
            // reads `rows x d` of q, `keys x d` of k and v at the given strides.
            unsafe {
                // scores = scale · Q_tile · K^T
                gemm(
                    rows,
                    keys,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    q.as_ptr().add(q_at(first)),
                    1,
                    (h * d) as isize,
                    k.as_ptr().add(kv_at(0)),
                    (kvh * d) as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                let (seen, unseen) = row.split_at_mut(past + first + i + 1);
                softmax_in_place(seen);
                unseen.fill(0.0);
            }
            // SAFETY: as above; the tile writes rows `first..first + rows` of head `head` in
            // batch `b`, which no other task writes.
            unsafe {
                // out = P · V
                gemm(
                    rows,
                    d,
                    keys,
                    out_ptr.get().add(q_at(first)),
                    1,
                    (h * d) as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    keys as isize,
                    v.as_ptr().add(kv_at(0)),
                    1,
                    (kvh * d) as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
}

/// `x ← exp(x − max x) / Σ exp(x − max x)`.
fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = exp_nonpositive(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `e^x` for `x <= 0` to about one ulp, branch-free so that the softmax loop vectorises
/// (libm's `expf` was a fifth of the attention time): `x = n·ln2 + r`, `|r| <= ln2/2`,
/// `e^r` by its degree-6 Taylor polynomial (error below 2e-7 relative), times `2^n`.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Below this, e^x underflows f32's normal range; the softmax terms are then negligible.
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Attention by its definition, in f64, one query at a time.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: &Dims) -> Vec<f32> {
        let (t, h, d, len, kvh) = (n.queries, n.heads, n.head_dim, n.keys, n.kv_heads);
        let mut out = vec![0.0f32; q.len()];
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
                    for c in 0..d {
                        let o: f64 = (0..seen)
                            .map(|j| w[j] / sum * v[((b * len + j) * kvh + g) * d + c] as f64)
                            .sum();
                        out[((b * t + i) * h + head) * d + c] = o as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn tiled_attention_matches_the_definition() {
        // Two tiles of queries (70 > 64), a cache of 9 earlier positions, 2 query heads per
        // KV head, batch of 2.
        for (t, past) in [(70, 0), (70, 9), (1, 30), (5, 0)] {
            let n = Dims {
                batch: 2,
                queries: t,
                heads: 4,
                head_dim: 8,
                keys: t + past,
                kv_heads: 2,
            };
            let q = pseudo_random(2 * t * 4 * 8, 1);
            let k = pseudo_random(2 * (t + past) * 2 * 8, 2);
            let v = pseudo_random(k.len(), 3);
            let mut out = vec![0.0; q.len()];
            attend_slices(&q, &k, &v, &mut out, &n);
            let expected = reference(&q, &k, &v, &n);
            let diff = out
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 2e-6, "t {t}, past {past}: differs by {diff}");
        }
    }

    #[test]
    fn exp_is_accurate_to_about_one_ulp() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let exact = (x as f64).exp();
            let rel = ((exp_nonpositive(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }
}
