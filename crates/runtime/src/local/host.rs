//! What this host offers the local provider: the OCI runtime binary, overlayfs, cgroups,
//! privileges, a state directory that can hold overlay upper dirs, inotify. Each check says
//! exactly what to install or change when it fails. Read-only: nothing here changes the host.

use std::path::{Path, PathBuf};
use std::process::Command;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Fine.
    Ok,
    /// Works, with a limitation.
    Warn,
    /// The local provider cannot run instances.
    Fail,
}

impl CheckStatus {
    /// `ok`, `warn`, `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        }
    }
}

/// One doctor check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// How it came out.
    pub status: CheckStatus,
    /// What was found.
    pub detail: String,
    /// What to do about it, when not ok.
    pub fix: Option<String>,
}

/// Which cgroup hierarchy the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v2 only.
    Unified,
    /// v1 controllers (possibly with a v2 hierarchy beside them).
    Legacy,
    /// Neither found.
    None,
}

/// The cgroup mode and whether memory and CPU limits can be enforced.
pub fn cgroups() -> (CgroupMode, bool) {
    cgroups_at(Path::new("/sys/fs/cgroup"))
}

fn cgroups_at(root: &Path) -> (CgroupMode, bool) {
    if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        return (CgroupMode::Unified, has("memory") && has("cpu"));
    }
    if root.join("memory").is_dir() || root.join("cpu").is_dir() {
        let limits = root.join("memory/memory.limit_in_bytes").exists()
            && root.join("cpu/cpu.cfs_quota_us").exists();
        return (CgroupMode::Legacy, limits);
    }
    (CgroupMode::None, false)
}

/// Finds `binary` (a path, or a name in `PATH`).
pub fn find_binary(binary: &str) -> Option<PathBuf> {
    if binary.contains('/') {
        let p = PathBuf::from(binary);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(binary))
            .find(|p| p.is_file())
    })
}

