//! Matrix products with `gemm`: the linear layers split by output columns over the threads
//! (one single-threaded `gemm` per block: 2-10% faster than gemm's own threading at the
//! model's shapes, m = 512, n or k = 192-1536, on two threads, most for the narrow pruned
//! layers), their outputs never zero-filled first, and strided single-threaded products for
//! the kernels that run in parallel themselves.

use ::gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::{multiversion, written_by, OutPtr};

/// A matrix operand: element `(r, c)` at `at[r * row + c * col]`.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    at: &'a [f32],
    row: usize,
    col: usize,
}

impl<'a> Operand<'a> {
    /// Rows `ld` apart, each contiguous.
    pub(crate) fn rows(at: &'a [f32], ld: usize) -> Self {
        Operand {
            at,
            row: ld,
            col: 1,
        }
    }

    /// The same values read as the transposed matrix.
    pub(crate) fn transposed(self) -> Self {
        Operand {
            row: self.col,
            col: self.row,
            ..self
        }
    }

    /// The same strides, starting `offset` values in.
    pub(crate) fn skip(self, offset: usize) -> Self {
        Operand {
            at: &self.at[offset..],
            ..self
        }
    }

    /// The operand from column `c` on.
    fn at_column(self, c: usize) -> Self {
        self.skip(c * self.col)
    }

    /// Whether an `rows x cols` matrix at these strides lies inside `at`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows > 0 && cols > 0 && (rows - 1) * self.row + (cols - 1) * self.col < self.at.len()
    }
}

/// `dst = scale · a · b`, or `dst += scale · a · b` with `accumulate`, for `m x n` outputs
/// `ldd` apart, `a` `m x k` and `b` `k x n` (single-threaded: the callers run in parallel).
pub(crate) fn multiply(
    dst: &mut [f32],
    ldd: usize,
    a: Operand,
    b: Operand,
    [m, n, k]: [usize; 3],
    accumulate: bool,
    scale: f32,
) {
    assert!(
        m > 0 && n > 0 && dst.len() >= (m - 1) * ldd + n && a.holds(m, k) && b.holds(k, n),
        "product operands"
    );
    // SAFETY: every element `gemm` addresses lies inside the slices (asserted).
    unsafe { multiply_raw(dst.as_mut_ptr(), ldd, a, b, [m, n, k], accumulate, scale) }
}

/// [`multiply`] through a raw output pointer.
///
/// # Safety
/// `dst` must be valid for `m` rows of `n` values `ldd` apart (initialised, with
/// `accumulate`); `a` and `b` must hold their matrices.
unsafe fn multiply_raw(
    dst: *mut f32,
    ldd: usize,
    a: Operand,
    b: Operand,
    [m, n, k]: [usize; 3],
    accumulate: bool,
    scale: f32,
) {
    debug_assert!(a.holds(m, k) && b.holds(k, n));
    gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        accumulate,
        a.at.as_ptr(),
        a.col as isize,
        a.row as isize,
        b.at.as_ptr(),
        b.col as isize,
        b.row as isize,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Column blocks `(first, count)` of an `m x n` product with inner size `k`: equal blocks
/// of whole 16-column panels, one per thread (192 columns on two threads: 96 + 96), or one
/// block when the product is too small to share (burn-flex's own threshold for threads).
fn column_blocks([m, n, k]: [usize; 3]) -> Vec<(usize, usize)> {
    let threads = if m * n * k >= 192 * 192 * 192 {
        rayon::current_num_threads()
    } else {
        1
    };
    let block = n.div_ceil(threads).div_ceil(16) * 16;
    (0..n)
        .step_by(block.max(1))
        .map(|first| (first, block.min(n - first)))
        .collect()
}

/// `dst (+)= a · b` for `a` `[m, k]`, `b` `[k, n]` (any strides), `dst` `[m, n]` row-major,
/// its column blocks over the threads.
///
/// # Safety
/// `dst` must be valid for `m·n` writes (and reads, initialised, with `accumulate`).
unsafe fn product_by_columns(
    dst: *mut f32,
    a: Operand,
    b: Operand,
    [m, n, k]: [usize; 3],
    accumulate: bool,
) {
    assert!(a.holds(m, k) && b.holds(k, n), "product shapes");
    let dst = OutPtr(dst);
    column_blocks([m, n, k])
        .into_par_iter()
        .for_each(|(first, cols)| {
            // SAFETY: block `first..first + cols` writes those columns of `dst` only; its
            // operand `b` from that column on holds `k x cols`.
            unsafe {
                multiply_raw(
                    dst.get().add(first),
                    n,
                    a,
                    b.at_column(first),
                    [m, cols, k],
                    accumulate,
                    1.0,
                )
            }
        });
}

/// `x · w` for row-major `x` `[m, k]` and `w` `[k, n]`.
pub fn matmul(x: &[f32], w: &[f32], [m, n, k]: [usize; 3]) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == k * n, "matmul shapes");
    let (a, b) = (Operand::rows(x, k), Operand::rows(w, n));
    // SAFETY: the column blocks write all `m·n` outputs.
    unsafe { written_by(m * n, |dst| product_by_columns(dst, a, b, [m, n, k], false)) }
}

