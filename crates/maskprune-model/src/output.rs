//! Atomic outputs: everything is written under a temporary name beside its destination and
//! renamed into place, so a crash or a full disk never leaves a half-written file or directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

fn sibling_temp(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| ModelError::new(parent, format!("cannot create directory: {e}")))?;
    }
    let tmp = sibling_temp(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::new(path, format!("cannot write: {e}"))
    })
}

/// Creates directory `dest` by letting `fill` write into a temporary directory, then renaming it.
/// An existing `dest` is refused unless `overwrite`, in which case it is replaced only once the
/// new directory is complete.
pub fn write_dir_atomically(
    dest: &Path,
    overwrite: bool,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if dest.exists() && !overwrite {
        return Err(ModelError::new(
            dest,
            "output directory already exists (pass --overwrite to replace it)",
        ));
    }
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| ModelError::new(parent, format!("cannot create directory: {e}")))?;
    }
    let tmp = sibling_temp(dest);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp)
        .map_err(|e| ModelError::new(&tmp, format!("cannot create directory: {e}")))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dest.exists() {
        let old = dest.with_file_name(format!(
            ".{}.old-{}",
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        std::fs::rename(dest, &old)
            .map_err(|e| ModelError::new(dest, format!("cannot replace: {e}")))?;
        std::fs::rename(&tmp, dest)
            .map_err(|e| ModelError::new(dest, format!("cannot rename into place: {e}")))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dest)
            .map_err(|e| ModelError::new(dest, format!("cannot rename into place: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("maskprune-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn failed_fill_leaves_nothing_and_existing_dirs_are_refused() {
        let root = scratch("dir");
        let dest = root.join("out");
        let err = write_dir_atomically(&dest, false, |tmp| {
            std::fs::write(tmp.join("half"), b"x").unwrap();
            Err(ModelError::new(tmp, "boom"))
        })
        .unwrap_err();
        assert!(err.message.contains("boom"));
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "temp dir left behind"
        );
        write_dir_atomically(&dest, false, |tmp| {
            std::fs::write(tmp.join("a"), b"1").map_err(|e| ModelError::new(tmp, e.to_string()))
        })
        .unwrap();
        let err = write_dir_atomically(&dest, false, |_| Ok(())).unwrap_err();
        assert!(err.message.contains("already exists"));
        write_dir_atomically(&dest, true, |tmp| {
            std::fs::write(tmp.join("b"), b"2").map_err(|e| ModelError::new(tmp, e.to_string()))
        })
        .unwrap();
        assert!(!dest.join("a").exists() && dest.join("b").exists());
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
    }

    #[test]
    fn files_are_replaced_whole() {
        let root = scratch("file");
        let path = root.join("sub/x.json");
        write_file_atomically(&path, b"{}").unwrap();
        write_file_atomically(&path, b"{\"a\":1}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}");
        assert_eq!(std::fs::read_dir(root.join("sub")).unwrap().count(), 1);
    }
}
