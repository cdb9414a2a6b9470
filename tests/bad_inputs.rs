//! Truncated, corrupted and contradictory inputs end in errors that name the cause, never panics.

use maskprune_gguf::{import_gguf, GgufFile, OutDtype};
use maskprune_model::{load_tokenizer, Llama, ModelConfig, WeightStore};
use maskprune_tests::*;

/// Deterministic pseudo-random numbers for corruption.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn copy_fixture(name: &str) -> std::path::PathBuf {
    let dir = scratch(name).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixtures().join("tiny-llama").join(f), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn truncated_safetensors_are_errors() {
    let dir = copy_fixture("st-trunc");
    let full = std::fs::read(dir.join("model.safetensors")).unwrap();
    for cut in [0, 4, 8, 9, 100, 1000, full.len() / 2, full.len() - 1] {
        std::fs::write(dir.join("model.safetensors"), &full[..cut]).unwrap();
        let err = WeightStore::open(&dir)
            .err()
            .expect("truncated file accepted");
        assert!(
            err.to_string()
                .contains("model.safetensors: corrupt safetensors file"),
            "{err}"
        );
    }
}

#[test]
fn corrupted_safetensors_never_panic() {
    let dir = copy_fixture("st-corrupt");
    let full = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize + 8;
    let mut rng = Lcg(1);
    let mut errors = 0;
    for _ in 0..200 {
        let mut bytes = full.clone();
        for _ in 0..3 {
            let i = (rng.next() as usize) % header_len;
            bytes[i] = rng.next() as u8;
        }
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        if let Err(e) =
            WeightStore::open(&dir).and_then(|_| Llama::<B>::load(&dir, &Default::default()))
        {
            errors += 1;
            assert!(!e.to_string().contains('\n'));
        }
    }
    assert!(errors > 50, "only {errors} of 200 corruptions detected");
}

#[test]
fn wrong_shapes_and_missing_tensors_name_the_tensor() {
    let dir = copy_fixture("st-shape");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["intermediate_size"] = 96.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = Llama::<B>::load(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "tensor `model.layers.0.mlp.gate_proj.weight` has shape [128, 64], expected [96, 64]"
        ),
        "{err}"
    );
    config["intermediate_size"] = 128.into();
    config["num_hidden_layers"] = 3.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = Llama::<B>::load(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `model.layers.2.input_layernorm.weight` is missing"),
        "{err}"
    );
}

#[test]
fn config_json_errors_name_the_file_and_field() {
    let dir = copy_fixture("cfg");
    let path = dir.join("config.json");
    for (text, expected) in [
        ("", "not valid JSON"),
        ("{\"model_type\": \"llama\"", "not valid JSON"),
        ("{\"model_type\": \"gpt_neox\"}", "unsupported `model_type`"),
        (
            "{\"model_type\": \"llama\", \"hidden_size\": 64}",
            "missing field `intermediate_size`",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = ModelConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string()) && err.contains(expected),
            "{err}"
        );
    }
    std::fs::remove_file(&path).unwrap();
    assert!(ModelConfig::from_file(&path)
        .unwrap_err()
        .to_string()
        .contains("cannot read config"));
}

#[test]
fn tokenizer_that_does_not_fit_the_vocab_is_refused() {
    let dir = copy_fixture("tok");
    let mut config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    config.vocab_size = 100;
    let err = load_tokenizer(&dir, &config).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer has 288 tokens but config.json `vocab_size` is 100"),
        "{err}"
    );
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    assert!(load_tokenizer(&dir, &config)
        .unwrap_err()
        .to_string()
        .contains("cannot load tokenizer"));
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert!(load_tokenizer(&dir, &config)
        .unwrap_err()
        .to_string()
        .contains("tokenizer.json is missing"));
}

#[test]
fn truncated_gguf_is_an_error_at_every_length() {
    let full = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
    let mut cut = 0;
    while cut < full.len() {
        let err = GgufFile::from_bytes(full[..cut].to_vec())
            .err()
            .unwrap_or_else(|| panic!("accepted a file cut at {cut}"));
        assert!(!err.contains('\n'));
        cut += if cut < 20_000 { 7 } else { 4001 };
    }
    assert!(GgufFile::from_bytes(full).is_ok());
}

#[test]
fn corrupted_gguf_never_panics() {
    let full = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
    let header = 16_000.min(full.len());
    let mut rng = Lcg(2);
    let mut errors = 0;
    for _ in 0..3000 {
        let mut bytes = full.clone();
        let i = (rng.next() as usize) % header;
        bytes[i] = rng.next() as u8;
        if GgufFile::from_bytes(bytes).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 100, "only {errors} corruptions detected");
}

#[test]
fn lying_gguf_headers_are_refused() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes()); // tensors
    bytes.extend(1u64.to_le_bytes());
    let err = GgufFile::from_bytes(bytes).err().unwrap();
    assert!(err.contains("more than the file can hold"), "{err}");

    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(3u64.to_le_bytes());
    bytes.extend(b"key");
    bytes.extend(8u32.to_le_bytes()); // string
    bytes.extend((1u64 << 60).to_le_bytes());
    let err = GgufFile::from_bytes(bytes).err().unwrap();
    assert!(err.contains("exceeds the file size"), "{err}");

    assert!(GgufFile::from_bytes(b"GGML\x03\0\0\0".to_vec())
        .err()
        .unwrap()
        .contains("bad magic"));
    let mut v9 = b"GGUF".to_vec();
    v9.extend(9u32.to_le_bytes());
    v9.extend([0u8; 16]);
    assert!(GgufFile::from_bytes(v9)
        .err()
        .unwrap()
        .contains("unsupported GGUF version 9"));
}

#[test]
fn importing_a_broken_gguf_writes_nothing() {
    let root = scratch("bad-import");
    let full = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
    let bad = root.join("bad.gguf");
    std::fs::write(&bad, &full[..full.len() - 100]).unwrap();
    let out = root.join("out");
    let err = import_gguf(&bad, &out, OutDtype::F32, false, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&bad.display().to_string())
            && err.contains("runs past the end of the file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        1,
        "something was written"
    );
}
