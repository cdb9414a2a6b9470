//! Weight surgery: the pruned checkpoint computes exactly what the masked original computes.

use maskprune_baselines::magnitude_scores;
use maskprune_eval::perplexity::token_tensor;
use maskprune_model::Extras;
use maskprune_model::{Llama, ModelConfig, WeightStore};
use maskprune_surgery::{
    plan_from_scores, prune_checkpoint, uniform_widths, Granularity, PrunePlan, Widths,
};
use maskprune_tests::*;

/// The magnitude baseline's plan at `widths`.
fn magnitude_plan(
    store: &WeightStore,
    config: &ModelConfig,
    granularity: Granularity,
    widths: Widths,
) -> PrunePlan {
    let scores = magnitude_scores(store, config).unwrap();
    plan_from_scores(&scores, config, granularity, widths, "magnitude")
}

fn rows() -> Vec<Vec<u32>> {
    reference_rows()
}

fn logits(model: &Llama<B>, masks: Option<&[maskprune_model::LayerMask<B>]>) -> Vec<f32> {
    let rows = rows();
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    values(
        model
            .forward_with(
                token_tensor(&rows, &model.device()),
                Extras { masks, lora: None },
            )
            .unwrap(),
    )
}

fn check(granularity: Granularity, sparsity: f64, expect: (usize, usize)) {
    check_model("tiny-llama", granularity, sparsity, expect);
}

fn check_model(name: &str, granularity: Granularity, sparsity: f64, expect: (usize, usize)) {
    let src = fixtures().join(name);
    let config = ModelConfig::from_file(&src.join("config.json")).unwrap();
    let store = WeightStore::open(&src).unwrap();
    let widths = uniform_widths(&config, granularity, sparsity, 16).unwrap();
    let plan = magnitude_plan(&store, &config, granularity, widths);
    let out = scratch(&format!("surgery-{name}-{granularity:?}")).join("pruned");
    let report = prune_checkpoint(&src, &plan, &out, false).unwrap();
    assert_eq!(
        (
            report.shape.num_attention_heads,
            report.shape.num_key_value_heads
        ),
        expect
    );
    assert!(
        report.decoder_linear_after as f64
            <= (1.0 - sparsity) * report.decoder_linear_before as f64
    );
    let pruned = Llama::<B>::load(&out, &Default::default()).unwrap();
    assert_eq!(pruned.config.intermediate_size, widths.channels);
    assert_eq!(pruned.config.total_params(), report.params_after);
    let original = Llama::<B>::load(&src, &Default::default()).unwrap();
    let masked = logits(&original, Some(&plan.masks(&config, &Default::default())));
    let diff = max_abs_diff(&logits(&pruned, None), &masked);
    assert!(diff < 1e-5, "pruned vs masked: {diff}");
    assert!(
        max_abs_diff(&masked, &logits(&original, None)) > 1e-3,
        "pruning changed nothing"
    );
    let provenance: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("maskprune.json")).unwrap())
            .unwrap();
    assert_eq!(provenance["method"], "magnitude");
    assert_eq!(provenance["kept"].as_array().unwrap().len(), 2);
    assert!(out.join("tokenizer.json").is_file());
    // An existing output is refused.
    assert!(prune_checkpoint(&src, &plan, &out, false)
        .unwrap_err()
        .message
        .contains("already exists"));
}

#[test]
fn kv_group_surgery_equals_the_masked_model() {
    check(Granularity::KvGroup, 0.5, (2, 1));
}

#[test]
fn query_head_surgery_equals_the_masked_model() {
    check(Granularity::QueryHead, 0.5, (2, 2));
}

#[test]
fn qwen3_surgery_keeps_the_shared_head_norms_and_equals_the_masked_model() {
    check_model("tiny-qwen3", Granularity::KvGroup, 0.5, (2, 1));
    check_model("tiny-qwen3", Granularity::QueryHead, 0.5, (2, 2));
}

#[test]
fn gemma3_surgery_keeps_the_sandwich_norms_and_equals_the_masked_model() {
    check_model("tiny-gemma3", Granularity::KvGroup, 0.5, (2, 1));
    check_model("tiny-gemma3", Granularity::QueryHead, 0.5, (2, 2));
}

/// A copy of the tiny fixture in `dir` with one more tensor, `extra` (f32 `[2, 4]`).
fn fixture_with_tensor(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let src = fixtures().join("tiny-llama");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros = vec![0u8; 4 * 8];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4], &zeros);
    views.push((extra.into(), view.unwrap()));
    std::fs::write(
        model.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    model
}

#[test]
fn a_tensor_the_family_does_not_know_is_an_error_not_kept() {
    // A fused projection (Phi-3's `gate_up_proj`) would be silently mis-pruned if kept.
    let dir = scratch("unknown-tensor");
    let model = fixture_with_tensor(&dir, "model.layers.1.mlp.gate_up_proj.weight");
    let config = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let store = WeightStore::open(&model).unwrap();
    let widths = uniform_widths(&config, Granularity::KvGroup, 0.5, 16).unwrap();
    let plan = magnitude_plan(&store, &config, Granularity::KvGroup, widths);
    let err = prune_checkpoint(&model, &plan, &dir.join("out"), false).unwrap_err();
    assert!(
        err.message.contains(
            "`model.layers.1.mlp.gate_up_proj.weight` is not part of the llama architecture"
        ),
        "{err}"
    );
    assert!(!dir.join("out").exists());
    // The rotary buffer older transformers saved is known: kept as it is.
    let dir = scratch("inv-freq-tensor");
    let model = fixture_with_tensor(&dir, "model.layers.0.self_attn.rotary_emb.inv_freq");
    prune_checkpoint(&model, &plan, &dir.join("out"), false).unwrap();
    let out = WeightStore::open(&dir.join("out")).unwrap();
    assert!(out
        .names()
        .contains(&"model.layers.0.self_attn.rotary_emb.inv_freq"));
}

#[test]
fn invalid_plans_are_refused_with_the_reason() {
    let src = fixtures().join("tiny-llama");
    let config = ModelConfig::from_file(&src.join("config.json")).unwrap();
    let store = WeightStore::open(&src).unwrap();
    let widths = uniform_widths(&config, Granularity::QueryHead, 0.5, 16).unwrap();
    let good = magnitude_plan(&store, &config, Granularity::QueryHead, widths);
    let out = scratch("bad-plan").join("x");
    let mut cases: Vec<(PrunePlan, &str)> = Vec::new();
    let mut p = good.clone();
    p.layers.pop();
    cases.push((p, "plan has 1 layers but the model has 2"));
    let mut p = good.clone();
    p.layers[1].channels.pop();
    cases.push((p, "not uniform"));
    let mut p = good.clone();
    p.layers[0].channels[0] = 999;
    p.layers[0].channels.sort();
    cases.push((p, "out of range"));
    let mut p = good.clone();
    p.layers[0].query_heads = vec![0, 1];
    cases.push((p, "every kept KV head must keep the same number"));
    let mut p = good;
    p.layers[0].channels = vec![];
    cases.push((p, "no channel kept"));
    for (plan, expected) in cases {
        let err = prune_checkpoint(&src, &plan, &out, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid prune plan") && err.contains(expected),
            "{err}"
        );
        assert!(!out.exists());
    }
}
