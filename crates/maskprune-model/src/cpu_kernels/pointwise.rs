//! RMSNorm, the rotary embedding and SwiGLU's `silu(gate) * up`, forward and backward, each
//! one pass over rows split across the threads.

use rayon::prelude::*;

use super::{exp_clamped, multiversion, MulAdd};

/// Rows per parallel task of the elementwise kernels.
const CHUNK: usize = 1 << 14;

/// RMSNorm of each row of `x` (`weight.len()` wide): `x / sqrt(mean(x²) + eps) * weight`,
/// the mean square accumulated in f64 per row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let width = weight.len();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .for_each(|(out, x)| normalise_row(out, x, weight, eps));
    out
}

/// The input gradient of [`rms_norm`] given the output gradient `dy`: with `r` the row's
/// `1 / sqrt(mean(x²) + eps)`, `dx = r·w·dy − x·r³·mean(x·w·dy)`.
pub fn rms_norm_backward(x: &[f32], weight: &[f32], eps: f64, dy: &[f32]) -> Vec<f32> {
    let width = weight.len();
    assert_eq!(x.len(), dy.len(), "rms_norm_backward shapes");
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(width)
        .zip(x.par_chunks(width).zip(dy.par_chunks(width)))
        .for_each(|(dx, (x, dy))| normalise_row_backward(dx, x, dy, weight, eps));
    dx
}

/// `sqrt(mean(x²) + eps)` with the mean square summed over eight f64 lanes (vectorisable,
/// unlike one running sum), folded in a fixed order.
#[inline(always)]
fn root_mean_square(x: &[f32], eps: f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v as f64) * (v as f64);
        }
    }
    let mean_square = (acc.iter().sum::<f64>() + rest) / x.len() as f64;
    (mean_square + eps).sqrt()
}

multiversion! {
    /// One row of [`rms_norm`].
    fn normalise_row(out: &mut [f32], x: &[f32], weight: &[f32], eps: f64) {
        // Divided by the root mean square (not multiplied by its inverse), as transformers
        // computes it.
        let rms = root_mean_square(x, eps) as f32;
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v / rms * w;
        }
    }
}

