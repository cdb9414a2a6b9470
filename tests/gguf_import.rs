//! GGUF import: dequantisers against gguf-py, and the tiny fixture's GGUF imported back to
//! exactly the checkpoint it was written from.

use maskprune_eval::perplexity::token_tensor;
use maskprune_gguf::quant::{dequantize, GgmlType};
use maskprune_gguf::{import_gguf, GgufFile, OutDtype};
use maskprune_model::{load_tokenizer, Llama, ModelConfig, WeightStore};
use maskprune_tests::*;

fn ggml_type(name: &str) -> GgmlType {
    let id = match name {
        "Q4_0" => 2,
        "Q4_1" => 3,
        "Q5_0" => 6,
        "Q5_1" => 7,
        "Q8_0" => 8,
        "Q4_K" => 12,
        "Q5_K" => 13,
        "Q6_K" => 14,
        other => panic!("unknown type {other}"),
    };
    GgmlType::from_id(id).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn dequantisers_agree_with_gguf_py() {
    let vectors = read_json("gguf-quant-vectors.json");
    let vectors = vectors["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), 8);
    for v in vectors {
        let name = v["type"].as_str().unwrap();
        let ours = dequantize(ggml_type(name), &hex(v["bytes_hex"].as_str().unwrap()));
        let theirs = floats(&v["values"]);
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name}[{i}]: {a} vs gguf-py {b}"
            );
        }
    }
}

#[test]
fn tiny_gguf_imports_to_the_original_checkpoint() {
    let out = scratch("tiny-import").join("model");
    let mut calls = 0;
    let report = import_gguf(
        &fixtures().join("tiny-llama.gguf"),
        &out,
        OutDtype::F32,
        false,
        &mut |_, _| calls += 1,
    )
    .unwrap();
    assert_eq!(calls, report.tensors);
    let original = ModelConfig::from_file(&fixtures().join("tiny-llama/config.json")).unwrap();
    let imported = ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(
        (
            imported.hidden_size,
            imported.intermediate_size,
            imported.num_attention_heads,
            imported.num_key_value_heads
        ),
        (
            original.hidden_size,
            original.intermediate_size,
            original.num_attention_heads,
            original.num_key_value_heads
        )
    );
    assert_eq!(
        (
            imported.head_dim,
            imported.vocab_size,
            imported.tie_word_embeddings
        ),
        (16, original.vocab_size, false)
    );
    assert_eq!(imported.rope_theta, original.rope_theta);
    assert_eq!(imported.rms_norm_eps, original.rms_norm_eps);
    // Tensor by tensor, exactly (q/k un-permuted, names mapped).
    let a = WeightStore::open(&fixtures().join("tiny-llama")).unwrap();
    let b = WeightStore::open(&out).unwrap();
    assert_eq!(a.names(), b.names());
    let st = std::fs::read(fixtures().join("tiny-llama/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    for name in a.names() {
        let shape = st.tensor(name).unwrap().shape().to_vec();
        assert_eq!(
            a.read_f32(name, &shape).unwrap(),
            b.read_f32(name, &shape).unwrap(),
            "{name}"
        );
    }
    // Same logits as transformers on the original.
    let reference = read_json("tiny-llama-reference.json");
    let rows: Vec<Vec<u32>> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let rows_ref: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let model = Llama::<B>::load(&out, &Default::default()).unwrap();
    let logits = values(
        model
            .forward(token_tensor(&rows_ref, &model.device()))
            .unwrap(),
    );
    assert!(max_abs_diff(&logits, &floats(&reference["logits"])) < 1e-4);
    // The tokenizer rebuilt from GGUF metadata encodes like the original.
    let tok = load_tokenizer(&out, &model.config).unwrap();
    let orig = load_tokenizer(&fixtures().join("tiny-llama"), &model.config).unwrap();
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "Masks <|endoftext|> widths, 12345!",
    ] {
        assert_eq!(
            tok.encode(text, true).unwrap().get_ids(),
            orig.encode(text, true).unwrap().get_ids(),
            "{text}"
        );
    }
    // Importing again over it is refused without --overwrite, and works with it.
    let err = import_gguf(
        &fixtures().join("tiny-llama.gguf"),
        &out,
        OutDtype::F32,
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.message.contains("already exists"), "{err}");
    import_gguf(
        &fixtures().join("tiny-llama.gguf"),
        &out,
        OutDtype::BF16,
        true,
        &mut |_, _| {},
    )
    .unwrap();
    let bf16 = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(bf16.contains("bfloat16"));
}

