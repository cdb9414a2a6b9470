//! The LM head fused with what is computed from its logits: the log-probability of each
//! row's target (perplexity, zero-shot), and the distillation and next-token losses with
//! their gradient for the student's hidden states (mask training). Rows go through in
//! blocks whose `[rows, vocab]` logits are a few tens of MB (a full `[512, 49152]` batch is
//! 100 MB per tensor, several of them live at once in the composed version, and their pages
//! were a tenth of a training step in the kernel's zero-fill alone); each block's logits are
//! reduced row by row while they are in memory, and a loss block's gradient goes back
//! through the head (`G · Wᵀ`) right away.

use rayon::prelude::*;

use super::gemm::{matmul_into, matmul_transposed_into};
use super::{exp_clamped, lanes, larger, multiversion};

/// Bytes of one block's logits.
const BLOCK_BYTES: usize = 32 << 20;

/// Rows per block for `rows` rows of a `vocab`-wide head: as many as fit [`BLOCK_BYTES`]
/// (at least 16), the blocks of equal size.
fn block_rows(rows: usize, vocab: usize) -> usize {
    let most = (BLOCK_BYTES / (4 * vocab.max(1))).max(16);
    let blocks = rows.div_ceil(most).max(1);
    rows.div_ceil(blocks).max(1)
}

/// `log softmax(h · W)[target]` for each row `h` of `hidden` (`[rows, width]`), `W` the
/// head `[width, vocab]` (row-major), one target per row. The normaliser is summed in f32
/// over blocks of 256 logits and the blocks in f64 (a flat f32 sum over a 49k vocabulary
/// drifts by ~1e-4 nats, which showed as an offset against transformers at seq-len 1024).
pub fn target_logprobs(hidden: &[f32], head: &[f32], width: usize, targets: &[u32]) -> Vec<f32> {
    let rows = targets.len();
    let vocab = head.len() / width.max(1);
    assert!(
        hidden.len() == rows * width && head.len() == width * vocab,
        "target_logprobs shapes"
    );
    assert!(
        targets.iter().all(|&t| (t as usize) < vocab),
        "a target is outside the vocabulary"
    );
    let block = block_rows(rows, vocab);
    let mut out = vec![0.0f32; rows];
    let mut buffers = BUFFERS.take();
    {
        let [logits, _, _] = &mut buffers;
        for (first, out) in (0..rows).step_by(block).zip(out.chunks_mut(block)) {
            let r = out.len();
            let logits = grown(logits, r * vocab);
            matmul_into(
                logits,
                &hidden[first * width..][..r * width],
                head,
                [r, vocab, width],
            );
            out.par_iter_mut()
                .zip(logits.par_chunks(vocab))
                .zip(&targets[first..first + r])
                .for_each(|((out, row), &target)| {
                    let (max, sum) = max_and_exp_sum(row, 1.0);
                    *out = ((row[target as usize] - max) as f64 - sum.ln()) as f32;
                });
        }
    }
    BUFFERS.set(buffers);
    out
}

