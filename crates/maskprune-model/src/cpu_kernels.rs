//! Kernels for inference on the CPU backend (burn-flex), where burn's composed tensor ops
//! spend more time walking strides and making passes over memory than computing: causal
//! grouped-query attention, the rotary position embedding, RMSNorm and SwiGLU's
//! `silu(gate) * up`, each one pass.
//!
//! Attention: burn-flex's own attention runs one head after another on one thread and, below
//! 256K scores, fills the whole score matrix. Here a tile of queries (with the query heads of
//! one KV group stacked) is multiplied with only the keys it may see (about half the work):
//! one `gemm` for the keys all its tokens see, and its diagonal block in steps of 16 tokens,
//! each with the keys up to its last token (the masked half of the block was 12% of the
//! products at 512 positions); then a softmax, the same pieces for `P·V`, and the tiles are
//! spread over the rayon pool.
//! Queries, keys and values are read in the projections' own `[batch, len, heads, head_dim]`
//! layout and the output is written in it, so no transposes are needed around the kernel.

use std::any::{Any, TypeId};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Query rows per tile.
const TILE: usize = 64;

/// Defines a function whose body is compiled three times: for x86-64's baseline (SSE2), with
/// AVX2 and FMA, and with AVX-512, and picks the widest copy the CPU runs at run time. The
/// bodies are plain loops written to auto-vectorise. Inside, `M::mul_add(a, b, c)` is
/// `a·b + c` rounded once (an FMA instruction) in the AVX copies and twice in the baseline
/// one (whose `f32::mul_add` would be a slow libm call), so those copies may differ in the
/// last bit; reductions fold fixed lanes in a fixed order in all three.
macro_rules! multiversion {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(unused)]
            fn body<M: MulAdd>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    body::<Fused>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body::<Fused>($($arg),*)
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
            body::<Separate>($($arg),*)
        }
    };
}

/// How a kernel computes `a·b + c` (see [`multiversion!`]).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding: an FMA instruction where the target has one.
struct Fused;

/// A product and a sum, each rounded.
struct Separate;

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

/// Whether these kernels serve backend `B`: burn-flex itself (inference). Under autodiff
/// (`Autodiff<Flex>`) and on CUDA the callers use burn's differentiable tensor ops instead.
pub fn serves<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<burn::backend::Flex>()
}

/// Runs `f` on a thread of rayon's pool when these kernels serve `B` (else right here).
/// The ten or so parallel passes of every layer then start from a pool thread, which works
/// on them itself, instead of the calling thread sleeping through each pass and being woken
/// after it: a wake-up costs tens of microseconds on a VM, and the 50% pruned model's
/// prefill ran 1-2% (1x512) to 5-10% (4x256) faster without them.
pub fn on_pool<B: Backend, R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if serves::<B>() && rayon::current_thread_index().is_none() {
        rayon::scope(|_| f())
    } else {
        f()
    }
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
    let (q, k, v) = (Host::new(q), Host::new(k), Host::new(v));
    let mut out = vec![0.0f32; b * t * h * d];
    let dims = Dims {
        batch: b,
        queries: t,
        heads: h,
        head_dim: d,
        keys: len,
        kv_heads: kvh,
    };
    attend_slices(q.f32s(), k.f32s(), v.f32s(), &mut out, &dims);
    Tensor::from_data(TensorData::new(out, [b, t, h, d]), &device)
}

/// A tensor's f32 values on the host: burn-flex's own storage, borrowed (no copy) when it is
/// contiguous from its start, as activations are, even while other tensors share it (the
/// residual stream does); a copy otherwise.
enum Host {
    Borrowed(FlexTensor, usize),
    Copied(TensorData),
}

impl Host {
    fn new<B: Backend, const D: usize>(x: Tensor<B, D>) -> Self {
        let len = x.shape().num_elements();
        match into_flex(x) {
            Ok(t) if is_plain_f32(&t) => Host::Borrowed(t, len),
            Ok(t) => Host::Copied(t.into_data()),
            Err(x) => Host::Copied(x.into_data()),
        }
    }

