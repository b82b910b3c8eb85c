//! What this host offers the local provider: the OCI runtime binary, overlayfs, cgroups,
//! the container seccomp profile, privileges, a state directory that can hold overlay upper
//! dirs, inotify. Each check says
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

/// Which limits the host's cgroups can enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Controllers {
    /// `[service] memory`.
    pub memory: bool,
    /// `[service] cpus`.
    pub cpu: bool,
    /// `[service] pids`.
    pub pids: bool,
}

impl Controllers {
    /// The names of the missing ones, for messages.
    pub fn missing(self) -> Vec<&'static str> {
        [
            ("memory", self.memory),
            ("cpu", self.cpu),
            ("pids", self.pids),
        ]
        .into_iter()
        .filter(|(_, has)| !has)
        .map(|(name, _)| name)
        .collect()
    }
}

/// The cgroup mode and the controllers that can enforce limits.
pub fn cgroups() -> (CgroupMode, Controllers) {
    cgroups_at(Path::new("/sys/fs/cgroup"))
}

fn cgroups_at(root: &Path) -> (CgroupMode, Controllers) {
    if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        return (
            CgroupMode::Unified,
            Controllers {
                memory: has("memory"),
                cpu: has("cpu"),
                pids: has("pids"),
            },
        );
    }
    // v1 (legacy, or hybrid with an empty v2 hierarchy beside it, as runc uses it).
    if root.join("memory").is_dir() || root.join("cpu").is_dir() || root.join("pids").is_dir() {
        return (
            CgroupMode::Legacy,
            Controllers {
                memory: root.join("memory/memory.limit_in_bytes").exists(),
                cpu: root.join("cpu/cpu.cfs_quota_us").exists(),
                pids: root.join("pids/cgroup.procs").exists(),
            },
        );
    }
    (CgroupMode::None, Controllers::default())
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

    let (mode, controllers) = cgroups();
    let mode_name = if mode == CgroupMode::Unified {
        "cgroup v2"
    } else {
        "cgroup v1 (legacy/hybrid)"
    };
    let missing = controllers.missing();
    checks.push(match mode {
        CgroupMode::None => Check {
            name: "cgroups",
            status: CheckStatus::Fail,
            detail: "no cgroup hierarchy at /sys/fs/cgroup".to_owned(),
            fix: Some("mount cgroup2: mount -t cgroup2 none /sys/fs/cgroup".to_owned()),
        },
        _ if missing.is_empty() => Check {
            name: "cgroups",
            status: CheckStatus::Ok,
            detail: format!("{mode_name}; memory, cpu and pids limits are enforced"),
            fix: None,
        },
        _ => Check {
            name: "cgroups",
            status: if controllers.pids {
                CheckStatus::Warn
            } else {
                CheckStatus::Fail
            },
            detail: format!(
                "{mode_name}; no {} controller: instances that need {} do not start (every \
                 instance has a pids limit)",
                missing.join(", "),
                if missing.len() == 1 { "it" } else { "them" }
            ),
            fix: Some(
                "enable the controllers: boot with cgroup_enable=memory, or on v2 add them to \
                 cgroup.subtree_control"
                    .to_owned(),
            ),
        },
    });

    checks.push(seccomp_check(Path::new(super::seccomp::HOST_PROFILE)));
    checks.push(network_check(&super::network::Cni::default()));

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

/// Whether the host's container seccomp profile is there and converts.
fn seccomp_check(profile: &Path) -> Check {
    let fix = format!(
        "apt-get install -y {} (or set [service] seccomp = \"unconfined\" per app)",
        super::seccomp::HOST_PROFILE_PACKAGE
    );
    let converted = std::fs::read(profile)
        .map_err(|e| e.to_string())
        .and_then(|json| {
            let host = super::seccomp::Host::this()
                .ok_or_else(|| format!("no seccomp names for {}", std::env::consts::ARCH))?;
            super::seccomp::from_profile(&json, &host, &std::collections::HashSet::new())
        });
    match converted {
        Ok(_) => Check {
            name: "seccomp",
            status: CheckStatus::Ok,
            detail: format!("{} (instances get its allowlist)", profile.display()),
            fix: None,
        },
        Err(e) => Check {
            name: "seccomp",
            status: CheckStatus::Fail,
            detail: format!(
                "{}: {e}; instances with [service] seccomp = \"default\" do not start",
                profile.display()
            ),
            fix: Some(fix),
        },
    }
}

