//! The guest's file systems: the initramfs's own `/dev`, `/proc` and `/sys`; then the
//! verity root at `/sysroot` with a size-capped tmpfs at each writable path and `/dev` and
//! `/proc` moved in; then the switch into it (`mount --move` to `/` and `chroot`, as
//! `switch_root` does: the initramfs cannot be unmounted, only hidden).
//!
//! The root is read-only erofs; the writable paths, `/dev` and `/proc` (and `/run/secrets`
//! when the app has secrets) must exist in it as directories (a read-only root cannot gain
//! mount points). The secrets get a tmpfs of their own, written, then made read-only.

use std::ffi::CString;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;

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

/// Mounts `device` (erofs, read-only) at [`SYSROOT`] with the writable paths' tmpfs and
/// the secrets' ([`secrets`]), and moves `/dev` and `/proc` into it.
pub fn root(device: &str, machine: &Machine, secrets: &[(String, Vec<u8>)]) -> Result<(), Error> {
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
    self::secrets(secrets, machine)?;
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

/// The secrets at `/run/secrets/NAME` under [`SYSROOT`]: a tmpfs just large enough, the
/// directory 0500 and each file 0400, both the app's, then remounted read-only.
fn secrets(values: &[(String, Vec<u8>)], machine: &Machine) -> Result<(), Error> {
    if values.is_empty() {
        return Ok(());
    }
    let target = format!("{SYSROOT}{}", super::secrets::DIR);
    // Inside a writable `/run`, the directory is made; on the sealed root, the export did.
    match rustix::fs::mkdir(target.as_str(), Mode::from_raw_mode(0o500)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => {
            return Err(err(
                "creating (it must be a directory in the image)",
                &target,
            )(e));
        }
    }
    let size: usize = values.iter().map(|(_, v)| v.len() + 4096).sum::<usize>() + 4096;
    let options = CString::new(format!(
        "size={size},mode=0500,uid={},gid={}",
        machine.uid, machine.gid
    ))
    .map_err(|_| Error {
        what: "mounting the secrets' tmpfs at",
        path: target.clone(),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    rustix::mount::mount("tmpfs", target.as_str(), "tmpfs", flags, options.as_c_str())
        .map_err(err("mounting the secrets' tmpfs at", &target))?;
    for (name, value) in values {
        let path = format!("{target}/{name}");
        let io_err = |source| Error {
            what: "writing the secret",
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)
            .map_err(io_err)?;
        file.write_all(value).map_err(io_err)?;
        std::os::unix::fs::fchown(&file, Some(machine.uid), Some(machine.gid)).map_err(io_err)?;
    }
    rustix::mount::mount_remount(target.as_str(), flags | MountFlags::RDONLY, "")
        .map_err(err("making the secrets read-only at", &target))?;
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
            "tmpfs_size_bytes": 1048576, "stop_grace_ms": 0, "image": "sha256:ab",
            "limits": {"memory_bytes": null, "cpu_millis": null, "pids": null},
            "secrets": [], "health": null, "status_port": null}"#;
        let m = Machine::parse(json).unwrap();
        assert_eq!(tmpfs_options("/tmp", &m), "size=1048576,mode=1777");
        assert_eq!(
            tmpfs_options("/data", &m),
            "size=1048576,mode=0755,uid=1000,gid=100"
        );
    }
}
