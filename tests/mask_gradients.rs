//! Gradients through the real model: masks (straight-through) and LoRA get them, frozen
//! weights do not, and the mask gradient agrees with finite differences of the loss.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use maskprune_eval::perplexity::token_tensor;
use maskprune_mask::{distillation_kl, Granularity, UnitMasks};
use maskprune_model::Extras;
use maskprune_model::{LayerMask, Llama};
use maskprune_tests::*;
use maskprune_train::{config::LoraSettings, Adapters};

type AD = Autodiff<Flex>;

fn setup() -> (Llama<AD>, Tensor<AD, 2, burn::tensor::Int>) {
    let model = Llama::<AD>::load(&fixtures().join("tiny-llama"), &Default::default()).unwrap();
    let rows: Vec<Vec<u32>> = read_json("tiny-llama-reference.json")["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let tokens = token_tensor::<AD>(&rows, &Default::default());
    (model, tokens)
}

#[test]
fn masks_and_lora_get_gradients_and_frozen_weights_do_not() {
    let (model, tokens) = setup();
    let device = Default::default();
    let teacher = model.forward(tokens.clone()).unwrap().detach();
    let masks = UnitMasks::<AD>::from_values(
        &model.config,
        Granularity::KvGroup,
        vec![vec![1.0, 0.0], vec![0.7, 1.0]],
        vec![
            vec![1.0; 128],
            (0..128)
                .map(|c| if c % 2 == 0 { 1.0 } else { 0.0 })
                .collect(),
        ],
        &device,
    )
    .require_grad();
    let (lora, _) = Adapters::new(&model.config, &LoraSettings::default(), 0).to_tensors::<AD>(
        model.config.num_hidden_layers,
        &device,
        Tensor::require_grad,
    );
    let student = model
        .forward_with(
            tokens,
            Extras {
                masks: Some(&masks.layer_masks()),
                lora: Some(&lora),
            },
        )
        .unwrap();
    let loss = distillation_kl(student, teacher, 2.0);
    let grads = loss.backward();
    for t in masks.attention.iter().chain(&masks.channels) {
        let g: Vec<f32> = t
            .grad(&grads)
            .expect("mask gradient")
            .into_data()
            .to_vec()
            .unwrap();
        assert!(g.iter().any(|v| *v != 0.0) && g.iter().all(|v| v.is_finite()));
    }
    // With B = 0 at the start, only B receives a gradient.
    let b = &lora[0].q_proj.as_ref().unwrap().b;
    assert!(b.grad(&grads).unwrap().abs().sum().into_scalar() > 0.0);
    assert!(
        model.layers[0]
            .self_attn
            .q_proj
            .weight
            .grad(&grads)
            .is_none(),
        "frozen weight got a gradient"
    );
}

#[test]
fn mask_gradient_matches_finite_differences() {
    let (model, tokens) = setup();
    let device = Default::default();
    let teacher = model.forward(tokens.clone()).unwrap().detach();
    let head_values = vec![1.0f32, 0.8, 1.0, 0.6];
    let loss_at = |heads: Vec<f32>, grad: bool| {
        let mut t = Tensor::<AD, 1>::from_data(TensorData::new(heads, [4]), &device);
        if grad {
            t = t.require_grad();
        }
        let masks = vec![
            LayerMask {
                heads: Some(t.clone()),
                channels: None,
            },
            LayerMask::default(),
        ];
        let student = model
            .forward_with(tokens.clone(), Extras::masks(&masks))
            .unwrap();
        (distillation_kl(student, teacher.clone(), 1.0), t)
    };
    let (loss, t) = loss_at(head_values.clone(), true);
    let analytic: Vec<f32> = t
        .grad(&loss.backward())
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let eps = 1e-2f32;
    for h in 0..4 {
        let (mut up, mut down) = (head_values.clone(), head_values.clone());
        up[h] += eps;
        down[h] -= eps;
        let lu: f32 = loss_at(up, false).0.into_scalar();
        let ld: f32 = loss_at(down, false).0.into_scalar();
        let numeric = (lu - ld) / (2.0 * eps);
        assert!(
            (numeric - analytic[h]).abs() <= 2e-3 + 2e-2 * analytic[h].abs(),
            "head {h}: autodiff {} vs finite differences {numeric}",
            analytic[h]
        );
    }
}

/// The loss and the gradients of one training step: the masked student with LoRA on every
/// projection, the head loss (KL to the dense teacher at `temperature`, plus the next-token
/// term), on backend `Bk`.
fn step_gradients<Bk: maskprune_model::TrainKernels>(temperature: f64) -> (f64, Vec<Vec<f32>>) {
    use maskprune_mask::next_token_targets;
    use maskprune_model::HeadTerms;
    let device = Default::default();
    let model = Llama::<Bk>::load(&fixtures().join("tiny-llama"), &device).unwrap();
    let rows = reference_rows();
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let tokens = token_tensor::<Bk>(&rows, &device);
    let teacher = model
        .inner()
        .hidden_states(token_tensor(&rows, &device), Extras::none())
        .unwrap();
    let [b, t, h] = teacher.dims();
    let teacher = Tensor::from_inner(teacher.reshape([b * t, h]));
    let masks = UnitMasks::<Bk>::from_values(
        &model.config,
        Granularity::KvGroup,
        vec![vec![1.0, 0.0], vec![0.7, 1.0]],
        vec![
            vec![1.0; 128],
            (0..128)
                .map(|c| if c % 3 == 0 { 0.0 } else { 1.0 })
                .collect(),
        ],
        &device,
    )
    .require_grad();
    let settings = LoraSettings {
        targets: maskprune_model::lora::lora_targets()
            .map(String::from)
            .to_vec(),
        ..LoraSettings::default()
    };
    let mut adapters = Adapters::new(&model.config, &settings, 0);
    // Non-zero B matrices, so that every adapter's A gets a gradient too.
    for (i, m) in adapters.matrices.iter_mut().enumerate() {
        if m.name.ends_with("lora_b") {
            let n = m.value.len();
            m.value = pseudo_random(n, i as u64)
                .into_iter()
                .map(|v| v * 0.1)
                .collect();
        }
    }
    let (lora, flat) = adapters.to_tensors::<Bk>(
        model.config.num_hidden_layers,
        &device,
        Tensor::require_grad,
    );
    let hidden = model
        .hidden_states(
            tokens,
            Extras {
                masks: Some(&masks.layer_masks()),
                lora: Some(&lora),
            },
        )
        .unwrap();
    let targets = next_token_targets(&rows);
    let loss = model.head_loss(
        hidden,
        HeadTerms {
            teacher: Some((teacher, temperature)),
            targets: Some((&targets[..], 0.5)),
        },
    );
    let value = loss.distill.unwrap() + 0.5 * loss.ntp.unwrap();
    let grads = loss.loss.backward();
    let grad = |t: &Tensor<Bk, 1>| -> Vec<f32> {
        t.grad(&grads)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap()
    };
    let mut all: Vec<Vec<f32>> = masks
        .attention
        .iter()
        .chain(&masks.channels)
        .map(grad)
        .collect();
    for t in &flat {
        all.push(
            t.grad(&grads)
                .unwrap()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap(),
        );
    }
    (value, all)
}

/// `n` reproducible values in `[-0.5, 0.5)`.
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// burn's composed ops differentiated by burn (the generic path, what burn-cuda trains with):
/// on burn-ndarray, or with `--features wgpu` on burn-wgpu's cubecl kernels.
#[cfg(not(feature = "wgpu"))]
type Generic = Autodiff<burn::backend::NdArray>;
#[cfg(feature = "wgpu")]
type Generic = Autodiff<burn::backend::Wgpu>;

#[test]
fn generic_path_training_step_gives_the_fused_kernels_gradients() {
    // burn-flex under autodiff runs the fused forward and backward kernels.
    for temperature in [1.0, 2.0] {
        let (fused_loss, fused) = step_gradients::<AD>(temperature);
        let (loss, composed) = step_gradients::<Generic>(temperature);
        assert!(
            (fused_loss - loss).abs() < 1e-5 * loss.abs().max(1.0),
            "loss {fused_loss} vs {loss}"
        );
        assert_eq!(fused.len(), composed.len());
        for (i, (a, b)) in fused.iter().zip(&composed).enumerate() {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
            let diff = max_abs_diff(a, b);
            assert!(
                diff < 1e-3 * scale,
                "T {temperature}: gradient {i} differs by {diff} (scale {scale})"
            );
        }
    }
}