#[test]
fn gguf_parser_reads_the_fixture_metadata() {
    let f = GgufFile::open(&fixtures().join("tiny-llama.gguf")).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(
        f.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    assert_eq!(
        f.get("llama.attention.head_count_kv")
            .and_then(|v| v.as_u64()),
        Some(2)
    );
    let q = f
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(
        (q.torch_shape(), q.ggml_type),
        (vec![64, 64], GgmlType::F16)
    );
}

#[test]
fn qwen2_exports_as_its_own_architecture_and_imports_back() {
    // llama.cpp's `qwen2`: q/k/v biases, rows in Hugging Face's order (no rotary permutation).
    let worst = export_round_trip(
        &fixtures().join("tiny-qwen2"),
        &[(GgmlType::F32, 0.0), (GgmlType::Q8_0, 1e-2)],
    );
    eprintln!("largest relative RMS error per type: {worst:?}");
    let file = exported_f32("tiny-qwen2");
    let arch = file.get("general.architecture").and_then(|v| v.as_str());
    assert_eq!(arch, Some("qwen2"));
    assert!(file.get("qwen2.block_count").is_some());
    assert!(file.tensors.iter().any(|t| t.name == "blk.0.attn_q.bias"));
}

/// The fixture `name` exported as an f32 GGUF, opened.
fn exported_f32(name: &str) -> GgufFile {
    let out = scratch(&format!("export-{name}-arch")).join(format!("{name}.gguf"));
    maskprune_gguf::export_gguf(
        &fixtures().join(name),
        &out,
        GgmlType::F32,
        false,
        &mut |_, _| {},
    )
    .unwrap();
    GgufFile::open(&out).unwrap()
}

#[test]
fn qwen3_exports_with_its_head_norms_and_imports_back() {
    // llama.cpp's `qwen3`: per-head q/k norms (`attn_q_norm`, `attn_k_norm`), an explicit
    // head width (`attention.key_length`), rows in Hugging Face's order.
    let worst = export_round_trip(
        &fixtures().join("tiny-qwen3"),
        &[(GgmlType::F32, 0.0), (GgmlType::Q8_0, 1e-2)],
    );
    eprintln!("largest relative RMS error per type: {worst:?}");
    let file = exported_f32("tiny-qwen3");
    let arch = file.get("general.architecture").and_then(|v| v.as_str());
    assert_eq!(arch, Some("qwen3"));
    let key_length = file
        .get("qwen3.attention.key_length")
        .and_then(|v| v.as_u64());
    assert_eq!(key_length, Some(16));
    for name in ["blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"] {
        assert!(file.tensors.iter().any(|t| t.name == name), "{name}");
    }
}

#[test]
fn exported_gguf_imports_back_within_each_types_precision() {
    let worst = export_round_trip(
        &fixtures().join("tiny-llama"),
        &[
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 8e-3),
            (GgmlType::Q8_0, 1e-2),
            (GgmlType::Q4_0, 0.2),
            // Rows of 64: k-quants fall back to q8_0 (SmolLM2's test covers them for real).
            (GgmlType::Q4K, 1e-2),
            (GgmlType::Q6K, 1e-2),
        ],
    );
    eprintln!("largest relative RMS error per type: {worst:?}");
}

#[test]
fn sentencepiece_gguf_tokenizers_encode_and_decode_as_transformers_loader_does() {
    // tests/fixtures/tiny-spm.gguf: `tokenizer.ggml.model = llama` (pieces, scores, byte
    // tokens, no merges); the reference is transformers' GGUF tokenizer loader on the same file
    // (scripts/make_tokenizer_reference.py).
    let file = GgufFile::open(&fixtures().join("tiny-spm.gguf")).unwrap();
    let files = maskprune_gguf::tokenizer::build_tokenizer(&file).unwrap();
    let tokenizer: tokenizers::Tokenizer = files.tokenizer.to_string().parse().unwrap();
    let reference = read_json("tiny-spm-tokens.json");
    let texts = reference["texts"].as_array().unwrap();
    for (i, text) in texts.iter().enumerate() {
        let text = text.as_str().unwrap();
        let got = tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(got, ids(&reference["input_ids"][i]), "{text}");
        let decoded = tokenizer.decode(&got, true).unwrap();
        assert_eq!(decoded, reference["decoded"][i].as_str().unwrap(), "{text}");
    }
    // A character outside the pieces falls back to its UTF-8 bytes, never `<unk>`.
    let cjk = tokenizer.encode("東", false).unwrap();
    assert_eq!(cjk.get_tokens(), ["▁", "<0xE6>", "<0x9D>", "<0xB1>"]);
}

