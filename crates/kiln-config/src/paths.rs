//! How kiln reads a file a user names (data, tokenizers, model weights): only a regular file. A
//! FIFO, socket or device would block the read forever or never end, so it is refused before it
//! is opened (opening a FIFO already blocks).

use std::io;
use std::path::Path;

/// Why `path` cannot be read as a file: the error of the file system (not found, a symlink loop,
/// no permission), or that it is not a regular file.
pub fn check_regular_file(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        Ok(())
    } else if meta.is_dir() {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a directory, not a file",
        ))
    } else {
        Err(not_regular())
    }
}

/// Like [`check_regular_file`], but a directory is fine too (model and dataset directories).
pub fn check_file_or_dir(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() || meta.is_dir() {
        Ok(())
    } else {
        Err(not_regular())
    }
}

fn not_regular() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "is not a regular file (a FIFO, socket or device cannot be read as data)",
    )
}

/// The bytes of the regular file `path`.
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    check_regular_file(path)?;
    std::fs::read(path)
}

/// The text of the regular file `path`.
pub fn read_regular_to_string(path: &Path) -> io::Result<String> {
    check_regular_file(path)?;
    std::fs::read_to_string(path)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn fifos_and_symlink_loops_are_refused_with_their_reason() {
        let dir = std::env::temp_dir().join(format!("kiln-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc_mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let a = dir.join("a");
        std::os::unix::fs::symlink(dir.join("b"), &a).unwrap();
        std::os::unix::fs::symlink(&a, dir.join("b")).unwrap();
        let e = read_regular(&a).unwrap_err();
        assert_ne!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(check_file_or_dir(&dir).is_ok());
        assert!(check_regular_file(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    unsafe extern "C" {
        #[link_name = "mkfifo"]
        fn libc_mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
    }
}
