//! A `newc` ("SVR4 without CRC", magic `070701`) cpio archive writer, the format the Linux
//! kernel unpacks an initramfs from.
//!
//! Deterministic by construction: every entry has mtime 0, uid and gid 0, inode numbers
//! 1, 2, 3, … in the order entries are added, no device of its own, and entries appear in
//! the order given; the archive ends with `TRAILER!!!`. Headers, names and contents are
//! padded to 4 bytes as the format requires. Hard links are not written (each file is its
//! own inode with one link).
//!
//! **API boundary:** paths are checked (relative, no `.`/`..` components, no NUL, no
//! empty components) but not that their parents were added first: the kernel creates
//! entries in order, so a caller adds each directory before what it holds.

use std::io::{self, Read, Write};

/// Why an entry could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path the archive must not carry.
    #[error("cpio path {0:?} is not relative, or has an empty, `.` or `..` component, or NUL")]
    Path(String),
    /// Permission bits beyond `0o7777`.
    #[error("cpio entry {path:?} mode {mode:#o} has bits beyond 0o7777")]
    Mode {
        /// The entry.
        path: String,
        /// The mode given.
        mode: u32,
    },
    /// A file too large for newc's 32-bit size field.
    #[error("cpio file {path:?} of {len} bytes is larger than newc's 4 GiB limit")]
    TooLarge {
        /// The file.
        path: String,
        /// Its length.
        len: u64,
    },
    /// A symlink target that is empty or contains NUL.
    #[error("cpio symlink {path:?} target {target:?} is empty or contains NUL")]
    Target {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// A file's content ended before its length.
    #[error("cpio file {path:?} content ended after {got} of {len} bytes")]
    ShortContent {
        /// The file.
        path: String,
        /// The length promised.
        len: u64,
        /// The bytes read.
        got: u64,
    },
    /// Reading a file's content failed.
    #[error("reading cpio file {path:?} content")]
    Read {
        /// The file.
        path: String,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// Writing the archive failed.
    #[error("writing the cpio archive at byte {offset}")]
    Write {
        /// Where the write was.
        offset: u64,
        /// The writer's error.
        #[source]
        source: io::Error,
    },
}

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;

/// The kind of a device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// A character device (`/dev/console`, `/dev/null`).
    Char,
    /// A block device.
    Block,
}

/// One fixed header's numbers (the rest are zero: mtime, uid, gid, devices, check).
struct Header {
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
}

