//! The issue-4 machinery on the tiny fixture: KV-cache decoding, masked (non-uniform)
//! checkpoints, and the baselines' scores checked against their definitions computed here
//! independently (activations by running the layers by hand; Taylor from gradients summed by
//! hand and checked against central finite differences).

use burn::backend::{Autodiff, Flex};
use burn::tensor::{backend::Backend, Int, Tensor};
use maskprune_baselines::{activation_scores, taylor_scores, Method};
use maskprune_eval::perplexity::token_tensor;
use maskprune_mask::next_token_loss;
use maskprune_model::kernels::composed::silu;
use maskprune_model::rope::{inverse_frequencies, Rotary};
use maskprune_model::Extras;
use maskprune_model::{KvCache, Llama, ModelConfig, WeightStore};
use maskprune_surgery::{mask_checkpoint_with_lora, Granularity, LayerPlan, PrunePlan};
use maskprune_tests::*;

fn rows() -> Vec<Vec<u32>> {
    reference_rows()
}

fn tokens<Bk: Backend>(device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    let rows = rows();
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    token_tensor(&rows, device)
}

#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    let model = Llama::<B>::load(&fixtures().join("tiny-llama"), &Default::default()).unwrap();
    let device = model.device();
    let all = tokens::<B>(&device);
    let [b, t] = all.dims();
    let full = values(model.forward(all.clone()).unwrap());
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut pieces = vec![model
        .forward_cached(all.clone().narrow(1, 0, 5), &mut cache)
        .unwrap()];
    for i in 5..t {
        pieces.push(
            model
                .forward_cached(all.clone().narrow(1, i, 1), &mut cache)
                .unwrap(),
        );
    }
    assert_eq!(cache.len, t);
    let cached = values(Tensor::cat(pieces, 1));
    assert_eq!(cached.len(), b * t * model.config.vocab_size);
    let diff = max_abs_diff(&full, &cached);
    assert!(diff < 1e-4, "cached vs full logits: {diff}");
}

#[test]
fn a_masked_checkpoint_equals_the_masked_model_and_counts_kept_units() {
    let src = fixtures().join("tiny-llama");
    let config = ModelConfig::from_file(&src.join("config.json")).unwrap();
    // Layer 0 keeps one KV group (query heads 0, 1) and 40 channels; layer 1 everything
    // attention and 100 channels: not uniform.
    let plan = PrunePlan {
        method: "maskprune-nonuniform".into(),
        granularity: Granularity::KvGroup,
        layers: vec![
            LayerPlan {
                query_heads: vec![0, 1],
                kv_heads: vec![0],
                channels: (0..40).collect(),
            },
            LayerPlan {
                query_heads: vec![0, 1, 2, 3],
                kv_heads: vec![0, 1],
                channels: (10..110).collect(),
            },
        ],
    };
    assert!(plan.validate(&config).unwrap_err().contains("not uniform"));
    let out = scratch("masked-checkpoint").join("masked");
    let report = mask_checkpoint_with_lora(&src, &plan, None, &out, false).unwrap();
    let (h, d) = (config.hidden_size, config.head_dim);
    let layer = |q: usize, kv: usize, ch: usize| 2 * h * q * d + 2 * h * kv * d + 3 * h * ch;
    assert_eq!(
        report.decoder_linear_after,
        layer(2, 1, 40) + layer(4, 2, 100)
    );
    assert_eq!(
        report.params_after,
        config.total_params() - (report.decoder_linear_before - report.decoder_linear_after)
    );
    let masked_dir = Llama::<B>::load(&out, &Default::default()).unwrap();
    assert_eq!(
        masked_dir.config.intermediate_size,
        config.intermediate_size
    );
    let original = Llama::<B>::load(&src, &Default::default()).unwrap();
    let device = original.device();
    let with_masks = values(
        original
            .forward_with(
                tokens::<B>(&device),
                Extras::masks(&plan.masks(&config, &device)),
            )
            .unwrap(),
    );
    let zeroed = values(masked_dir.forward(tokens::<B>(&device)).unwrap());
    let diff = max_abs_diff(&with_masks, &zeroed);
    assert!(diff < 1e-5, "masked checkpoint vs masks: {diff}");
    let dense = values(original.forward(tokens::<B>(&device)).unwrap());
    assert!(
        max_abs_diff(&dense, &zeroed) > 1e-3,
        "masking changed nothing"
    );
}

