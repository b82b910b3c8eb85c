//! The validated spec: what the rest of kiln trusts.
//!
//! These types are built only by [`crate::Spec::parse`], which has checked every rule, so code
//! that holds a [`Spec`] never re-validates. They deliberately do not derive `serde`: the
//! on-disk format is `kiln.toml` and the catalog, not these structs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A whole, validated `kiln.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// The app's name.
    pub name: AppName,
    /// How to build the image.
    pub image: ImageSpec,
    /// How to run an instance.
    pub service: ServiceSpec,
    /// How a release replaces the previous one.
    pub deploy: DeploySpec,
    /// Where the router listens.
    pub route: RouteSpec,
    /// Where instances run.
    pub target: TargetSpec,
    /// What an image must carry to be run.
    pub policy: PolicySpec,
}

/// `[policy]`: the proofs an image must carry before the daemon runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySpec {
    /// Trusted public keys, each an OpenSSH `ssh-ed25519 …` line (read from the files the
    /// spec names).
    pub keys: Vec<String>,
    /// The proofs required, in the order written, without repeats.
    pub require: Vec<Proof>,
    /// What the provenance must say of the source.
    pub source: SourceRule,
}

impl PolicySpec {
    /// Whether the policy asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.require.is_empty() && self.source == SourceRule::Any
    }
}

/// One proof `[policy] require` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proof {
    /// An image signature by a trusted key.
    Signature,
    /// A passed test attestation.
    Tested,
    /// SLSA provenance.
    Provenance,
    /// An SPDX SBOM.
    Sbom,
}

impl Proof {
    /// Every proof, in the order the catalog lists them.
    pub const ALL: [Proof; 4] = [
        Proof::Signature,
        Proof::Tested,
        Proof::Provenance,
        Proof::Sbom,
    ];

    /// The name as `require` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proof::Signature => "signature",
            Proof::Tested => "tested",
            Proof::Provenance => "provenance",
            Proof::Sbom => "sbom",
        }
    }

    /// The proof `require` spells `s`.
    pub fn parse(s: &str) -> Option<Proof> {
        Proof::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// `[policy] source`: what the provenance must say of the source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceRule {
    /// Nothing.
    #[default]
    Any,
    /// Built from a git commit.
    Git,
    /// Built from a git commit whose work tree was clean.
    GitClean,
}

impl SourceRule {
    /// The name as `source` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceRule::Any => "any",
            SourceRule::Git => "git",
            SourceRule::GitClean => "git-clean",
        }
    }
}

/// An app name: `[a-z][a-z0-9-]{0,39}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppName(String);

impl AppName {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Option<AppName> {
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        (first_ok && rest_ok && s.len() <= 40).then(|| AppName(s.to_owned()))
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for AppName {
    /// `app`, the name used when nothing better is known.
    fn default() -> AppName {
        AppName("app".to_owned())
    }
}

impl std::fmt::Display for AppName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[image]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    /// Where the image starts from.
    pub base: BaseImage,
    /// Overrides the base's entrypoint when set.
    pub entrypoint: Option<Vec<String>>,
    /// Overrides the base's cmd when set.
    pub cmd: Option<Vec<String>>,
    /// Added to the base's environment.
    pub env: BTreeMap<String, String>,
    /// Overrides the base's working directory when set.
    pub workdir: Option<String>,
    /// Overrides the base's user when set.
    pub user: Option<UserSpec>,
    /// OCI labels.
    pub labels: BTreeMap<String, String>,
    /// Layer compression.
    pub compression: Compression,
    /// One layer each, in order.
    pub copies: Vec<CopySpec>,
    /// How `kiln test` checks the image.
    pub test: Option<ImageTest>,
}

/// `[image] base`. Paths are absolute (resolved against the spec's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseImage {
    /// An empty image.
    Scratch,
    /// An OCI image layout directory, optionally narrowed to a tag or a manifest digest.
    Oci {
        /// The layout directory.
        path: PathBuf,
        /// Which image in it; `None` means the only one.
        reference: Option<OciReference>,
    },
    /// A `docker save` tarball.
    DockerArchive(PathBuf),
    /// A directory or a `.tar`/`.tar.gz` used as the base layer.
    Rootfs(PathBuf),
}

/// Selects one image in an OCI layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OciReference {
    /// `org.opencontainers.image.ref.name`.
    Tag(String),
    /// `sha256:` followed by 64 lowercase hex digits.
    Digest(String),
}

/// A numeric user and optional group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserSpec {
    /// User id.
    pub uid: u32,
    /// Group id; `None` means the user's primary group as the runtime decides (0 on scratch).
    pub gid: Option<u32>,
}