    fn f32s(&self) -> &[f32] {
        match self {
            Host::Borrowed(t, len) => &t.storage::<f32>()[..*len],
            Host::Copied(data) => data.as_slice::<f32>().expect("f32 activations"),
        }
    }
}

/// `x`'s burn-flex tensor (no copy), or `x` back when `B` is another backend.
fn into_flex<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<FlexTensor, Tensor<B, D>> {
    let primitive: Box<dyn Any> = Box::new(x.into_primitive().tensor());
    primitive.downcast::<FlexTensor>().map(|t| *t).map_err(|p| {
        let p = p
            .downcast::<B::FloatTensorPrimitive>()
            .expect("the primitive just boxed");
        Tensor::from_primitive(TensorPrimitive::Float(*p))
    })
}

/// A burn-flex tensor as a tensor of `B` (which is burn-flex: see [`serves`]).
fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    let primitive: Box<dyn Any> = Box::new(t);
    let p = primitive
        .downcast::<B::FloatTensorPrimitive>()
        .expect("from_flex on burn-flex only");
    Tensor::from_primitive(TensorPrimitive::Float(*p))
}

/// Whether `t` is f32 values laid out contiguously from the start of its storage.
fn is_plain_f32(t: &FlexTensor) -> bool {
    t.layout().is_contiguous() && t.layout().start_offset() == 0 && t.dtype() == DType::F32
}

/// `x · weight` for `x` `[b, t, in]` and `weight` `[in, out]`, with [`gemm_by_columns`].
pub fn matmul<B: Backend>(x: Tensor<B, 3>, weight: &Tensor<B, 2>) -> Tensor<B, 3> {
    let device = x.device();
    let [b, t, d_in] = x.dims();
    let [w_in, d_out] = weight.dims();
    assert_eq!(w_in, d_in, "weight shape");
    let (x, w) = (Host::new(x), Host::new(weight.clone()));
    let (x, w, mnk) = (x.f32s(), w.f32s(), [b * t, d_out, d_in]);
    // SAFETY: the product writes all `b·t·d_out` outputs.
    let out = unsafe { written_by(b * t * d_out, |dst| gemm_by_columns(dst, false, x, w, mnk)) };
    Tensor::from_data(TensorData::new(out, [b, t, d_out]), &device)
}

/// `residual + x · weight` for `x` `[b, t, in]` and `weight` `[in, out]`: the product is
/// accumulated into the residual's buffer (reused when no other tensor shares it), so the
/// residual connection costs no pass of its own.
pub fn matmul_add<B: Backend>(
    residual: Tensor<B, 3>,
    x: Tensor<B, 3>,
    weight: &Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [b, t, d_in] = x.dims();
    let [w_in, d_out] = weight.dims();
    assert_eq!(residual.dims(), [b, t, d_out], "residual shape");
    assert_eq!(w_in, d_in, "weight shape");
    let mut sum = match into_flex(residual) {
        Ok(s) if is_plain_f32(&s) => s,
        Ok(s) => s.to_contiguous(),
        Err(residual) => {
            let y = x.reshape([b * t, d_in]).matmul(weight.clone());
            return residual + y.reshape([b, t, d_out]);
        }
    };
    let (x, w) = (Host::new(x), Host::new(weight.clone()));
    let dst = &mut sum.storage_mut::<f32>()[..b * t * d_out];
    // SAFETY: `dst` holds the `b·t·d_out` initialised sums (the slice above).
    unsafe {
        gemm_by_columns(
            dst.as_mut_ptr(),
            true,
            x.f32s(),
            w.f32s(),
            [b * t, d_out, d_in],
        )
    };
    from_flex(sum)
}

