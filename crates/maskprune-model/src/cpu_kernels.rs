//! Kernels for inference on the CPU backend (burn-flex), where burn's composed tensor ops
//! spend more time walking strides and making passes over memory than computing: causal
//! grouped-query attention, the rotary position embedding, RMSNorm and SwiGLU's
//! `silu(gate) * up`, each one pass.
//!
//! Attention: burn-flex's own attention runs one head after another on one thread and, below
//! 256K scores, fills the whole score matrix. Here a tile of queries (with the query heads of
//! one KV group stacked) is multiplied with only the keys it may see (about half the work),
//! each tile is two `gemm` calls and a softmax, and the tiles are spread over the rayon pool.
//! Queries, keys and values are read in the projections' own `[batch, len, heads, head_dim]`
//! layout and the output is written in it, so no transposes are needed around the kernel.

use std::any::TypeId;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Query rows per tile.
const TILE: usize = 64;

/// Whether these kernels serve backend `B`: burn-flex itself (inference). Under autodiff
/// (`Autodiff<Flex>`) and on CUDA the callers use burn's differentiable tensor ops instead.
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
    let mut out = vec![0.0f32; b * t * h * d];
    let dims = Dims {
        batch: b,
        queries: t,
        heads: h,
        head_dim: d,
        keys: len,
        kv_heads: kvh,
    };
    attend_slices(f32s(&q), f32s(&k), f32s(&v), &mut out, &dims);
    Tensor::from_data(TensorData::new(out, [b, t, h, d]), &device)
}

fn f32s(x: &TensorData) -> &[f32] {
    x.as_slice::<f32>().expect("f32 activations")
}

/// Rotary embedding of `x` `[b, t, heads, d]` with the `cos` and `sin` tables of the `t`
/// positions (`[t, d]` each, rotate-half layout): `x·cos + rotate_half(x)·sin`.
pub fn rotary<B: Backend>(x: Tensor<B, 4>, cos: &[f32], sin: &[f32]) -> Tensor<B, 4> {
    let device = x.device();
    let [b, t, h, d] = x.dims();
    assert_eq!(cos.len(), t * d, "rotary tables");
    let data = x.into_data();
    let x = f32s(&data);
    let half = d / 2;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(h * d)
        .zip(x.par_chunks(h * d))
        .enumerate()
        .for_each(|(row, (out, x))| {
            let pos = row % t;
            let (c, s) = (&cos[pos * d..][..d], &sin[pos * d..][..d]);
            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (x1, x2) = x.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                for i in 0..half {
                    o1[i] = x1[i] * c[i] - x2[i] * s[i];
                    o2[i] = x2[i] * c[half + i] + x1[i] * s[half + i];
                }
            }
        });
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
    // One task per (batch, KV group, tile of queries): the group's `rep` query heads are
    // stacked as rows `i * rep + r` (token-major, so each token's heads are one contiguous
    // block to copy in and out), and share one pass over their keys and values.
    (0..n.batch * kvh * tiles).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(queries, scores, values): &mut (Vec<f32>, Vec<f32>, Vec<f32>), task| {
            let (b, group, tile) = (task / (kvh * tiles), task / tiles % kvh, task % tiles);
            let first = tile * TILE;
            let tokens = TILE.min(t - first);
            let rows = tokens * rep;
            // Keys the tile's last token sees; earlier tokens see fewer (zeroed below).
            let keys = past + first + tokens;
            let q_at = |i: usize| ((b * t + i) * h + group * rep) * d;
            let kv_at = |j: usize| ((b * len + j) * kvh + group) * d;
            queries.clear();
            for i in first..first + tokens {
                queries.extend_from_slice(&q[q_at(i)..q_at(i) + rep * d]);
            }
            scores.clear();
            scores.resize(rows * keys, 0.0);
            values.clear();
            values.resize(rows * d, 0.0);
            // SAFETY: every index stays inside the slices (asserted shapes above); `gemm`
            // reads `rows x d` of `queries` and `keys x d` of k and v at the given strides.
            unsafe {
                // scores = scale · Q · K^T
                gemm(
                    rows,
                    keys,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    queries.as_ptr(),
                    1,
                    d as isize,
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
            for (row, s) in scores.chunks_exact_mut(keys).enumerate() {
                let (seen, unseen) = s.split_at_mut(past + first + row / rep + 1);
                softmax_in_place(seen);
                unseen.fill(0.0);
            }
            // SAFETY: as above.
            unsafe {
                // values = P · V
                gemm(
                    rows,
                    d,
                    keys,
                    values.as_mut_ptr(),
                    1,
                    d as isize,
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
            for (k, i) in (first..first + tokens).enumerate() {
                let block = &values[k * rep * d..(k + 1) * rep * d];
                // SAFETY: the task owns the heads of `group` at the tile's tokens in batch
                // `b`; no other task writes them.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        block.as_ptr(),
                        out_ptr.get().add(q_at(i)),
                        block.len(),
                    );
                }
            }
        },
    );
}

