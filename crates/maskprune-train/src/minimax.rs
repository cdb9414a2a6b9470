//! The host-side update rules of the minimax problem (see `docs/method.md`).
//!
//! Per layer `l` and unit kind `t` (attention units, MLP channels) the primal iterate `z` is
//! the gradient-step accumulator and the mask is its hard threshold `m = z·1[|z| ≥ τ]` with
//! `τ = sqrt(2·η·y_l)`, the proximal operator of `η·y_l·||·||_0`, applied lazily so a pruned
//! unit whose gradient keeps asking for it comes back. The shared widths are fractions
//! `r_t = s_t / n_t`, one per kind for all layers; `y` enforce `||m_l||_0 ≤ s_t` layer by
//! layer and `μ` the parameter budget `p(r) ≤ p_target` (fractions of the dense
//! decoder-layer linear parameters).

use maskprune_surgery::Widths;
use serde::{Deserialize, Serialize};

/// Index of attention units in the per-kind arrays.
pub const ATTENTION: usize = 0;
/// Index of MLP channels in the per-kind arrays.
pub const CHANNELS: usize = 1;
/// Display names of the kinds.
pub const KIND_NAMES: [&str; 2] = ["attention", "channels"];

/// Step sizes of the primal and dual updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinimaxRates {
    /// η: mask step on the normalised gradient (also sets the threshold `sqrt(2ηy)`).
    pub mask_lr: f64,
    /// Momentum of the normalised mask gradient.
    pub mask_momentum: f64,
    /// Step of the per-layer multipliers `y`, as the fraction of the way to the value that
    /// meets the layer's constraint exactly (a line search along the ascent direction).
    pub dual_lr: f64,
    /// Gradient ascent step of the budget multiplier `μ`.
    pub budget_lr: f64,
    /// Gradient descent step of the shared widths `r`.
    pub width_lr: f64,
    /// Quadratic (augmented Lagrangian) penalty `ρ/2·max(0, p(r) − p_target)²`, which
    /// damps the oscillation plain gradient descent-ascent has on a bilinear term.
    pub penalty: f64,
    /// `true` (MaskPrune): every layer keeps the shared width `s` (one multiplier per layer).
    /// `false` (the non-uniform ablation): only the total over layers is constrained, one
    /// multiplier per kind, so each layer finds its own width under the same budget.
    pub uniform: bool,
}

impl Default for MinimaxRates {
    fn default() -> Self {
        Self {
            mask_lr: 0.05,
            mask_momentum: 0.9,
            dual_lr: 0.5,
            budget_lr: 20.0,
            width_lr: 0.004,
            penalty: 100.0,
            uniform: true,
        }
    }
}

/// One kind of unit: how many per layer, and what share of the decoder-layer linear
/// parameters the kind holds when dense.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitKind {
    /// Units per layer.
    pub units: usize,
    /// Share of the dense decoder-layer linear parameters.
    pub share: f64,
    /// Smallest width fraction allowed (one rounding step).
    pub min_fraction: f64,
}

/// Everything the minimax updates change, as plain numbers (checkpointed exactly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinimaxState {
    /// `z[t][l][i]`: the primal accumulators.
    pub z: [Vec<Vec<f32>>; 2],
    /// Momentum of the normalised gradients, same shape as `z`.
    pub velocity: [Vec<Vec<f32>>; 2],
    /// `y[t][l]`: per-layer multipliers of the uniformity constraints.
    pub y: [Vec<f64>; 2],
    /// `r[t] = s_t / n_t`: the shared widths as fractions.
    pub width: [f64; 2],
    /// `μ`: the budget multiplier.
    pub mu: f64,
    /// Running mean of the squared mask gradient per kind (normalises the step).
    pub grad_sq: [f64; 2],
    /// Updates applied so far.
    pub updates: u64,
    /// The integer widths of the last updates (`train.commit_steps`), once chosen: from then
    /// on the masks keep exactly the units extraction keeps, and only `z` moves.
    #[serde(default)]
    pub committed: Option<Committed>,
}