/// `dst = x · w`, or `dst += x · w` with `accumulate`, for row-major `x` `[m, k]`, `w`
/// `[k, n]`, `dst` `[m, n]`. The columns are cut into one block per thread and each block
/// is one single-threaded `gemm`: 2-10% faster than gemm's own threading at the model's
/// shapes (m = 512, n or k = 192-1536, two threads), most for the narrow pruned layers.
///
/// # Safety
/// `dst` must be valid for `m·n` writes (and reads, initialised, with `accumulate`).
unsafe fn gemm_by_columns(dst: *mut f32, accumulate: bool, x: &[f32], w: &[f32], mnk: [usize; 3]) {
    let [m, n, k] = mnk;
    assert!(x.len() == m * k && w.len() == k * n, "gemm shapes");
    let dst_ptr = OutPtr(dst);
    column_blocks(mnk)
        .into_par_iter()
        .for_each(|(first, cols)| {
            // SAFETY: block `first..first + cols` reads those columns of `w` and writes the same
            // columns of `dst` (no other block touches them), inside the asserted lengths.
            unsafe {
                gemm_block(
                    dst_ptr.get().add(first),
                    n,
                    accumulate,
                    x,
                    w,
                    first,
                    [m, cols, k],
                )
            }
        });
}

/// A vector of `len` values written by `fill` through the pointer it is given, without
/// the zero-fill of `vec![0.0; len]` first (outputs that a `gemm` overwrites anyway).
///
/// # Safety
/// `fill` must write all `len` values.
unsafe fn written_by(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    fill(out.as_mut_ptr());
    // SAFETY: the first `len` values are initialised (the caller's promise).
    unsafe { out.set_len(len) };
    out
}

/// `silu(x · gate) * (x · up)` for `x` `[b, t, in]` and `gate`, `up` `[in, out]` (SwiGLU's
/// input to `down_proj`): each thread takes a block of columns, multiplies it out for both
/// projections and applies the product while the block is in cache; one pass over the
/// threads instead of three, and no full-size gate and up tensors.
pub fn swiglu_projections<B: Backend>(
    x: Tensor<B, 3>,
    gate: &Tensor<B, 2>,
    up: &Tensor<B, 2>,
) -> Tensor<B, 3> {
    let device = x.device();
    let [b, t, k] = x.dims();
    let [w_in, n] = gate.dims();
    assert!(w_in == k && up.dims() == [k, n], "weight shapes");
    let m = b * t;
    let (x, g, u) = (Host::new(x), Host::new(gate.clone()), Host::new(up.clone()));
    let (x, g, u) = (x.f32s(), g.f32s(), u.f32s());
    assert!(
        x.len() == m * k && g.len() == k * n && u.len() == k * n,
        "gemm shapes"
    );
    let each_block = |out: OutPtr| {
        column_blocks([m, n, k])
            .into_par_iter()
            .for_each(|(first, cols)| {
                // SAFETY: the block writes columns `first..first + cols` of `out` (its own)
                // and all of `ups` (`m x cols`) before reading them; reads as in
                // `gemm_by_columns`.
                unsafe {
                    gemm_block(out.get().add(first), n, false, x, g, first, [m, cols, k]);
                    let ups = written_by(m * cols, |ups| {
                        gemm_block(ups, cols, false, x, u, first, [m, cols, k])
                    });
                    for (row, ups) in ups.chunks_exact(cols).enumerate() {
                        let gates =
                            std::slice::from_raw_parts_mut(out.get().add(row * n + first), cols);
                        silu_times_in_place(gates, ups);
                    }
                }
            })
    };
    // SAFETY: the blocks cover all `n` columns of all `m` rows.
    let out = unsafe { written_by(m * n, |out| each_block(OutPtr(out))) };
    Tensor::from_data(TensorData::new(out, [b, t, n]), &device)
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

/// One single-threaded `gemm`: `dst (+)= x · w[:, first..first + cols]` for `x` `[m, k]`
/// (row-major), `w` `[k, n]` (row-major, `n = w.len() / k`), `dst` rows `dst_stride` apart.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `cols` values at stride `dst_stride`, and
/// `first + cols <= n`, `x.len() >= m * k`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    dst: *mut f32,
    dst_stride: usize,
    accumulate: bool,
    x: &[f32],
    w: &[f32],
    first: usize,
    [m, cols, k]: [usize; 3],
) {
    let n = w.len() / k;
    debug_assert!(first + cols <= n && x.len() >= m * k);
    gemm(
        m,
        cols,
        k,
        dst,
        1,
        dst_stride as isize,
        accumulate,
        x.as_ptr(),
        1,
        k as isize,
        w.as_ptr().add(first),
        1,
        n as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// Rotary embedding of `x` `[b, t, heads, d]` with the `cos` and `sin` tables of the `t`
/// positions (`[t, d]` each, rotate-half layout): `x·cos + rotate_half(x)·sin`.
pub fn rotary<B: Backend>(x: Tensor<B, 4>, cos: &[f32], sin: &[f32]) -> Tensor<B, 4> {
    let device = x.device();
    let [b, t, h, d] = x.dims();
    assert_eq!(cos.len(), t * d, "rotary tables");
    let data = Host::new(x);
    let x = data.f32s();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(h * d)
        .zip(x.par_chunks(h * d))
        .enumerate()
        .for_each(|(row, (out, x))| {
            let pos = row % t;
            rotate_heads(out, x, &cos[pos * d..][..d], &sin[pos * d..][..d]);
        });
    Tensor::from_data(TensorData::new(out, [b, t, h, d]), &device)
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

/// Shapes of one attention call.
struct Dims {
    batch: usize,
    queries: usize,
    heads: usize,
    head_dim: usize,
    keys: usize,
    kv_heads: usize,
}

/// An output pointer that parallel tasks write through, each to a part no other task
/// touches (attention tiles: their rows; column blocks of a product: their columns).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint parts (see `attend_slices`, `gemm_by_columns`,
// `swiglu_projections`).
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
    (0..n.batch * kvh * tiles).into_par_iter().for_each(|task| {
        SCRATCH.with_borrow_mut(|(queries, scores, values, inv_sums)| {
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
            // Grown when needed, never cleared: `gemm` overwrites what is used.
            for (buffer, len) in [(&mut *scores, rows * keys), (&mut *values, rows * d)] {
                if buffer.len() < len {
                    buffer.resize(len, 0.0);
                }
            }
            inv_sums.resize(rows, 0.0);
            let (scores, values) = (&mut scores[..rows * keys], &mut values[..rows * d]);
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
            causal_exp(scores, keys, shared, rep, inv_sums);
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
                // SAFETY: the task owns the heads of `group` at the tile's tokens in batch
                // `b` (`rep * d` values from `q_at(i)`); no other task writes them.
                let heads =
                    unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(q_at(i)), rep * d) };
                let rows = k * rep..(k + 1) * rep;
                scale_rows(
                    heads,
                    &values[rows.start * d..rows.end * d],
                    &inv_sums[rows],
                );
            }
        })
    });
}

