//! Crash-safe file writes.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory is written,
/// synced, then renamed over `path`, so readers see either the old file or the whole new one.
/// A symlink is followed (its target is replaced); an existing non-regular file such as
/// `/dev/stdout` or a FIFO cannot be replaced and is written directly.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> std::io::Result<()> {
    let mut path = path.as_ref().to_path_buf();
    if let Ok(meta) = std::fs::metadata(&path) {
        if !meta.is_file() {
            return std::fs::write(&path, bytes);
        }
        path = std::fs::canonicalize(&path)?;
    }
    let path = path.as_path();
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
