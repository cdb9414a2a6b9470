//! `maskprune report`: plots and a report of a mask-training run directory.

use std::path::PathBuf;

/// Arguments of `report`.
#[derive(clap::Args)]
pub struct Args {
    /// Run directory (from `train-masks` or `prune`).
    run_dir: PathBuf,
    /// A results table (markdown, e.g. `table.md` of `maskprune table`) to include.
    #[arg(long)]
    results: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let out = maskprune_report::write_report(&a.run_dir, a.results.as_deref())
        .map_err(anyhow::Error::msg)?;
    println!("report: {}", out.join("report.md").display());
    Ok(())
}