/// Tokens per step of a tile's diagonal block (see `attend_slices`).
const DIAGONAL_STEP: usize = 16;

/// The end of the diagonal step holding the tile's token `i` (of `tokens`): the diagonal
/// keys that step is multiplied with.
fn step_end(i: usize, tokens: usize) -> usize {
    ((i / DIAGONAL_STEP + 1) * DIAGONAL_STEP).min(tokens)
}

/// A matrix operand: element `(r, c)` at `at[r * row + c * col]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    at: &'a [f32],
    row: usize,
    col: usize,
}

impl<'a> Operand<'a> {
    /// Rows `ld` apart, each contiguous.
    fn rows(at: &'a [f32], ld: usize) -> Self {
        Operand {
            at,
            row: ld,
            col: 1,
        }
    }

    /// The same values read as the transposed matrix.
    fn transposed(self) -> Self {
        Operand {
            row: self.col,
            col: self.row,
            ..self
        }
    }

    /// The same strides, starting `offset` values in.
    fn skip(self, offset: usize) -> Self {
        Operand {
            at: &self.at[offset..],
            ..self
        }
    }

    /// Whether an `rows x cols` matrix at these strides lies inside `at`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows > 0 && cols > 0 && (rows - 1) * self.row + (cols - 1) * self.col < self.at.len()
    }
}