/// The inputs of `down_proj` in layer `l`, computed by running the blocks by hand.
fn down_inputs_by_hand(model: &Llama<B>, l: usize) -> Vec<Vec<f32>> {
    let device = model.device();
    let c = &model.config;
    let toks = tokens::<B>(&device);
    let [b, t] = toks.dims();
    let rotary = Rotary::new(&inverse_frequencies(c), 0, t, &device);
    let mut x = model.embed(toks);
    for layer in &model.layers[..l] {
        x = layer.forward(x, &rotary, Default::default(), None);
    }
    let layer = &model.layers[l];
    let x = x.clone()
        + layer
            .self_attn
            .forward(layer.attention_norm.forward(x), &rotary, None);
    let n = layer.mlp_norm.forward(x);
    let act = silu(layer.mlp.gate_proj.forward(n.clone())) * layer.mlp.up_proj.forward(n);
    let f = c.intermediate_size;
    let flat = values(act.reshape([b * t, f]));
    flat.chunks(f).map(<[f32]>::to_vec).collect()
}

#[test]
fn wanda_sp_and_flap_channel_scores_follow_their_definitions() {
    let src = fixtures().join("tiny-llama");
    let model = Llama::<B>::load(&src, &Default::default()).unwrap();
    let store = WeightStore::open(&src).unwrap();
    let c = model.config.clone();
    let windows = rows();
    let wanda =
        activation_scores(Method::WandaSp, &model, &store, &windows, 2, &mut || {}).unwrap();
    let flap = activation_scores(Method::Flap, &model, &store, &windows, 1, &mut || {}).unwrap();
    let f = c.intermediate_size;
    for l in 0..c.num_hidden_layers {
        let x = down_inputs_by_hand(&model, l);
        let down = store
            .read_f32(
                &format!("model.layers.{l}.mlp.down_proj.weight"),
                &[c.hidden_size, f],
            )
            .unwrap();
        let n = x.len() as f64;
        for ch in [0, 7, f - 1] {
            let col: Vec<f64> = down.chunks(f).map(|r| r[ch] as f64).collect();
            let xs: Vec<f64> = x.iter().map(|r| r[ch] as f64).collect();
            let norm = xs.iter().map(|v| v * v).sum::<f64>().sqrt();
            let mean = xs.iter().sum::<f64>() / n;
            let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let want_wanda = col.iter().map(|w| w.abs()).sum::<f64>() * norm;
            let want_flap = col.iter().map(|w| w * w).sum::<f64>() * var;
            let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
            assert!(
                rel(wanda[l].channels[ch], want_wanda) < 1e-4,
                "wanda layer {l} ch {ch}: {} vs {want_wanda}",
                wanda[l].channels[ch]
            );
            assert!(
                rel(flap[l].channels[ch], want_flap) < 1e-3,
                "flap layer {l} ch {ch}: {} vs {want_flap}",
                flap[l].channels[ch]
            );
        }
        // A KV group's score is its query heads' scores summed.
        let g = c.group_size();
        for s in [&wanda[l], &flap[l]] {
            let sum: f64 = s.query_heads[..g].iter().sum();
            assert!((s.kv_groups[0] - sum).abs() <= 1e-9 * sum.abs().max(1.0));
        }
    }
}

type AD = Autodiff<Flex>;

