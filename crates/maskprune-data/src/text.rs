//! Finding a corpus in the data directory and joining its rows into one text.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::manifest::{builtin_manifests, DatasetManifest, Format, Role};
use crate::{DataError, Result};

/// A corpus loaded into memory, with what is needed to report the protocol.
#[derive(Debug, Clone)]
pub struct LoadedText {
    /// Dataset name.
    pub name: String,
    /// The joined text.
    pub text: String,
    /// The file it was read from.
    pub file: PathBuf,
    /// SHA-256 of that file.
    pub sha256: String,
    /// Description of the protocol (from the manifest).
    pub description: String,
    /// Evaluation or calibration text.
    pub role: Role,
    /// Protocol limit on windows, if any.
    pub max_windows: Option<usize>,
    /// Rows joined.
    pub rows: usize,
}

/// The data directories searched, in order: `explicit`, `$MASKPRUNE_DATA`, `../shared/data`,
/// then the user cache (`$XDG_CACHE_HOME/maskprune/data` or `~/.cache/maskprune/data`).
pub fn data_dir_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = explicit {
        return vec![dir.to_path_buf()];
    }
    let mut dirs = Vec::new();
    if let Some(env) = std::env::var_os("MASKPRUNE_DATA").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(env));
    }
    dirs.push(PathBuf::from("../shared/data"));
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(c) = cache {
        dirs.push(c.join("maskprune/data"));
    }
    dirs
}

/// The manifest for `spec`: a built-in name, a manifest `.toml` path, or `None` for a plain file.
pub fn resolve_dataset(spec: &str) -> Result<Option<DatasetManifest>> {
    if let Some(m) = builtin_manifests().into_iter().find(|m| m.name == spec) {
        return Ok(Some(m));
    }
    let path = Path::new(spec);
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "toml") {
            return DatasetManifest::from_file(path).map(Some);
        }
        return Ok(None);
    }
    let names: Vec<String> = builtin_manifests().into_iter().map(|m| m.name).collect();
    Err(DataError(format!(
        "{spec}: unknown dataset and no such file (built-in datasets: {})",
        names.join(", ")
    )))
}

/// Loads dataset `spec` (see [`resolve_dataset`]) from the data directory.
pub fn load_dataset(spec: &str, data_dir: Option<&Path>) -> Result<LoadedText> {
    let Some(manifest) = resolve_dataset(spec)? else {
        let path = PathBuf::from(spec);
        let bytes = read(&path)?;
        let text = utf8(&path, bytes.clone())?;
        return Ok(LoadedText {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            text,
            sha256: sha256_hex(&bytes),
            file: path,
            description: "plain text file, used as is".into(),
            role: Role::Eval,
            max_windows: None,
            rows: 1,
        });
    };
    let (mut rows, file, sha256) = load_rows(&manifest, data_dir)?;
    if let Some(n) = manifest.take {
        rows.truncate(n);
    }
    if rows.is_empty() {
        return Err(DataError(format!(
            "{}: dataset `{}` has no rows",
            file.display(),
            manifest.name
        )));
    }
    Ok(LoadedText {
        name: manifest.name.clone(),
        text: rows.join(&manifest.join),
        rows: rows.len(),
        file,
        sha256,
        description: manifest.description.clone(),
        role: manifest.role,
        max_windows: manifest.max_windows,
    })
}

