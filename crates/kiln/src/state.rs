//! The state directory: the image store, the ledger (every release's configuration), the
//! daemon's socket, the layer cache, instances and their logs. [`choose`] says which
//! directory a command uses (`--state`, else `KILN_STATE`, else a default) and why;
//! [`prepare`] is the one door every command that uses it goes through.
//!
//! **Invariant:** kiln uses a state directory only when it is a directory owned by the
//! effective user that no other user can write to (as sshd's `StrictModes` treats `~/.ssh`),
//! and leaves it `0700`; what kiln creates under it is `0600` (directories `0700`), by the
//! process umask [`private_umask`] sets. A directory someone else owns or can write to may
//! hold their ledger, their socket or their layers, so it is refused, never repaired.
//! Image layers keep their own modes inside the cache; the `0700` directory above them is
//! what keeps their setuid files out of other users' reach.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The state directory of the system service (`kiln.service`, which the Debian package
/// installs and whose `StateDirectory=` makes it).
pub const SYSTEM_STATE: &str = "/var/lib/kiln";

/// For tests only: a directory that stands in for [`SYSTEM_STATE`], so a test can show the
/// choice without touching the host's `/var/lib`.
pub const SYSTEM_STATE_ENV: &str = "KILN_SYSTEM_STATE";

/// The default state directory, relative to the current directory.
const PROJECT_STATE: &str = ".kiln";

/// The state directory a command uses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Absolute.
    pub dir: PathBuf,
    /// Why this one.
    pub why: Why,
}

/// Why kiln uses the state directory it uses (`kiln doctor` prints it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// `--state DIR`.
    Flag,
    /// `KILN_STATE`.
    Env,
    /// Root, outside a project, and the system service's directory exists.
    System,
    /// The current directory is a project: it has this entry (`kiln.toml` or `.kiln`).
    Project(&'static str),
    /// Not root: the system service's directory is root's.
    NotRoot,
    /// Root outside a project, but no system service's directory (the package is not
    /// installed, or it was purged).
    NoSystem(PathBuf),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Flag => f.write_str("--state"),
            Why::Env => f.write_str("KILN_STATE"),
            Why::System => f.write_str("the system service's (root, outside a project)"),
            Why::Project(entry) => write!(f, "the project's (./{entry} is here)"),
            Why::NotRoot => f.write_str("the default (not root, so not the system service's)"),
            Why::NoSystem(system) => write!(
                f,
                "the default ({} does not exist: no system service installed)",
                system.display()
            ),
        }
    }
}

/// What [`decide`] goes by, gathered by [`choose`].
#[derive(Debug)]
struct Facts {
    flag: Option<PathBuf>,
    env: Option<PathBuf>,
    root: bool,
    /// The first of `kiln.toml` and `.kiln` that the current directory has.
    project: Option<&'static str>,
    system: PathBuf,
    system_exists: bool,
}

/// Which state directory to use: `--state`, else `KILN_STATE`, else `/var/lib/kiln` when
/// kiln runs as root outside a project (no `kiln.toml` and no `.kiln` here) and the system
/// service's directory exists, else `./.kiln`. The result is absolute.
pub fn choose(flag: Option<PathBuf>) -> anyhow::Result<Choice> {
    let non_empty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    let system = non_empty(std::env::var_os(SYSTEM_STATE_ENV))
        .unwrap_or_else(|| PathBuf::from(SYSTEM_STATE));
    let facts = Facts {
        env: non_empty(std::env::var_os("KILN_STATE")),
        root: rustix::process::geteuid().is_root(),
        // Any entry counts, even one that is not a directory: `prepare` then refuses it with
        // its reason, rather than kiln quietly using the system's state instead.
        project: ["kiln.toml", PROJECT_STATE]
            .into_iter()
            .find(|entry| std::fs::symlink_metadata(entry).is_ok()),
        system_exists: system.is_dir(),
        system,
        flag,
    };
    let Choice { dir, why } = decide(facts);
    let shown = dir.display().to_string();
    let dir = std::path::absolute(&dir).with_context(|| format!("cannot resolve {why} {shown}"))?;
    Ok(Choice { dir, why })
}

