//! Property-based fuzzing of every parser that reads user files: GGUF header and metadata
//! (and the config and tokenizer built from them), safetensors headers (and reading every
//! tensor through them), config.json, prune plans and calibration sets. Inputs are valid files
//! mutated at random (bytes overwritten, lengths truncated, fields removed or replaced); the
//! property is that a parser returns `Ok` or `Err` and never panics. Each property runs the
//! case count given to `cases` below; `MASKPRUNE_FUZZ_CASES` scales them.

use std::sync::atomic::{AtomicUsize, Ordering};

use maskprune_gguf::import::{hf_config, OutDtype};
use maskprune_gguf::reader::GgufFile;
use maskprune_gguf::tokenizer::build_tokenizer;
use maskprune_model::{ModelConfig, WeightStore};
use maskprune_surgery::PrunePlan;
use maskprune_tests::*;
use proptest::prelude::*;
use serde_json::Value;

fn cases(default: u32) -> ProptestConfig {
    let scale: f64 = std::env::var("MASKPRUNE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    ProptestConfig {
        cases: ((default as f64) * scale).max(1.0) as u32,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A mutation of a byte buffer: overwrite bytes near the start (headers live there),
/// overwrite bytes anywhere, or truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Head(Vec<(usize, u8)>),
    Anywhere(Vec<(usize, u8)>),
    /// Write a little-endian u64 at an offset (lengths, counts, offsets that lie).
    Word(usize, u64),
    Truncate(usize),
}

fn mutation(head: usize) -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0u64),
        Just(1u64),
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(1u64 << 40),
        any::<u64>()
    ];
    prop_oneof![
        prop::collection::vec((0..head, any::<u8>()), 1..8).prop_map(Mutation::Head),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..8).prop_map(Mutation::Anywhere),
        (0..head, interesting).prop_map(|(o, v)| Mutation::Word(o, v)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &[u8], m: &Mutation) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match m {
        Mutation::Head(edits) | Mutation::Anywhere(edits) => {
            for &(i, v) in edits {
                let n = b.len();
                b[i % n] = v;
            }
        }
        Mutation::Word(o, v) => {
            let o = (*o).min(b.len().saturating_sub(8));
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::Truncate(n) => b.truncate(n % (bytes.len() + 1)),
    }
    b
}

/// Numbers the safetensors cases' scratch directories.
static SAFETENSORS: AtomicUsize = AtomicUsize::new(0);

proptest! {
    #![proptest_config(cases(10000))]
    #[test]
    fn gguf_parsing_never_panics(m in mutation(4096)) {
        let base = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
        let bytes = apply(&base, &m);
        if let Ok(file) = GgufFile::from_bytes(bytes) {
            let _ = hf_config(&file, OutDtype::F32);
            let _ = build_tokenizer(&file);
            for t in &file.tensors {
                let _ = file.tensor_bytes(t);
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(2000))]
    #[test]
    fn safetensors_parsing_never_panics(m in mutation(2048)) {
        let src = fixtures().join("tiny-llama");
        let base = std::fs::read(src.join("model.safetensors")).unwrap();
        let dir = scratch(&format!("fuzz-st-{}", SAFETENSORS.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(dir.join("model.safetensors"), apply(&base, &m)).unwrap();
        if let Ok(store) = WeightStore::open(&dir) {
            for name in store.names() {
                let shape = store.shape(name).unwrap().to_vec();
                let _ = store.read_f32(name, &shape);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A JSON mutation: drop a key, or set a key (existing or new) to an arbitrary value.
fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![Just(0i64), Just(-1), Just(1), Just(3), Just(1 << 40)].prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::from),
        prop::collection::vec(0u64..10, 0..4).prop_map(Value::from),
    ]
}

fn mutate_object(v: &mut Value, edits: &[(usize, Option<Value>)], extra_keys: &[&str]) {
    let obj = v.as_object_mut().unwrap();
    for (k, value) in edits {
        let mut keys: Vec<String> = obj.keys().cloned().collect();
        keys.extend(extra_keys.iter().map(|s| s.to_string()));
        let key = keys[k % keys.len()].clone();
        match value {
            None => {
                obj.remove(&key);
            }
            Some(x) => {
                obj.insert(key, x.clone());
            }
        }
    }
}

proptest! {
    #![proptest_config(cases(20000))]
    #[test]
    fn config_parsing_never_panics(edits in prop::collection::vec((any::<usize>(), prop::option::of(json_value())), 1..5)) {
        let text = std::fs::read_to_string(fixtures().join("tiny-llama/config.json")).unwrap();
        let mut v: Value = serde_json::from_str(&text).unwrap();
        mutate_object(&mut v, &edits, &["rope_scaling", "sliding_window", "num_key_value_heads", "model_type", "head_dim"]);
        if let Ok(c) = ModelConfig::from_json_str(&v.to_string()) {
            // Whatever parses must give finite, consistent counts.
            let _ = c.total_params();
            prop_assert!(c.num_attention_heads % c.num_key_value_heads.max(1) == 0);
        }
    }
}

proptest! {
    #![proptest_config(cases(20000))]
    #[test]
    fn plans_and_masks_never_panic(
        layer in 0usize..3,
        field in 0usize..3,
        indices in prop::collection::vec(any::<u16>(), 0..8),
        granularity in prop_oneof![Just("kv_group"), Just("query_head"), Just("bogus")],
        extra_layers in 0usize..2,
    ) {
        let config = ModelConfig::from_file(&fixtures().join("tiny-llama/config.json")).unwrap();
        let mut plan = serde_json::json!({
            "method": "fuzz", "granularity": granularity,
            "layers": (0..2 + extra_layers).map(|_| serde_json::json!({
                "query_heads": [0, 1, 2, 3], "kv_heads": [0, 1], "channels": (0..64).collect::<Vec<_>>()
            })).collect::<Vec<_>>(),
        });
        let name = ["query_heads", "kv_heads", "channels"][field];
        if let Some(l) = plan["layers"].get_mut(layer) {
            l[name] = serde_json::json!(indices);
        }
        if let Ok(p) = serde_json::from_str::<PrunePlan>(&plan.to_string()) {
            if p.validate(&config).is_ok() {
                // A valid plan gives masks of the model's shape.
                let masks = p.masks::<B>(&config, &Default::default());
                prop_assert_eq!(masks.len(), config.num_hidden_layers);
            }
            let _ = p.validate_masked(&config);
        }
    }
}
