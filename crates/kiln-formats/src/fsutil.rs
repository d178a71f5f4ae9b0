//! Files written by a run are written atomically: a temp file in the same directory, fsync,
//! rename, fsync of the directory. A crash leaves the old file or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory `path` lies in (`.` for a bare file name).
pub fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The temp file beside `path` that an atomic write fills before renaming it onto `path`.
pub fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    dir_of(path).join(format!(".{name}.tmp.{}", std::process::id()))
}

pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = dir_of(path);
    let tmp = temp_beside(path);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    sync_dir(dir);
    Ok(())
}

/// Makes a rename or creation in `dir` durable (best effort: not all filesystems support it).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