impl std::fmt::Display for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.gid {
            Some(gid) => write!(f, "{}:{gid}", self.uid),
            None => write!(f, "{}", self.uid),
        }
    }
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`.
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`.
    Zstd,
}

/// One `[[image.copy]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// The source, absolute (resolved against the spec's directory); it existed at validation.
    pub from: PathBuf,
    /// The destination in the image: absolute and normalised.
    pub to: String,
    /// Permission bits forced on copied files.
    pub mode: Option<u32>,
    /// Owner of copied files.
    pub owner: Owner,
    /// Globs relative to `from` to leave out.
    pub exclude: Vec<String>,
    /// Copy an ELF binary's shared-library closure too.
    pub closure: bool,
}

/// Numeric owner of files in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// `[image.test]`: at least one of `command` and `http` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTest {
    /// Run once in the image; must exit 0.
    pub command: Option<Vec<String>>,
    /// Must answer 2xx on a started instance.
    pub http: Option<String>,
    /// Bound on the whole test.
    pub timeout: Duration,
}

/// `[service]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// Port inside an instance with its own network.
    pub port: u16,
    /// Instances of the live release.
    pub replicas: u32,
    /// Instance environment on top of the image's.
    pub env: BTreeMap<String, String>,
    /// The tmpfs paths, absolute and normalised, each with the size written for it.
    pub writable: Vec<Writable>,
    /// The size of a writable tmpfs that sets none, in bytes.
    pub tmpfs_size: u64,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
    /// Time between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// The app runs under kiln's init (PID 1 forwards signals and reaps zombies).
    pub init: bool,
    /// The health check.
    pub health: HealthCheck,
    /// Who the process runs as (`root`, `UID[:GID]`, `NAME[:GROUP]`); `None` means the
    /// image's user, or 65534:65534 when it has none.
    pub user: Option<String>,
    /// The most processes and threads at once.
    pub pids: u32,
    /// The system-call filter.
    pub seccomp: Seccomp,
    /// The network an instance joins.
    pub network: Network,
    /// `[service.secrets]`, by name.
    pub secrets: Vec<Secret>,
    /// Capabilities added to the minimal set, each once, in the order written.
    pub capabilities: Vec<Capability>,
    /// The spec opts in to the capabilities outside the safe set.
    pub allow_dangerous_capabilities: bool,
}

impl ServiceSpec {
    /// `[service] pids` when absent.
    pub const DEFAULT_PIDS: u32 = 512;
    /// `[service] tmpfs_size` when absent: 64 MiB.
    pub const DEFAULT_TMPFS_SIZE: u64 = 64 << 20;

    /// Each writable path with its size cap in bytes (its own, else `tmpfs_size`).
    pub fn tmpfs(&self) -> impl Iterator<Item = (&str, u64)> {
        self.writable
            .iter()
            .map(|w| (w.path.as_str(), w.size.unwrap_or(self.tmpfs_size)))
    }
}

/// One `[service] writable` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writable {
    /// Absolute, normalised, not `/`.
    pub path: String,
    /// Its own size cap in bytes; `None` means `tmpfs_size`.
    pub size: Option<u64>,
}

impl Writable {
    /// A path with the default size.
    pub fn path(path: &str) -> Writable {
        Writable {
            path: path.to_owned(),
            size: None,
        }
    }
}

/// `[service] seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    /// An allowlist: the host's container profile (local) or the engine's default (docker).
    Default,
    /// No filter: an explicit weakening.
    Unconfined,
}

impl Seccomp {
    /// The name as `[service] seccomp` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Seccomp::Default => "default",
            Seccomp::Unconfined => "unconfined",
        }
    }
}

/// One `[service.secrets]` entry: a name and where its value comes from. The value itself
/// is never part of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// The name: the file under `/run/secrets/`, and the variable with `expose_env`.
    pub name: String,
    /// Where the daemon reads the value.
    pub source: SecretSource,
    /// Also in the instance's environment.
    pub expose_env: bool,
}

/// Where a secret's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file's content; an absolute path (relative ones are resolved against the spec's
    /// directory).
    File(PathBuf),
    /// An environment variable of the daemon.
    Env(String),
    /// A command's standard output, run in `dir`.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// The directory it runs in: the spec's.
        dir: PathBuf,
    },
}

/// `[service] network`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// The instance's own network namespace on kiln's bridge (the local provider's CNI
    /// network `kiln`); on docker, the engine's default bridge.
    #[default]
    Kiln,
    /// The host's network: no namespace of its own; an explicit weakening.
    Host,
    /// Its own namespace on the CNI network list of this name (a `*.conflist` in the CNI
    /// configuration directory, `/etc/cni/net.d`).
    Named(String),
}