/// The integer widths a run trains at once committed (see `train.commit_steps`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Committed {
    /// Every layer keeps these widths (MaskPrune).
    Uniform(Widths),
    /// This many attention units over all layers, the MLP channels the budget leaves (the
    /// non-uniform ablation).
    Nonuniform {
        /// Attention units kept over all layers.
        attention_total: usize,
    },
}

/// What one update did (for the log).
#[derive(Debug, Clone, Serialize)]
pub struct UpdateStats {
    /// Per kind: kept units per layer after the update.
    pub kept: [Vec<usize>; 2],
    /// Per kind: the width `s_t` in units.
    pub s: [f64; 2],
    /// `p(r)`: the parameter fraction the widths imply.
    pub params_fraction: f64,
    /// `p(kept)`: the parameter fraction the kept counts imply (mean over layers).
    pub achieved_fraction: f64,
    /// The uniformity term `Σ_t mean_l y (kept/n − r)`.
    pub uniformity_term: f64,
    /// The budget term `μ·(p(r) − p_target)`.
    pub budget_term: f64,
}

impl MinimaxState {
    /// Starts from `z = init` (one vector per layer per kind), dense widths and zero multipliers.
    pub fn new(init: [Vec<Vec<f32>>; 2]) -> Self {
        let velocity = init
            .clone()
            .map(|k| k.into_iter().map(|v| vec![0.0; v.len()]).collect());
        let y = [vec![0.0; init[0].len()], vec![0.0; init[1].len()]];
        Self {
            z: init,
            velocity,
            y,
            width: [1.0, 1.0],
            mu: 0.0,
            grad_sq: [0.0, 0.0],
            updates: 0,
            committed: None,
        }
    }

    /// Threshold `τ = sqrt(2ηy)` of layer `l`, kind `t`.
    pub fn threshold(&self, t: usize, l: usize, rates: &MinimaxRates) -> f64 {
        (2.0 * rates.mask_lr * self.y[t][l]).sqrt()
    }

    /// The masks `m = prox(z)`: `z` where `|z| ≥ τ`, else 0.
    pub fn masks(&self, rates: &MinimaxRates) -> [Vec<Vec<f32>>; 2] {
        std::array::from_fn(|t| {
            self.z[t]
                .iter()
                .enumerate()
                .map(|(l, z)| {
                    let tau = self.threshold(t, l, rates);
                    z.iter()
                        .map(|&v| if (v.abs() as f64) >= tau { v } else { 0.0 })
                        .collect()
                })
                .collect()
        })
    }

    /// Kept (non-zero mask) units per layer, per kind.
    pub fn kept(&self, rates: &MinimaxRates) -> [Vec<usize>; 2] {
        kept_counts(&self.masks(rates))
    }

    /// `p(r)` for widths `r`: the fraction of the dense decoder-layer linear parameters.
    pub fn params_fraction(width: [f64; 2], kinds: &[UnitKind; 2]) -> f64 {
        kinds[0].share * width[0] + kinds[1].share * width[1]
    }

    /// One minimax update from the loss gradient `grads[t][l][i] = ∂L/∂b` (straight through
    /// to `m`), with the budget at `target_fraction` this step.
    pub fn update(
        &mut self,
        grads: &[Vec<Vec<f32>>; 2],
        kinds: &[UnitKind; 2],
        rates: &MinimaxRates,
        target_fraction: f64,
    ) -> UpdateStats {
        self.step_masks(grads, rates);
        self.update_duals(kinds, rates, target_fraction)
    }