/// What the loss of [`head_loss`] is made of.
#[derive(Debug, Clone, Copy)]
pub struct LossTerms<'a> {
    /// The teacher's final hidden states (`[rows, width]`, the student's shape) and the
    /// temperature `T`: the loss gains `T² · mean over rows of KL(softmax(t/T) ‖ softmax(s/T))`
    /// of the teacher's and student's logits (Hinton et al.: gradients keep their scale).
    pub teacher: Option<(&'a [f32], f32)>,
    /// Each row's next token (`None` where the row predicts nothing) and a weight: the loss
    /// gains the weight times the mean cross-entropy over the rows that have a target.
    pub targets: Option<(&'a [Option<u32>], f32)>,
}

/// The value of [`head_loss`] and its gradient.
#[derive(Debug, Clone)]
pub struct HeadLoss {
    /// `T² · mean KL`, the distillation term as it enters the loss.
    pub distill: Option<f64>,
    /// The mean next-token cross-entropy (unweighted).
    pub ntp: Option<f64>,
    /// The gradient of the loss for the student's hidden states, `[rows, width]`, when asked
    /// for.
    pub grad: Option<Vec<f32>>,
}

/// The distillation and next-token losses of the student's hidden states `student`
/// (`[rows, width]`) through the head `[width, vocab]`, and, `with_grad`, their gradient.
pub fn head_loss(
    student: &[f32],
    head: &[f32],
    width: usize,
    terms: &LossTerms,
    with_grad: bool,
) -> HeadLoss {
    let rows = student.len() / width.max(1);
    let vocab = head.len() / width.max(1);
    assert!(
        student.len() == rows * width && head.len() == width * vocab && rows > 0,
        "head_loss shapes"
    );
    if let Some((teacher, t)) = terms.teacher {
        assert_eq!(
            teacher.len(),
            student.len(),
            "teacher and student differ in size"
        );
        assert!(t > 0.0, "temperature must be positive");
    }
    let counted = terms.targets.map(|(targets, _)| {
        assert_eq!(targets.len(), rows, "one target per row");
        assert!(
            targets.iter().flatten().all(|&t| (t as usize) < vocab),
            "a target is outside the vocabulary"
        );
        targets.iter().flatten().count()
    });
    // The weight of each row's terms in the mean.
    let kl_scale = terms.teacher.map(|(_, t)| (t * t) as f64 / rows as f64);
    let ntp_scale = terms
        .targets
        .zip(counted)
        .map(|((_, w), n)| (w as f64 / n.max(1) as f64, 1.0 / n.max(1) as f64));
    let block = block_rows(rows, vocab);
    let mut grad = with_grad.then(|| vec![0.0f32; rows * width]);
    let mut per_row = vec![(0.0f64, 0.0f64); rows];
    let mut buffers = BUFFERS.take();
    {
        let [student_logits, teacher_logits, plain] = &mut buffers;
        for first in (0..rows).step_by(block) {
            let r = block.min(rows - first);
            let s_logits = grown(student_logits, r * vocab);
            let at = first * width..(first + r) * width;
            matmul_into(s_logits, &student[at.clone()], head, [r, vocab, width]);
            let t_logits = match terms.teacher {
                Some((teacher, _)) => {
                    let t_logits = grown(teacher_logits, r * vocab);
                    matmul_into(t_logits, &teacher[at.clone()], head, [r, vocab, width]);
                    Some(&*t_logits)
                }
                None => None,
            };
            // The next-token term needs the softmax at temperature 1 beside the KL's at T.
            let plain_softmax = match (terms.teacher, terms.targets) {
                (Some((_, t)), Some(_)) if t != 1.0 => Some(grown(plain, r * vocab)),
                _ => None,
            };
            let rows_out = &mut per_row[first..first + r];
            let targets = terms.targets.map(|(t, _)| &t[first..first + r]);
            let work = RowWork {
                vocab,
                temperature: terms.teacher.map_or(1.0, |(_, t)| t),
                kl_scale,
                ntp_scale,
            };
            match plain_softmax {
                Some(plain) => s_logits
                    .par_chunks_mut(vocab)
                    .zip(plain.par_chunks_mut(vocab))
                    .enumerate()
                    .zip(rows_out.par_iter_mut())
                    .for_each(|((i, (s, p)), out)| {
                        let t = t_logits.map(|t| &t[i * vocab..][..vocab]);
                        *out = work.row(s, t, Some(p), targets.and_then(|x| x[i]));
                    }),
                None => s_logits
                    .par_chunks_mut(vocab)
                    .enumerate()
                    .zip(rows_out.par_iter_mut())
                    .for_each(|((i, s), out)| {
                        let t = t_logits.map(|t| &t[i * vocab..][..vocab]);
                        *out = work.row(s, t, None, targets.and_then(|x| x[i]));
                    }),
            }
            if let Some(grad) = &mut grad {
                matmul_transposed_into(&mut grad[at], s_logits, head, [r, vocab, width]);
            }
        }
    }
    BUFFERS.set(buffers);
    let (kl, ce) = per_row
        .iter()
        .fold((0.0, 0.0), |(a, b), &(k, c)| (a + k, b + c));
    HeadLoss {
        distill: kl_scale.map(|s| kl * s),
        ntp: ntp_scale.map(|(_, mean)| ce * mean),
        grad,
    }
}

std::thread_local! {
    /// The blocks' logits (student, teacher, and the next-token softmax beside a tempered
    /// KL), kept between calls: at ~32 MB each, fresh ones cost the kernel's zero-fill of
    /// their pages every update. A call takes them out for its duration (no borrow is held
    /// across its parallel passes, where this thread may run another task's call, which
    /// then gets buffers of its own) and puts them back.
    static BUFFERS: std::cell::Cell<[Vec<f32>; 3]> =
        const { std::cell::Cell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// `buffer[..len]`, grown when needed (its values are overwritten by the users).
fn grown(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The per-row part of [`head_loss`].
#[derive(Clone, Copy)]
struct RowWork {
    vocab: usize,
    temperature: f32,
    /// `T² / rows` when there is a teacher.
    kl_scale: Option<f64>,
    /// `(weight / counted, 1 / counted)` when there are targets.
    ntp_scale: Option<(f64, f64)>,
}

impl RowWork {
    /// One row: `s` (the student's logits, overwritten with the gradient of the loss for
    /// them), the teacher's logits `t`, a buffer `plain` for the next-token softmax when the
    /// KL's temperature is not 1, and the row's target. Returns the row's KL and
    /// cross-entropy (unscaled).
    fn row(
        self,
        s: &mut [f32],
        t: Option<&[f32]>,
        plain: Option<&mut [f32]>,
        target: Option<u32>,
    ) -> (f64, f64) {
        debug_assert_eq!(s.len(), self.vocab);
        let ntp = target.zip(self.ntp_scale.map(|(w, _)| w as f32));
        // The next-token cross-entropy at temperature 1, from the untouched logits.
        let plain_stats = ntp.map(|_| max_and_exp_sum(s, 1.0));
        let ce = match (ntp, plain_stats) {
            (Some((target, _)), Some((max, sum))) => sum.ln() - (s[target as usize] - max) as f64,
            _ => 0.0,
        };
        let mut kl = 0.0;
        match t {
            None => match (ntp, plain_stats) {
                (Some((_, w)), Some((max, sum))) => {
                    softmax_in_place(s, max, 1.0, (w as f64 / sum) as f32)
                }
                _ => s.fill(0.0),
            },
            Some(t) => {
                // With e = exp((x − max)/T) and Z = Σe: KL = (1/Zt)·Σ et·(t − s)/T
                // − (mt − ms)/T − ln Zt + ln Zs; its gradient, times T²/rows, is
                // (T/rows)·(es/Zs − et/Zt).
                let temperature = self.temperature;
                let inv_t = 1.0 / temperature;
                let (ms, zs) = max_and_exp_sum(s, inv_t);
                let (mt, zt) = max_and_exp_sum(t, inv_t);
                let cross = weighted_difference(t, s, mt, inv_t) / temperature as f64;
                kl = cross / zt - (mt - ms) as f64 / temperature as f64 - zt.ln() + zs.ln();
                let c = self.kl_scale.expect("a teacher has a KL scale") / temperature as f64;
                // The next-token softmax: at temperature 1 the KL's own (its weight joins
                // the student's coefficient), else computed into `plain` before `s` is
                // overwritten, and added after.
                let mut student = c / zs;
                let mut separate = None;
                if let (Some((_, w)), Some((max, sum))) = (ntp, plain_stats) {
                    if temperature == 1.0 {
                        student += w as f64 / zs;
                    } else {
                        let plain = plain.expect("a buffer when the temperature is not 1");
                        softmax_into(plain, s, max, 1.0, (w as f64 / sum) as f32);
                        separate = Some(plain);
                    }
                }
                kl_gradient(s, t, [ms, mt, inv_t], [student as f32, (c / zt) as f32]);
                if let Some(plain) = separate {
                    super::gemm::add_assign(s, plain);
                }
            }
        }
        if let Some((target, w)) = ntp {
            s[target as usize] -= w;
        }
        (kl, ce)
    }
}

multiversion! {
    /// The largest of `x` and `Σ exp((x − max)·inv_t)`: exponentials summed in f32 over
    /// blocks of 256 (16 lanes), the blocks in f64.
    fn max_and_exp_sum(x: &[f32], inv_t: f32) -> (f32, f64) {
        let max = lanes(x, f32::NEG_INFINITY, larger);
        let mut total = 0.0f64;
        for block in x.chunks(256) {
            let mut acc = [0.0f32; 16];
            let chunks = block.chunks_exact(16);
            let rest: f32 = chunks
                .remainder()
                .iter()
                .map(|&v| exp_clamped::<M>((v - max) * inv_t))
                .sum();
            for c in chunks {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a += exp_clamped::<M>((v - max) * inv_t);
                }
            }
            total += (acc.iter().sum::<f32>() + rest) as f64;
        }
        (max, total)
    }
}

multiversion! {
    /// `Σ exp((t − mt)·inv_t)·(t − s)`, summed as in [`max_and_exp_sum`].
    fn weighted_difference(t: &[f32], s: &[f32], mt: f32, inv_t: f32) -> f64 {
        let mut total = 0.0f64;
        for (t, s) in t.chunks(256).zip(s.chunks(256)) {
            let mut acc = [0.0f32; 16];
            let (ct, cs) = (t.chunks_exact(16), s.chunks_exact(16));
            let rest: f32 = ct
                .remainder()
                .iter()
                .zip(cs.remainder())
                .map(|(&t, &s)| exp_clamped::<M>((t - mt) * inv_t) * (t - s))
                .sum();
            for (t, s) in ct.zip(cs) {
                for ((a, &t), &s) in acc.iter_mut().zip(t).zip(s) {
                    *a = M::mul_add(exp_clamped::<M>((t - mt) * inv_t), t - s, *a);
                }
            }
            total += (acc.iter().sum::<f32>() + rest) as f64;
        }
        total
    }
}

multiversion! {
    /// `s ← a·exp((s − ms)·inv_t) − b·exp((t − mt)·inv_t)`, with `[ms, mt, inv_t]` and
    /// `[a, b]`.
    fn kl_gradient(s: &mut [f32], t: &[f32], shifts: [f32; 3], coefficients: [f32; 2]) {
        let [ms, mt, inv_t] = shifts;
        let [a, b] = coefficients;
        for (s, &t) in s.iter_mut().zip(t) {
            *s = a * exp_clamped::<M>((*s - ms) * inv_t) - b * exp_clamped::<M>((t - mt) * inv_t);
        }
    }
}

multiversion! {
    /// `dst ← c·exp((s − max)·inv_t)`.
    fn softmax_into(dst: &mut [f32], s: &[f32], max: f32, inv_t: f32, c: f32) {
        for (d, &s) in dst.iter_mut().zip(s) {
            *d = c * exp_clamped::<M>((s - max) * inv_t);
        }
    }
}

multiversion! {
    /// `s ← c·exp((s − max)·inv_t)`.
    fn softmax_in_place(s: &mut [f32], max: f32, inv_t: f32, c: f32) {
        for s in s.iter_mut() {
            *s = c * exp_clamped::<M>((*s - max) * inv_t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::test_util::{max_abs_diff, pseudo_random};

    /// Logits `h · W` in f64.
    fn logits(h: &[f32], w: &[f32], width: usize) -> Vec<Vec<f64>> {
        let vocab = w.len() / width;
        h.chunks(width)
            .map(|h| {
                (0..vocab)
                    .map(|v| {
                        (0..width)
                            .map(|c| h[c] as f64 * w[c * vocab + v] as f64)
                            .sum()
                    })
                    .collect()
            })
            .collect()
    }

    fn log_softmax(x: &[f64], t: f64) -> Vec<f64> {
        let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = x.iter().map(|v| ((v - max) / t).exp()).sum();
        x.iter().map(|v| (v - max) / t - z.ln()).collect()
    }

    /// The loss of `terms` by its definition, in f64.
    fn reference_loss(
        s: &[f32],
        teacher: Option<(&[f32], f64)>,
        targets: Option<(&[Option<u32>], f64)>,
        w: &[f32],
        width: usize,
    ) -> (f64, f64) {
        let ls = logits(s, w, width);
        let rows = ls.len() as f64;
        let kl = teacher.map_or(0.0, |(t, temp)| {
            let lt = logits(t, w, width);
            let sum: f64 = ls
                .iter()
                .zip(&lt)
                .map(|(s, t)| {
                    let (ps, pt) = (log_softmax(s, temp), log_softmax(t, temp));
                    pt.iter()
                        .zip(&ps)
                        .map(|(a, b)| a.exp() * (a - b))
                        .sum::<f64>()
                })
                .sum();
            temp * temp * sum / rows
        });
        let ce = targets.map_or(0.0, |(targets, _)| {
            let (mut sum, mut n) = (0.0, 0);
            for (l, t) in ls.iter().zip(targets) {
                if let Some(t) = t {
                    sum -= log_softmax(l, 1.0)[*t as usize];
                    n += 1;
                }
            }
            sum / n as f64
        });
        (kl, ce)
    }

    #[test]
    fn target_logprobs_match_the_definition() {
        // More rows than one block holds at this vocabulary (blocks of equal size).
        let (width, vocab) = (8, 40_000);
        let rows = block_rows(1000, vocab) + 3;
        let h = pseudo_random(rows * width, 1);
        let w = pseudo_random(width * vocab, 2);
        let targets: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 7919) % vocab as u32)
            .collect();
        let got = target_logprobs(&h, &w, width, &targets);
        let expected: Vec<f32> = logits(&h, &w, width)
            .iter()
            .zip(&targets)
            .map(|(l, &t)| log_softmax(l, 1.0)[t as usize] as f32)
            .collect();
        assert!(max_abs_diff(&got, &expected) < 2e-5);
    }

    #[test]
    fn losses_and_gradients_match_the_definition() {
        let (rows, width, vocab) = (5, 6, 50);
        let s = pseudo_random(rows * width, 3);
        let t = pseudo_random(rows * width, 4);
        let w: Vec<f32> = pseudo_random(width * vocab, 5);
        let targets: Vec<Option<u32>> = vec![Some(3), None, Some(49), Some(0), Some(17)];
        for (temperature, teacher, ntp) in [
            (1.0, true, false),
            (2.0, true, false),
            (1.0, false, true),
            (1.0, true, true),
            (2.0, true, true),
        ] {
            let terms = LossTerms {
                teacher: teacher.then_some((&t[..], temperature)),
                targets: ntp.then_some((&targets[..], 0.5)),
            };
            let got = head_loss(&s, &w, width, &terms, true);
            let without = head_loss(&s, &w, width, &terms, false);
            assert!(without.grad.is_none());
            assert_eq!((without.distill, without.ntp), (got.distill, got.ntp));
            let grad = got.grad.expect("asked for");
            let reference = |s: &[f32]| {
                reference_loss(
                    s,
                    teacher.then_some((&t[..], temperature as f64)),
                    ntp.then_some((&targets[..], 0.5)),
                    &w,
                    width,
                )
            };
            let (kl, ce) = reference(&s);
            let case = format!("T {temperature}, teacher {teacher}, ntp {ntp}");
            assert!((got.distill.unwrap_or(0.0) - kl).abs() < 1e-5, "{case}: KL");
            assert!((got.ntp.unwrap_or(0.0) - ce).abs() < 1e-5, "{case}: CE");
            assert_eq!(got.distill.is_some(), teacher);
            assert_eq!(got.ntp.is_some(), ntp);
            // The gradient of kl + 0.5·ce by central differences in f64.
            for i in 0..s.len() {
                let loss = |d: f32| {
                    let mut x = s.clone();
                    x[i] += d;
                    let (kl, ce) = reference(&x);
                    kl + 0.5 * ce
                };
                let numeric = (loss(1e-3) - loss(-1e-3)) / 2e-3;
                assert!(
                    (grad[i] as f64 - numeric).abs() < 1e-4,
                    "{case}: d[{i}] = {} vs {numeric}",
                    grad[i]
                );
            }
        }
    }
}
