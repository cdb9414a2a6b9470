//! `maskprune datasets`: the built-in corpora and where (or whether) they were found.

use std::path::PathBuf;

use maskprune_data::{builtin_manifests, data_dir_candidates};

/// Arguments of `datasets`.
#[derive(clap::Args)]
pub struct Args {
    /// Only this dataset; the exit status says whether its file was found.
    name: Option<String>,
    /// Data directory (default: $MASKPRUNE_DATA, ../shared/data, ~/.cache/maskprune/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let candidates = data_dir_candidates(args.data_dir.as_deref());
    let manifests: Vec<_> = builtin_manifests()
        .into_iter()
        .filter(|m| args.name.as_ref().is_none_or(|n| *n == m.name))
        .collect();
    if let Some(name) = &args.name {
        anyhow::ensure!(!manifests.is_empty(), "unknown dataset `{name}`");
    }
    let mut missing = None;
    for m in &manifests {
        let found = candidates
            .iter()
            .map(|d| d.join(&m.file))
            .find(|p| p.is_file());
        let role = format!("{:?}", m.role).to_lowercase();
        match &found {
            Some(p) => println!(
                "{:<10} {:<12} {}  ({})",
                m.name,
                role,
                p.display(),
                m.description
            ),
            None => {
                println!(
                    "{:<10} {:<12} missing: {}  ({})",
                    m.name, role, m.file, m.description
                );
                missing = Some(m.name.clone());
            }
        }
    }
    match (&args.name, missing) {
        (Some(_), Some(name)) => anyhow::bail!(
            "dataset `{name}` not found in {}",
            candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => Ok(()),
    }
}
