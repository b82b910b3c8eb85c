//! Safe unpacking of layer tarballs into a directory, for bases, `export --format rootfs`, and
//! the local runtime's per-layer cache.
//!
//! **Invariant:** nothing is created, changed or removed outside `root`. Every entry's parent
//! directory is opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so `..` and
//! symlinks (absolute or relative, planted by this archive or an earlier layer) resolve as if
//! `root` were `/`; the entry itself is then created relative to that directory fd with
//! `O_NOFOLLOW`/`O_EXCL` semantics, and hardlink targets are resolved the same way. tar's
//! `unpack_in` is not used: it is not the safety boundary here.
//! Entry names with a `..` component are refused outright, absolute names are taken relative
//! to `root`, device nodes are refused, and the entry count and byte total are bounded.
//! This module knows nothing of the store or of image configs.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

use crate::entries::{Bounded, Entries, Entry, read_error, stream_too_long};

/// Why an unpack stopped. Every variant names the archive entry at fault.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// A name with a `..` component.
    #[error("entry {entry:?} climbs out of the root with `..`; refused")]
    PathTraversal {
        /// The entry name.
        entry: String,
    },
    /// A hardlink whose target climbs out with `..`.
    #[error("hardlink {entry:?} points outside the root ({target:?}); refused")]
    LinkEscape {
        /// The entry name.
        entry: String,
        /// Its target.
        target: String,
    },
    /// A hardlink to nothing.
    #[error("hardlink {entry:?} points at {target:?}, which is not in the archive before it")]
    LinkTargetMissing {
        /// The entry name.
        entry: String,
        /// Its target.
        target: String,
    },
    /// A character or block device.
    #[error("entry {entry:?} is a device node; images may not carry devices")]
    DeviceNode {
        /// The entry name.
        entry: String,
    },
    /// An entry type kiln does not unpack.
    #[error("entry {entry:?} has an unsupported type ({kind})")]
    Unsupported {
        /// The entry name.
        entry: String,
        /// The tar type.
        kind: String,
    },
    /// More entries than the limit.
    #[error("archive has more than {limit} entries; refused")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// More bytes than the limit.
    #[error("entry {entry:?} takes the archive past {limit} bytes of content; refused")]
    TooLarge {
        /// The entry that crossed the limit.
        entry: String,
        /// The limit.
        limit: u64,
    },
    /// A PAX or GNU extension header larger than the limit: refused before it is read.
    #[error(
        "a {kind} header of {size} bytes at byte {offset} exceeds the limit of {limit} bytes; refused"
    )]
    HeaderTooLarge {
        /// Which extension.
        kind: &'static str,
        /// Where its header starts in the uncompressed archive.
        offset: u64,
        /// What it claims.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The (decompressed) stream is longer than the limit.
    #[error("the archive decompresses to more than {limit} bytes; refused")]
    StreamTooLong {
        /// The limit.
        limit: u64,
    },
    /// The archive itself is malformed.
    #[error("malformed archive: {source}")]
    Malformed {
        /// The reader's error.
        source: io::Error,
    },
    /// A file system operation failed.
    #[error("{op} {entry:?}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The entry (or the root).
        entry: String,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err(op: &'static str, entry: &str) -> impl FnOnce(rustix::io::Errno) -> UnpackError {
    let entry = entry.to_owned();
    move |e| UnpackError::Io {
        op,
        entry,
        source: e.into(),
    }
}

/// What to do with OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// Apply them: delete `NAME`, or empty the directory of what earlier layers put there.
    /// For unpacking a stack of layers onto one rootfs.
    Apply,
    /// Turn them into overlayfs whiteouts: a 0/0 character device for `NAME`, the
    /// `trusted.overlay.opaque=y` xattr for an opaque directory. For unpacking each layer
    /// into its own overlay lowerdir; needs root (`CAP_MKNOD`, `CAP_SYS_ADMIN`).
    Overlay,
    /// Write nothing for them; list them in the [`UnpackReport`].
    Record,
}

/// Bounds on what one archive may contain.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries of any kind.
    pub max_entries: u64,
    /// Bytes of the uncompressed archive (headers and content): an entry whose size would
    /// pass it is refused before it is written, and reading stops there.
    pub max_bytes: u64,
    /// Bytes of one PAX or GNU extension header (long names, PAX records).
    pub max_header_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1_000_000,
            max_bytes: 64 << 30,
            // Real PAX records and long names take a few hundred bytes; 1 MiB leaves room
            // for large xattrs while keeping a hostile header's cost small.
            max_header_bytes: 1 << 20,
        }
    }
}

