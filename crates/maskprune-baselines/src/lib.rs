//! One-shot structured-pruning baselines. Each scores the same units MaskPrune learns masks
//! for (query heads, KV groups, MLP channels); `maskprune_surgery::rank::plan_from_scores`
//! then keeps the top units at given uniform widths, so every method is compared at exactly
//! the same architecture.
//!
//! - `random`: seeded uniform scores.
//! - `magnitude`: the L2 norm of the unit's weights.
//! - `wanda-sp` (Wanda's structured variant as FLAP implements it): `|W_ij|·‖X_j‖` summed
//!   over the unit's columns of the output projection (`o_proj`, `down_proj`), `‖X_j‖` the
//!   L2 norm of that input channel over the calibration tokens.
//! - `flap`: the fluctuation metric, `Var(X_j)·‖W_:,j‖²` summed over the same columns.
//! - `taylor` (LLM-Pruner's element-wise first order): `|w·∂L/∂w|` summed over every weight
//!   of the unit, `L` the next-token loss summed over the calibration batches.

use std::str::FromStr;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Int, Tensor};
use maskprune_eval::perplexity::token_tensor;
use maskprune_mask::next_token_targets;
use maskprune_model::llama::{transpose, Linear};
use maskprune_model::Extras;
use maskprune_model::{HeadTerms, Kernels};
use maskprune_model::{Llama, ModelConfig, Projection, Result, Site, WeightStore};
use maskprune_surgery::LayerScores;

mod importance;
pub use importance::{magnitude_scores, unit_sums, LayerImportance};

/// A one-shot ranking method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Seeded random scores.
    Random,
    /// L2 norm of the unit's weights.
    Magnitude,
    /// Weight magnitude times input-activation norm (Wanda-SP).
    WandaSp,
    /// Input variance times squared output-weight norm (FLAP, without bias compensation).
    Flap,
    /// First-order Taylor `|w·g|` (LLM-Pruner).
    Taylor,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 5] = [
        Method::Random,
        Method::Magnitude,
        Method::WandaSp,
        Method::Flap,
        Method::Taylor,
    ];

    /// The name used on the command line and in plans.
    pub fn name(self) -> &'static str {
        match self {
            Method::Random => "random",
            Method::Magnitude => "magnitude",
            Method::WandaSp => "wanda-sp",
            Method::Flap => "flap",
            Method::Taylor => "taylor",
        }
    }

    /// Whether the method reads calibration data.
    pub fn needs_calibration(self) -> bool {
        matches!(self, Method::WandaSp | Method::Flap | Method::Taylor)
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
                format!("unknown ranking method `{s}` ({})", names.join(", "))
            })
    }
}

/// Uniform random scores for every unit, seeded.
pub fn random_scores(c: &ModelConfig, seed: u64) -> Vec<LayerScores> {
    let mut rng = maskprune_data::SplitMix64(seed);
    let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.next_u64() as f64).collect() };
    (0..c.num_hidden_layers)
        .map(|_| LayerScores {
            query_heads: draw(c.num_attention_heads),
            kv_groups: draw(c.num_key_value_heads),
            channels: draw(c.intermediate_size),
        })
        .collect()
}

/// Per-channel sums of an activation and of its square over tokens.
#[derive(Debug, Clone)]
struct ChannelStats {
    tokens: f64,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
}

impl ChannelStats {
    fn new(width: usize) -> Self {
        Self {
            tokens: 0.0,
            sum: vec![0.0; width],
            sum_sq: vec![0.0; width],
        }
    }

    fn add<B: Backend>(&mut self, x: &Tensor<B, 3>) {
        let [b, t, w] = x.dims();
        let x = x.clone().reshape([b * t, w]);
        let host =
            |t: Tensor<B, 2>| -> Vec<f32> { t.into_data().convert::<f32>().to_vec().expect("f32") };
        let sum = host(x.clone().sum_dim(0));
        let sum_sq = host(x.square().sum_dim(0));
        for (a, v) in self.sum.iter_mut().zip(sum) {
            *a += v as f64;
        }
        for (a, v) in self.sum_sq.iter_mut().zip(sum_sq) {
            *a += v as f64;
        }
        self.tokens += (b * t) as f64;
    }

    /// L2 norm of each channel over the tokens seen.
    fn norms(&self) -> Vec<f64> {
        self.sum_sq.iter().map(|s| s.sqrt()).collect()
    }

    /// Sample variance of each channel over the tokens seen.
    fn variances(&self) -> Vec<f64> {
        let n = self.tokens.max(2.0);
        self.sum
            .iter()
            .zip(&self.sum_sq)
            .map(|(s, q)| ((q - s * s / n) / (n - 1.0)).max(0.0))
            .collect()
    }
}

/// A batch of windows as a token tensor.
fn tokens<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    token_tensor(&rows, device)
}

/// Scales every column `j` of a row-major `[rows, cols]` matrix: `f(W_ij, a_j)`.
fn column_weighted(w: &[f32], cols: usize, a: &[f64], f: impl Fn(f32, f64) -> f64) -> Vec<f32> {
    w.chunks_exact(cols)
        .flat_map(|row| row.iter().zip(a).map(|(&x, &aj)| f(x, aj) as f32))
        .collect()
}