    /// The primal step alone: `z` moves along the normalised gradient with momentum (the
    /// prox is lazy, applied by [`MinimaxState::masks`]); each layer is rescaled to mean
    /// `|z|` = 1. A committed run takes only this step.
    pub fn step_masks(&mut self, grads: &[Vec<Vec<f32>>; 2], rates: &MinimaxRates) {
        self.updates += 1;
        for (t, grads) in grads.iter().enumerate() {
            let (sum_sq, count) = grads.iter().flatten().fold((0.0f64, 0usize), |(s, n), &g| {
                (s + (g as f64).powi(2), n + 1)
            });
            let mean_sq = sum_sq / count.max(1) as f64;
            self.grad_sq[t] = 0.99 * self.grad_sq[t] + 0.01 * mean_sq;
            let bias = 1.0 - 0.99f64.powi(self.updates.min(10_000) as i32);
            let rms = (self.grad_sq[t] / bias).sqrt().max(1e-30);
            let beta = rates.mask_momentum;
            for (l, g) in grads.iter().enumerate() {
                for (i, &gi) in g.iter().enumerate() {
                    let v = &mut self.velocity[t][l][i];
                    *v = (beta * *v as f64 + (1.0 - beta) * gi as f64 / rms) as f32;
                    self.z[t][l][i] -= (rates.mask_lr * *v as f64) as f32;
                }
            }
        }
        // Keep each layer's accumulators at mean |z| = 1: the prox only compares units within
        // a layer, and a fixed scale keeps the thresholds (and so y) bounded.
        for z in self.z.iter_mut().flatten() {
            let mean = z.iter().map(|v| v.abs() as f64).sum::<f64>() / z.len().max(1) as f64;
            if mean > 0.0 {
                z.iter_mut().for_each(|v| *v = (*v as f64 / mean) as f32);
            }
        }
    }

    /// The dual steps on `y` and `μ` and the descent on the widths after a primal step.
    fn update_duals(
        &mut self,
        kinds: &[UnitKind; 2],
        rates: &MinimaxRates,
        target_fraction: f64,
    ) -> UpdateStats {
        // Dual ascent on y. Its step is chosen by a line search on the constraint: y moves a
        // fraction `dual_lr` of the way to y* = τ*²/(2η), where τ* is the threshold at which
        // the layer keeps exactly round(s) units. The
        // step has the sign of the violation `kept − s` like a plain gradient step, but its
        // size follows how densely the layer's |z| crowd around τ, so the counts do not
        // overshoot when many units have similar values.
        let kept = self.kept(rates);
        let mut uniformity_term = 0.0;
        for t in 0..2 {
            let n = kinds[t].units as f64;
            let s = self.width[t] * n;
            // Non-uniform: one threshold over all layers keeps s units per layer on average.
            let shared_tau = (!rates.uniform).then(|| {
                let all: Vec<f32> = self.z[t].iter().flatten().copied().collect();
                rank_threshold(&all, s * kept[t].len() as f64)
            });
            for (l, &c) in kept[t].iter().enumerate() {
                let excess = c as f64 / n - self.width[t];
                uniformity_term += self.y[t][l] * excess / kept[t].len() as f64;
                let tau = shared_tau.unwrap_or_else(|| rank_threshold(&self.z[t][l], s));
                let y_star = tau * tau / (2.0 * rates.mask_lr);
                self.y[t][l] = (self.y[t][l] + rates.dual_lr * (y_star - self.y[t][l])).max(0.0);
            }
        }
        // Budget: ascent on μ, descent on the widths (squeezed layers push them up).
        let violation = Self::params_fraction(self.width, kinds) - target_fraction;
        let budget_term = self.mu * violation;
        let price = self.mu + rates.penalty * violation.max(0.0);
        self.mu = (self.mu + rates.budget_lr * violation).max(0.0);
        for (t, kind) in kinds.iter().enumerate() {
            let mean_y = self.y[t].iter().sum::<f64>() / self.y[t].len().max(1) as f64;
            let grad = -mean_y + price * kind.share;
            self.width[t] = (self.width[t] - rates.width_lr * grad).clamp(kind.min_fraction, 1.0);
        }
        let achieved = achieved_fraction(&mean_kept(&kept), kinds);
        UpdateStats {
            s: std::array::from_fn(|t| self.width[t] * kinds[t].units as f64),
            params_fraction: Self::params_fraction(self.width, kinds),
            achieved_fraction: achieved,
            uniformity_term,
            budget_term,
            kept,
        }
    }
}

