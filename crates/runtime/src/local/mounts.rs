//! Mounting and unmounting an instance's overlay root, behind the [`Mounter`] trait so the
//! provider's logic runs in tests without root; [`KernelMounter`] makes the real syscalls
//! (through `rustix`, never the `mount` program).
//!
//! Only the overlay root is mounted on the host: tmpfs for `writable` paths, `/proc`, `/dev`
//! and the rest are mounted by the OCI runtime inside the instance's own mount namespace and
//! vanish with it.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

/// Mounts and unmounts overlay roots.
pub trait Mounter: Send + Sync {
    /// Mounts an overlay on `target`: `lower` (top-most first), `upper`, `work`.
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()>;

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
    ) -> io::Result<()> {
        let data = overlay_options(lower, upper, work)?;
        let data =
            CString::new(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        rustix::mount::mount(
            "overlay",
            target,
            "overlay",
            rustix::mount::MountFlags::NODEV,
            Some(data.as_c_str()),
        )
        .map_err(io::Error::from)
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
    fn mountinfo_points_are_unescaped() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            mount_points(text),
            [PathBuf::from("/mnt/a b"), PathBuf::from("/proc")]
        );
    }
}