/// RMSNorm of each row of `x` (`[..., width]`): `x / sqrt(mean(x²) + eps) * weight`, the
/// mean square accumulated in f64 per row.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &[f32],
    eps: f64,
) -> Tensor<B, D> {
    let device = x.device();
    let shape = x.shape();
    let width = weight.len();
    let data = x.into_data();
    let x = f32s(&data);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .for_each(|(out, x)| {
            let mean_square =
                x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / width as f64;
            let rms = (mean_square + eps).sqrt() as f32;
            for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
                *o = v / rms * w;
            }
        });
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// `silu(gate) * up` elementwise (SwiGLU's product), `silu(g) = g / (1 + e^-g)`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let device = gate.device();
    let shape = gate.shape();
    let (gate, up) = (gate.into_data(), up.into_data());
    let (g, u) = (f32s(&gate), f32s(&up));
    assert_eq!(g.len(), u.len(), "gate and up differ in size");
    let mut out = vec![0.0f32; g.len()];
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(out, (g, u))| {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + exp_clamped(-g)) * u;
            }
        });
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// `x ← exp(x − max x) / Σ exp(x − max x)`, in passes the compiler vectorises.
fn softmax_in_place(x: &mut [f32]) {
    let max = lanes(x, f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = exp_clamped(*v - max);
    }
    let inv = 1.0 / lanes(x, 0.0, |a, b| a + b);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Folds `x` with `f` over 16 independent lanes (a reduction the compiler can vectorise,
/// unlike one running accumulator), then folds the lanes.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for c in chunks {
        for (a, &b) in acc.iter_mut().zip(c) {
            *a = f(*a, b);
        }
    }
    acc.iter().fold(rest, |a, &b| f(a, b))
}

/// `e^x` to about one ulp for `x` in `[-87, 88]` (clamped to it outside), branch-free and
/// without libm calls so that the loops vectorise (libm's `expf` was a fifth of the
/// attention time): `x = n·ln2 + r`, `|r| <= ln2/2`, `e^r` by its degree-6 Taylor
/// polynomial (error below 2e-7 relative), times `2^n`.
#[inline(always)]
fn exp_clamped(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer (|y| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    // Outside, e^x leaves f32's normal range (softmax terms and SiLU's tail are then
    // negligible or saturated).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
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

    /// Values in `[-2, 2)`: the shared test values, scaled (exactly) by 4.
    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        crate::pseudo_random(n, seed)
            .into_iter()
            .map(|v| v * 4.0)
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
    fn rotary_kernel_equals_the_tensor_composition() {
        use burn::backend::Flex;
        let (b, t, h, d) = (2, 5, 3, 8);
        let inv = [1.0f32, 0.3, 0.05, 0.01];
        let device = Default::default();
        let composed = crate::rope::Rotary::<burn::backend::NdArray>::new(&inv, 7, t, &device);
        let x = pseudo_random(b * t * h * d, 4);
        let expected: Vec<f32> = composed
            .apply(Tensor::from_data(
                TensorData::new(x.clone(), [b, t, h, d]),
                &device,
            ))
            .into_data()
            .to_vec()
            .unwrap();
        let (cos, sin) = crate::rope::cos_sin_tables(&inv, 7, t);
        let x = Tensor::<Flex, 4>::from_data(TensorData::new(x, [b, t, h, d]), &Default::default());
        let got: Vec<f32> = rotary(x, &cos, &sin).into_data().to_vec().unwrap();
        let diff = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-6, "differs by {diff}");
    }

    #[test]
    fn norm_and_swiglu_kernels_equal_the_tensor_compositions() {
        use burn::backend::{Flex, NdArray};
        let device = Default::default();
        let (rows, width) = (7, 40);
        let x = pseudo_random(rows * width, 5);
        let w = pseudo_random(width, 6);
        let u = pseudo_random(rows * width, 7);
        let nd = |v: &[f32]| {
            Tensor::<NdArray, 2>::from_data(TensorData::new(v.to_vec(), [rows, width]), &device)
        };
        let flex = |v: &[f32]| {
            Tensor::<Flex, 2>::from_data(
                TensorData::new(v.to_vec(), [rows, width]),
                &Default::default(),
            )
        };
        let norm = crate::llama::RmsNorm::<NdArray> {
            weight: Tensor::from_data(TensorData::new(w.clone(), [width]), &device),
            eps: 1e-5,
        };
        let pairs: [(Vec<f32>, Vec<f32>); 2] = [
            (
                norm.forward(nd(&x).unsqueeze::<3>())
                    .into_data()
                    .to_vec()
                    .unwrap(),
                rms_norm(flex(&x), &w, 1e-5).into_data().to_vec().unwrap(),
            ),
            (
                (crate::llama::silu(nd(&x).mul_scalar(8.0)) * nd(&u))
                    .into_data()
                    .to_vec()
                    .unwrap(),
                swiglu(flex(&x).mul_scalar(8.0), flex(&u))
                    .into_data()
                    .to_vec()
                    .unwrap(),
            ),
        ];
        for (expected, got) in pairs {
            for (e, g) in expected.iter().zip(&got) {
                assert!((e - g).abs() <= 2e-6 * e.abs().max(1.0), "{g} vs {e}");
            }
        }
    }

    #[test]
    fn exp_is_accurate_to_about_one_ulp() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + (i as f32) * 175.0 / 200_000.0;
            let exact = (x as f64).exp();
            let rel = ((exp_clamped(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }
}
