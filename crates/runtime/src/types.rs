//! The domain types every provider speaks: instance ids, digests, what to run
//! ([`InstanceSpec`]), what is observed ([`Observation`]), health and drift.
//!
//! These are domain types and deliberately do not derive `serde`; the local provider's
//! on-disk record is its own type (`local::record`), so changing a field here never silently
//! changes a stored format. [`Digest`] is the workspace's one digest type (`kiln_digest`),
//! the same the image store uses, so the binary hands digests across without converting.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

pub use kiln_digest::{Digest, InvalidDigest};
use kiln_spec::{Capability, HealthCheck, Network, Seccomp, ServiceSpec, TargetSpec};

/// An instance's name: `[a-z0-9][a-z0-9-]{0,62}`. It names the instance's directory and its
/// runc container, so it is checked before it can reach a path or a command line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(String);

/// A string that cannot be an instance id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid instance id {0:?}: expected [a-z0-9][a-z0-9-]{{0,62}}")]
pub struct InvalidInstanceId(pub String);

impl InstanceId {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<InstanceId, InvalidInstanceId> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && s.len() <= 63 {
            Ok(InstanceId(s.to_owned()))
        } else {
            Err(InvalidInstanceId(s.to_owned()))
        }
    }

    /// A fresh id `<prefix>-<12 hex>`; the prefix is trimmed to what an id allows.
    pub fn generate(prefix: &str) -> InstanceId {
        let clean: String = prefix
            .chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .take(40)
            .collect();
        let clean = clean.trim_matches('-');
        let prefix = if clean.is_empty() { "instance" } else { clean };
        InstanceId(format!("{prefix}-{}", random_hex(6)))
    }

    /// The id as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `n` random bytes as hex, from the kernel's random source; falls back to the clock and the
/// process id when that is unavailable (uniqueness, not secrecy, is what ids need).
pub(crate) fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    if rustix::rand::getrandom(&mut buf, rustix::rand::GetRandomFlags::empty()).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = nanos ^ (u128::from(std::process::id()) << 64);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where an instance with `init` finds kiln's init: a directory of its own (a mount point
/// no image is likely to use), holding the one binary.
pub const INIT_DIR: &str = "/.kiln";

/// The init binary in an instance with `init`.
pub const INIT_PATH: &str = "/.kiln/init";

/// Where an instance finds its secrets, one file per secret, on every provider.
pub const SECRETS_DIR: &str = "/run/secrets";

/// The argument that makes the `kiln` binary the init: `/.kiln/init <INIT_ARG> -- argv…`.
pub const INIT_ARG: &str = "instance-init";

/// `argv` run by kiln's init: `/.kiln/init instance-init -- argv…`.
pub(crate) fn with_init(argv: Vec<String>) -> Vec<String> {
    [INIT_PATH, INIT_ARG, "--"]
        .into_iter()
        .map(str::to_owned)
        .chain(argv)
        .collect()
}

/// What to run: one image with one runtime configuration. This is the "runtime config" of a
/// release; a provider turns it into an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// The image, by digest only.
    pub image: Digest,
    /// The app the instance belongs to (names the instance and labels it).
    pub app: String,
    /// Environment on top of the image's; the provider adds `PORT`.
    pub env: BTreeMap<String, String>,
    /// Absolute paths that are a fresh tmpfs each, with its size cap; everything else is
    /// read-only.
    pub writable: Vec<Tmpfs>,
    /// Memory limit in bytes, applied when the host's cgroups allow it.
    pub memory: Option<u64>,
    /// CPU limit in cores, applied when the host's cgroups allow it.
    pub cpus: Option<f64>,
    /// Time between SIGTERM and SIGKILL when kiln stops the instance.
    pub stop_grace: Duration,
    /// The process runs under kiln's init (the provider's init binary, bound read-only at
    /// [`INIT_PATH`]): PID 1 forwards signals to it, reaps orphans and exits with its status.
    pub init: bool,
    /// How the provider checks the instance; `None` means no check (one-off commands).
    pub health: Option<HealthCheck>,
    /// The port to give the instance in `PORT`; `None` lets the provider allocate one.
    /// With its own network (the docker provider) this is the host port it is published on.
    pub port: Option<u16>,
    /// The port the app listens on inside an instance with its own network (`[service]
    /// port`, given in `PORT` there); `None` means the same as the host port. Providers on
    /// the host network ignore it.
    pub container_port: Option<u16>,
    /// Replaces the image's entrypoint and cmd (for one-off commands such as image tests).
    pub command: Option<Vec<String>>,
    /// Opaque key-value pairs recorded with the instance and returned by `observe`/`list`
    /// (the control plane records the release an instance belongs to here).
    pub labels: BTreeMap<String, String>,
    /// Where it runs (`[target]`): which provider, and that provider's settings.
    pub target: TargetSpec,
    /// Who the process runs as, as `[service] user` says it (`root`, `UID[:GID]`,
    /// `NAME[:GROUP]`); `None` means the image's user, or 65534:65534 when it has none. uid 0
    /// only when this says so.
    pub user: Option<String>,
    /// The most processes and threads at once; a provider whose host cannot enforce it
    /// refuses the instance.
    pub pids: u32,
    /// The system-call filter.
    pub seccomp: Seccomp,
    /// The network the instance joins (`Host` only on the local provider).
    pub network: Network,
    /// Secrets, delivered on a tmpfs at `/run/secrets/` (and in the environment where asked).
    pub secrets: Vec<Secret>,
    /// Capabilities added to the minimal set (`[service] capabilities`, already checked
    /// against the spec's rules); the process holds them whoever it runs as.
    pub capabilities: Vec<Capability>,
}

