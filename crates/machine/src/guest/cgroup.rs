//! The app's cgroup: cgroup v2 mounted in the initramfs (so the app, whose root it is not
//! in, never sees it), one child `app` with the spec's `memory`, `cpus` and `pids` as
//! `memory.max`, `cpu.max` and `pids.max`, and the app started inside it.
//!
//! The init keeps a descriptor of the hierarchy's root and reaches every file through it:
//! after the switch into the image's root the mount has no path left. To start the app in
//! `app` without a window where it runs outside, the init moves itself in, spawns, and
//! moves itself back ([`Cgroup::spawn_in`]): a child is born in its parent's cgroup.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::process::{Child, Command};

use rustix::fs::{Mode, OFlags};
use rustix::mount::MountFlags;

use super::config::Limits;

/// Where the hierarchy is mounted in the initramfs.
pub const MOUNT: &str = "/cgroup";
/// The app's cgroup, under the root.
pub const APP: &str = "app";
/// `cpu.max`'s period, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// The least quota `cpu.max` takes, in microseconds.
const CPU_QUOTA_MIN_US: u64 = 1_000;

/// Why the cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct Error {
    /// The step.
    pub what: &'static str,
    /// The file or directory.
    pub path: String,
    /// The kernel's answer.
    #[source]
    pub source: io::Error,
}

fn err(what: &'static str, path: &str) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error { what, path, source }
}

/// The hierarchy's root, held open.
#[derive(Debug)]
pub struct Cgroup {
    root: OwnedFd,
}

/// The files of `app` the limits go into, with their values, in the order they are
/// written; pure.
pub fn limit_files(limits: &Limits) -> Vec<(&'static str, String)> {
    let mut files = Vec::new();
    if let Some(bytes) = limits.memory_bytes {
        // The guest has no swap (the init turns none on), so this is the whole limit.
        files.push(("memory.max", bytes.to_string()));
    }
    if let Some(millis) = limits.cpu_millis {
        let quota = (millis.saturating_mul(CPU_PERIOD_US) / 1000).max(CPU_QUOTA_MIN_US);
        files.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}")));
    }
    if let Some(pids) = limits.pids {
        files.push(("pids.max", pids.to_string()));
    }
    files
}

impl Cgroup {
    /// Mounts cgroup2 at [`MOUNT`], turns on the `cpu`, `memory` and `pids` controllers
    /// for the children, creates `app` and writes its limits.
    pub fn setup(limits: &Limits) -> Result<Cgroup, Error> {
        match rustix::fs::mkdir(MOUNT, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(err("creating", MOUNT)(e.into())),
        }
        rustix::mount::mount(
            "cgroup2",
            MOUNT,
            "cgroup2",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        )
        .map_err(|e| err("mounting cgroup2 at", MOUNT)(e.into()))?;
        let root = rustix::fs::open(
            MOUNT,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err("opening", MOUNT)(e.into()))?;
        let cgroup = Cgroup { root };
        cgroup.write("cgroup.subtree_control", "+cpu +memory +pids")?;
        match rustix::fs::mkdirat(&cgroup.root, APP, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(err("creating the cgroup", APP)(e.into())),
        }
        for (file, value) in limit_files(limits) {
            cgroup.write(&format!("{APP}/{file}"), &value)?;
        }
        Ok(cgroup)
    }

    fn open(&self, path: &str, flags: OFlags) -> io::Result<File> {
        Ok(File::from(rustix::fs::openat(
            &self.root,
            path,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
        )?))
    }

    fn write(&self, path: &str, value: &str) -> Result<(), Error> {
        let what = "writing the cgroup file";
        let mut file = self.open(path, OFlags::WRONLY).map_err(err(what, path))?;
        file.write_all(value.as_bytes()).map_err(err(what, path))
    }

    /// A file of the app's cgroup (`memory.current`, `memory.events`…), trimmed; `None` if
    /// it cannot be read.
    pub fn read(&self, file: &str) -> Option<String> {
        let mut text = String::new();
        self.open(&format!("{APP}/{file}"), OFlags::RDONLY)
            .ok()?
            .read_to_string(&mut text)
            .ok()?;
        Some(text.trim().to_owned())
    }

    /// Spawns `command` inside `app`: the init joins it, spawns, and goes back to the
    /// root (it must not stay: its own memory would count against the app's limit).
    pub fn spawn_in(&self, command: &mut Command) -> Result<Child, Error> {
        let me = std::process::id().to_string();
        self.write(&format!("{APP}/cgroup.procs"), &me)?;
        let child = command
            .spawn()
            .map_err(err("starting the app in the cgroup", APP));
        let back = self.write("cgroup.procs", &me);
        let child = child?;
        back?;
        Ok(child)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn limits_as_the_kernel_files_take_them() {
        let all = Limits {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(500),
            pids: Some(64),
        };
        assert_eq!(
            limit_files(&all),
            [
                ("memory.max", "67108864".to_owned()),
                ("cpu.max", "50000 100000".to_owned()),
                ("pids.max", "64".to_owned()),
            ]
        );
        assert!(limit_files(&Limits::default()).is_empty());
        let tiny = Limits {
            cpu_millis: Some(1),
            ..Limits::default()
        };
        assert_eq!(limit_files(&tiny), [("cpu.max", "1000 100000".to_owned())]);
        let many = Limits {
            cpu_millis: Some(4000),
            ..Limits::default()
        };
        assert_eq!(
            limit_files(&many),
            [("cpu.max", "400000 100000".to_owned())]
        );
    }
}