/// Whether the CNI plugins kiln's own network list needs, and `iptables`, are there.
fn network_check(cni: &super::network::Cni) -> Check {
    let missing: Vec<&str> = super::network::KILN_PLUGINS
        .iter()
        .copied()
        .filter(|p| !cni.bin_dirs.iter().any(|d| d.join(p).is_file()))
        .collect();
    let iptables = ["/usr/sbin/iptables", "/sbin/iptables"]
        .iter()
        .any(|p| Path::new(p).exists());
    if missing.is_empty() && iptables {
        return Check {
            name: "network",
            status: CheckStatus::Ok,
            detail: format!(
                "CNI plugins in {}; instances get their own namespace on {}",
                cni.bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                super::network::BRIDGE
            ),
            fix: None,
        };
    }
    let mut lacking: Vec<String> = missing.iter().map(|p| format!("CNI plugin {p}")).collect();
    if !iptables {
        lacking.push("iptables".to_owned());
    }
    Check {
        name: "network",
        status: CheckStatus::Fail,
        detail: format!(
            "no {}: instances on the default network do not start",
            lacking.join(", ")
        ),
        fix: Some(
            "apt-get install -y containernetworking-plugins iptables (or set [service] network \
             = \"host\" per app)"
                .to_owned(),
        ),
    }
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
        let all = Controllers {
            memory: true,
            cpu: true,
            pids: true,
        };
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            cgroups_at(d.path()),
            (CgroupMode::None, Controllers::default())
        );
        std::fs::write(
            d.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(cgroups_at(d.path()), (CgroupMode::Unified, all));
        std::fs::write(d.path().join("cgroup.controllers"), "pids\n").unwrap();
        let (_, only_pids) = cgroups_at(d.path());
        assert_eq!(only_pids.missing(), ["memory", "cpu"]);
        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v1.path().join("memory")).unwrap();
        std::fs::write(v1.path().join("memory/memory.limit_in_bytes"), "").unwrap();
        std::fs::create_dir_all(v1.path().join("cpu")).unwrap();
        std::fs::write(v1.path().join("cpu/cpu.cfs_quota_us"), "").unwrap();
        let (mode, no_pids) = cgroups_at(v1.path());
        assert_eq!(
            (mode, no_pids.missing()),
            (CgroupMode::Legacy, vec!["pids"])
        );
        std::fs::create_dir_all(v1.path().join("pids")).unwrap();
        std::fs::write(v1.path().join("pids/cgroup.procs"), "").unwrap();
        assert_eq!(cgroups_at(v1.path()), (CgroupMode::Legacy, all));
    }

    #[test]
    fn missing_cni_plugins_are_named_with_the_package() {
        let cni = super::super::network::Cni {
            conf_dir: PathBuf::new(),
            bin_dirs: vec![PathBuf::from("/nonexistent")],
        };
        let check = network_check(&cni);
        assert_eq!(check.status, CheckStatus::Fail);
        assert!(
            check.detail.contains("CNI plugin bridge"),
            "{}",
            check.detail
        );
        assert!(check.fix.unwrap().contains("containernetworking-plugins"));
    }

    #[test]
    fn a_missing_seccomp_profile_names_the_package() {
        let check = seccomp_check(Path::new("/nonexistent/seccomp.json"));
        assert_eq!(check.status, CheckStatus::Fail);
        assert!(
            check
                .fix
                .unwrap()
                .contains("golang-github-containers-common"),
            "{}",
            check.detail
        );
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