impl UpdateStats {
    /// A committed update's record: the kept counts, their means as the widths, no dual terms.
    pub fn committed(kept: [Vec<usize>; 2], kinds: &[UnitKind; 2]) -> Self {
        let s = mean_kept(&kept);
        let fraction = achieved_fraction(&s, kinds);
        Self {
            kept,
            s,
            params_fraction: fraction,
            achieved_fraction: fraction,
            uniformity_term: 0.0,
            budget_term: 0.0,
        }
    }
}

/// Kept (non-zero mask) units per layer, per kind, of mask values.
pub fn kept_counts(masks: &[Vec<Vec<f32>>; 2]) -> [Vec<usize>; 2] {
    std::array::from_fn(|t| {
        masks[t]
            .iter()
            .map(|m| m.iter().filter(|&&v| v != 0.0).count())
            .collect()
    })
}

/// Mean kept units over layers, per kind.
fn mean_kept(kept: &[Vec<usize>; 2]) -> [f64; 2] {
    std::array::from_fn(|t| kept[t].iter().sum::<usize>() as f64 / kept[t].len().max(1) as f64)
}

/// `p(kept)`: the parameter fraction mean kept counts imply.
fn achieved_fraction(mean: &[f64; 2], kinds: &[UnitKind; 2]) -> f64 {
    (0..2)
        .map(|t| kinds[t].share * mean[t] / kinds[t].units as f64)
        .sum()
}

/// The threshold on `|z|` halfway between the unit at rank `k = round(s)` and the next (ranks
/// from 1, largest first): keeping the units above it keeps `k`, the count extraction keeps.
pub fn rank_threshold(z: &[f32], s: f64) -> f64 {
    let mut a: Vec<f64> = z.iter().map(|v| v.abs() as f64).collect();
    a.sort_by(|x, y| y.total_cmp(x));
    let k = s.round().max(0.0) as usize;
    match k {
        _ if k >= a.len() => 0.0,
        0 => a[0] * 1.0001 + 1e-12,
        k => 0.5 * (a[k - 1] + a[k]),
    }
}