/// How to unpack.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Whiteout handling.
    pub whiteouts: WhiteoutMode,
    /// Size bounds.
    pub limits: Limits,
    /// Apply the archive's uid/gid (only meaningful as root).
    pub preserve_owners: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            whiteouts: WhiteoutMode::Apply,
            limits: Limits::default(),
            preserve_owners: rustix::process::geteuid().is_root(),
        }
    }
}

/// What an unpack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackReport {
    /// Entries processed (whiteouts included).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Paths whited out (relative to the root).
    pub whiteouts: Vec<String>,
    /// Directories marked opaque (relative to the root).
    pub opaque_dirs: Vec<String>,
}

/// Splits an entry name into clean components: `.` and empty parts dropped, a leading `/`
/// ignored (so absolute names stay inside the root), `..` refused.
fn components(name: &[u8], entry: &str) -> Result<Vec<Vec<u8>>, UnpackError> {
    let mut out = Vec::new();
    for part in name.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::PathTraversal {
                    entry: entry.to_owned(),
                });
            }
            p => out.push(p.to_vec()),
        }
    }
    Ok(out)
}

fn join(parts: &[Vec<u8>]) -> PathBuf {
    let mut s: Vec<u8> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            s.push(b'/');
        }
        s.extend_from_slice(p);
    }
    PathBuf::from(OsStr::from_bytes(&s))
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// Opens (creating as needed) the directory `parts` under `root`, resolved inside the root.
fn open_dir(root: &OwnedFd, parts: &[Vec<u8>], entry: &str) -> Result<OwnedFd, UnpackError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    if parts.is_empty() {
        return rustix::fs::openat2(root, ".", flags, Mode::empty(), resolve_flags())
            .map_err(io_err("open root for", entry));
    }
    match rustix::fs::openat2(root, join(parts), flags, Mode::empty(), resolve_flags()) {
        Ok(fd) => return Ok(fd),
        Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(io_err("open parent of", entry)(e)),
    }
    // Create missing ancestors one at a time, each relative to its resolved parent.
    let mut dir = open_dir(root, &[], entry)?;
    for (i, part) in parts.iter().enumerate() {
        let name = OsStr::from_bytes(part);
        let created = match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(io_err("create parent of", entry)(e)),
        };
        dir = rustix::fs::openat2(
            root,
            join(&parts[..=i]),
            flags,
            Mode::empty(),
            resolve_flags(),
        )
        .map_err(io_err("open parent of", entry))?;
        // A parent the archive does not list is 0755 whatever the umask: kiln runs under
        // 077, and a 0700 directory would lock an image's non-root user out of its own files.
        if created {
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o755))
                .map_err(io_err("chmod parent of", entry))?;
        }
    }
    Ok(dir)
}

/// Removes `name` in `dir` (recursively for a directory), never following symlinks.
fn remove_all(dir: &OwnedFd, name: &OsStr, entry: &str) -> Result<(), UnpackError> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io_err("stat", entry)(e)),
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err("open", entry))?;
        empty_dir(&sub, entry, &|_| false)?;
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(io_err("remove", entry))
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(io_err("remove", entry))
    }
}

/// Removes every child of `dir` for which `keep` is false.
fn empty_dir(dir: &OwnedFd, entry: &str, keep: &dyn Fn(&[u8]) -> bool) -> Result<(), UnpackError> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    let mut it = rustix::fs::Dir::read_from(dir).map_err(io_err("list", entry))?;
    while let Some(e) = it.read() {
        let e = e.map_err(io_err("list", entry))?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        if !keep(&n) {
            remove_all(dir, OsStr::from_bytes(&n), entry)?;
        }
    }
    Ok(())
}

/// An entry that passed [`check_entry`]: its name, clean components and size.
struct Checked {
    name: String,
    parts: Vec<Vec<u8>>,
    size: u64,
}

