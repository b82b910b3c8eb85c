//! The guest's file systems: the initramfs's own `/dev`, `/proc` and `/sys`; then the
//! verity root at `/sysroot` with a size-capped tmpfs at each writable path and `/dev` and
//! `/proc` moved in; then the switch into it (`mount --move` to `/` and `chroot`, as
//! `switch_root` does: the initramfs cannot be unmounted, only hidden).
//!
//! The root is read-only erofs; the writable paths and `/dev` and `/proc` must exist in it
//! as directories (a read-only root cannot gain mount points).

use std::ffi::CString;
use std::io;

use rustix::fs::Mode;
use rustix::mount::{MountFlags, UnmountFlags};

use super::config::Machine;

/// Where the root is mounted before the switch.
pub const SYSROOT: &str = "/sysroot";

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct Error {
    /// The step.
    pub what: &'static str,
    /// The mount point.
    pub path: String,
    /// The kernel's answer.
    #[source]
    pub source: io::Error,
}

fn err(what: &'static str, path: &str) -> impl FnOnce(rustix::io::Errno) -> Error {
    let path = path.to_owned();
    move |e| Error {
        what,
        path,
        source: e.into(),
    }
}

/// Mounts devtmpfs at `/dev`, proc at `/proc` and sysfs at `/sys` in the initramfs.
pub fn early() -> Result<(), Error> {
    for (fs, path) in [("devtmpfs", "/dev"), ("proc", "/proc"), ("sysfs", "/sys")] {
        match rustix::fs::mkdir(path, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(err("creating", path)(e)),
        }
        let flags = MountFlags::NOSUID | MountFlags::NOEXEC;
        rustix::mount::mount(fs, path, fs, flags, None).map_err(err("mounting", path))?;
    }
    Ok(())
}

/// The options of a writable path's tmpfs: `/tmp` and `/var/tmp` as everyone's (sticky),
/// any other path the app's own.
pub fn tmpfs_options(path: &str, machine: &Machine) -> String {
    let size = machine.tmpfs_size_bytes;
    if path == "/tmp" || path == "/var/tmp" {
        format!("size={size},mode=1777")
    } else {
        format!(
            "size={size},mode=0755,uid={},gid={}",
            machine.uid, machine.gid
        )
    }
}

/// Mounts `device` (erofs, read-only) at [`SYSROOT`] with the writable paths' tmpfs, and
/// moves `/dev` and `/proc` into it.
pub fn root(device: &str, machine: &Machine) -> Result<(), Error> {
    match rustix::fs::mkdir(SYSROOT, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(err("creating", SYSROOT)(e)),
    }
    rustix::mount::mount(device, SYSROOT, "erofs", MountFlags::RDONLY, None)
        .map_err(err("mounting the root (erofs) at", SYSROOT))?;
    for path in &machine.writable {
        let target = format!("{SYSROOT}{path}");
        let options = CString::new(tmpfs_options(path, machine)).map_err(|_| Error {
            what: "mounting a tmpfs at",
            path: path.clone(),
            source: io::ErrorKind::InvalidInput.into(),
        })?;
        rustix::mount::mount(
            "tmpfs",
            target.as_str(),
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            options.as_c_str(),
        )
        .map_err(err(
            "mounting a tmpfs at (it must be a directory in the image)",
            path,
        ))?;
    }
    for path in ["/dev", "/proc"] {
        let target = format!("{SYSROOT}{path}");
        rustix::mount::mount_move(path, target.as_str()).map_err(err(
            "moving into the root (it must be a directory in the image)",
            path,
        ))?;
    }
    // The app gets no sysfs; the init has read what it needs from it.
    rustix::mount::unmount("/sys", UnmountFlags::DETACH).map_err(err("unmounting", "/sys"))?;
    Ok(())
}

/// Makes [`SYSROOT`] the root: `chdir`, `mount --move . /`, `chroot .`, `chdir /`.
pub fn switch_root() -> Result<(), Error> {
    rustix::process::chdir(SYSROOT).map_err(err("entering", SYSROOT))?;
    rustix::mount::mount_move(".", "/").map_err(err("moving to /", SYSROOT))?;
    rustix::process::chroot(".").map_err(err("changing root to", SYSROOT))?;
    rustix::process::chdir("/").map_err(err("entering the new", "/"))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_options_per_path() {
        let json = br#"{"modules": [], "argv": ["/hello"], "env": [], "cwd": "/",
            "uid": 1000, "gid": 100, "writable": ["/tmp", "/data"],
            "tmpfs_size_bytes": 1048576, "stop_grace_ms": 0}"#;
        let m = Machine::parse(json).unwrap();
        assert_eq!(tmpfs_options("/tmp", &m), "size=1048576,mode=1777");
        assert_eq!(
            tmpfs_options("/data", &m),
            "size=1048576,mode=0755,uid=1000,gid=100"
        );
    }
}