/// [`choose`]'s rule, on the facts it gathered.
fn decide(facts: Facts) -> Choice {
    let (dir, why) = if let Some(dir) = facts.flag {
        (dir, Why::Flag)
    } else if let Some(dir) = facts.env {
        (dir, Why::Env)
    } else if let Some(entry) = facts.project {
        (PathBuf::from(PROJECT_STATE), Why::Project(entry))
    } else if !facts.root {
        (PathBuf::from(PROJECT_STATE), Why::NotRoot)
    } else if !facts.system_exists {
        (PathBuf::from(PROJECT_STATE), Why::NoSystem(facts.system))
    } else {
        (facts.system, Why::System)
    };
    Choice { dir, why }
}

/// Whether a command may create the state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The command writes state (builds, runs, serves): create the directory when missing.
    Create,
    /// The command only reads state or talks to a daemon: a missing directory is left
    /// missing, and the command says what it did not find.
    Existing,
}

/// Sets the process umask to `077`, so every file kiln creates from now on (SQLite's WAL and
/// shared-memory files, logs, records, pid files runc writes, the daemon's socket) is the
/// owner's alone. Call before anything is created.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Checks `dir` and makes it private: creates it `0700` when missing (with `Need::Create`),
/// tightens an existing directory of ours to `0700`, and refuses one that another user owns
/// or can write to. A symlink is judged by the directory it points to.
pub fn prepare(dir: &Path, need: Need) -> anyhow::Result<()> {
    let md = match std::fs::metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound && need == Need::Create => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| {
                    format!(
                        "cannot create the state directory {}: create it (mode 0700) or pass \
                         --state DIR",
                        dir.display()
                    )
                });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot read the state directory {}: check its path and permissions",
                    dir.display()
                )
            });
        }
    };
    let shown = match std::fs::read_link(dir) {
        Ok(target) => format!("{} (a symlink to {})", dir.display(), target.display()),
        Err(_) => dir.display().to_string(),
    };
    let euid = rustix::process::geteuid().as_raw();
    match judge(md.is_dir(), md.uid(), md.mode(), euid) {
        Verdict::Private => Ok(()),
        Verdict::Tighten => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(
                || format!("cannot make the state directory {shown} private (chmod 700)"),
            )?;
            tracing::warn!(
                state = %dir.display(),
                was = format!("{:04o}", md.mode() & 0o7777),
                "the state directory was readable by other users; it is 0700 now"
            );
            Ok(())
        }
        Verdict::NotADirectory => anyhow::bail!(
            "the state directory {shown} is not a directory: pass --state DIR (or set \
             KILN_STATE) naming a directory"
        ),
        Verdict::NotOurs { owner } => anyhow::bail!(
            "refusing the state directory {shown}: it is owned by uid {owner} and kiln runs as \
             uid {euid}, so its ledger, socket and layers may be someone else's; use a state \
             directory of your own (--state DIR or KILN_STATE), or `chown -R {euid} {}` if \
             you trust what is in it",
            dir.display()
        ),
        Verdict::OthersWrite { mode } => anyhow::bail!(
            "refusing the state directory {shown}: its mode {mode:04o} lets other users write \
             to it, so what is in it may not be kiln's; check its contents, then `chmod 700 {}`, \
             or use another --state DIR",
            dir.display()
        ),
    }
}

/// What [`prepare`] does with an existing state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Ours and `0700` (or tighter): use it.
    Private,
    /// Ours, readable or searchable by others but writable by no one else: chmod 700, use it.
    Tighten,
    NotADirectory,
    NotOurs {
        owner: u32,
    },
    OthersWrite {
        mode: u32,
    },
}