impl Network {
    /// `[service] network` when absent.
    pub const DEFAULT: &'static str = "kiln";
    /// The value that means the host's network.
    pub const HOST: &'static str = "host";

    /// The network a value of `[service] network` names (checked by `rules::network`).
    pub fn from_name(name: &str) -> Network {
        match name {
            Network::DEFAULT => Network::Kiln,
            Network::HOST => Network::Host,
            other => Network::Named(other.to_owned()),
        }
    }

    /// The name as `[service] network` spells it.
    pub fn as_str(&self) -> &str {
        match self {
            Network::Kiln => Network::DEFAULT,
            Network::Host => Network::HOST,
            Network::Named(name) => name,
        }
    }
}

/// A Linux capability, named as capabilities(7) names it without `CAP_` (`CHOWN`,
/// `NET_BIND_SERVICE`). Only the names [`Capability::all`] yields exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Capability(&'static str);

impl Capability {
    /// `NET_BIND_SERVICE`, the one capability a root instance keeps without asking.
    pub const NET_BIND_SERVICE: Capability = Capability("NET_BIND_SERVICE");

    /// Every capability kiln can name, in alphabetical order.
    pub fn all() -> impl Iterator<Item = Capability> {
        crate::rules::CAPABILITIES
            .iter()
            .map(|(name, _)| Capability(name))
    }

    /// The capability `name` means: any case, with or without `CAP_` (`chown`,
    /// `CAP_SETUID`).
    pub fn parse(name: &str) -> Option<Capability> {
        let upper = name.to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        Capability::all().find(|c| c.0 == bare)
    }

    /// The capability spelled exactly as [`Capability::as_str`] spells it, as stored.
    pub fn canonical(name: &str) -> Option<Capability> {
        Capability::all().find(|c| c.0 == name)
    }

    /// The name without `CAP_`, upper case.
    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// What the capability lets a process reach beyond its instance, when it is outside the
    /// safe set (see [`crate::rules::CAPABILITIES`]); `None` for a safe one.
    pub fn danger(self) -> Option<&'static str> {
        crate::rules::CAPABILITIES
            .iter()
            .find(|(name, _)| *name == self.0)
            .and_then(|(_, danger)| *danger)
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// `[service.health]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// HTTP path; `None` means a TCP connect.
    pub path: Option<String>,
    /// Time between checks.
    pub interval: Duration,
    /// Bound on one check.
    pub timeout: Duration,
    /// Consecutive passes to become healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Grace period after start.
    pub start_period: Duration,
}

/// `[deploy]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploySpec {
    /// The rollout strategy with its strategy-specific settings.
    pub strategy: Strategy,
    /// Extra instances a rolling update may start.
    pub max_surge: CountOrPercent,
    /// Instances a rolling update may take away.
    pub max_unavailable: CountOrPercent,
    /// No progress for this long rolls back.
    pub progress_deadline: Duration,
    /// How long the previous release stays warm.
    pub keep_previous: Duration,
    /// The migration to run before traffic moves.
    pub migrate: Option<Migrate>,
}

/// How a release replaces the previous one.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// A few instances at a time.
    Rolling,
    /// A full new set, then one switch.
    BlueGreen {
        /// Switch by itself or wait for `kiln promote`.
        promote: Promote,
    },
    /// Traffic shifted in steps, each judged.
    Canary {
        /// Advance by itself or wait for `kiln promote`.
        promote: Promote,
        /// Strictly increasing weights ending at 100.
        steps: Vec<CanaryStep>,
        /// How each step is judged.
        analysis: Analysis,
        /// Stable scales down as the canary scales up, never below what its share of the
        /// route needs.
        scale_stable: bool,
    },
}

impl Strategy {
    /// The name as written in `kiln.toml`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::BlueGreen { .. } => "blue-green",
            Strategy::Canary { .. } => "canary",
        }
    }
}

/// Whether a rollout advances by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promote {
    /// By itself.
    Auto,
    /// Waits for `kiln promote`.
    Manual,
}

/// One `[[deploy.steps]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryStep {
    /// Percent of traffic, 1–100.
    pub weight: u8,
    /// Step length; `None` waits for `kiln promote`.
    pub pause: Option<Duration>,
}

/// `[deploy.analysis]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// Fraction 0–1.
    pub max_error_rate: f64,
    /// Bound on the canary's p99.
    pub max_p99: Option<Duration>,
    /// Below this a step is inconclusive.
    pub min_requests: u64,
    /// Also compare against the stable release.
    pub compare_to_stable: bool,
    /// What a step that stays inconclusive leads to.
    pub on_inconclusive: OnInconclusive,
}

