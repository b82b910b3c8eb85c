//! The OCI runtime binary (`runc` by default; `crun`/`youki` speak the same command line),
//! invoked as a process because its command line *is* its interface. Behind the
//! [`OciRuntime`] trait so the provider's logic can be tested without root.
//!
//! Instances run under `runc run` in the foreground, as a child of kiln in its own process
//! group: runc then reaps the instance and exits with its exit code, which kiln records. If
//! kiln dies, runc and the instance carry on (their output goes to files, not pipes, so
//! nothing breaks), and a new kiln finds them with `runc state`/`runc list` under kiln's own
//! `--root`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use serde::Deserialize;

/// What `state` reports about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeState {
    /// The container id.
    pub id: String,
    /// `creating`, `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// The init process id on the host (0 once stopped).
    pub pid: u32,
}

/// Why the runtime could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeFailure {
    /// The command line.
    pub command: String,
    /// Its stderr, or why it could not be started.
    pub message: String,
}

/// A running `runtime run` process.
pub type RunChild = tokio::process::Child;

/// The OCI runtime.
#[async_trait]
pub trait OciRuntime: Send + Sync {
    /// The binary, for messages.
    fn binary(&self) -> &str;

    /// Starts `run --bundle B --pid-file P ID` in the foreground in its own process group,
    /// stdin from /dev/null and stdout/stderr appended to `log`.
    fn run(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        log: File,
    ) -> Result<RunChild, RuntimeFailure>;

    /// The container's state; `None` when the runtime does not know it.
    async fn state(&self, id: &str) -> Result<Option<RuntimeState>, RuntimeFailure>;

    /// Every container under kiln's root.
    async fn list(&self) -> Result<Vec<RuntimeState>, RuntimeFailure>;

    /// Sends `signal` (`TERM`, `KILL`) to the container's processes; a container that is
    /// gone or stopped is not an error.
    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeFailure>;

    /// Forgets the container, killing it if needed; unknown is not an error.
    async fn delete(&self, id: &str) -> Result<(), RuntimeFailure>;
}

/// `runc`-compatible runtimes, driven through their command line.
#[derive(Debug, Clone)]
pub struct RuncCli {
    /// The binary (a name looked up in PATH, or a path).
    pub binary: String,
    /// The runtime's state root (`--root`), kept inside kiln's state so kiln lists only its
    /// own containers.
    pub root: PathBuf,
}

#[derive(Debug, Deserialize)]
struct StateJson {
    id: String,
    #[serde(default)]
    pid: u32,
    status: String,
}

impl RuncCli {
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn line(&self, args: &[&str]) -> String {
        format!(
            "{} --root {} {}",
            self.binary,
            self.root.display(),
            args.join(" ")
        )
    }

    async fn output(&self, args: &[&str]) -> Result<std::process::Output, RuntimeFailure> {
        self.command()
            .args(args)
            .output()
            .await
            .map_err(|e| RuntimeFailure {
                command: self.line(args),
                message: format!("cannot run {}: {e}", self.binary),
            })
    }

    fn failure(&self, args: &[&str], out: &std::process::Output) -> RuntimeFailure {
        RuntimeFailure {
            command: self.line(args),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
    }
}

/// Whether the runtime's stderr says the container does not exist (or no longer runs).
fn is_gone(stderr: &[u8]) -> bool {
    let s = String::from_utf8_lossy(stderr);
    s.contains("does not exist") || s.contains("not running") || s.contains("container not found")
}

#[async_trait]
impl OciRuntime for RuncCli {
    fn binary(&self) -> &str {
        &self.binary
    }

    fn run(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        log: File,
    ) -> Result<RunChild, RuntimeFailure> {
        let args = [
            "run",
            "--bundle",
            &bundle.to_string_lossy(),
            "--pid-file",
            &pid_file.to_string_lossy(),
            id,
        ]
        .map(|s| s.to_owned());
        let line = self.line(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let fail = |e: std::io::Error| RuntimeFailure {
            command: line.clone(),
            message: e.to_string(),
        };
        let err = log.try_clone().map_err(fail)?;
        let mut cmd = self.command();
        cmd.args(&args)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            // Its own process group: Ctrl-C on kiln's terminal must not reach the instance
            // directly; kiln stops it with the grace period instead.
            .process_group(0)
            .kill_on_drop(false);
        cmd.spawn().map_err(|e| RuntimeFailure {
            command: line.clone(),
            message: format!("cannot run {}: {e}", self.binary),
        })
    }

    async fn state(&self, id: &str) -> Result<Option<RuntimeState>, RuntimeFailure> {
        let args = ["state", id];
        let out = self.output(&args).await?;
        if !out.status.success() {
            return if is_gone(&out.stderr) {
                Ok(None)
            } else {
                Err(self.failure(&args, &out))
            };
        }
        let s: StateJson = serde_json::from_slice(&out.stdout).map_err(|e| RuntimeFailure {
            command: self.line(&args),
            message: format!("unreadable state: {e}"),
        })?;
        Ok(Some(RuntimeState {
            id: s.id,
            status: s.status,
            pid: s.pid,
        }))
    }

    async fn list(&self) -> Result<Vec<RuntimeState>, RuntimeFailure> {
        let args = ["list", "--format", "json"];
        let mut out = self.output(&args).await?;
        // `runc list` reads each container's state directory after listing the root, so a
        // container deleted in between (a concurrent destroy) fails the whole listing with
        // "no such file or directory". That is a race, not an error: list again.
        for _ in 0..5 {
            if out.status.success()
                || !String::from_utf8_lossy(&out.stderr).contains("no such file or directory")
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            out = self.output(&args).await?;
        }
        if !out.status.success() {
            return Err(self.failure(&args, &out));
        }
        // runc prints `null` when there is nothing.
        let list: Option<Vec<StateJson>> =
            serde_json::from_slice(&out.stdout).map_err(|e| RuntimeFailure {
                command: self.line(&args),
                message: format!("unreadable list: {e}"),
            })?;
        Ok(list
            .unwrap_or_default()
            .into_iter()
            .map(|s| RuntimeState {
                id: s.id,
                status: s.status,
                pid: s.pid,
            })
            .collect())
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeFailure> {
        let args = ["kill", id, signal];
        let out = self.output(&args).await?;
        if out.status.success() || is_gone(&out.stderr) {
            Ok(())
        } else {
            Err(self.failure(&args, &out))
        }
    }

    async fn delete(&self, id: &str) -> Result<(), RuntimeFailure> {
        let args = ["delete", "--force", id];
        let out = self.output(&args).await?;
        if out.status.success() || is_gone(&out.stderr) {
            Ok(())
        } else {
            Err(self.failure(&args, &out))
        }
    }
}
