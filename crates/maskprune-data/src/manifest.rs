//! Dataset manifests: how a corpus is found and joined into one text.

use std::path::Path;

use serde::Deserialize;

use crate::{DataError, Result};

/// What a corpus may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Held-out evaluation text.
    Eval,
    /// Calibration text for pruning.
    Calibration,
}

/// How the file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Format {
    /// The whole file is the text.
    #[serde(rename = "text")]
    Text,
    /// One row per line.
    #[serde(rename = "lines")]
    Lines,
    /// One JSON object per line.
    #[serde(rename = "jsonl")]
    Jsonl,
    /// Gzipped JSON lines.
    #[serde(rename = "jsonl.gz")]
    JsonlGz,
}

/// A corpus description (see `datasets/README.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetManifest {
    /// Name given to `--dataset`.
    pub name: String,
    /// Evaluation or calibration.
    pub role: Role,
    /// One-line description.
    pub description: String,
    /// Where the text originally comes from.
    pub source: String,
    /// Path relative to the data directory.
    pub file: String,
    /// File layout.
    pub format: Format,
    /// For JSONL: dotted paths of the string fields concatenated per row.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Strip each row.
    #[serde(default)]
    pub strip: bool,
    /// Drop empty rows.
    #[serde(default)]
    pub skip_empty: bool,
    /// Keep only the first N rows.
    pub take: Option<usize>,
    /// Separator between rows.
    #[serde(default)]
    pub join: String,
    /// Protocol limit on evaluation windows.
    pub max_windows: Option<usize>,
    /// SHA-256 of the file.
    pub sha256: Option<String>,
}

const BUILTIN: [(&str, &str); 4] = [
    (
        "wikitext2.toml",
        include_str!("../../../datasets/wikitext2.toml"),
    ),
    ("ptb.toml", include_str!("../../../datasets/ptb.toml")),
    ("c4.toml", include_str!("../../../datasets/c4.toml")),
    (
        "lambada.toml",
        include_str!("../../../datasets/lambada.toml"),
    ),
];

impl DatasetManifest {
    /// Parses a manifest; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let m: Self = toml::from_str(text).map_err(|e| {
            DataError(format!(
                "{origin}: invalid dataset manifest: {}",
                one_line(&e.to_string())
            ))
        })?;
        if matches!(m.format, Format::Jsonl | Format::JsonlGz) && m.fields.is_empty() {
            return Err(DataError(format!(
                "{origin}: a JSONL manifest needs `fields`"
            )));
        }
        if Path::new(&m.file).is_absolute() || m.file.contains("..") {
            return Err(DataError(format!(
                "{origin}: `file` must be relative to the data directory"
            )));
        }
        Ok(m)
    }

    /// Reads a manifest file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DataError(format!("{}: cannot read: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// The manifests shipped with maskprune (`datasets/*.toml`).
pub fn builtin_manifests() -> Vec<DatasetManifest> {
    BUILTIN
        .iter()
        .map(|(name, text)| {
            DatasetManifest::parse(text, name).expect("built-in manifests are valid")
        })
        .collect()
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifests_parse() {
        let names: Vec<String> = builtin_manifests().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["wikitext2", "ptb", "c4", "lambada"]);
        let c4 = builtin_manifests()
            .into_iter()
            .find(|m| m.name == "c4")
            .unwrap();
        assert_eq!(
            (c4.take, c4.max_windows, c4.join.as_str()),
            (Some(1100), Some(256), " ")
        );
        assert_eq!(c4.role, Role::Calibration);
    }

    #[test]
    fn bad_manifests_are_one_line_errors() {
        let e = DatasetManifest::parse("name = 1", "x.toml").unwrap_err().0;
        assert!(
            e.starts_with("x.toml: invalid dataset manifest") && !e.contains('\n'),
            "{e}"
        );
        let jsonl =
            "name='a'\nrole='eval'\ndescription=''\nsource=''\nfile='a.jsonl'\nformat='jsonl'";
        assert!(DatasetManifest::parse(jsonl, "m")
            .unwrap_err()
            .0
            .contains("needs `fields`"));
        let escape = "name='a'\nrole='eval'\ndescription=''\nsource=''\nfile='../../etc/passwd'\nformat='text'";
        assert!(DatasetManifest::parse(escape, "m")
            .unwrap_err()
            .0
            .contains("relative"));
    }
}
