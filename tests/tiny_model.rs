//! The tiny GQA fixture against transformers' logits: dense, masked, and mask semantics.

use burn::tensor::{Tensor, TensorData};
use maskprune_eval::perplexity::token_tensor;
use maskprune_model::Extras;
use maskprune_model::{load_tokenizer, LayerMask, Llama};
use maskprune_tests::*;

fn model() -> Llama<B> {
    Llama::load(&fixtures().join("tiny-llama"), &Default::default()).unwrap()
}

fn logits(model: &Llama<B>, rows: &[Vec<u32>], masks: Option<&[LayerMask<B>]>) -> Vec<f32> {
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

fn mask(v: &serde_json::Value) -> Option<Tensor<B, 1>> {
    if v.is_null() {
        return None;
    }
    let f = floats(v);
    let n = f.len();
    Some(Tensor::from_data(
        TensorData::new(f, [n]),
        &Default::default(),
    ))
}

#[test]
fn dense_logits_match_transformers() {
    let reference = read_json("tiny-llama-reference.json");
    let model = model();
    assert_eq!(
        (
            model.config.num_attention_heads,
            model.config.num_key_value_heads
        ),
        (4, 2)
    );
    let ours = logits(&model, &input_rows(&reference), None);
    let diff = max_abs_diff(&ours, &floats(&reference["logits"]));
    assert!(diff < 1e-4, "max |dlogit| = {diff}");
}

#[test]
fn masked_logits_match_transformers() {
    masked_logits_match("tiny-llama");
}

/// The fixture's logits under its reference masks (a zeroed and a halved query head, zeroed
/// channels) against transformers', and different from the dense ones.
fn masked_logits_match(name: &str) {
    let reference = read_json(&format!("{name}-reference.json"));
    let model = Llama::<B>::load(&fixtures().join(name), &Default::default()).unwrap();
    let masks: Vec<LayerMask<B>> = (0..model.config.num_hidden_layers)
        .map(|l| LayerMask {
            heads: mask(&reference["head_masks"][l]),
            channels: mask(&reference["channel_masks"][l]),
        })
        .collect();
    let ours = logits(&model, &input_rows(&reference), Some(&masks));
    let diff = max_abs_diff(&ours, &floats(&reference["masked_logits"]));
    assert!(diff < 1e-4, "{name}: masked max |dlogit| = {diff}");
    // And the masks really change the output.
    assert!(max_abs_diff(&ours, &floats(&reference["logits"])) > 1e-2);
}

#[test]
fn all_ones_masks_are_the_dense_model_bit_for_bit() {
    let model = model();
    let rows = reference_rows();
    let ones = |n: usize| Some(Tensor::<B, 1>::ones([n], &Default::default()));
    let masks: Vec<LayerMask<B>> = (0..2)
        .map(|_| LayerMask {
            heads: ones(4),
            channels: ones(128),
        })
        .collect();
    assert_eq!(
        logits(&model, &rows, None),
        logits(&model, &rows, Some(&masks))
    );
}

#[test]
fn a_zeroed_head_removes_exactly_that_heads_contribution() {
    let model = model();
    let rows = reference_rows();
    let device = Default::default();
    let d = model.config.head_dim;
    let (layer, head) = (1, 2);
    let mut heads = vec![1.0f32; 4];
    heads[head] = 0.0;
    let mut masks = vec![LayerMask::default(), LayerMask::default()];
    masks[layer].heads = Some(Tensor::from_data(TensorData::new(heads, [4]), &device));
    let masked = logits(&model, &rows, Some(&masks));
    // The same model with that head's input rows of o_proj set to zero.
    let mut surgery = model.clone();
    let o = &mut surgery.layers[layer].self_attn.o_proj.weight;
    let hidden = o.dims()[1];
    *o = o
        .clone()
        .slice_fill([head * d..(head + 1) * d, 0..hidden], 0.0);
    let removed = logits(&surgery, &rows, None);
    assert!(max_abs_diff(&masked, &removed) < 1e-6);
    assert!(max_abs_diff(&masked, &logits(&model, &rows, None)) > 1e-3);
}

#[test]
fn a_zeroed_channel_removes_exactly_that_channels_contribution() {
    let model = model();
    let rows = reference_rows();
    let device = Default::default();
    let mut channels = vec![1.0f32; 128];
    for c in [0, 17, 127] {
        channels[c] = 0.0;
    }
    let mut masks = vec![LayerMask::default(), LayerMask::default()];
    masks[0].channels = Some(Tensor::from_data(TensorData::new(channels, [128]), &device));
    let masked = logits(&model, &rows, Some(&masks));
    let mut surgery = model.clone();
    let down = &mut surgery.layers[0].mlp.down_proj.weight;
    for c in [0, 17, 127] {
        *down = down.clone().slice_fill([c..c + 1, 0..64], 0.0);
    }
    assert!(max_abs_diff(&masked, &logits(&surgery, &rows, None)) < 1e-6);
}

#[test]
fn the_wrong_number_of_layer_masks_is_an_error() {
    let model = model();
    let masks = vec![LayerMask::<B>::default()];
    let tokens = token_tensor::<B>(&[&[1, 2, 3]], &Default::default());
    let err = model
        .forward_with(tokens, Extras::masks(&masks))
        .unwrap_err();
    assert!(
        err.message
            .contains("1 layer masks given for a model of 2 layers"),
        "{err}"
    );
}

#[test]
fn tokenizer_reproduces_the_reference_ids() {
    // Whole texts, as transformers encodes them (scripts/make_tokenizer_reference.py).
    let reference = read_json("tiny-llama-tokens.json");
    let model = model();
    let tok = load_tokenizer(&fixtures().join("tiny-llama"), &model.config).unwrap();
    let texts = reference["texts"].as_array().unwrap();
    let expected = reference["input_ids"].as_array().unwrap();
    assert_eq!(texts.len(), expected.len());
    for (text, expected) in texts.iter().zip(expected) {
        let got = tok
            .encode(text.as_str().unwrap(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(got, ids(expected), "{text}");
    }
}

fn family_logits_match(name: &str) {
    let reference = read_json(&format!("{name}-reference.json"));
    let model = Llama::<B>::load(&fixtures().join(name), &Default::default()).unwrap();
    let ours = logits(&model, &input_rows(&reference), None);
    let diff = max_abs_diff(&ours, &floats(&reference["logits"]));
    assert!(diff < 1e-4, "{name}: max |dlogit| = {diff}");
}

#[test]
fn qwen2_with_qkv_biases_and_tied_embeddings_matches_transformers() {
    family_logits_match("tiny-qwen2");
    let model = Llama::<B>::load(&fixtures().join("tiny-qwen2"), &Default::default()).unwrap();
    assert!(
        model.layers[0].self_attn.q_proj.bias.is_some()
            && model.layers[0].self_attn.o_proj.bias.is_none()
    );
}

/// `total_params` equals the elements of every tensor in the fixture's checkpoint.
fn counts_every_stored_parameter(name: &str, model: &Llama<B>) {
    let store = maskprune_model::WeightStore::open(&fixtures().join(name)).unwrap();
    let stored: usize = store
        .names()
        .into_iter()
        .map(|n| store.shape(n).unwrap().iter().product::<usize>())
        .sum();
    assert_eq!(model.config.total_params(), stored, "{name}");
}

#[test]
fn qwen3_with_head_norms_and_explicit_head_dim_matches_transformers_dense_and_masked() {
    family_logits_match("tiny-qwen3");
    masked_logits_match("tiny-qwen3");
    let model = Llama::<B>::load(&fixtures().join("tiny-qwen3"), &Default::default()).unwrap();
    let attn = &model.layers[0].self_attn;
    assert!(attn.q_norm.is_some() && attn.k_norm.is_some() && attn.q_proj.bias.is_none());
    assert_eq!((model.config.hidden_size, model.config.head_dim), (32, 16));
    // The parameter count includes the per-head norms.
    counts_every_stored_parameter("tiny-qwen3", &model);
}

#[test]
fn gemma3_matches_transformers_dense_and_masked() {
    family_logits_match("tiny-gemma3");
    masked_logits_match("tiny-gemma3");
    let model = Llama::<B>::load(&fixtures().join("tiny-gemma3"), &Default::default()).unwrap();
    let c = &model.config;
    assert_eq!(c.sliding_layers, vec![true, false]);
    assert_eq!((c.local_rope_theta, c.rope_theta), (Some(10_000.0), 1e6));
    assert_eq!(c.activation, maskprune_model::Activation::GeluTanh);
    let layer = &model.layers[0];
    assert!(layer.attention_output_norm.is_some() && layer.mlp_output_norm.is_some());
    assert_eq!(model.embed_scale, Some(32f32.sqrt()));
    // The sandwich norms are counted, the tied embeddings once.
    counts_every_stored_parameter("tiny-gemma3", &model);
    // 40 tokens: the first layer attends through its 16-token window, the second globally.
    long_logits_match("tiny-gemma3");
}

/// Transformers' logits for the fixture's row longer than its sliding window.
fn long_logits_match(name: &str) {
    let reference = read_json(&format!("{name}-reference.json"));
    let model = Llama::<B>::load(&fixtures().join(name), &Default::default()).unwrap();
    let row = ids(&reference["long_input_ids"][0]);
    assert!(row.len() > model.config.sliding_window.unwrap());
    let ours = logits(&model, &[row], None);
    let diff = max_abs_diff(&ours, &floats(&reference["long_logits"]));
    assert!(diff < 1e-4, "{name} past its window: max |dlogit| = {diff}");
}

#[test]
fn mistral_matches_transformers_within_and_past_its_window() {
    family_logits_match("tiny-mistral");
    long_logits_match("tiny-mistral");
}

#[test]
fn sharded_and_bf16_checkpoints_load() {
    use std::collections::HashMap;
    let dir = scratch("sharded");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixtures().join("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixtures().join("tiny-llama/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        // Re-encode as bf16 in the second shard, to exercise the bf16 path too.
        let tensors: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = part
            .iter()
            .map(|n| {
                let t = st.tensor(n).unwrap();
                let f16: Vec<f32> = t
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect();
                // (`model-00001-of-00002` contains "00002" too: match the start.)
                if shard.starts_with("model-00002") {
                    let bf: Vec<u8> = f16
                        .iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect();
                    (n.clone(), bf, t.shape().to_vec(), safetensors::Dtype::BF16)
                } else {
                    (n.clone(), t.data().to_vec(), t.shape().to_vec(), t.dtype())
                }
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, b, s, d)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &dir.join(shard)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let reference = read_json("tiny-llama-reference.json");
    let model = Llama::<B>::load(&dir, &Default::default()).unwrap();
    let ours = logits(&model, &input_rows(&reference), None);
    // bf16 rounding of half the weights moves the logits a little, not a lot.
    let diff = max_abs_diff(&ours, &floats(&reference["logits"]));
    assert!(diff > 0.0 && diff < 0.1, "max |dlogit| = {diff}");
    // On burn-flex the weights stay in the checkpoint's dtype (bf16 or f16, by shard), the
    // LM head in f32; the generic path (burn-ndarray) widens them at load to the same values.
    let dtypes: std::collections::BTreeSet<String> = model
        .layers
        .iter()
        .flat_map(|l| [&l.self_attn.q_proj.weight, &l.mlp.down_proj.weight])
        .map(|w| format!("{:?}", w.dtype()))
        .collect();
    assert_eq!(
        dtypes.into_iter().collect::<Vec<_>>(),
        ["BF16", "F16"],
        "weights kept as stored"
    );
    assert_eq!(model.lm_head.dtype(), burn::tensor::DType::F32);
    let generic = Llama::<burn::backend::NdArray>::load(&dir, &Default::default()).unwrap();
    let rows = input_rows(&reference);
    let row_refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let widened: Vec<f32> = generic
        .forward(token_tensor(&row_refs, &generic.device()))
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    assert!(max_abs_diff(&ours, &widened) < 1e-4);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = Llama::<B>::load(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard") && err.contains("does not exist"),
        "{err}"
    );
}