/// The budget warm-up: the target fraction moves linearly from 1 (dense) to `target` over
/// the first `warmup` updates, then stays.
pub fn scheduled_target(target: f64, update: u64, warmup: u64) -> f64 {
    if warmup == 0 || update >= warmup {
        target
    } else {
        1.0 - (1.0 - target) * update as f64 / warmup as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64) / ((1u64 << 53) as f64)
    }

    #[test]
    fn hard_threshold_is_the_l0_prox() {
        let s = MinimaxState {
            y: [vec![1.0], vec![0.0]],
            ..MinimaxState::new([vec![vec![0.5, -0.2, 0.31, 0.3]], vec![vec![0.0, 1.0]]])
        };
        let rates = MinimaxRates {
            mask_lr: 0.05,
            ..Default::default()
        };
        // τ = sqrt(2 · 0.05 · 1) ≈ 0.316
        let m = s.masks(&rates);
        assert_eq!(m[0][0], vec![0.5, 0.0, 0.0, 0.0]);
        assert_eq!(m[1][0], vec![0.0, 1.0], "y = 0 keeps every non-zero value");
    }

    #[test]
    fn rank_threshold_separates_the_top_s() {
        let z = [0.1f32, -3.0, 2.0, 1.0];
        assert!((rank_threshold(&z, 2.0) - 1.5).abs() < 1e-9);
        assert!((rank_threshold(&z, 2.4) - 1.5).abs() < 1e-9);
        assert!((rank_threshold(&z, 2.6) - 0.55).abs() < 1e-9);
        assert_eq!(rank_threshold(&z, 4.0), 0.0);
        assert!(rank_threshold(&z, 0.0) > 3.0);
    }

    #[test]
    fn warmup_is_linear_then_flat() {
        assert_eq!(scheduled_target(0.5, 0, 10), 1.0);
        assert!((scheduled_target(0.5, 5, 10) - 0.75).abs() < 1e-12);
        assert_eq!(scheduled_target(0.5, 10, 10), 0.5);
        assert_eq!(scheduled_target(0.5, 99, 0), 0.5);
    }

    /// A synthetic problem: every unit has a hidden importance; a kept unit's gradient is
    /// noise, a pruned unit's gradient asks for it back in proportion to its importance.
    /// The minimax must meet the budget with uniform layers keeping the important units.
    #[test]
    fn synthetic_problem_converges_to_a_uniform_budgeted_solution() {
        let (layers, units) = (6usize, [4usize, 256usize]);
        let kinds = [
            UnitKind {
                units: units[0],
                share: 0.25,
                min_fraction: 0.25,
            },
            UnitKind {
                units: units[1],
                share: 0.75,
                min_fraction: 1.0 / 16.0,
            },
        ];
        let mut seed = 7u64;
        let importance: [Vec<Vec<f64>>; 2] = std::array::from_fn(|t| {
            (0..layers)
                .map(|_| {
                    (0..units[t])
                        .map(|_| (3.0 * lcg(&mut seed)).exp())
                        .collect()
                })
                .collect()
        });
        // Initialised from a noisy estimate of the importance, normalised to mean 1.
        let init = std::array::from_fn(|t| {
            importance[t]
                .iter()
                .map(|w| {
                    let noisy: Vec<f64> = w.iter().map(|x| x * (0.5 + lcg(&mut seed))).collect();
                    let mean = noisy.iter().sum::<f64>() / noisy.len() as f64;
                    noisy.iter().map(|x| (x / mean) as f32).collect()
                })
                .collect()
        });
        let rates = MinimaxRates::default();
        let mut state = MinimaxState::new(init);
        let (target, steps, warmup) = (0.5, 400u64, 150u64);
        let mut last = None;
        let mut late_kept = [0.0f64; 2];
        for k in 0..steps {
            let masks = state.masks(&rates);
            let grads = std::array::from_fn(|t| {
                masks[t]
                    .iter()
                    .zip(&importance[t])
                    .map(|(m, w)| {
                        m.iter()
                            .zip(w)
                            .map(|(&mi, &wi)| {
                                let noise = lcg(&mut seed) - 0.5;
                                (if mi == 0.0 { -wi } else { wi * (noise - 0.5) }) as f32
                            })
                            .collect()
                    })
                    .collect()
            });
            last = Some(state.update(&grads, &kinds, &rates, scheduled_target(target, k, warmup)));
            if k >= steps - 100 {
                for (t, acc) in late_kept.iter_mut().enumerate() {
                    let kept = &last.as_ref().unwrap().kept[t];
                    *acc += kept.iter().sum::<usize>() as f64 / (100 * layers) as f64;
                }
            }
        }
        let stats = last.unwrap();
        assert!(
            (stats.params_fraction - target).abs() < 0.02,
            "widths imply {} of the parameters, target {target}",
            stats.params_fraction
        );
        // The counts follow s (on average over the last 100 updates: they move in whole units).
        for t in 0..2 {
            assert!(
                (late_kept[t] - stats.s[t]).abs() <= 0.15 * stats.s[t],
                "{}: layers keep {} units on average, s = {}",
                KIND_NAMES[t],
                late_kept[t],
                stats.s[t]
            );
        }
        // Extraction keeps the top round(s) channels by |z|: mostly the important ones.
        let k = stats.s[CHANNELS].round() as usize;
        let (mut hits, mut total) = (0usize, 0usize);
        for (z, w) in state.z[CHANNELS].iter().zip(&importance[CHANNELS]) {
            let top = |score: &dyn Fn(usize) -> f64| {
                let mut order: Vec<usize> = (0..w.len()).collect();
                order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
                order.truncate(k);
                order
            };
            let best = top(&|i| w[i]);
            let chosen = top(&|i| z[i].abs() as f64);
            hits += chosen.iter().filter(|i| best.contains(i)).count();
            total += k;
        }
        assert!(
            hits as f64 > 0.85 * total as f64,
            "only {hits} of {total} extracted channels are among the most important"
        );
    }
}