/// What every entry must pass before anything is written for it, and all that [`check`]
/// asks of an archive: within the limits, no `..`, no devices, only types kiln unpacks.
/// `None` for entries with nothing to create (global headers, the root itself).
fn check_entry<R: Read>(
    entry: &Entry<'_, R>,
    limits: &Limits,
    report: &mut UnpackReport,
) -> Result<Option<Checked>, UnpackError> {
    report.entries += 1;
    if report.entries > limits.max_entries {
        return Err(UnpackError::TooManyEntries {
            limit: limits.max_entries,
        });
    }
    let name = String::from_utf8_lossy(&entry.name).into_owned();
    let kind = entry.header.entry_type();
    if matches!(kind, tar::EntryType::XGlobalHeader) {
        return Ok(None);
    }
    let parts = components(&entry.name, &name)?;
    let size = entry.size;
    if report.bytes.saturating_add(size) > limits.max_bytes {
        return Err(UnpackError::TooLarge {
            entry: name,
            limit: limits.max_bytes,
        });
    }
    if let Some(last) = parts.last()
        && let Some(victim) = last.strip_prefix(b".wh.")
    {
        if victim.is_empty() || victim == b"." || victim == b".." {
            return Err(UnpackError::PathTraversal { entry: name });
        }
        return Ok(Some(Checked { name, parts, size }));
    }
    match kind {
        tar::EntryType::Directory
        | tar::EntryType::Regular
        | tar::EntryType::Continuous
        | tar::EntryType::Symlink
        | tar::EntryType::Fifo => {}
        tar::EntryType::Link => {
            let target = entry.link.as_deref().unwrap_or_default();
            if components(target, &name).is_err() {
                return Err(UnpackError::LinkEscape {
                    entry: name,
                    target: String::from_utf8_lossy(target).into_owned(),
                });
            }
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            return Err(UnpackError::DeviceNode { entry: name });
        }
        other => {
            return Err(UnpackError::Unsupported {
                entry: name,
                kind: format!("{other:?}"),
            });
        }
    }
    Ok(Some(Checked { name, parts, size }))
}

/// Reads the uncompressed tar stream `reader` to its end as [`unpack`] would, writing
/// nothing, and fails where it would fail on the archive alone: a layer is refused when it
/// comes in, not when an instance first needs it. Hardlink targets are not looked for: an
/// earlier layer may hold them.
pub fn check(reader: impl Read, limits: &Limits) -> Result<UnpackReport, UnpackError> {
    let mut bounded = Bounded::new(reader, limits.max_bytes);
    let mut report = UnpackReport::default();
    {
        let mut archive = tar::Archive::new(&mut bounded);
        let mut entries = Entries::new(&mut archive, limits.max_header_bytes)?;
        while let Some(mut entry) = entries.next_entry()? {
            if check_entry(&entry, limits, &mut report)?.is_some() {
                report.bytes += entry.size;
            }
            // Read the data through, so the stream's bound counts it.
            io::copy(&mut (&mut entry.data).take(entry.size), &mut io::sink())
                .map_err(read_error)?;
        }
    }
    // What follows the end marker still counts against the bound (a caller hashing the
    // stream reads it).
    io::copy(&mut bounded, &mut io::sink()).map_err(read_error)?;
    Ok(report)
}

