//! SmolLM2-135M-Instruct imported from its PyPI GGUF, against transformers' numbers
//! (tests/fixtures/smollm2-reference.json, from scripts/make_smollm2_reference.py).
//!
//! The model directory comes from `$MASKPRUNE_SMOLLM2` or `~/.cache/maskprune/models/smollm2-135m-instruct`
//! (`scripts/fetch-smollm2.sh` puts it there). When it is absent the tests say so and pass,
//! unless `MASKPRUNE_REQUIRE_SMOLLM2=1` (set by `.ci/run`), where absence is a failure.

use std::path::PathBuf;

use maskprune_data::{load_dataset, windows};
use maskprune_eval::perplexity::{perplexity, token_tensor};
use maskprune_model::{load_tokenizer, Llama};
use maskprune_tests::*;

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MASKPRUNE_SMOLLM2")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/maskprune/models/smollm2-135m-instruct"))
        })?;
    if dir.join("config.json").is_file() {
        return Some(dir);
    }
    if std::env::var("MASKPRUNE_REQUIRE_SMOLLM2").as_deref() == Ok("1") {
        panic!(
            "SmolLM2 not found at {} (run scripts/fetch-smollm2.sh)",
            dir.display()
        );
    }
    eprintln!(
        "skipping: SmolLM2 not found at {} (run scripts/fetch-smollm2.sh)",
        dir.display()
    );
    None
}

#[test]
fn smollm2_logits_and_tokens_match_transformers() {
    let Some(dir) = model_dir() else { return };
    let reference = read_json("smollm2-reference.json");
    let model = Llama::<B>::load(&dir, &Default::default()).unwrap();
    let tok = load_tokenizer(&dir, &model.config).unwrap();
    let subset: Vec<usize> = ids(&reference["vocab_subset"])
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let vocab = model.config.vocab_size;
    for s in reference["sentences"].as_array().unwrap() {
        let expected_ids = ids(&s["input_ids"]);
        let got = tok
            .encode(s["text"].as_str().unwrap(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(got, expected_ids, "tokenizer disagrees with transformers");
        let logits = values(
            model
                .forward(token_tensor(&[&got[..]], &model.device()))
                .unwrap(),
        );
        let mut worst = 0.0f32;
        for (t, row) in s["subset_logits"].as_array().unwrap().iter().enumerate() {
            let ours: Vec<f32> = subset.iter().map(|&v| logits[t * vocab + v]).collect();
            worst = worst.max(max_abs_diff(&ours, &floats(row)));
            let full = &logits[t * vocab..(t + 1) * vocab];
            let max = full.iter().cloned().fold(f32::MIN, f32::max);
            let lse = max + full.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            worst = worst.max((lse - s["logsumexp"][t].as_f64().unwrap() as f32).abs());
            let argmax = full
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(
                argmax as u64,
                s["argmax"][t].as_u64().unwrap(),
                "argmax at position {t}"
            );
        }
        assert!(worst < 1e-3, "max |dlogit| {worst} on {:?}", s["text"]);
    }
}

#[test]
fn smollm2_wikitext2_perplexity_matches_transformers() {
    let Some(dir) = model_dir() else { return };
    let reference = read_json("smollm2-reference.json");
    let Some(data) = data_dir() else { return };
    let text = load_dataset("wikitext2", Some(&data)).unwrap();
    let model = Llama::<B>::load(&dir, &Default::default()).unwrap();
    let tok = load_tokenizer(&dir, &model.config).unwrap();
    let enc = tok.encode(text.text.as_str(), true).unwrap();
    for (seq_len, n, key) in [
        (128, 8, "wikitext2_first8x128"),
        (1024, 1, "wikitext2_first1x1024"),
    ] {
        let wins = windows(enc.get_ids(), seq_len, Some(n));
        let result = perplexity(&model, &wins, 4, None, &mut |_| {}).unwrap();
        let expected = reference[key]["mean_nll"].as_f64().unwrap();
        assert!(
            (result.mean_nll - expected).abs() < 2e-5,
            "{key}: mean NLL {} vs transformers {expected}",
            result.mean_nll
        );
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    // tests/fixtures/smollm2-generate.json: scripts/make_generate_reference.py, 32 tokens of
    // `generate(do_sample=False)` without an end-of-text stop, dense and pruned with the
    // committed 50% plan (no adapters).
    let Some(dir) = model_dir() else { return };
    use maskprune_eval::{generate, Sampling};
    let reference = read_json("smollm2-generate.json");
    let plan_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../results/smollm2-135m/plan-maskprune-50.json");
    let plan: maskprune_surgery::PrunePlan =
        serde_json::from_str(&std::fs::read_to_string(plan_path).unwrap()).unwrap();
    let pruned = scratch("generate-pruned").join("model");
    maskprune_surgery::prune_checkpoint(&dir, &plan, &pruned, false).unwrap();
    for (key, model_dir) in [("dense", &dir), ("pruned_50", &pruned)] {
        let model = Llama::<B>::load(model_dir, &Default::default()).unwrap();
        for case in reference[key].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            let out = generate(&model, &prompt, 32, Sampling::GREEDY, &[], &mut |_| true).unwrap();
            assert_eq!(
                out.tokens,
                ids(&case["greedy"]),
                "{key}: greedy continuation of {:?} differs from transformers'",
                case["prompt"]
            );
        }
    }
}

#[test]
fn smollm2_exports_to_gguf_and_back_within_each_types_precision() {
    let Some(dir) = model_dir() else { return };
    use maskprune_gguf::GgmlType;
    // f32 exact; the others within their precision (rows of 576 fill no k-quant block, so
    // those tensors fall back to q8_0; the 1536-wide down projections are k-quantised).
    let worst = export_round_trip(
        &dir,
        &[
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::Q8_0, 1e-2),
            (GgmlType::Q6K, 2e-2),
            (GgmlType::Q4K, 0.1),
        ],
    );
    eprintln!("largest relative RMS error of a tensor per type: {worst:?}");
}
