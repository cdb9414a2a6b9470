//! Helpers shared by the integration tests: fixture paths, reference files, scratch dirs.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::Tensor;
use maskprune_gguf::{export_gguf, import_gguf, GgmlType, OutDtype};
use maskprune_model::{load_tokenizer, ModelConfig, WeightStore};
use serde_json::Value;

/// The CPU backend the tests run on.
pub type B = Flex;

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A parsed JSON fixture.
pub fn read_json(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A tensor's values.
pub fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The evaluation and calibration data (WikiText-2, PTB, C4, the zero-shot tasks):
/// `$MASKPRUNE_DATA`, else `../shared/data` next to the checkout. When absent, `None` (the
/// test says it skipped) — unless `MASKPRUNE_REQUIRE_DATA=1` (set by `scripts/test.sh`
/// whenever it finds the data), where absence is a failure.
pub fn data_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MASKPRUNE_DATA")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    if dir.join("wikitext2").is_dir() {
        return Some(dir);
    }
    if std::env::var("MASKPRUNE_REQUIRE_DATA").as_deref() == Ok("1") {
        panic!("evaluation data not found at {}", dir.display());
    }
    eprintln!("skipping: evaluation data not found at {}", dir.display());
    None
}

/// A fresh, empty scratch directory unique to this test process and `name`. It stays after
/// the test for inspection; the first call of a later test process removes the scratch
/// directories of test processes that no longer run (they reach gigabytes with SmolLM2).
pub fn scratch(name: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(remove_stale_scratch);
    let d = std::env::temp_dir().join(format!("maskprune-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes `maskprune-test-*-PID` directories whose process is gone (Linux: no /proc/PID).
fn remove_stale_scratch() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("maskprune-test-") else {
            continue;
        };
        let Some(pid) = rest.rsplit('-').next().filter(|p| p.parse::<u32>().is_ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The token rows (`input_ids`) of a reference file.
pub fn input_rows(reference: &Value) -> Vec<Vec<u32>> {
    reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect()
}

/// The token rows of the tiny fixture's reference file.
pub fn reference_rows() -> Vec<Vec<u32>> {
    input_rows(&read_json("tiny-llama-reference.json"))
}

/// RMS of `a − b` over the RMS of `a`.
pub fn relative_rms(a: &[f32], b: &[f32]) -> f64 {
    let err: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (err / norm.max(1e-30)).sqrt()
}

/// Exports `dir` as each type, imports it back, and checks every weight against the
/// original: equal for f32, within the type's precision otherwise (`bounds`: type, largest
/// relative RMS error of a tensor). Returns the largest errors.
pub fn export_round_trip(dir: &Path, bounds: &[(GgmlType, f64)]) -> Vec<(GgmlType, f64)> {
    let scratch = scratch(&format!(
        "export-{}",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let original = WeightStore::open(dir).unwrap();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let mut worst = Vec::new();
    for &(ty, bound) in bounds {
        let gguf = scratch.join(format!("{}.gguf", ty.name()));
        export_gguf(dir, &gguf, ty, false, &mut |_, _| {}).unwrap();
        let back = scratch.join(ty.name());
        import_gguf(&gguf, &back, OutDtype::F32, false, &mut |_, _| {}).unwrap();
        assert_eq!(
            ModelConfig::from_file(&back.join("config.json"))
                .unwrap()
                .family,
            config.family
        );
        let store = WeightStore::open(&back).unwrap();
        let mut largest = 0.0f64;
        for name in original.names() {
            let shape = original.shape(name).unwrap().to_vec();
            let a = original.read_f32(name, &shape).unwrap();
            let b = store.read_f32(name, &shape).unwrap();
            let e = relative_rms(&a, &b);
            if ty == GgmlType::F32 {
                assert!(
                    a == b,
                    "{}: `{name}` changed in an f32 round trip",
                    ty.name()
                );
            }
            largest = largest.max(e);
        }
        assert!(
            largest <= bound,
            "{}: a tensor's relative RMS error is {largest} > {bound}",
            ty.name()
        );
        // The tokenizer rebuilt from the GGUF's metadata encodes as the original.
        let (t0, t1) = (
            load_tokenizer(dir, &config).unwrap(),
            load_tokenizer(&back, &config).unwrap(),
        );
        for text in [
            "Hello, world! 123",
            "  pruning\nstructured\tmodels  ",
            "<|endoftext|>x",
        ] {
            assert_eq!(
                t0.encode(text, true).unwrap().get_ids(),
                t1.encode(text, true).unwrap().get_ids(),
                "{}: {text:?}",
                ty.name()
            );
        }
        worst.push((ty, largest));
    }
    worst
}
