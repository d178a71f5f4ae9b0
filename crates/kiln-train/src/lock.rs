//! One run per run directory: an exclusive `flock` on `<run dir>/.lock`, held while training.

use crate::TrainError;
use std::io::{Read, Seek, Write};
use std::path::Path;

pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    pub fn acquire(run_dir: &Path) -> Result<Self, TrainError> {
        let path = run_dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| TrainError::Output {
                path: path.clone(),
                source,
            })?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(TrainError::Other(format!(
                    "{} is in use by another kiln run (pid {}); wait for it or choose another run.name",
                    run_dir.display(),
                    holder.trim()
                )));
            }
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(Self { _file: file })
    }
}