/// A copy of the tiny Gemma-3 that llama.cpp's `gemma3` can represent: its layers follow
/// llama.cpp's pattern (every 6th global: with two layers, both sliding) and attention is
/// scaled by `head_dim^-1/2` (`query_pre_attn_scalar` = `head_dim`).
fn llama_cpp_shaped_gemma3() -> std::path::PathBuf {
    let src = fixtures().join("tiny-gemma3");
    let dir = scratch("gemma3-llama-cpp-shaped").join("tiny-gemma3-swa");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["layer_types"] = serde_json::json!(["sliding_attention", "sliding_attention"]);
    config["query_pre_attn_scalar"] = 16.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn gemma3_exports_with_its_norm_offset_and_imports_back_to_the_same_model() {
    let dir = llama_cpp_shaped_gemma3();
    let worst = export_round_trip(&dir, &[(GgmlType::F32, 0.0), (GgmlType::Q8_0, 1e-2)]);
    eprintln!("largest relative RMS error per type: {worst:?}");
    let gguf = dir.with_extension("gguf");
    maskprune_gguf::export_gguf(&dir, &gguf, GgmlType::F32, false, &mut |_, _| {}).unwrap();
    let file = GgufFile::open(&gguf).unwrap();
    assert_eq!(
        file.get("general.architecture").and_then(|v| v.as_str()),
        Some("gemma3")
    );
    let window = file.get("gemma3.attention.sliding_window");
    assert_eq!(window.and_then(|v| v.as_u64()), Some(16));
    // llama.cpp's converter stores Gemma's norms as `1 + w`.
    let original = WeightStore::open(&dir).unwrap();
    let name = "model.layers.1.post_feedforward_layernorm.weight";
    let w = original.read_f32(name, &[32]).unwrap();
    let info = file
        .tensors
        .iter()
        .find(|t| t.name == "blk.1.post_ffw_norm.weight")
        .unwrap();
    let stored = dequantize(info.ggml_type, file.tensor_bytes(info));
    assert!(w.iter().zip(&stored).all(|(w, s)| *s == w + 1.0));
    // Imported back: the same architecture and the same logits.
    let back = dir.with_extension("imported");
    import_gguf(&gguf, &back, OutDtype::F32, false, &mut |_, _| {}).unwrap();
    let (a, b) = (
        Llama::<B>::load(&dir, &Default::default()).unwrap(),
        Llama::<B>::load(&back, &Default::default()).unwrap(),
    );
    let (ca, cb) = (&a.config, &b.config);
    assert_eq!(
        (ca.sliding_window, &ca.sliding_layers, ca.local_rope_theta),
        (cb.sliding_window, &cb.sliding_layers, cb.local_rope_theta)
    );
    assert_eq!(
        (ca.query_scale, ca.activation, ca.rope_theta),
        (cb.query_scale, cb.activation, cb.rope_theta)
    );
    let reference = read_json("tiny-gemma3-reference.json");
    let row = ids(&reference["long_input_ids"][0]);
    let logits = |m: &Llama<B>| values(m.forward(token_tensor(&[&row[..]], &m.device())).unwrap());
    assert_eq!(logits(&a), logits(&b));
}

#[test]
fn gemma3_layouts_llama_cpp_cannot_run_are_refused_with_the_reason() {
    // The fixture's second layer is global and its `query_pre_attn_scalar` is 24.
    let out = scratch("gemma3-refused").join("x.gguf");
    let err = maskprune_gguf::export_gguf(
        &fixtures().join("tiny-gemma3"),
        &out,
        GgmlType::F32,
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.message.contains("every 6th layer global"), "{err}");
    assert!(!out.exists());
}
