//! `maskprune import-gguf` (GGUF file to Hugging Face directory) and `maskprune export-gguf`
//! (Hugging Face directory to the GGUF llama.cpp loads).

use std::path::PathBuf;
use std::time::Instant;

use maskprune_gguf::{export_gguf, import_gguf, GgmlType, OutDtype};

use crate::progress;

/// Arguments of `import-gguf`.
#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file.
    gguf: PathBuf,
    /// Output model directory (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Element type of the written weights: f32 (exact), bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dtype = match args.dtype.as_str() {
        "bf16" => OutDtype::BF16,
        "f16" => OutDtype::F16,
        _ => OutDtype::F32,
    };
    let start = Instant::now();
    let report = progress::over_tensors("import", |progress| {
        import_gguf(&args.gguf, &args.out, dtype, args.overwrite, progress)
    })?;
    let types = type_counts(&report.source_types);
    println!(
        "imported {} -> {} ({} tensors [{}], {} parameters, {}) in {:.1}s",
        args.gguf.display(),
        args.out.display(),
        report.tensors,
        types,
        report.params,
        dtype.torch_name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Arguments of `export-gguf`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// The model directory (Hugging Face layout; a pruned one included).
    dir: PathBuf,
    /// Output GGUF file (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Weight encoding. Norms stay f32; a quantised type whose blocks a tensor's rows do not
    /// fill falls back to q8_0, then f16 (listed in the file's `maskprune.fallback_tensors`).
    #[arg(long = "type", default_value = "f16", value_parser = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k"])]
    ty: String,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let ty = match args.ty.as_str() {
        "f32" => GgmlType::F32,
        "bf16" => GgmlType::BF16,
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        "q4_k" => GgmlType::Q4K,
        "q6_k" => GgmlType::Q6K,
        _ => GgmlType::F16,
    };
    let start = Instant::now();
    let report = progress::over_tensors("export", |progress| {
        export_gguf(&args.dir, &args.out, ty, args.overwrite, progress)
    })?;
    let types = type_counts(&report.types);
    println!(
        "exported {} -> {} ({} tensors [{}], {:.1} MB) in {:.1}s{}",
        args.dir.display(),
        args.out.display(),
        report.tensors,
        types,
        report.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        if report.fallbacks.is_empty() {
            String::new()
        } else {
            format!(
                "; {} tensors whose rows do not fill {} blocks written as {}",
                report.fallbacks.len(),
                ty.name(),
                report
                    .fallbacks
                    .iter()
                    .map(|(_, t)| t.name())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join("/")
            )
        }
    );
    Ok(())
}

/// "61 f32, 211 q8_0": tensors per type.
fn type_counts<K: std::fmt::Display, V: std::fmt::Display>(
    counts: &std::collections::BTreeMap<K, V>,
) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}