/// Unpacks the uncompressed tar stream `reader` into `root` (which must exist).
pub fn unpack(
    reader: impl Read,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackReport, UnpackError> {
    let root_name = root.display().to_string();
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err("open root", &root_name))?;
    let mut archive = tar::Archive::new(Bounded::new(reader, opts.limits.max_bytes));
    let mut report = UnpackReport::default();
    // Paths this archive created, which an opaque whiteout in the same layer must keep.
    let mut created: HashSet<Vec<u8>> = HashSet::new();
    let mut entries = Entries::new(&mut archive, opts.limits.max_header_bytes)?;
    while let Some(entry) = entries.next_entry()? {
        let Some(checked) = check_entry(&entry, &opts.limits, &mut report)? else {
            continue;
        };
        let Checked { name, parts, size } = checked;
        let Some((last, parent)) = parts.split_last() else {
            continue;
        };
        let header = entry.header.clone();
        let kind = header.entry_type();
        let link_bytes = entry.link.clone();
        let mut entry = entry.data;
        // Whiteouts.
        if let Some(victim) = last.strip_prefix(b".wh.") {
            let parent_path =
                String::from_utf8_lossy(&join(parent).into_os_string().into_vec()).into_owned();
            if victim == b".wh..opq" {
                report.opaque_dirs.push(parent_path);
                match opts.whiteouts {
                    WhiteoutMode::Record => {}
                    WhiteoutMode::Apply => {
                        let dir = open_dir(&root_fd, parent, &name)?;
                        let prefix = parent.to_vec();
                        empty_dir(&dir, &name, &|child| {
                            let mut p = prefix.clone();
                            p.push(child.to_vec());
                            created.contains(&join(&p).into_os_string().into_vec())
                        })?;
                    }
                    WhiteoutMode::Overlay => {
                        let dir = open_dir(&root_fd, parent, &name)?;
                        rustix::fs::fsetxattr(
                            &dir,
                            "trusted.overlay.opaque",
                            b"y",
                            rustix::fs::XattrFlags::empty(),
                        )
                        .map_err(io_err("mark opaque", &name))?;
                    }
                }
            } else {
                if victim.is_empty() || victim == b"." || victim == b".." {
                    return Err(UnpackError::PathTraversal { entry: name });
                }
                let mut p = parent.to_vec();
                p.push(victim.to_vec());
                report.whiteouts.push(
                    String::from_utf8_lossy(&join(&p).into_os_string().into_vec()).into_owned(),
                );
                let victim = OsStr::from_bytes(victim);
                match opts.whiteouts {
                    WhiteoutMode::Record => {}
                    WhiteoutMode::Apply => {
                        let dir = open_dir(&root_fd, parent, &name)?;
                        remove_all(&dir, victim, &name)?;
                    }
                    WhiteoutMode::Overlay => {
                        let dir = open_dir(&root_fd, parent, &name)?;
                        remove_all(&dir, victim, &name)?;
                        rustix::fs::mknodat(
                            &dir,
                            victim,
                            rustix::fs::FileType::CharacterDevice,
                            Mode::empty(),
                            rustix::fs::makedev(0, 0),
                        )
                        .map_err(io_err("create overlay whiteout for", &name))?;
                    }
                }
            }
            continue;
        }
        let dir = open_dir(&root_fd, parent, &name)?;
        let leaf = OsStr::from_bytes(last);
        let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o644) & 0o7777);
        let owner = if opts.preserve_owners {
            let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok());
            let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok());
            Some((uid, gid))
        } else {
            None
        };
        let mtime = header.mtime().unwrap_or(0);
        match kind {
            tar::EntryType::Directory => {
                match rustix::fs::statat(&dir, leaf, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st)
                        if rustix::fs::FileType::from_raw_mode(st.st_mode)
                            == rustix::fs::FileType::Directory => {}
                    Ok(_) => {
                        remove_all(&dir, leaf, &name)?;
                        rustix::fs::mkdirat(&dir, leaf, mode).map_err(io_err("create", &name))?;
                    }
                    Err(_) => {
                        rustix::fs::mkdirat(&dir, leaf, mode).map_err(io_err("create", &name))?;
                    }
                }
                let fd = rustix::fs::openat(
                    &dir,
                    leaf,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_err("open", &name))?;
                set_owner_mode(&fd, owner, Some(mode), &name)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_all(&dir, leaf, &name)?;
                let fd = rustix::fs::openat(
                    &dir,
                    leaf,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io_err("create", &name))?;
                let mut file = std::fs::File::from(fd);
                let n = io::copy(&mut (&mut entry).take(size), &mut file).map_err(|source| {
                    match stream_too_long(&source) {
                        Some(limit) => UnpackError::StreamTooLong { limit },
                        None => UnpackError::Io {
                            op: "write",
                            entry: name.clone(),
                            source,
                        },
                    }
                })?;
                report.bytes += n;
                set_owner_mode(file.as_fd(), owner, Some(mode), &name)?;
                let t = rustix::fs::Timestamps {
                    last_access: rustix::fs::Timespec {
                        tv_sec: i64::try_from(mtime).unwrap_or(0),
                        tv_nsec: 0,
                    },
                    last_modification: rustix::fs::Timespec {
                        tv_sec: i64::try_from(mtime).unwrap_or(0),
                        tv_nsec: 0,
                    },
                };
                rustix::fs::futimens(&file, &t).map_err(io_err("set times of", &name))?;
            }
            tar::EntryType::Symlink => {
                let target = link_bytes.clone().unwrap_or_default();
                remove_all(&dir, leaf, &name)?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &dir, leaf)
                    .map_err(io_err("create symlink", &name))?;
                if let Some((uid, gid)) = owner {
                    rustix::fs::chownat(
                        &dir,
                        leaf,
                        uid.map(rustix::fs::Uid::from_raw),
                        gid.map(rustix::fs::Gid::from_raw),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(io_err("chown", &name))?;
                }
            }
            tar::EntryType::Link => {
                let target = link_bytes.clone().unwrap_or_default();
                let target_str = String::from_utf8_lossy(&target).into_owned();
                let tparts = components(&target, &name).map_err(|_| UnpackError::LinkEscape {
                    entry: name.clone(),
                    target: target_str.clone(),
                })?;
                let Some((tlast, tparent)) = tparts.split_last() else {
                    return Err(UnpackError::LinkEscape {
                        entry: name,
                        target: target_str,
                    });
                };
                let tdir = match rustix::fs::openat2(
                    &root_fd,
                    join(tparent),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    resolve_flags(),
                ) {
                    Ok(fd) => fd,
                    Err(_) if tparent.is_empty() => open_dir(&root_fd, &[], &name)?,
                    Err(_) => {
                        return Err(UnpackError::LinkTargetMissing {
                            entry: name,
                            target: target_str,
                        });
                    }
                };
                remove_all(&dir, leaf, &name)?;
                match rustix::fs::linkat(
                    &tdir,
                    OsStr::from_bytes(tlast),
                    &dir,
                    leaf,
                    AtFlags::empty(),
                ) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::NOENT) => {
                        return Err(UnpackError::LinkTargetMissing {
                            entry: name,
                            target: target_str,
                        });
                    }
                    Err(e) => return Err(io_err("create hardlink", &name)(e)),
                }
            }
            tar::EntryType::Fifo => {
                remove_all(&dir, leaf, &name)?;
                rustix::fs::mknodat(&dir, leaf, rustix::fs::FileType::Fifo, mode, 0)
                    .map_err(io_err("create fifo", &name))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(UnpackError::DeviceNode { entry: name });
            }
            other => {
                return Err(UnpackError::Unsupported {
                    entry: name,
                    kind: format!("{other:?}"),
                });
            }
        }
        created.insert(join(&parts).into_os_string().into_vec());
    }
    Ok(report)
}