multiversion! {
    /// One row of [`rms_norm_backward`].
    fn normalise_row_backward(dx: &mut [f32], x: &[f32], dy: &[f32], weight: &[f32], eps: f64) {
        let r = 1.0 / root_mean_square(x, eps);
        let mut acc = [0.0f64; 8];
        for (i, ((&x, &dy), &w)) in x.iter().zip(dy).zip(weight).enumerate() {
            acc[i % 8] += x as f64 * w as f64 * dy as f64;
        }
        let mean = acc.iter().sum::<f64>() / x.len() as f64;
        let (r32, c) = (r as f32, (r * r * r * mean) as f32);
        for (((d, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(weight) {
            *d = M::mul_add(r32 * w, dy, -(x * c));
        }
    }
}

/// Rotary embedding of `x` `[b, t, heads, d]` (`shape`) with the `cos` and `sin` tables of
/// the `t` positions (`[t, d]` each, rotate-half layout): `x·cos + rotate_half(x)·sin`.
/// The transpose of the rotation is the rotation by the opposite angles, so the backward
/// pass is this kernel with the sines negated.
pub fn rotary(x: &[f32], cos: &[f32], sin: &[f32], shape: [usize; 4]) -> Vec<f32> {
    let [_, t, h, d] = shape;
    assert_eq!(x.len(), shape.iter().product::<usize>(), "rotary shape");
    assert!(cos.len() == t * d && sin.len() == t * d, "rotary tables");
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(h * d)
        .zip(x.par_chunks(h * d))
        .enumerate()
        .for_each(|(row, (out, x))| {
            let pos = row % t;
            rotate_heads(out, x, &cos[pos * d..][..d], &sin[pos * d..][..d]);
        });
    out
}

multiversion! {
    /// Rotates each head (`d = cos.len()` values) of one position's row.
    fn rotate_heads(out: &mut [f32], x: &[f32], c: &[f32], s: &[f32]) {
        let d = c.len();
        let half = d / 2;
        for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            // Every slice cut to `half` up front, so the loop has no bounds checks and
            // vectorises.
            let (x1, x2) = (&x[..half], &x[half..][..half]);
            let (o1, o2) = o.split_at_mut(half);
            let o2 = &mut o2[..half];
            let (c1, c2) = (&c[..half], &c[half..][..half]);
            let (s1, s2) = (&s[..half], &s[half..][..half]);
            for i in 0..half {
                o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
            }
        }
    }
}

/// `x` viewed as rows of `m.len()` runs of `group` values, each run scaled by its `m[i]`:
/// the per-head (`group = head_dim`) or per-channel (`group = 1`) masks.
pub fn scale_groups(x: &[f32], m: &[f32], group: usize) -> Vec<f32> {
    let width = m.len() * group;
    assert!(
        width > 0 && x.len().is_multiple_of(width),
        "scale_groups shapes"
    );
    let mut out = vec![0.0f32; x.len()];
    let rows = (CHUNK / width).max(1);
    out.par_chunks_mut(rows * width)
        .zip(x.par_chunks(rows * width))
        .for_each(|(out, x)| scale_runs(out, x, m, group));
    out
}

/// The gradient of [`scale_groups`] for `m`: `Σ dy·x` over each run, summed over the rows —
/// in fixed blocks of rows whose partial sums are added in order, so the result does not
/// depend on the threads' scheduling (resumed runs match bit for bit).
pub fn scale_groups_gradient(x: &[f32], dy: &[f32], n: usize, group: usize) -> Vec<f32> {
    let width = n * group;
    assert!(
        width > 0 && x.len().is_multiple_of(width) && dy.len() == x.len(),
        "scale_groups shapes"
    );
    let rows = (CHUNK / width).max(1);
    let partials: Vec<Vec<f64>> = x
        .par_chunks(rows * width)
        .zip(dy.par_chunks(rows * width))
        .map(|(x, dy)| {
            let mut acc = vec![0.0f64; n];
            run_sums(&mut acc, x, dy, group);
            acc
        })
        .collect();
    let mut total = vec![0.0f64; n];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total.into_iter().map(|v| v as f32).collect()
}

multiversion! {
    /// Rows of [`scale_groups`] (runs of one value: an elementwise product with `m`).
    fn scale_runs(out: &mut [f32], x: &[f32], m: &[f32], group: usize) {
        let width = m.len() * group;
        for (o, x) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
            if group == 1 {
                for ((o, &x), &s) in o.iter_mut().zip(x).zip(m) {
                    *o = x * s;
                }
                continue;
            }
            for ((o, x), &s) in o.chunks_exact_mut(group).zip(x.chunks_exact(group)).zip(m) {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = x * s;
                }
            }
        }
    }
}

multiversion! {
    /// `acc[i] += Σ x·dy` over run `i` of every row of a block (in f64).
    fn run_sums(acc: &mut [f64], x: &[f32], dy: &[f32], group: usize) {
        let width = acc.len() * group;
        for (x, dy) in x.chunks_exact(width).zip(dy.chunks_exact(width)) {
            if group == 1 {
                for ((a, &x), &dy) in acc.iter_mut().zip(x).zip(dy) {
                    *a += x as f64 * dy as f64;
                }
                continue;
            }
            for ((a, x), dy) in acc.iter_mut().zip(x.chunks_exact(group)).zip(dy.chunks_exact(group)) {
                *a += x.iter().zip(dy).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
            }
        }
    }
}

/// `silu(gate) * up` elementwise (SwiGLU's product), `silu(g) = g / (1 + e^-g)`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "gate and up differ in size");
    let mut out = vec![0.0f32; gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(out, (g, u))| silu_times(out, g, u));
    out
}

/// The gradients of [`swiglu`] for the gate and up inputs given the output gradient `dy`:
/// `d_up = dy·silu(g)`, `d_gate = dy·u·σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        gate.len() == up.len() && up.len() == dy.len(),
        "swiglu_backward shapes"
    );
    let mut d_gate = vec![0.0f32; gate.len()];
    let mut d_up = vec![0.0f32; gate.len()];
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), dy)| silu_times_backward(dg, du, g, u, dy));
    (d_gate, d_up)
}

