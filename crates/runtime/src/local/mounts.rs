//! Mounting and unmounting an instance's overlay root, behind the [`Mounter`] trait so the
//! provider's logic runs in tests without root; [`KernelMounter`] makes the real syscalls
//! (through `rustix`, never the `mount` program).
//!
//! Only the overlay root is mounted on the host: tmpfs for `writable` paths, `/proc`, `/dev`
//! and the rest are mounted by the OCI runtime inside the instance's own mount namespace and
//! vanish with it.
//!
//! The root is read-only, `nosuid` and `nodev` from the moment the runtime sees it: runc makes
//! a root it is asked to make read-only so with a bind remount that drops `nosuid` and
//! `nodev`, so kiln makes it read-only itself, after creating the mount points the runtime
//! needs in it (what runc would have created).

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::mount::MountFlags;

/// Mounts and unmounts overlay roots.
pub trait Mounter: Send + Sync {
    /// Mounts an overlay on `target`: `lower` (top-most first), `upper`, `work`; creates the
    /// directories `mount_points` (absolute paths, resolved inside the root) in it; leaves it
    /// read-only, `nosuid` and `nodev`.
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
        mount_points: &[String],
    ) -> io::Result<()>;

    /// Mounts a `nosuid,nodev,noexec` tmpfs of `size` bytes, mode 0700, on `target`: memory
    /// for what must never reach the disk (an instance's secrets and the bundle that holds
    /// them).
    fn mount_tmpfs(&self, target: &Path, size: u64) -> io::Result<()>;

    /// Detaches whatever is mounted on `target` (lazily, so a busy mount cannot block
    /// destroy); not mounted is not an error.
    fn unmount(&self, target: &Path) -> io::Result<()>;

    /// Mount points at or below `dir` in this mount namespace.
    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
}

/// The real mount syscalls.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelMounter;

impl Mounter for KernelMounter {
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
        mount_points: &[String],
    ) -> io::Result<()> {
        let data = overlay_options(lower, upper, work)?;
        let data =
            CString::new(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let sealed = MountFlags::NOSUID | MountFlags::NODEV;
        rustix::mount::mount("overlay", target, "overlay", sealed, Some(data.as_c_str()))?;
        let finished = (|| -> io::Result<()> {
            let root = rustix::fs::open(
                target,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            for point in mount_points {
                mkdir_in_root(&root, point)
                    .map_err(|e| io::Error::new(e.kind(), format!("mount point {point}: {e}")))?;
            }
            rustix::mount::mount_remount(target, sealed | MountFlags::RDONLY, "")?;
            Ok(())
        })();
        if finished.is_err() {
            let _ = self.unmount(target);
        }
        finished
    }

    fn mount_tmpfs(&self, target: &Path, size: u64) -> io::Result<()> {
        let data = CString::new(format!("size={size},mode=0700"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        rustix::mount::mount("tmpfs", target, "tmpfs", flags, Some(data.as_c_str()))?;
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        match rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) => Ok(()),
            // EINVAL: not a mount point; ENOENT: already gone. Both mean "nothing mounted".
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(mount_points(&text)
            .into_iter()
            .filter(|p| p.starts_with(dir))
            .collect())
    }
}

/// The overlay mount data. `lowerdir` lists the top-most layer first, as overlayfs wants.
/// Paths with `,` or `:` would be misparsed by the kernel, so they are refused.
pub(crate) fn overlay_options(lower: &[PathBuf], upper: &Path, work: &Path) -> io::Result<String> {
    let check = |p: &Path| -> io::Result<String> {
        let s = p.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("non-UTF-8 path {}", p.display()),
            )
        })?;
        if s.contains([',', ':', '\\']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay paths cannot contain ',', ':' or '\\': {s}"),
            ));
        }
        Ok(s.to_owned())
    };
    let lowers: Vec<String> = lower.iter().map(|p| check(p)).collect::<io::Result<_>>()?;
    // index=off: overlayfs then records nothing about lower files (no origin file handles),
    // so an instance's lifetime leaves the shared layer cache exactly as it was.
    Ok(format!(
        "lowerdir={},upperdir={},workdir={},index=off",
        lowers.join(":"),
        check(upper)?,
        check(work)?
    ))
}