/// `dst = scale · a · b`, or `dst += scale · a · b` with `accumulate`, for `m x n` outputs
/// `ldd` apart, `a` `m x k` and `b` `k x n` (single-threaded: the callers run in parallel).
fn multiply(
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
        "attention operands"
    );
    // SAFETY: every element `gemm` addresses lies inside the slices (asserted).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
}

std::thread_local! {
    /// Each thread's attention buffers (queries, scores, values and the rows' inverse sums
    /// of one tile), kept between calls so that no tile allocates.
    static SCRATCH: std::cell::RefCell<Scratch> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
}

/// Queries, scores, values, inverse row sums.
type Scratch = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

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
    let data = Host::new(x);
    let x = data.f32s();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .for_each(|(out, x)| normalise_row(out, x, weight, eps));
    Tensor::from_data(TensorData::new(out, shape), &device)
}

multiversion! {
    /// One row of [`rms_norm`].
    fn normalise_row(out: &mut [f32], x: &[f32], weight: &[f32], eps: f64) {
        // Eight f64 lanes (vectorisable, unlike one running sum), folded in a fixed order.
        let mut acc = [0.0f64; 8];
        let chunks = x.chunks_exact(8);
        let rest: f64 = chunks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += (v as f64) * (v as f64);
            }
        }
        let mean_square = (acc.iter().sum::<f64>() + rest) / x.len() as f64;
        let rms = (mean_square + eps).sqrt() as f32;
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v / rms * w;
        }
    }
}

/// `silu(gate) * up` elementwise (SwiGLU's product), `silu(g) = g / (1 + e^-g)`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let device = gate.device();
    let shape = gate.shape();
    let (gate, up) = (Host::new(gate), Host::new(up));
    let (g, u) = (gate.f32s(), up.f32s());
    assert_eq!(g.len(), u.len(), "gate and up differ in size");
    let mut out = vec![0.0f32; g.len()];
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(out, (g, u))| silu_times(out, g, u));
    Tensor::from_data(TensorData::new(out, shape), &device)
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
    fn silu_times_in_place(g: &mut [f32], u: &[f32]) {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = silu_mul::<M>(*g, u);
        }
    }
}

multiversion! {
    /// Softmax numerators of each row of `scores` (`keys` wide) over the keys its token
    /// sees, and `inv_sums[row]` = 1 / the row's sum: row `r` (token `i = r / rep`) sees
    /// the first `shared + i + 1` keys. Only the part of the row that the products
    /// read (up to the end of the token's diagonal step) is written; its unseen keys are
    /// zeroed.
    fn causal_exp(
        scores: &mut [f32],
        keys: usize,
        shared: usize,
        rep: usize,
        inv_sums: &mut [f32],
    ) {
        let tokens = keys - shared;
        for (row, s) in scores.chunks_exact_mut(keys).enumerate() {
            let i = row / rep;
            let read = shared + step_end(i, tokens);
            inv_sums[row] = 1.0 / exp_seen::<M>(&mut s[..read], shared + i + 1);
        }
    }
}

