//! An instance's output: one append-only file, `logs/output.log`, that the instance's stdout
//! and stderr are both opened on (`O_APPEND`, so they interleave as written), capped in size
//! and rotated by copy-and-truncate into `output.log.1`, `.2`…
//!
//! Copy-and-truncate is what lets the instance keep writing to the same descriptor while
//! kiln is not running (no pipe and no log process that could die with kiln); its cost is
//! that the cap holds only when kiln checks (every health/drift tick and every read), and
//! lines written between the copy and the truncate can be lost.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::types::LogChunk;

/// The most one read returns.
const MAX_CHUNK: u64 = 1 << 20;

/// Log files of one instance.
#[derive(Debug, Clone)]
pub(crate) struct LogFiles {
    dir: PathBuf,
    cap: u64,
    keep: u32,
}

impl LogFiles {
    pub(crate) fn new(dir: PathBuf, cap: u64, keep: u32) -> LogFiles {
        LogFiles { dir, cap, keep }
    }

    /// The current log file.
    pub(crate) fn current(&self) -> PathBuf {
        self.dir.join("output.log")
    }

    fn rotated(&self, n: u32) -> PathBuf {
        self.dir.join(format!("output.log.{n}"))
    }

    /// Opens the current file for the instance to append to.
    pub(crate) fn open_for_instance(&self) -> io::Result<File> {
        fs::create_dir_all(&self.dir)?;
        // The instance's output is its business: the owner's alone, whatever the umask.
        std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().create(true).append(true), 0o600)
            .open(self.current())
    }

    /// Rotates when the current file is over the cap; returns whether it did.
    pub(crate) fn rotate_if_needed(&self) -> io::Result<bool> {
        let current = self.current();
        let len = match fs::metadata(&current) {
            Ok(md) => md.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if len <= self.cap {
            return Ok(false);
        }
        if self.keep == 0 {
            OpenOptions::new().write(true).open(&current)?.set_len(0)?;
            return Ok(true);
        }
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        fs::copy(&current, self.rotated(1))?;
        OpenOptions::new().write(true).open(&current)?.set_len(0)?;
        Ok(true)
    }

    /// Output from byte `from` of the current file. A `from` past the end means the file was
    /// rotated since: reading starts again at 0.
    pub(crate) fn read(&self, from: u64) -> io::Result<LogChunk> {
        read_from(&self.current(), from)
    }
}

fn read_from(path: &Path, from: u64) -> io::Result<LogChunk> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(LogChunk {
                data: Vec::new(),
                next: 0,
            });
        }
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = if from > len { 0 } else { from };
    file.seek(SeekFrom::Start(start))?;
    let mut data = Vec::new();
    file.take(MAX_CHUNK).read_to_end(&mut data)?;
    Ok(LogChunk {
        next: start + data.len() as u64,
        data,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::io::Write;

    use super::*;

    #[test]
    fn appends_rotates_and_follows_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogFiles::new(dir.path().join("logs"), 10, 2);
        let mut out = logs.open_for_instance().unwrap();
        out.write_all(b"hello\n").unwrap();
        let first = logs.read(0).unwrap();
        assert_eq!(first.data, b"hello\n");
        assert!(!logs.rotate_if_needed().unwrap());
        out.write_all(b"world, longer\n").unwrap();
        assert_eq!(logs.read(first.next).unwrap().data, b"world, longer\n");
        assert!(logs.rotate_if_needed().unwrap());
        assert_eq!(
            fs::read(dir.path().join("logs/output.log.1")).unwrap(),
            b"hello\nworld, longer\n"
        );
        // The instance's descriptor appends at the new end after the truncate.
        out.write_all(b"again\n").unwrap();
        let after = logs.read(first.next + 14).unwrap();
        assert_eq!(
            after.data, b"again\n",
            "a reader past the end restarts at 0"
        );
        out.write_all(b"0123456789x\n").unwrap();
        assert!(logs.rotate_if_needed().unwrap());
        assert!(dir.path().join("logs/output.log.2").exists());
        assert_eq!(
            fs::read(dir.path().join("logs/output.log.1")).unwrap(),
            b"again\n0123456789x\n"
        );
    }
}