/// `[deploy.analysis] on_inconclusive`: what a canary step leads to when, after its extended
/// window, it still saw fewer than `min_requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInconclusive {
    /// Wait at the step for `kiln promote` or `kiln abort`.
    Pause,
    /// Abort the rollout.
    Abort,
    /// Proceed as if the step passed.
    Promote,
}

impl OnInconclusive {
    /// Every value, as `kiln.toml` spells them.
    pub const NAMES: &'static [&'static str] = &["pause", "abort", "promote"];

    /// The name as written in `kiln.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnInconclusive::Pause => "pause",
            OnInconclusive::Abort => "abort",
            OnInconclusive::Promote => "promote",
        }
    }

    /// The value a name spells, if any.
    pub fn from_name(name: &str) -> Option<OnInconclusive> {
        match name {
            "pause" => Some(OnInconclusive::Pause),
            "abort" => Some(OnInconclusive::Abort),
            "promote" => Some(OnInconclusive::Promote),
            _ => None,
        }
    }
}

/// `[deploy.migrate]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrate {
    /// Run once in the new image.
    pub command: Vec<String>,
    /// Schema version after the migration.
    pub schema: u32,
    /// Oldest schema this release works with (≤ `schema`).
    pub compatible_from: u32,
    /// The router holds the app's new requests while it runs.
    pub pause: bool,
}

/// A whole number or a percentage of `replicas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountOrPercent {
    /// An absolute number of instances.
    Count(u32),
    /// A percentage, 0–100.
    Percent(u8),
}

impl CountOrPercent {
    /// The number of instances this means for `replicas`, rounding up as Kubernetes does for
    /// surge (`round_up = true`) and down for unavailability.
    pub fn resolve(self, replicas: u32, round_up: bool) -> u32 {
        match self {
            CountOrPercent::Count(n) => n,
            CountOrPercent::Percent(p) => {
                let scaled = u64::from(replicas) * u64::from(p);
                let n = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }
}

/// `[route]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Where the router listens.
    pub listen: SocketAddr,
    /// Host names; empty means any host.
    pub hosts: Vec<String>,
    /// TLS files, absolute.
    pub tls: Option<TlsFiles>,
    /// Stickiness.
    pub sticky: Sticky,
    /// Bound on draining a leaving instance.
    pub drain_timeout: Duration,
    /// Bound on one proxied request.
    pub request_timeout: Duration,
    /// The largest request body, in bytes; `None` means no limit.
    pub max_body_size: Option<u64>,
    /// The largest request head, in bytes.
    pub max_header_size: u64,
    /// The preview header's name, lowercase; `None` means off.
    pub preview_header: Option<String>,
}

/// `[route.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[route] sticky`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// Every request is routed afresh.
    None,
    /// A cookie pins a client to a release.
    Cookie,
}

/// `[target]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// Which provider runs instances.
    pub provider: ProviderKind,
    /// OCI runtime binary for `local`.
    pub runtime: String,
    /// Engine address for `docker`; the Swarm manager's for `swarm`.
    pub docker_host: Option<String>,
    /// What an exec into an instance means (`docker`, `swarm`).
    pub exec: ExecPolicy,
    /// Swarm placement constraints (`swarm`): `node.role == worker`, `node.labels.zone != a`.
    pub placement: Vec<String>,
    /// The registry images are pushed to and nodes pull from (`swarm`): `HOST[:PORT][/PATH]`;
    /// `None`: the daemon's own registry endpoint.
    pub registry: Option<String>,
    /// Plain HTTP to `registry` even off loopback.
    pub registry_insecure: bool,
}

impl Default for TargetSpec {
    /// `[target]` left out: the local provider on runc.
    fn default() -> TargetSpec {
        TargetSpec {
            provider: ProviderKind::Local,
            runtime: "runc".to_owned(),
            docker_host: None,
            exec: ExecPolicy::Taint,
            placement: Vec::new(),
            registry: None,
            registry_insecure: false,
        }
    }
}

impl ProviderKind {
    /// The name as `[target] provider` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Docker => "docker",
            ProviderKind::Swarm => "swarm",
        }
    }
}

/// `[target] exec`: what a command executed inside a running instance means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecPolicy {
    /// The instance is tainted (drift) and replaced.
    Taint,
    /// Execs are allowed.
    Allow,
}

impl ExecPolicy {
    /// The name as `[target] exec` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecPolicy::Taint => "taint",
            ExecPolicy::Allow => "allow",
        }
    }
}

/// `[target] provider`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// runc + overlayfs on this host.
    Local,
    /// A Docker Engine.
    Docker,
    /// A Docker Swarm, through its manager's Engine API.
    Swarm,
}