/// How paths inside an instance's root are resolved: `..` and absolute symlinks stay in it,
/// and `/proc` magic links are refused.
fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// `mkdir -p path` inside `root`, following the image's symlinks as the instance would see
/// them, so a mount point is where the runtime will mount.
fn mkdir_in_root(root: &rustix::fd::OwnedFd, path: &str) -> io::Result<()> {
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut at = PathBuf::from(".");
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let next = at.join(part);
        match rustix::fs::openat2(root, &next, dir_flags, Mode::empty(), in_root()) {
            Ok(_) => {}
            Err(rustix::io::Errno::NOENT) => {
                let parent = rustix::fs::openat2(root, &at, dir_flags, Mode::empty(), in_root())?;
                match rustix::fs::mkdirat(&parent, part, Mode::from_raw_mode(0o755)) {
                    // 0755 whatever kiln's umask (077 on its state): the instance's user
                    // must be able to reach what is mounted below it.
                    Ok(()) => rustix::fs::chmodat(
                        &parent,
                        part,
                        Mode::from_raw_mode(0o755),
                        rustix::fs::AtFlags::empty(),
                    )?,
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                // A dangling symlink makes `mkdirat` say EEXIST and this fail: say so.
                rustix::fs::openat2(root, &next, dir_flags, Mode::empty(), in_root())?;
            }
            Err(e) => return Err(e.into()),
        }
        at = next;
    }
    Ok(())
}

/// The regular file at `path` inside the directory tree `root` (an instance's mounted root),
/// resolved as the instance would resolve it; `None` when there is none. At most `cap` bytes
/// are read: a bigger file is an error.
pub(crate) fn read_in_root(root: &Path, path: &str, cap: u64) -> io::Result<Option<String>> {
    use std::io::Read;
    let root = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let rel = path.trim_start_matches('/');
    // Non-blocking, so a FIFO planted at the path cannot hang the create.
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = match rustix::fs::openat2(&root, rel, flags, Mode::empty(), in_root()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode).is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path} is not a regular file"),
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(cap + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path} is larger than {cap} bytes"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The mount points listed in a `/proc/self/mountinfo` text (field 5, octal escapes decoded).
pub(crate) fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .collect()
}

/// Decodes mountinfo's `\040`-style escapes (space, tab, newline, backslash).
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn overlay_options_put_the_top_layer_first_and_refuse_separators() {
        let lower = [PathBuf::from("/l/top"), PathBuf::from("/l/base")];
        assert_eq!(
            overlay_options(&lower, Path::new("/i/upper"), Path::new("/i/work")).unwrap(),
            "lowerdir=/l/top:/l/base,upperdir=/i/upper,workdir=/i/work,index=off"
        );
        assert!(
            overlay_options(&[PathBuf::from("/a:b")], Path::new("/u"), Path::new("/w")).is_err()
        );
        assert!(overlay_options(&[], Path::new("/u,x"), Path::new("/w")).is_err());
    }

    #[test]
    fn files_are_read_and_dirs_made_inside_the_root_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::write(root.join("etc/passwd"), "app:x:1:1::/:/bin/sh\n").unwrap();
        std::fs::write(d.path().join("outside"), "host secret\n").unwrap();
        // Absolute and relative symlinks resolve inside the root, never out of it.
        std::os::unix::fs::symlink("/etc/passwd", root.join("etc/abs")).unwrap();
        std::os::unix::fs::symlink("../../outside", root.join("etc/escape")).unwrap();
        std::os::unix::fs::symlink("/real", root.join("link")).unwrap();
        assert_eq!(
            read_in_root(&root, "/etc/passwd", 1024).unwrap().as_deref(),
            Some("app:x:1:1::/:/bin/sh\n")
        );
        assert_eq!(
            read_in_root(&root, "/etc/abs", 1024).unwrap().as_deref(),
            Some("app:x:1:1::/:/bin/sh\n")
        );
        assert_eq!(read_in_root(&root, "/etc/escape", 1024).unwrap(), None);
        assert_eq!(read_in_root(&root, "/etc/group", 1024).unwrap(), None);
        assert!(read_in_root(&root, "/etc/passwd", 4).is_err());
        assert!(read_in_root(&root, "/etc", 1024).is_err());

        let fd = rustix::fs::open(&root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        mkdir_in_root(&fd, "/var/cache/app").unwrap();
        mkdir_in_root(&fd, "/link/tmp").unwrap();
        mkdir_in_root(&fd, "/var/cache/app").unwrap();
        assert!(root.join("var/cache/app").is_dir());
        assert!(
            root.join("real/tmp").is_dir(),
            "created through the symlink"
        );
        assert!(mkdir_in_root(&fd, "/etc/passwd/x").is_err());
    }

    #[test]
    fn mountinfo_points_are_unescaped() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            mount_points(text),
            [PathBuf::from("/mnt/a b"), PathBuf::from("/proc")]
        );
    }
}