/// Writes a `newc` archive to `W`, entry by entry; [`Writer::finish`] adds the trailer.
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// A writer with nothing written yet.
    pub fn new(out: W) -> Writer<W> {
        Writer {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), Error> {
        check_path(path)?;
        let mode = check_mode(path, mode)?;
        self.entry(
            path,
            Header {
                mode: S_IFDIR | mode,
                nlink: 2,
                filesize: 0,
                rdev: (0, 0),
            },
        )
    }

    /// A regular file of exactly `len` bytes read from `content`.
    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        len: u64,
        content: &mut impl Read,
    ) -> Result<(), Error> {
        check_path(path)?;
        let mode = check_mode(path, mode)?;
        let filesize = u32::try_from(len).map_err(|_| Error::TooLarge {
            path: path.to_owned(),
            len,
        })?;
        self.entry(
            path,
            Header {
                mode: S_IFREG | mode,
                nlink: 1,
                filesize,
                rdev: (0, 0),
            },
        )?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut copied = 0u64;
        while copied < len {
            let want = (len - copied).min(buf.len() as u64) as usize;
            let n = match content.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(Error::ShortContent {
                        path: path.to_owned(),
                        len,
                        got: copied,
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Read {
                        path: path.to_owned(),
                        source,
                    });
                }
            };
            self.put(&buf[..n])?;
            copied += n as u64;
        }
        self.pad()
    }

    /// A symbolic link to `target` (mode `0777`, as links are).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), Error> {
        check_path(path)?;
        if target.is_empty() || target.contains('\0') {
            return Err(Error::Target {
                path: path.to_owned(),
                target: target.to_owned(),
            });
        }
        let filesize = u32::try_from(target.len()).map_err(|_| Error::TooLarge {
            path: path.to_owned(),
            len: target.len() as u64,
        })?;
        self.entry(
            path,
            Header {
                mode: S_IFLNK | 0o777,
                nlink: 1,
                filesize,
                rdev: (0, 0),
            },
        )?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// A device node (`major:minor`), such as `dev/console` (character, 5:1), which the
    /// kernel needs before the init can open a console.
    pub fn device(
        &mut self,
        path: &str,
        mode: u32,
        kind: Device,
        major: u32,
        minor: u32,
    ) -> Result<(), Error> {
        check_path(path)?;
        let mode = check_mode(path, mode)?;
        let kind = match kind {
            Device::Char => S_IFCHR,
            Device::Block => S_IFBLK,
        };
        self.entry(
            path,
            Header {
                mode: kind | mode,
                nlink: 1,
                filesize: 0,
                rdev: (major, minor),
            },
        )
    }

    /// Writes the `TRAILER!!!` entry and hands back the writer, flushed.
    pub fn finish(mut self) -> Result<W, Error> {
        self.header(
            "TRAILER!!!",
            0,
            &Header {
                mode: 0,
                nlink: 1,
                filesize: 0,
                rdev: (0, 0),
            },
        )?;
        let offset = self.offset;
        self.out
            .flush()
            .map_err(|source| Error::Write { offset, source })?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, h: Header) -> Result<(), Error> {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, &h)
    }

    fn header(&mut self, name: &str, ino: u32, h: &Header) -> Result<(), Error> {
        // The name's size counts its NUL.
        let namesize = name.len() + 1;
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime
            h.filesize,
            0, // devmajor
            0, // devminor
            h.rdev.0,
            h.rdev.1,
            namesize as u32,
            0, // check (newc has none)
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out.write_all(bytes).map_err(|source| Error::Write {
            offset: self.offset,
            source,
        })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Zeros to the next multiple of 4 bytes from the archive's start.
    fn pad(&mut self) -> Result<(), Error> {
        let n = (self.offset.next_multiple_of(4) - self.offset) as usize;
        self.put(&[0; 3][..n])
    }
}

fn check_path(path: &str) -> Result<(), Error> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(Error::Path(path.to_owned()));
    }
    Ok(())
}

fn check_mode(path: &str, mode: u32) -> Result<u32, Error> {
    if mode & !0o7777 != 0 {
        return Err(Error::Mode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(mode)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn one_file_byte_for_byte() {
        let mut w = Writer::new(Vec::new());
        w.file("init", 0o755, 2, &mut &b"hi"[..]).unwrap();
        let bytes = w.finish().unwrap();
        // Fields: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize (with its NUL), check.
        let header = |fields: [u32; 13]| {
            let hex: String = fields.iter().map(|f| format!("{f:08X}")).collect();
            format!("070701{hex}")
        };
        let file = header([1, 0o100755, 0, 0, 1, 0, 2, 0, 0, 0, 0, 5, 0]);
        let trailer = header([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0]);
        // 110 + 5 name bytes pad to 116; 110 + 11 pad to 124.
        let expected = format!("{file}init\0\0hi\0\0{trailer}TRAILER!!!\0\0\0\0");
        assert_eq!(String::from_utf8_lossy(&bytes), expected);
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn refuses_bad_paths_modes_and_short_content() {
        let mut w = Writer::new(Vec::new());
        for p in ["", "/init", "a//b", "a/../b", "./a", "a/", "a\0b"] {
            assert!(matches!(w.dir(p, 0o755), Err(Error::Path(_))), "{p:?}");
        }
        assert!(matches!(w.dir("a", 0o10755), Err(Error::Mode { .. })));
        assert!(matches!(
            w.file("f", 0o644, 3, &mut &b"ab"[..]),
            Err(Error::ShortContent { got: 2, len: 3, .. })
        ));
        assert!(matches!(w.symlink("l", ""), Err(Error::Target { .. })));
    }
}