/// `silu(g) * u = g / (1 + e^-g) * u`.
#[inline(always)]
fn silu_mul<M: MulAdd>(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_clamped::<M>(-g)) * u
}

multiversion! {
    /// `out = silu(g) * u` elementwise.
    fn silu_times(out: &mut [f32], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = silu_mul::<M>(g, u);
        }
    }
}

multiversion! {
    /// `g = silu(g) * u` elementwise.
    pub(crate) fn silu_times_in_place(g: &mut [f32], u: &[f32]) {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = silu_mul::<M>(*g, u);
        }
    }
}

multiversion! {
    /// One chunk of [`swiglu_backward`].
    fn silu_times_backward(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let sigmoid = 1.0 / (1.0 + exp_clamped::<M>(-g));
            let silu = g * sigmoid;
            *du = dy * silu;
            *dg = dy * u * sigmoid * M::mul_add(g, 1.0 - sigmoid, 1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::test_util::{max_abs_diff, numeric_gradient, pseudo_random};

    #[test]
    fn rms_norm_matches_its_definition_and_its_gradient() {
        let (rows, width) = (3, 10);
        let x = pseudo_random(rows * width, 1);
        let w = pseudo_random(width, 2);
        let y = rms_norm(&x, &w, 1e-5);
        for r in 0..rows {
            let row = &x[r * width..][..width];
            let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / width as f64;
            for c in 0..width {
                let e = row[c] as f64 / (ms + 1e-5).sqrt() * w[c] as f64;
                assert!((y[r * width + c] as f64 - e).abs() < 1e-5);
            }
        }
        let dy = pseudo_random(rows * width, 3);
        let numeric = numeric_gradient(&x, &dy, |x| rms_norm(x, &w, 1e-5));
        let got = rms_norm_backward(&x, &w, 1e-5, &dy);
        assert!(
            max_abs_diff(&got, &numeric) < 2e-3,
            "{got:?} vs {numeric:?}"
        );
    }

    #[test]
    fn rotary_backward_is_the_transpose() {
        let shape = [2, 3, 2, 8];
        let (cos, sin) = crate::rope::cos_sin_tables(&[1.0, 0.3, 0.05, 0.01], 7, 3);
        let neg_sin: Vec<f32> = sin.iter().map(|s| -s).collect();
        let x = pseudo_random(shape.iter().product(), 4);
        let dy = pseudo_random(x.len(), 5);
        let numeric = numeric_gradient(&x, &dy, |x| rotary(x, &cos, &sin, shape));
        let got = rotary(&dy, &cos, &neg_sin, shape);
        assert!(max_abs_diff(&got, &numeric) < 1e-3);
    }

    #[test]
    fn scale_groups_and_its_gradients() {
        // 3 rows of 4 heads of 5 values.
        let (n, group) = (4, 5);
        let x = pseudo_random(3 * n * group, 9);
        let m = [1.0, 0.0, 0.5, -2.0];
        let y = scale_groups(&x, &m, group);
        for (i, (y, x)) in y.iter().zip(&x).enumerate() {
            assert_eq!(*y, x * m[i / group % n]);
        }
        let dy = pseudo_random(x.len(), 10);
        let numeric = numeric_gradient(&m, &dy, |m| scale_groups(&x, m, group));
        let got = scale_groups_gradient(&x, &dy, n, group);
        assert!(
            max_abs_diff(&got, &numeric) < 1e-3,
            "{got:?} vs {numeric:?}"
        );
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let g = pseudo_random(40, 6);
        let u = pseudo_random(40, 7);
        let dy = pseudo_random(40, 8);
        let (dg, du) = swiglu_backward(&g, &u, &dy);
        let numeric_g = numeric_gradient(&g, &dy, |g| swiglu(g, &u));
        let numeric_u = numeric_gradient(&u, &dy, |u| swiglu(&g, u));
        assert!(max_abs_diff(&dg, &numeric_g) < 2e-3);
        assert!(max_abs_diff(&du, &numeric_u) < 2e-3);
        for ((y, g), u) in swiglu(&g, &u).iter().zip(&g).zip(&u) {
            let e = g / (1.0 + (-g).exp()) * u;
            assert!((y - e).abs() <= 2e-6 * e.abs().max(1.0), "{y} vs {e}");
        }
    }
}