/// [`matmul`] into `dst` (`[m, n]`, overwritten).
pub(crate) fn matmul_into(dst: &mut [f32], x: &[f32], w: &[f32], [m, n, k]: [usize; 3]) {
    assert!(
        dst.len() == m * n && x.len() == m * k && w.len() == k * n,
        "matmul shapes"
    );
    let (a, b) = (Operand::rows(x, k), Operand::rows(w, n));
    // SAFETY: `dst` holds `m·n` values (asserted).
    unsafe { product_by_columns(dst.as_mut_ptr(), a, b, [m, n, k], false) }
}

/// `dst += x · w` for row-major `dst` `[m, n]`, `x` `[m, k]`, `w` `[k, n]` (a residual
/// connection accumulated into the product: no pass of its own).
pub fn matmul_add(dst: &mut [f32], x: &[f32], w: &[f32], [m, n, k]: [usize; 3]) {
    assert!(
        dst.len() == m * n && x.len() == m * k && w.len() == k * n,
        "matmul shapes"
    );
    let (a, b) = (Operand::rows(x, k), Operand::rows(w, n));
    // SAFETY: `dst` holds the `m·n` initialised sums (asserted).
    unsafe { product_by_columns(dst.as_mut_ptr(), a, b, [m, n, k], true) }
}

/// `g · wᵀ` for row-major `g` `[m, n]` and `w` `[k, n]`: the input gradient of a linear
/// layer `x · w` (`[m, k]`), read from `w` in place.
pub fn matmul_transposed(g: &[f32], w: &[f32], [m, n, k]: [usize; 3]) -> Vec<f32> {
    assert!(g.len() == m * n && w.len() == k * n, "matmul shapes");
    let (a, b) = (Operand::rows(g, n), Operand::rows(w, n).transposed());
    // SAFETY: the column blocks write all `m·k` outputs.
    unsafe { written_by(m * k, |dst| product_by_columns(dst, a, b, [m, k, n], false)) }
}

/// [`matmul_transposed`] into `dst` (`[m, k]`, overwritten).
pub(crate) fn matmul_transposed_into(dst: &mut [f32], g: &[f32], w: &[f32], [m, n, k]: [usize; 3]) {
    assert!(
        dst.len() == m * k && g.len() == m * n && w.len() == k * n,
        "matmul shapes"
    );
    let (a, b) = (Operand::rows(g, n), Operand::rows(w, n).transposed());
    // SAFETY: `dst` holds `m·k` values (asserted).
    unsafe { product_by_columns(dst.as_mut_ptr(), a, b, [m, k, n], false) }
}