const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// Every check, for `runtime` and a state directory at `state`.
pub fn doctor(runtime: &str, state: &Path) -> Vec<Check> {
    let mut checks = Vec::new();

    checks.push(match find_binary(runtime) {
        Some(path) => match Command::new(&path).arg("--version").output() {
            Ok(out) if out.status.success() => Check {
                name: "runtime",
                status: CheckStatus::Ok,
                detail: format!(
                    "{} ({})",
                    path.display(),
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                ),
                fix: None,
            },
            _ => Check {
                name: "runtime",
                status: CheckStatus::Fail,
                detail: format!(
                    "{} does not run (`{runtime} --version` failed)",
                    path.display()
                ),
                fix: Some("reinstall it: apt-get install --reinstall -y runc".to_owned()),
            },
        },
        None => Check {
            name: "runtime",
            status: CheckStatus::Fail,
            detail: format!("OCI runtime `{runtime}` not found in PATH"),
            fix: Some(
                "install runc: apt-get install -y runc (or set [target] runtime to its path)"
                    .to_owned(),
            ),
        },
    });

    let overlay = std::fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("overlay"))
        })
        .unwrap_or(false);
    checks.push(if overlay {
        Check {
            name: "overlayfs",
            status: CheckStatus::Ok,
            detail: "the kernel supports overlay".to_owned(),
            fix: None,
        }
    } else {
        Check {
            name: "overlayfs",
            status: CheckStatus::Fail,
            detail: "overlay is not in /proc/filesystems".to_owned(),
            fix: Some(
                "load the module: modprobe overlay (kernel ≥ 4.0 with CONFIG_OVERLAY_FS)"
                    .to_owned(),
            ),
        }
    });

    let (mode, limits) = cgroups();
    checks.push(match (mode, limits) {
        (CgroupMode::None, _) => Check {
            name: "cgroups",
            status: CheckStatus::Fail,
            detail: "no cgroup hierarchy at /sys/fs/cgroup".to_owned(),
            fix: Some("mount cgroup2: mount -t cgroup2 none /sys/fs/cgroup".to_owned()),
        },
        (mode, true) => Check {
            name: "cgroups",
            status: CheckStatus::Ok,
            detail: format!(
                "{}; memory and cpu limits are enforced",
                if mode == CgroupMode::Unified { "cgroup v2" } else { "cgroup v1 (legacy/hybrid)" }
            ),
            fix: None,
        },
        (mode, false) => Check {
            name: "cgroups",
            status: CheckStatus::Warn,
            detail: format!(
                "{}; memory/cpu controllers unavailable, so [service] memory and cpus are not enforced",
                if mode == CgroupMode::Unified { "cgroup v2" } else { "cgroup v1 (legacy/hybrid)" }
            ),
            fix: Some(
                "enable the controllers: boot with cgroup_enable=memory, or on v2 add them to \
                 cgroup.subtree_control"
                    .to_owned(),
            ),
        },
    });

    let root = rustix::process::geteuid().is_root();
    checks.push(Check {
        name: "privileges",
        status: if root {
            CheckStatus::Ok
        } else {
            CheckStatus::Fail
        },
        detail: if root {
            "running as root".to_owned()
        } else {
            "not root: mounting overlays and creating namespaces need root".to_owned()
        },
        fix: (!root).then(|| "run kiln as root (sudo kiln …)".to_owned()),
    });

    let probe = existing_ancestor(state);
    checks.push(match rustix::fs::statfs(&probe) {
        Ok(fs) if fs.f_type == OVERLAYFS_SUPER_MAGIC => Check {
            name: "state",
            status: CheckStatus::Fail,
            detail: format!(
                "{} is on overlayfs, which cannot hold overlay upper dirs",
                probe.display()
            ),
            fix: Some(
                "use --state on a local disk or tmpfs (e.g. --state /var/lib/kiln)".to_owned(),
            ),
        },
        Ok(_) => Check {
            name: "state",
            status: CheckStatus::Ok,
            detail: format!("{} can hold instance files", state.display()),
            fix: None,
        },
        Err(e) => Check {
            name: "state",
            status: CheckStatus::Fail,
            detail: format!("{}: {e}", probe.display()),
            fix: Some("create the state directory or pass --state DIR".to_owned()),
        },
    });

    let watches = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    checks.push(match watches {
        Some(n) if n >= 8192 => Check {
            name: "inotify",
            status: CheckStatus::Ok,
            detail: format!("max_user_watches = {n}"),
            fix: None,
        },
        other => Check {
            name: "inotify",
            status: CheckStatus::Warn,
            detail: format!(
                "max_user_watches = {}: drift may only be found by the periodic rescan",
                other.map_or("unknown".to_owned(), |n| n.to_string())
            ),
            fix: Some("sysctl -w fs.inotify.max_user_watches=65536".to_owned()),
        },
    });
    checks
}

fn existing_ancestor(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    abs.ancestors()
        .find(|p| p.exists())
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn cgroup_modes_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(cgroups_at(d.path()), (CgroupMode::None, false));
        std::fs::write(
            d.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(cgroups_at(d.path()), (CgroupMode::Unified, true));
        std::fs::write(d.path().join("cgroup.controllers"), "pids\n").unwrap();
        assert_eq!(cgroups_at(d.path()), (CgroupMode::Unified, false));
        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v1.path().join("memory")).unwrap();
        std::fs::write(v1.path().join("memory/memory.limit_in_bytes"), "").unwrap();
        std::fs::create_dir_all(v1.path().join("cpu")).unwrap();
        std::fs::write(v1.path().join("cpu/cpu.cfs_quota_us"), "").unwrap();
        assert_eq!(cgroups_at(v1.path()), (CgroupMode::Legacy, true));
    }

    #[test]
    fn a_missing_runtime_says_what_to_install() {
        let checks = doctor("kiln-no-such-runtime", Path::new("/tmp"));
        let rt = checks.iter().find(|c| c.name == "runtime").unwrap();
        assert_eq!(rt.status, CheckStatus::Fail);
        assert!(
            rt.fix
                .as_deref()
                .unwrap()
                .contains("apt-get install -y runc")
        );
    }
}