/// A secret an instance gets: its name, its value, and whether it is also in the
/// environment. Providers put it on a tmpfs at `/run/secrets/NAME` and nowhere on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// The file name under `/run/secrets/` (and the variable with `expose_env`).
    pub name: String,
    /// The value.
    pub value: SecretBytes,
    /// Also in the process's environment.
    pub expose_env: bool,
}

/// A secret's value: shown by `Debug` as `<redacted>`, never serialised.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(std::sync::Arc<[u8]>);

impl SecretBytes {
    /// Wraps a value.
    pub fn new(value: Vec<u8>) -> SecretBytes {
        SecretBytes(value.into())
    }

    /// The value itself, for the one place that delivers it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One `writable` path: a tmpfs of at most `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmpfs {
    /// Absolute and normalised.
    pub path: String,
    /// Its size cap in bytes.
    pub size: u64,
}

impl Tmpfs {
    /// A tmpfs at `path` of `size` bytes.
    pub fn new(path: &str, size: u64) -> Tmpfs {
        Tmpfs {
            path: path.to_owned(),
            size,
        }
    }
}

impl InstanceSpec {
    /// The runtime config `[service]` describes for `image`.
    pub fn from_service(image: Digest, app: &str, service: &ServiceSpec) -> InstanceSpec {
        InstanceSpec {
            image,
            app: app.to_owned(),
            env: service.env.clone(),
            writable: service
                .tmpfs()
                .map(|(path, size)| Tmpfs::new(path, size))
                .collect(),
            memory: service.memory,
            cpus: service.cpus,
            stop_grace: service.stop_grace,
            init: service.init,
            health: Some(service.health.clone()),
            port: None,
            container_port: Some(service.port),
            command: None,
            labels: BTreeMap::new(),
            target: TargetSpec::default(),
            user: service.user.clone(),
            pids: service.pids,
            seccomp: service.seccomp,
            network: service.network.clone(),
            capabilities: service.capabilities.clone(),
            secrets: Vec::new(),
        }
    }

    /// The writable paths alone.
    pub fn writable_paths(&self) -> Vec<String> {
        self.writable.iter().map(|w| w.path.clone()).collect()
    }
}

/// The lifecycle state of an instance as its provider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Prepared (filesystem, bundle), not started.
    Created,
    /// Its process is running.
    Running,
    /// Its process exited or was stopped.
    Exited,
    /// kiln knows the instance but its process or its files disappeared without kiln
    /// stopping it: this is drift.
    Vanished,
}

impl InstanceState {
    /// The lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Created => "created",
            InstanceState::Running => "running",
            InstanceState::Exited => "exited",
            InstanceState::Vanished => "vanished",
        }
    }
}

/// Health as the health check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not checked: no health check, or the instance was never started.
    Unknown,
    /// Started; not yet passed `healthy_threshold` checks in a row.
    Starting,
    /// Passing: may receive traffic.
    Healthy,
    /// Failed `unhealthy_threshold` checks in a row after being healthy or after the start
    /// period.
    Unhealthy,
    /// The process exited: it will never be healthy again.
    Failed,
}

impl Health {
    /// The lowercase name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Failed => "failed",
        }
    }
}

