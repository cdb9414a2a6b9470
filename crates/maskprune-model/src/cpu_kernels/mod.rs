//! One-pass CPU kernels over plain `f32` slices, the forward and backward passes that
//! burn-flex runs through [`crate::kernels::Kernels`] (the adaptation to burn tensors lives
//! there; nothing here knows about burn).
//!
//! burn's composed tensor ops spend more time walking strides and making passes over memory
//! than computing; these kernels do each operation in one pass, keep the projections'
//! `[batch, len, heads, head_dim]` layout (no transposes around attention), split products
//! by columns over the rayon pool, and compile their elementwise loops for SSE2, AVX2 and
//! AVX-512 (picked at run time).
//!
//! - [`gemm`]: products of row-major matrices split over the threads.
//! - [`attention`]: causal grouped-query attention, forward (with each row's log-sum-exp)
//!   and backward.
//! - [`pointwise`]: RMSNorm, the rotary embedding and SwiGLU, forward and backward.
//! - [`head`]: the LM head fused with what is computed from its logits (target
//!   log-probabilities; the distillation and next-token losses with their gradient), in
//!   blocks of rows, so the `[rows, vocab]` logits never exist whole.

pub mod attention;
pub mod gemm;
pub mod head;
pub mod pointwise;

/// Defines a function whose body is compiled three times: for x86-64's baseline (SSE2), with
/// AVX2 and FMA, and with AVX-512, and picks the widest copy the CPU runs at run time. The
/// bodies are plain loops written to auto-vectorise. Inside, `M::mul_add(a, b, c)` is
/// `a·b + c` rounded once (an FMA instruction) in the AVX copies and twice in the baseline
/// one (whose `f32::mul_add` would be a slow libm call), so those copies may differ in the
/// last bit; reductions fold fixed lanes in a fixed order in all three.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(unused, clippy::extra_unused_type_parameters)]
            fn body<M: $crate::cpu_kernels::MulAdd>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    body::<$crate::cpu_kernels::Fused>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body::<$crate::cpu_kernels::Fused>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the CPU has every feature `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body::<$crate::cpu_kernels::Separate>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// How a kernel computes `a·b + c` (see [`multiversion!`]).
pub trait MulAdd {
    /// `a·b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding: an FMA instruction where the target has one.
pub struct Fused;

/// A product and a sum, each rounded.
pub struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Runs `f` on a thread of rayon's pool (or right here when already on one). The parallel
/// passes of a forward or a training step then start from a thread that works on them
/// itself: no third thread (the caller) sleeps through each pass and is woken after it, and
/// no caller runs its serial work beside workers still spinning for more. On two cores that
/// was 2-10% of a prefill and the context switches of a training step.
///
/// Callers from outside the pool take turns: a worker waiting inside one caller's parallel
/// pass may otherwise pick up another caller's whole job, and when that job needs a lock the
/// first one holds (burn's autodiff graph is behind one lock during a backward pass), both
/// wait forever (seen with tests training in parallel).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    rayon::scope(|_| f())
}

/// An output pointer that parallel tasks write through, each to a part no other task
/// touches (attention tiles: their rows; column blocks of a product: their columns).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: the tasks write disjoint parts (see the users of `OutPtr`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Send + Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A vector of `len` values written by `fill` through the pointer it is given, without
/// the zero-fill of `vec![0.0; len]` first (outputs that a `gemm` overwrites anyway).
///
/// # Safety
/// `fill` must write all `len` values.
pub(crate) unsafe fn written_by(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    fill(out.as_mut_ptr());
    // SAFETY: the first `len` values are initialised (the caller's promise).
    unsafe { out.set_len(len) };
    out
}

/// Folds `x` with `f` over 16 independent lanes (a reduction the compiler can vectorise,
/// unlike one running accumulator), then folds the lanes.
#[inline(always)]
pub(crate) fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
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

/// The larger of two values by a plain comparison (`f32::max`'s NaN rules cost a compare
/// and a blend per lane).
#[inline(always)]
pub(crate) fn larger(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `e^x` to about one ulp for `x` in `[-87, 88]` (clamped to it outside), branch-free and
/// without libm calls so that the loops vectorise (libm's `expf` was a fifth of the
/// attention time): `x = n·ln2 + r`, `|r| <= ln2/2`, `e^r` by its degree-6 Taylor
/// polynomial (error below 2e-7 relative), times `2^n`.
#[inline(always)]
pub(crate) fn exp_clamped<M: MulAdd>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer (|y| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    // Outside, e^x leaves f32's normal range (softmax terms and SiLU's tail are then
    // negligible or saturated).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = M::mul_add(x, std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = M::mul_add(-n, LN2_LO, M::mul_add(-n, LN2_HI, x));
    // Horner's rule, highest power first.
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = M::mul_add(p, r, c);
    }
    // 2^n from the bits of `shifted` (`1.5·2^23 + n`, so its low mantissa bits are n): n + 127
    // shifted into the exponent field. Integer ops only; a float-to-int `as` cast (saturating)
    // would not vectorise.
    p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Values in `[-2, 2)`: the crate's shared test values, scaled (exactly) by 4.
    pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        crate::pseudo_random(n, seed)
            .into_iter()
            .map(|v| v * 4.0)
            .collect()
    }

    /// The largest `|a - b|` over the pairs.
    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "lengths differ");
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// `Σ a·b` in f64.
    pub fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// The gradient of `Σ dy·f(x)` with respect to `x` by central differences in f64
    /// (`f` computed in f32, so steps of 1e-2 keep the rounding error small next to the
    /// differences of these O(1) values).
    pub fn numeric_gradient(x: &[f32], dy: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) -> Vec<f32> {
        (0..x.len())
            .map(|i| numeric_partial(x, dy, &f, i))
            .collect()
    }

    /// Coordinate `i` of [`numeric_gradient`].
    pub fn numeric_partial(
        x: &[f32],
        dy: &[f32],
        f: &impl Fn(&[f32]) -> Vec<f32>,
        i: usize,
    ) -> f32 {
        let h = 1e-2f32;
        let mut plus = x.to_vec();
        plus[i] += h;
        let mut minus = x.to_vec();
        minus[i] -= h;
        ((dot(&f(&plus), dy) - dot(&f(&minus), dy)) / (2.0 * h as f64)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_to_about_one_ulp() {
        let (mut worst, mut worst_fused) = (0.0f64, 0.0f64);
        for i in 0..=200_000 {
            let x = -87.0 + (i as f32) * 175.0 / 200_000.0;
            let exact = (x as f64).exp();
            let rel = |e: f32| ((e as f64 - exact) / exact).abs();
            worst = worst.max(rel(exp_clamped::<Separate>(x)));
            worst_fused = worst_fused.max(rel(exp_clamped::<Fused>(x)));
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(
            worst_fused < 3e-7,
            "worst relative error with FMA {worst_fused}"
        );
    }

    #[test]
    fn on_pool_runs_on_a_pool_thread() {
        assert!(rayon::current_thread_index().is_none());
        assert!(on_pool(|| rayon::current_thread_index().is_some()));
    }
}