/// Wanda-SP or FLAP scores from activation statistics over `windows` (batches of `batch`);
/// `on_batch` is called after each batch.
pub fn activation_scores<B: Kernels>(
    method: Method,
    model: &Llama<B>,
    store: &WeightStore,
    windows: &[Vec<u32>],
    batch: usize,
    on_batch: &mut dyn FnMut(),
) -> Result<Vec<LayerScores>> {
    assert!(matches!(method, Method::WandaSp | Method::Flap));
    let c = &model.config;
    let o_width = c.num_attention_heads * c.head_dim;
    let mut stats: Vec<[ChannelStats; 2]> = (0..c.num_hidden_layers)
        .map(|_| {
            [
                ChannelStats::new(o_width),
                ChannelStats::new(c.intermediate_size),
            ]
        })
        .collect();
    let device = model.device();
    for rows in windows.chunks(batch.max(1)) {
        let tokens = tokens::<B>(rows, &device);
        model.observe(tokens, &mut |layer, site, x| {
            let i = match site {
                Site::OProjInput => 0,
                Site::DownProjInput => 1,
                Site::LayerOutput => return,
            };
            stats[layer][i].add(x);
        })?;
        on_batch();
    }
    // Per input column j of the output projections: Wanda-SP weighs |W_ij| by ‖X_j‖, FLAP
    // weighs W_ij² by Var(X_j).
    let statistic = match method {
        Method::WandaSp => ChannelStats::norms,
        _ => ChannelStats::variances,
    };
    let weigh = |x: f32, a: f64| match method {
        Method::WandaSp => x.abs() as f64 * a,
        _ => (x as f64).powi(2) * a,
    };
    let f = c.intermediate_size;
    (0..c.num_hidden_layers)
        .map(|l| {
            let o = store.read_projection(c, l, Projection::O)?;
            let down = store.read_projection(c, l, Projection::Down)?;
            let [o_stats, down_stats] = &stats[l];
            let imp = LayerImportance {
                o: Some(column_weighted(&o, o_width, &statistic(o_stats), weigh)),
                down: Some(column_weighted(&down, f, &statistic(down_stats), weigh)),
                ..Default::default()
            };
            Ok(unit_sums(&imp, c))
        })
        .collect()
}

fn linears_mut<B: Backend>(model: &mut Llama<B>) -> Vec<&mut Linear<B>> {
    model
        .layers
        .iter_mut()
        .flat_map(|l| {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ]
        })
        .collect()
}

/// LLM-Pruner's element-wise first-order Taylor scores: the next-token loss's gradient
/// summed over the batches of `windows`, then `|w·g|` summed over each unit's weights.
pub fn taylor_scores<B: AutodiffBackend + Kernels>(
    mut model: Llama<B>,
    windows: &[Vec<u32>],
    batch: usize,
    on_batch: &mut dyn FnMut(),
) -> Result<Vec<LayerScores>> {
    for lin in linears_mut(&mut model) {
        // Gradients flow through burn's f32 ops: weights kept in bf16 are widened first.
        lin.weight = lin.weight.clone().cast(FloatDType::F32).require_grad();
    }
    let device = model.device();
    let mut grad_sums: Vec<Vec<f32>> = Vec::new();
    for rows in windows.chunks(batch.max(1)) {
        let hidden = model.hidden_states(tokens::<B>(rows, &device), Extras::none())?;
        let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let targets = next_token_targets(&rows);
        let terms = HeadTerms {
            teacher: None,
            targets: Some((&targets[..], 1.0)),
        };
        let grads = model.head_loss(hidden, terms).loss.backward();
        for (i, lin) in linears_mut(&mut model).into_iter().enumerate() {
            let g: Vec<f32> = lin
                .weight
                .grad(&grads)
                .map(|g| g.into_data().convert::<f32>().to_vec().expect("f32"))
                .unwrap_or_else(|| vec![0.0; lin.weight.dims().iter().product()]);
            match grad_sums.get_mut(i) {
                Some(acc) => acc.iter_mut().zip(g).for_each(|(a, v)| *a += v),
                None => grad_sums.push(g),
            }
        }
        on_batch();
    }
    let c = model.config.clone();
    let mut lins = linears_mut(&mut model).into_iter();
    let mut sums = grad_sums.into_iter();
    let mut importance = || -> Option<Vec<f32>> {
        let lin = lins.next().expect("seven linears per layer");
        let g = sums.next()?;
        let [d_in, d_out] = lin.weight.dims();
        let w: Vec<f32> = lin
            .weight
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        let imp: Vec<f32> = w.iter().zip(&g).map(|(w, g)| (w * g).abs()).collect();
        // Ours is [in, out]; the unit sums read PyTorch's [out, in].
        Some(transpose(&imp, d_in, d_out))
    };
    Ok((0..c.num_hidden_layers)
        .map(|_| {
            let imp = LayerImportance {
                q: importance(),
                k: importance(),
                v: importance(),
                o: importance(),
                gate: importance(),
                up: importance(),
                down: importance(),
            };
            unit_sums(&imp, &c)
        })
        .collect())
}