/// Every row of a manifest's file after `strip` and `skip_empty` (before `take` and `join`),
/// with the file it came from and its checksum (verified against the manifest).
pub fn load_rows(
    manifest: &DatasetManifest,
    data_dir: Option<&Path>,
) -> Result<(Vec<String>, PathBuf, String)> {
    let candidates = data_dir_candidates(data_dir);
    let file = candidates
        .iter()
        .map(|d| d.join(&manifest.file))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            let looked: Vec<String> = candidates.iter().map(|d| d.join(&manifest.file).display().to_string()).collect();
            DataError(format!(
                "dataset `{}`: file not found; looked for {} (set --data-dir or MASKPRUNE_DATA, or run scripts/fetch-data.sh)",
                manifest.name,
                looked.join(", ")
            ))
        })?;
    let bytes = read(&file)?;
    let sha256 = sha256_hex(&bytes);
    if let Some(expected) = &manifest.sha256 {
        if !expected.eq_ignore_ascii_case(&sha256) {
            return Err(DataError(format!(
                "{}: checksum mismatch for dataset `{}` (expected {expected}, found {sha256}); numbers would not be comparable",
                file.display(),
                manifest.name
            )));
        }
    }
    let rows = rows_of(manifest, &file, bytes)?;
    let rows: Vec<String> = rows
        .into_iter()
        .map(|r| {
            if manifest.strip {
                r.trim().to_string()
            } else {
                r
            }
        })
        .filter(|r| !(manifest.skip_empty && r.is_empty()))
        .collect();
    Ok((rows, file, sha256))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataError(format!("{}: cannot read: {e}", path.display())))
}

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes)
        .map_err(|e| DataError(format!("{}: not UTF-8 text ({e})", path.display())))
}

fn rows_of(m: &DatasetManifest, file: &Path, bytes: Vec<u8>) -> Result<Vec<String>> {
    let text = match m.format {
        Format::JsonlGz => {
            let mut out = String::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut out)
                .map_err(|e| DataError(format!("{}: cannot decompress: {e}", file.display())))?;
            out
        }
        _ => utf8(file, bytes)?,
    };
    match m.format {
        Format::Text => Ok(vec![text]),
        Format::Lines => Ok(text.lines().map(str::to_string).collect()),
        Format::Jsonl | Format::JsonlGz => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let v: Value = serde_json::from_str(line).map_err(|e| {
                    DataError(format!("{}:{}: invalid JSON: {e}", file.display(), i + 1))
                })?;
                let mut row = String::new();
                for field in &m.fields {
                    let s = field
                        .split('.')
                        .try_fold(&v, |v, k| v.get(k))
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            DataError(format!(
                                "{}:{}: no string field `{field}`",
                                file.display(),
                                i + 1
                            ))
                        })?;
                    row.push_str(s);
                }
                Ok(row)
            })
            .collect(),
    }
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("maskprune-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn jsonl_rows_are_joined_per_manifest() {
        let dir = scratch("jsonl");
        std::fs::write(
            dir.join("m.toml"),
            "name='t'\nrole='eval'\ndescription='d'\nsource='s'\nfile='d.jsonl'\nformat='jsonl'\nfields=['a.b','c']\ntake=2\njoin='|'\n",
        )
        .unwrap();
        std::fs::write(dir.join("d.jsonl"), "{\"a\":{\"b\":\"x\"},\"c\":\"1\"}\n{\"a\":{\"b\":\"y\"},\"c\":\"2\"}\n{\"a\":{\"b\":\"z\"},\"c\":\"3\"}\n").unwrap();
        let t = load_dataset(dir.join("m.toml").to_str().unwrap(), Some(&dir)).unwrap();
        assert_eq!(t.text, "x1|y2");
        assert_eq!(t.rows, 2);
    }

    #[test]
    fn missing_files_say_where_they_were_looked_for() {
        let dir = scratch("missing");
        let e = load_dataset("wikitext2", Some(&dir)).unwrap_err().0;
        assert!(
            e.contains("file not found") && e.contains("wikitext2/wiki.test.joined.txt"),
            "{e}"
        );
        let e = load_dataset("no-such-dataset", None).unwrap_err().0;
        assert!(
            e.contains("unknown dataset") && e.contains("wikitext2"),
            "{e}"
        );
    }

    #[test]
    fn checksum_mismatch_is_an_error() {
        let dir = scratch("sum");
        std::fs::create_dir_all(dir.join("ptb")).unwrap();
        std::fs::write(dir.join("ptb/ptb.test.txt"), " a b \n c \n").unwrap();
        let e = load_dataset("ptb", Some(&dir)).unwrap_err().0;
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn shared_ptb_follows_the_protocol_when_present() {
        let Ok(t) = load_dataset("ptb", None) else {
            return;
        };
        assert!(t.text.starts_with("no it was n't black monday but while"));
        assert!(!t.text.contains("  "));
    }
}