fn judge(is_dir: bool, owner: u32, mode: u32, euid: u32) -> Verdict {
    let mode = mode & 0o7777;
    if !is_dir {
        Verdict::NotADirectory
    } else if owner != euid {
        Verdict::NotOurs { owner }
    } else if mode & 0o022 != 0 {
        Verdict::OthersWrite { mode }
    } else if mode & 0o077 != 0 {
        Verdict::Tighten
    } else {
        Verdict::Private
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_directory_is_used_only_when_ours_and_written_by_no_one_else() {
        let cases = [
            // (is_dir, owner, mode, euid) → verdict
            ((true, 0, 0o40700, 0), Verdict::Private),
            ((true, 1000, 0o700, 1000), Verdict::Private),
            ((true, 0, 0o500, 0), Verdict::Private),
            ((true, 0, 0o755, 0), Verdict::Tighten),
            ((true, 0, 0o750, 0), Verdict::Tighten),
            ((true, 0, 0o701, 0), Verdict::Tighten),
            ((true, 0, 0o775, 0), Verdict::OthersWrite { mode: 0o775 }),
            ((true, 0, 0o1777, 0), Verdict::OthersWrite { mode: 0o1777 }),
            ((true, 0, 0o702, 0), Verdict::OthersWrite { mode: 0o702 }),
            ((true, 65534, 0o700, 0), Verdict::NotOurs { owner: 65534 }),
            ((true, 0, 0o700, 1000), Verdict::NotOurs { owner: 0 }),
            ((false, 0, 0o600, 0), Verdict::NotADirectory),
        ];
        for ((is_dir, owner, mode, euid), want) in cases {
            assert_eq!(
                judge(is_dir, owner, mode, euid),
                want,
                "dir={is_dir} owner={owner} mode={mode:o} euid={euid}"
            );
        }
    }

    #[test]
    fn the_system_state_is_roots_outside_a_project_once_the_service_made_it() {
        let facts = |flag: Option<&str>, env: Option<&str>, root, project, system_exists| Facts {
            flag: flag.map(PathBuf::from),
            env: env.map(PathBuf::from),
            root,
            project,
            system: PathBuf::from("/var/lib/kiln"),
            system_exists,
        };
        let system = || Why::NoSystem(PathBuf::from("/var/lib/kiln"));
        let cases = [
            // (flag, env, root, project, system exists) → (dir, why)
            (
                (Some("/s"), Some("/e"), true, None, true),
                ("/s", Why::Flag),
            ),
            ((None, Some("/e"), true, None, true), ("/e", Why::Env)),
            (
                (None, Some("/e"), false, Some("kiln.toml"), false),
                ("/e", Why::Env),
            ),
            (
                (None, None, true, None, true),
                ("/var/lib/kiln", Why::System),
            ),
            (
                (None, None, true, Some("kiln.toml"), true),
                (".kiln", Why::Project("kiln.toml")),
            ),
            (
                (None, None, true, Some(".kiln"), true),
                (".kiln", Why::Project(".kiln")),
            ),
            ((None, None, false, None, true), (".kiln", Why::NotRoot)),
            ((None, None, true, None, false), (".kiln", system())),
        ];
        for ((flag, env, root, project, exists), (dir, why)) in cases {
            let choice = decide(facts(flag, env, root, project, exists));
            assert_eq!(
                choice,
                Choice {
                    dir: PathBuf::from(dir),
                    why
                },
                "flag={flag:?} env={env:?} root={root} project={project:?} exists={exists}"
            );
        }
        assert_eq!(
            Why::System.to_string(),
            "the system service's (root, outside a project)"
        );
    }

    #[test]
    fn a_missing_directory_is_created_private_only_when_the_command_writes_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        prepare(&dir, Need::Existing).unwrap();
        assert!(!dir.exists());
        prepare(&dir, Need::Create).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
    }

    #[test]
    fn an_existing_directory_of_ours_is_tightened_and_a_world_writable_one_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&dir, Need::Existing).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = format!("{:#}", prepare(&link, Need::Create).unwrap_err());
        assert!(err.contains("a symlink to"), "{err}");
        assert!(err.contains("mode 0777"), "{err}");
        assert!(err.contains("chmod 700"), "{err}");
        // Refused, not repaired.
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o777);
    }
}