/// One observation of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Which instance.
    pub id: InstanceId,
    /// The image it runs.
    pub image: Digest,
    /// The app it belongs to.
    pub app: String,
    /// Its lifecycle state.
    pub state: InstanceState,
    /// The exit code when it exited and the provider saw it (a provider that was restarted
    /// while the instance exited cannot know it).
    pub exit_code: Option<i32>,
    /// Its health.
    pub health: Health,
    /// Where it is reached: its own address and the app's port in its own network
    /// namespace, `127.0.0.1:PORT` on the host's network or a docker host port.
    pub addr: SocketAddr,
    /// What its processes listen on (TCP), read from its own network namespace while it is
    /// running and not healthy, so a failed health check can say where the app listens
    /// instead; `None` when not read (healthy, or a provider that cannot tell).
    pub listening: Option<Vec<SocketAddr>>,
    /// Its main process id on the host, while running.
    pub pid: Option<u32>,
    /// When it was created.
    pub created: SystemTime,
    /// The labels it was created with.
    pub labels: BTreeMap<String, String>,
}

impl Observation {
    /// The port the instance was given.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// One change made to an instance outside kiln.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftFinding {
    /// A path in the instance's root filesystem, outside its `writable` paths, was created,
    /// changed or deleted (a copy-up or whiteout in its overlay upper dir).
    Write {
        /// The path as the instance sees it (absolute).
        path: String,
    },
    /// A file of a cached image layer the instance runs on changed.
    Layer {
        /// The layer.
        layer: Digest,
        /// The path inside the layer (absolute).
        path: String,
        /// What changed, for people: `modified`, `added`, `removed`.
        change: &'static str,
    },
    /// The instance's runtime configuration is not the one kiln wrote.
    Config {
        /// The digest kiln recorded.
        expected: Digest,
        /// The digest found; `None` when the file is gone.
        found: Option<Digest>,
    },
    /// The instance's process or its files disappeared without kiln stopping it.
    Vanished {
        /// What is missing.
        what: String,
    },
    /// A command was executed inside the instance (`docker exec`): it may have changed
    /// anything, so the instance is tainted.
    Exec {
        /// The command as the engine reported it.
        command: String,
    },
    /// A runtime setting of the instance (limits, env, mounts, security) is not the one
    /// kiln created it with (e.g. `docker update`).
    Setting {
        /// The setting, e.g. `HostConfig.Memory`.
        name: String,
        /// As kiln created it.
        expected: String,
        /// As found.
        found: String,
    },
}

impl fmt::Display for DriftFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriftFinding::Write { path } => write!(f, "written outside writable paths: {path}"),
            DriftFinding::Layer {
                layer,
                path,
                change,
            } => write!(f, "layer {} {change}: {path}", layer.short()),
            DriftFinding::Config { expected, found } => match found {
                Some(found) => write!(
                    f,
                    "runtime config changed: expected {}, found {}",
                    expected.short(),
                    found.short()
                ),
                None => write!(f, "runtime config removed (expected {})", expected.short()),
            },
            DriftFinding::Vanished { what } => write!(f, "vanished: {what}"),
            DriftFinding::Exec { command } => write!(f, "exec into the instance: {command}"),
            DriftFinding::Setting {
                name,
                expected,
                found,
            } => write!(f, "runtime setting {name} changed: {expected} → {found}"),
        }
    }
}

/// Drift found on one instance: the data the controller needs to replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftReport {
    /// The drifted instance.
    pub instance: InstanceId,
    /// Every finding, sorted and without duplicates.
    pub findings: Vec<DriftFinding>,
    /// When the drift was found.
    pub at: SystemTime,
}

impl DriftReport {
    /// The paths the findings name (instance paths, layer paths, or what vanished).
    pub fn paths(&self) -> Vec<String> {
        self.findings
            .iter()
            .map(|f| match f {
                DriftFinding::Write { path } | DriftFinding::Layer { path, .. } => path.clone(),
                DriftFinding::Config { .. } => "config.json".to_owned(),
                DriftFinding::Vanished { what } => what.clone(),
                DriftFinding::Exec { command } => format!("exec: {command}"),
                DriftFinding::Setting { name, .. } => name.clone(),
            })
            .collect()
    }
}

/// A piece of an instance's output (stdout and stderr, interleaved as written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The bytes from the requested offset.
    pub data: Vec<u8>,
    /// The offset to ask for next.
    pub next: u64,
}

/// Where an instance keeps its files, for people (`kiln run` prints it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePaths {
    /// `<state>/instances/<id>`.
    pub dir: PathBuf,
    /// The current log file.
    pub log: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_checked() {
        assert!(InstanceId::new("hello-0a1b2c").is_ok());
        for bad in ["", "-a", "A", "a/b", "..", "a b", &"a".repeat(64)] {
            assert!(InstanceId::new(bad).is_err(), "{bad:?} accepted");
        }
        let id = InstanceId::generate("Hello_World/../x");
        assert!(InstanceId::new(id.as_str()).is_ok(), "{id}");
        assert!(id.as_str().starts_with("elloorld"), "{id}");
        assert_ne!(InstanceId::generate("a"), InstanceId::generate("a"));
    }
}
