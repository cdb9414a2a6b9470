//! The generic inference path — burn's composed tensor ops, which burn-cuda (and every backend
//! without fused CPU kernels) runs — on the CPU through burn-ndarray (or burn-wgpu with
//! `--features wgpu`), against transformers:
//! the three fixtures' logits, masked logits, and cached decoding equal to the full forward.
//! (Its training step is checked against the fused one in `mask_gradients.rs`.) What a GPU
//! adds on top — cubecl kernels, device memory, f32 accumulation order — is for
//! `scripts/gpu-check.sh`.

use burn::tensor::{Tensor, TensorData};
use maskprune_eval::perplexity::token_tensor;
use maskprune_model::Extras;
use maskprune_model::{Kernels, KvCache, LayerMask, Llama};
use maskprune_tests::*;

/// burn-ndarray; with `--features wgpu`, burn-wgpu (cubecl kernels through wgpu on whatever
/// Vulkan device there is: lavapipe on the CPU here, the kernel family burn-cuda compiles).
#[cfg(not(feature = "wgpu"))]
type G = burn::backend::NdArray;
#[cfg(feature = "wgpu")]
type G = burn::backend::Wgpu;

fn host<const D: usize>(t: Tensor<G, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn load(name: &str) -> Llama<G> {
    Llama::load(&fixtures().join(name), &Default::default()).unwrap()
}

fn forward<Bk: Kernels>(
    model: &Llama<Bk>,
    rows: &[Vec<u32>],
    masks: Option<&[LayerMask<Bk>]>,
) -> Tensor<Bk, 3> {
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    model
        .forward_with(
            token_tensor(&rows, &model.device()),
            Extras { masks, lora: None },
        )
        .unwrap()
}

#[test]
fn generic_path_logits_match_transformers_for_every_family() {
    for name in [
        "tiny-llama",
        "tiny-mistral",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-gemma3",
    ] {
        let reference = read_json(&format!("{name}-reference.json"));
        let ours = host(forward(&load(name), &input_rows(&reference), None));
        let diff = max_abs_diff(&ours, &floats(&reference["logits"]));
        assert!(diff < 1e-4, "{name}: max |dlogit| = {diff}");
    }
}

#[test]
fn generic_path_masked_logits_match_transformers() {
    let reference = read_json("tiny-llama-reference.json");
    let model = load("tiny-llama");
    let mask = |v: &serde_json::Value| -> Option<Tensor<G, 1>> {
        (!v.is_null()).then(|| {
            let f = floats(v);
            let n = f.len();
            Tensor::from_data(TensorData::new(f, [n]), &Default::default())
        })
    };
    let masks: Vec<LayerMask<G>> = (0..2)
        .map(|l| LayerMask {
            heads: mask(&reference["head_masks"][l]),
            channels: mask(&reference["channel_masks"][l]),
        })
        .collect();
    let ours = host(forward(&model, &input_rows(&reference), Some(&masks)));
    let diff = max_abs_diff(&ours, &floats(&reference["masked_logits"]));
    assert!(diff < 1e-4, "max |dlogit| = {diff}");
    assert!(max_abs_diff(&ours, &floats(&reference["logits"])) > 1e-2);
}

#[test]
fn generic_path_cached_decoding_equals_its_full_forward_and_the_fused_path() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"] {
        let reference = read_json(&format!("{name}-reference.json"));
        let model = load(name);
        let all = input_rows(&reference);
        let full = forward(&model, &all, None);
        let rows_ref: Vec<&[u32]> = all.iter().map(Vec::as_slice).collect();
        let tokens = token_tensor::<G>(&rows_ref, &model.device());
        let t = tokens.dims()[1];
        let mut cache = KvCache::new(model.config.num_hidden_layers);
        let mut pieces = vec![model
            .forward_cached(tokens.clone().narrow(1, 0, 3), &mut cache)
            .unwrap()];
        for i in 3..t {
            pieces.push(
                model
                    .forward_cached(tokens.clone().narrow(1, i, 1), &mut cache)
                    .unwrap(),
            );
        }
        let cached = host(Tensor::cat(pieces, 1));
        let full = host(full);
        let diff = max_abs_diff(&full, &cached);
        assert!(diff < 1e-4, "{name}: cached vs full logits {diff}");
        // And the same numbers as the fused CPU path (burn-flex).
        let fused = Llama::<B>::load(&fixtures().join(name), &Default::default()).unwrap();
        let fused = values(forward(&fused, &all, None));
        let diff = max_abs_diff(&full, &fused);
        assert!(diff < 1e-4, "{name}: generic vs fused logits {diff}");
    }
}

#[test]
fn generic_path_sliding_windows_match_transformers_in_full_and_cached_decoding() {
    for name in ["tiny-mistral", "tiny-gemma3"] {
        let reference = read_json(&format!("{name}-reference.json"));
        let model = load(name);
        let row = ids(&reference["long_input_ids"][0]);
        let full = host(forward(&model, std::slice::from_ref(&row), None));
        let diff = max_abs_diff(&full, &floats(&reference["long_logits"]));
        assert!(diff < 1e-4, "{name} past its window: max |dlogit| = {diff}");
        // Decoding one token at a time past the window: the cache keeps every key, the
        // window hides the old ones.
        let tokens = token_tensor::<G>(&[&row[..]], &model.device());
        let mut cache = KvCache::new(model.config.num_hidden_layers);
        let pieces: Vec<_> = (0..row.len())
            .map(|i| {
                model
                    .forward_cached(tokens.clone().narrow(1, i, 1), &mut cache)
                    .unwrap()
            })
            .collect();
        let diff = max_abs_diff(&full, &host(Tensor::cat(pieces, 1)));
        assert!(
            diff < 1e-4,
            "{name}: cached vs full logits past the window {diff}"
        );
    }
}