/// `x[..seen] ← exp(x − max x[..seen])`, the rest of `x` zeroed, returning the sum of the
/// exponentials. Whole chunks of 16 that the compiler vectorises; the chunk holding the last
/// seen key is computed whole and its unseen lanes zeroed (a scalar tail cost a fifth of
/// the time), or done one by one when it would run past the end of `x`.
#[inline(always)]
fn exp_seen<M: MulAdd>(x: &mut [f32], seen: usize) -> f32 {
    let whole = seen / 16 * 16;
    let tail = if seen > whole && whole + 16 <= x.len() {
        Some(whole)
    } else {
        None
    };
    // A plain comparison (`f32::max`'s NaN rules cost a compare and a blend per lane).
    let larger = |a: f32, b: f32| if a > b { a } else { b };
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
    acc.iter().fold(rest, |a, &b| a + b)
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
fn exp_clamped<M: MulAdd>(x: f32) -> f32 {
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
mod tests {
    use super::*;

    /// Values in `[-2, 2)`: the shared test values, scaled (exactly) by 4.
    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        crate::pseudo_random(n, seed)
            .into_iter()
            .map(|v| v * 4.0)
            .collect()
    }

    /// A burn-flex tensor of `values`.
    fn flex<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<burn::backend::Flex, D> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    /// The largest `|a - b|` over the pairs.
    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
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
        // Two or three tiles of queries (70, 150 > 64; the last tile's diagonal in steps of
        // 16 with a remainder), caches of earlier positions (also ones that leave rows
        // ending mid-chunk), 2 query heads per KV head, batch of 2.
        for (t, past) in [(70, 0), (70, 9), (150, 0), (37, 21), (1, 30), (5, 0)] {
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
            let diff = max_abs_diff(&out, &expected);
            assert!(diff < 2e-6, "t {t}, past {past}: differs by {diff}");
        }
    }

    #[test]
    fn rotary_kernel_equals_the_tensor_composition() {
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
        let got: Vec<f32> = rotary(flex(x, [b, t, h, d]), &cos, &sin)
            .into_data()
            .to_vec()
            .unwrap();
        let diff = max_abs_diff(&got, &expected);
        assert!(diff < 1e-6, "differs by {diff}");
    }

    #[test]
    fn norm_and_swiglu_kernels_equal_the_tensor_compositions() {
        use burn::backend::NdArray;
        let device = Default::default();
        let (rows, width) = (7, 40);
        let x = pseudo_random(rows * width, 5);
        let w = pseudo_random(width, 6);
        let u = pseudo_random(rows * width, 7);
        let nd = |v: &[f32]| {
            Tensor::<NdArray, 2>::from_data(TensorData::new(v.to_vec(), [rows, width]), &device)
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
                rms_norm(flex(x.clone(), [rows, width]), &w, 1e-5)
                    .into_data()
                    .to_vec()
                    .unwrap(),
            ),
            (
                (crate::llama::silu(nd(&x).mul_scalar(8.0)) * nd(&u))
                    .into_data()
                    .to_vec()
                    .unwrap(),
                swiglu(
                    flex(x.clone(), [rows, width]).mul_scalar(8.0),
                    flex(u.clone(), [rows, width]),
                )
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
    fn matmul_add_equals_the_sum_and_leaves_a_shared_residual_alone() {
        let (b, t, d_in, d_out) = (2, 3, 5, 4);
        let r0 = pseudo_random(b * t * d_out, 8);
        let residual = flex(r0.clone(), [b, t, d_out]);
        let x = flex(pseudo_random(b * t * d_in, 9), [b, t, d_in]);
        let w = flex(pseudo_random(d_in * d_out, 10), [d_in, d_out]);
        let kept = residual.clone();
        let got: Vec<f32> = matmul_add(residual, x.clone(), &w)
            .into_data()
            .to_vec()
            .unwrap();
        let product = x.reshape([b * t, d_in]).matmul(w).reshape([b, t, d_out]);
        let expected: Vec<f32> = (kept.clone() + product).into_data().to_vec().unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-6, "{g} vs {e}");
        }
        let kept: Vec<f32> = kept.into_data().to_vec().unwrap();
        assert_eq!(kept, r0, "the shared residual was written through");
    }

    #[test]
    fn swiglu_projections_equal_the_composition() {
        // Above the size that is cut into column blocks (one per thread; 200 columns: blocks
        // of unequal width on most thread counts).
        let (b, t, k, n) = (2, 64, 300, 200);
        assert!(b * t * k * n >= 192 * 192 * 192);
        let x = flex(pseudo_random(b * t * k, 11), [b, t, k]);
        let gate = flex(pseudo_random(k * n, 12), [k, n]);
        let up = flex(pseudo_random(k * n, 13), [k, n]);
        let got: Vec<f32> = swiglu_projections(x.clone(), &gate, &up)
            .into_data()
            .to_vec()
            .unwrap();
        let x = x.reshape([b * t, k]);
        let g = x.clone().matmul(gate);
        let expected: Vec<f32> = (crate::llama::silu(g) * x.matmul(up))
            .into_data()
            .to_vec()
            .unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "{g} vs {e}");
        }
    }

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
}