fn set_owner_mode(
    fd: impl AsFd,
    owner: Option<(Option<u32>, Option<u32>)>,
    mode: Option<Mode>,
    entry: &str,
) -> Result<(), UnpackError> {
    // chown first: it clears setuid/setgid, which the chmod after it restores.
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(
            &fd,
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
        )
        .map_err(io_err("chown", entry))?;
    }
    if let Some(mode) = mode {
        rustix::fs::fchmod(&fd, mode).map_err(io_err("chmod", entry))?;
    }
    Ok(())
}

/// Unpacks the layer blob `layer` from `store` into `root`, decompressing as its bytes say.
/// The blob is verified against its digest as it is read (to its very end, past the tar
/// trailer); on any error the caller should discard `root`, which may hold a partial layer.
pub fn unpack_blob(
    store: &crate::Store,
    layer: &crate::Digest,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackReport, UnpackError> {
    let path = store.blob_path(layer);
    let name = path.display().to_string();
    let mut blob = store.open_blob(layer).map_err(|e| UnpackError::Io {
        op: "open layer",
        entry: name.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    let report = {
        let r = decompress(&mut blob).map_err(|source| UnpackError::Malformed { source })?;
        unpack(r, root, opts)?
    };
    // tar stops at its end marker; the rest of the blob must still be read to verify it.
    io::copy(&mut blob, &mut io::sink()).map_err(|source| UnpackError::Io {
        op: "verify layer",
        entry: name,
        source,
    })?;
    Ok(report)
}

/// Wraps a layer stream in the decompressor its first bytes call for (gzip — all members —
/// zstd, or none).
pub fn decompress<'a>(mut reader: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        let n = reader.read(&mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = io::Cursor::new(magic[..got].to_vec()).chain(reader);
    if got >= 2 && magic[..2] == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(head)))
    } else if got == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Ok(Box::new(zstd::stream::read::Decoder::new(head)?))
    } else {
        Ok(Box::new(head))
    }
}