#[test]
fn taylor_channel_scores_sum_weight_times_accumulated_gradient() {
    let src = fixtures().join("tiny-llama");
    let device = Default::default();
    let windows = rows();
    // Two batches of one window: the score must use the gradient summed over batches.
    let scores = taylor_scores(
        Llama::<AD>::load(&src, &device).unwrap(),
        &windows,
        1,
        &mut || {},
    )
    .unwrap();
    // The same by hand: backward per batch, gradients summed, |w·g| over the channel's
    // gate and up columns and down row (our [in, out] layout).
    let mut model = Llama::<AD>::load(&src, &device).unwrap();
    let l = 1;
    let mlp = &mut model.layers[l].mlp;
    for w in [
        &mut mlp.gate_proj.weight,
        &mut mlp.up_proj.weight,
        &mut mlp.down_proj.weight,
    ] {
        // As `taylor_scores` does: the f16 weights widened, then tracked.
        *w = w.clone().cast(burn::tensor::FloatDType::F32).require_grad();
    }
    let host =
        |t: Tensor<Flex, 2>| -> Vec<f64> { t.into_data().convert::<f64>().to_vec().unwrap() };
    let mut sums: Vec<Vec<f64>> = Vec::new();
    for row in &windows {
        let toks: Tensor<AD, 2, Int> = token_tensor(&[row.as_slice()], &device);
        let grads = next_token_loss(model.forward(toks.clone()).unwrap(), toks).backward();
        let mlp = &model.layers[l].mlp;
        for (k, w) in [
            &mlp.gate_proj.weight,
            &mlp.up_proj.weight,
            &mlp.down_proj.weight,
        ]
        .into_iter()
        .enumerate()
        {
            let g = host(w.grad(&grads).unwrap());
            match sums.get_mut(k) {
                Some(acc) => acc.iter_mut().zip(g).for_each(|(a, v)| *a += v),
                None => sums.push(g),
            }
        }
    }
    // The summed gradients themselves, against central finite differences of the loss at
    // the largest-gradient entry of each weight (forward passes only, no autodiff).
    let mut plain = Llama::<B>::load(&src, &device).unwrap();
    let loss_sum = |m: &Llama<B>| -> f64 {
        windows
            .iter()
            .map(|row| {
                let toks: Tensor<B, 2, Int> = token_tensor(&[row.as_slice()], &device);
                next_token_loss(m.forward(toks.clone()).unwrap(), toks).into_scalar() as f64
            })
            .sum()
    };
    for (k, grad) in sums.iter().enumerate() {
        let i = (0..grad.len())
            .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
            .unwrap();
        let eps = 1e-2f32;
        let mut at = |delta: f32| {
            let mlp = &mut plain.layers[l].mlp;
            let w = match k {
                0 => &mut mlp.gate_proj,
                1 => &mut mlp.up_proj,
                _ => &mut mlp.down_proj,
            };
            let dims = w.weight.dims();
            let mut v: Vec<f32> = w
                .weight
                .clone()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap();
            v[i] += delta;
            w.weight = Tensor::from_data(burn::tensor::TensorData::new(v, dims), &device);
            loss_sum(&plain)
        };
        let (up, down) = (at(eps), at(-2.0 * eps));
        at(eps); // back to the weight (up to rounding) for the next matrix's check
        let numeric = (up - down) / (2.0 * eps as f64);
        assert!(
            (numeric - grad[i]).abs() < 2e-2 * grad[i].abs(),
            "weight {k} entry {i}: autodiff gradient {} vs finite differences {numeric}",
            grad[i]
        );
    }
    let (h, f) = (model.config.hidden_size, model.config.intermediate_size);
    let mlp = &model.layers[l].mlp;
    let weights: Vec<Vec<f64>> = [
        &mlp.gate_proj.weight,
        &mlp.up_proj.weight,
        &mlp.down_proj.weight,
    ]
    .into_iter()
    .map(|w| host(w.clone().inner()))
    .collect();
    for ch in [3, 77] {
        let mut expected = 0.0;
        for k in 0..3 {
            let indices: Vec<usize> = match k {
                0 | 1 => (0..h).map(|i| i * f + ch).collect(),
                _ => (0..h).map(|o| ch * h + o).collect(),
            };
            expected += indices
                .iter()
                .map(|&i| (weights[k][i] * sums[k][i]).abs())
                .sum::<f64>();
        }
        let got = scores[l].channels[ch];
        assert!(
            (got - expected).abs() < 1e-4 * expected,
            "taylor layer {l} channel {ch}: {got} vs {expected} by hand"
        );
    }
    // Units with larger |w·g| rank higher: scores are not all equal.
    let ch = &scores[l].channels;
    assert!(
        ch.iter().cloned().fold(f64::MIN, f64::max)
            > 2.0 * ch.iter().cloned().fold(f64::MAX, f64::min)
    );
}
