//! Writing files so that a reader never sees half of one: every file another command
//! reads (checkpoints, prediction files, reports, generated data) is written to a
//! temporary name in the same folder, flushed to disk, then renamed over the target.
//! A write that fails part-way (a full disk, a file-size limit, a kill) leaves the
//! previous file intact and removes the temporary one where it can.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name used while writing `path`: `.NAME.tmp-PID` beside it, so the
/// rename stays on one file system and a crashed writer's leftover is easy to spot.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Like [`write_atomic`], with the content produced by `fill` into a buffered writer.
pub fn write_atomic_with(
    path: impl AsRef<Path>,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(f);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(Error::io(path, e))
        }
    }
}

/// Like [`write_atomic`], for writers that insist on a path of their own (the
/// `safetensors` crate's `serialize_to_file`): `fill` writes the temporary path it is
/// given, which is then flushed to disk and renamed over `path`.  On any error the
/// temporary file is removed and `path` is left as it was.
pub fn write_atomic_via_path(
    path: impl AsRef<Path>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let tmp = temp_path(path);
    let result = fill(&tmp).and_then(|()| {
        (|| -> std::io::Result<()> {
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)
        })()
        .map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The lock file of a run directory (`RUN/.lock`).
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a run directory, held while a stage writes it: a second
/// `popen train` (or `popen demo`) on the same directory stops with an error instead of
/// interleaving its checkpoints with the first one's.  The lock is the operating
/// system's advisory file lock on `DIR/.lock`, so a killed run leaves nothing to clean
/// up: the lock goes with the process, and a rerun resumes.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Creates `dir` if needed and locks it; `Err` naming the directory when another
    /// process holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "another process is writing the run directory {}: wait for it to \
                         finish (or stop it) and run again, or choose another --out",
                        dir.display()
                    ),
                ),
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = std::env::temp_dir().join(format!("popen-fsio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.json");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.json"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(!temp_path(&p).exists());
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_locked_run_directory_refuses_a_second_writer_until_released() {
        let dir = std::env::temp_dir().join(format!("popen-lock-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let held = RunLock::acquire(&dir).unwrap();
        assert!(dir.join(LOCK_FILE).exists());
        let e = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            e.contains("another process") && e.contains(&*dir.to_string_lossy()),
            "{e}"
        );
        drop(held);
        let again = RunLock::acquire(&dir).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