/// `silu(x · gate) * (x · up)` for row-major `x` `[m, k]` and `gate`, `up` `[k, n]`
/// (SwiGLU's input to `down_proj`): each thread takes a block of columns, multiplies it out
/// for both projections and applies the product while the block is in cache; one pass over
/// the threads instead of three, and no full-size gate and up tensors.
pub fn swiglu_projections(x: &[f32], gate: &[f32], up: &[f32], [m, n, k]: [usize; 3]) -> Vec<f32> {
    assert!(
        x.len() == m * k && gate.len() == k * n && up.len() == k * n,
        "matmul shapes"
    );
    let a = Operand::rows(x, k);
    let (g, u) = (Operand::rows(gate, n), Operand::rows(up, n));
    let each_block = |out: OutPtr| {
        column_blocks([m, n, k])
            .into_par_iter()
            .for_each(|(first, cols)| {
                // SAFETY: the block writes columns `first..first + cols` of `out` (its own)
                // and all of `ups` (`m x cols`) before reading them.
                unsafe {
                    let gates = out.get().add(first);
                    multiply_raw(gates, n, a, g.at_column(first), [m, cols, k], false, 1.0);
                    let ups = written_by(m * cols, |ups| {
                        multiply_raw(ups, cols, a, u.at_column(first), [m, cols, k], false, 1.0)
                    });
                    for (row, ups) in ups.chunks_exact(cols).enumerate() {
                        let gates = std::slice::from_raw_parts_mut(gates.add(row * n), cols);
                        super::pointwise::silu_times_in_place(gates, ups);
                    }
                }
            })
    };
    // SAFETY: the blocks cover all `n` columns of all `m` rows.
    unsafe { written_by(m * n, |out| each_block(OutPtr(out))) }
}

multiversion! {
    /// `dst += x` elementwise.
    pub fn add_assign(dst: &mut [f32], x: &[f32]) {
        for (d, &x) in dst.iter_mut().zip(x) {
            *d += x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::test_util::{max_abs_diff, pseudo_random};

    /// `a · b` by its definition, in f64.
    fn reference(a: &[f32], b: &[f32], [m, n, k]: [usize; 3]) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        crate::llama::transpose(x, rows, cols)
    }

    #[test]
    fn products_equal_the_definition() {
        // Above the size that is cut into column blocks (200 columns: blocks of unequal
        // width on most thread counts), and below it.
        for [m, n, k] in [[130, 200, 300], [3, 5, 7]] {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(k * n, 2);
            let expected = reference(&x, &w, [m, n, k]);
            assert!(max_abs_diff(&matmul(&x, &w, [m, n, k]), &expected) < 1e-4);
            let mut sum = pseudo_random(m * n, 3);
            let start = sum.clone();
            matmul_add(&mut sum, &x, &w, [m, n, k]);
            let expected_sum: Vec<f32> = start.iter().zip(&expected).map(|(a, b)| a + b).collect();
            assert!(max_abs_diff(&sum, &expected_sum) < 1e-4);
            // g · wᵀ with w [k, n] read in place: the same as g times the transposed copy.
            let g = pseudo_random(m * n, 4);
            let w_t = transpose(&w, k, n);
            let expected = reference(&g, &w_t, [m, k, n]);
            assert!(max_abs_diff(&matmul_transposed(&g, &w, [m, n, k]), &expected) < 1e-4);
        }
    }

    #[test]
    fn swiglu_projections_equal_the_composition() {
        // Values in [-0.5, 0.5), so that gate and up stay O(1) and the f32 products'
        // rounding stays well below the tolerance.
        let [m, n, k] = [128, 200, 300];
        let x = crate::pseudo_random(m * k, 11);
        let gate = crate::pseudo_random(k * n, 12);
        let up = crate::pseudo_random(k * n, 13);
        let got = swiglu_projections(&x, &gate, &up, [m, n, k]);
        let g = reference(&x, &gate, [m, n, k]);
        let u = reference(&x, &up, [m, n, k]);
        for ((got, g), u) in got.iter().zip(&g).zip(&u) {
            let e = g / (1.0 + (-g).exp()) * u;
            assert!((got - e).abs() <= 1e-5 * e.abs().max(1.0), "{got} vs {e}");
        }
    }
}
