//! `maskprune import-gguf`: GGUF file to Hugging Face directory.

use std::path::PathBuf;
use std::time::Instant;

use maskprune_gguf::{import_gguf, OutDtype};

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
    let pb = progress::bar("import", 0, "tensors");
    let report = import_gguf(
        &args.gguf,
        &args.out,
        dtype,
        args.overwrite,
        &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish_and_clear();
    let types: Vec<String> = report
        .source_types
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    println!(
        "imported {} -> {} ({} tensors [{}], {} parameters, {}) in {:.1}s",
        args.gguf.display(),
        args.out.display(),
        report.tensors,
        types.join(", "),
        report.params,
        dtype.torch_name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
