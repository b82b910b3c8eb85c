//! `ReleaseConfig`: a release's runtime configuration as the ledger stores it.
//!
//! A storage format, so its own serde type: the validated `kiln_spec::Spec` is turned into
//! this at apply time, and the daemon rebuilds what it runs from it after a restart without
//! needing the spec file or its build context.
//!
//! Every choice among fixed names (`provider`, `exec`, `strategy`, `promote`) and every
//! count (`max_surge`, `max_unavailable`) is typed and decodes strictly: an unknown name or a
//! malformed count fails to decode instead of falling back to a default, so an edited or
//! hand-written release cannot silently run somewhere or somehow else. Valid data is stored
//! exactly as before (`"docker"`, `"blue-green"`, `"25%"`).
//!
//! [`ReleaseConfig::decode`] is the way in for JSON from outside (the API, the ledger): its
//! [`ConfigError`] names the JSON path of the field that failed, e.g.
//! `target.provider: unknown variant "dockr", expected "local", "docker" or "swarm"`.
//! [`ReleaseConfig::validate`] then holds the values to the rules `kiln.toml` gets, calling
//! the spec crate's own [`kiln_spec::rules`] so the two cannot disagree.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_spec::rules::{self, Broken};
use kiln_spec::{
    Analysis, CanaryStep, Capability, CountOrPercent, DeploySpec, ExecPolicy, HealthCheck, Migrate,
    Network, OnInconclusive, Promote, ProviderKind, Seccomp, ServiceSpec, Spec, Sticky, Strategy,
    TargetSpec, Writable,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a release configuration is refused: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The JSON path of the field (`target.provider`, `deploy.steps[1].weight`,
    /// `service.env.TOKEN`); `config` when the problem is the whole value.
    pub field: String,
    /// What is wrong: lowercase, no trailing period.
    pub message: String,
}

/// Everything a release needs to run, route and roll out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseConfig {
    /// `[service]`.
    pub service: ServiceConfig,
    /// `[deploy]`.
    pub deploy: DeployConfig,
    /// `[route]`.
    pub route: RouteConfig,
    /// `[target]`; releases recorded before it was stored ran on the local provider.
    #[serde(default)]
    pub target: TargetConfig,
    /// The spec has `[image.test]`: the daemon applies only an image whose test attestation
    /// says it passed (releases recorded before this field had no such gate).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub test_required: bool,
    /// The spec's `[policy]` (absent in releases stored before it, and when empty).
    #[serde(default, skip_serializing_if = "PolicyConfig::is_empty")]
    pub policy: PolicyConfig,
    /// The daemon's policy when the release was applied: set by the daemon, whatever a
    /// client sent, so a later change of the daemon's policy never stops a release that runs.
    #[serde(default, skip_serializing_if = "PolicyConfig::is_empty")]
    pub daemon_policy: PolicyConfig,
}

/// A deploy policy as stored: the spec's `[policy]`, or the daemon's `--policy` file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Trusted keys, OpenSSH `ssh-ed25519` lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// The proofs required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<ProofName>,
    /// What the provenance must say of the source.
    #[serde(default, skip_serializing_if = "SourceName::is_any")]
    pub source: SourceName,
}

impl PolicyConfig {
    /// Whether the policy asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.require.is_empty() && self.source.is_any()
    }

    /// Whether `proof` is required.
    pub fn requires(&self, proof: ProofName) -> bool {
        self.require.contains(&proof)
    }

    fn validate(&self, field: &str, p: &mut Problems) {
        for (i, k) in self.keys.iter().enumerate() {
            p.check(&format!("{field}.keys[{i}]"), rules::trusted_key(k));
        }
        for (i, r) in self.require.iter().enumerate() {
            if self.require[..i].contains(r) {
                p.add(
                    &format!("{field}.require[{i}]"),
                    format!("{:?} is listed twice", r.as_str()),
                );
            }
        }
        if self.requires(ProofName::Signature) && self.keys.is_empty() {
            p.add(
                &format!("{field}.require"),
                "`signature` needs at least one trusted key in `keys`".to_owned(),
            );
        }
    }
}

impl From<&kiln_spec::PolicySpec> for PolicyConfig {
    fn from(s: &kiln_spec::PolicySpec) -> PolicyConfig {
        PolicyConfig {
            keys: s.keys.clone(),
            require: s
                .require
                .iter()
                .map(|p| match p {
                    kiln_spec::Proof::Signature => ProofName::Signature,
                    kiln_spec::Proof::Tested => ProofName::Tested,
                    kiln_spec::Proof::Provenance => ProofName::Provenance,
                    kiln_spec::Proof::Sbom => ProofName::Sbom,
                })
                .collect(),
            source: match s.source {
                kiln_spec::SourceRule::Any => SourceName::Any,
                kiln_spec::SourceRule::Git => SourceName::Git,
                kiln_spec::SourceRule::GitClean => SourceName::GitClean,
            },
        }
    }
}

/// `[target]` as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `local` or `docker`.
    pub provider: ProviderName,
    /// The OCI runtime of the local provider.
    pub runtime: String,
    /// The Docker Engine address.
    pub docker_host: Option<String>,
    /// `taint` or `allow`.
    pub exec: ExecPolicyName,
    /// Swarm placement constraints (absent in releases stored before them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<String>,
    /// The registry images are pushed to (absent in releases stored before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Plain HTTP to `registry` off loopback.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub registry_insecure: bool,
}

/// Declares a storage enum written in JSON as one of fixed strings. It serialises as its
/// spelling and decodes only from one, failing with the spellings it accepts.
macro_rules! spelled {
    (
        $(#[$doc:meta])*
        $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in the order an error lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The spelling in JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = String::deserialize(d)?;
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        serde::de::Error::custom(unknown_spelling(
                            &s,
                            $name::ALL.iter().map(|v| v.as_str()),
                        ))
                    })
            }
        }
    };
}

/// `unknown variant "dockr", expected "local", "docker" or "swarm"`.
fn unknown_spelling<'a>(got: &str, known: impl Iterator<Item = &'a str>) -> String {
    let known: Vec<String> = known.map(|k| format!("{k:?}")).collect();
    let expected = match known.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "nothing".to_owned(),
    };
    format!("unknown variant {got:?}, expected {expected}")
}

spelled! {
    /// `[target] provider` as stored.
    ProviderName {
        /// `local`: runc + overlayfs on the daemon's host.
        Local = "local",
        /// `docker`: a Docker Engine.
        Docker = "docker",
        /// `swarm`: a Docker Swarm.
        Swarm = "swarm",
    }
}

spelled! {
    /// A proof `[policy] require` names, as stored.
    ProofName {
        /// An image signature by a trusted key.
        Signature = "signature",
        /// A passed test attestation.
        Tested = "tested",
        /// SLSA provenance.
        Provenance = "provenance",
        /// An SPDX SBOM.
        Sbom = "sbom",
    }
}

spelled! {
    /// `[policy] source` as stored.
    SourceName {
        /// Nothing is required of the source.
        Any = "any",
        /// Built from a git commit.
        Git = "git",
        /// Built from a git commit with a clean work tree.
        GitClean = "git-clean",
    }
}

// `spelled!` fixes the derives of the enums it declares.
#[allow(clippy::derivable_impls)]
impl Default for SourceName {
    fn default() -> SourceName {
        SourceName::Any
    }
}

impl SourceName {
    /// Whether nothing is required.
    pub fn is_any(&self) -> bool {
        *self == SourceName::Any
    }
}

spelled! {
    /// `[target] exec` as stored.
    ExecPolicyName {
        /// `taint`: an exec marks the instance drifted.
        Taint = "taint",
        /// `allow`: execs are allowed.
        Allow = "allow",
    }
}

spelled! {
    /// `[deploy] strategy` as stored.
    StrategyName {
        /// `rolling`.
        Rolling = "rolling",
        /// `blue-green`.
        BlueGreen = "blue-green",
        /// `canary`.
        Canary = "canary",
    }
}

spelled! {
    /// `[deploy] promote` as stored.
    PromoteName {
        /// `auto`: the rollout advances by itself.
        Auto = "auto",
        /// `manual`: it waits for `kiln promote`.
        Manual = "manual",
    }
}

spelled! {
    /// `[deploy.analysis] on_inconclusive` as stored.
    OnInconclusiveName {
        /// `pause`: wait for `kiln promote` or `kiln abort`.
        Pause = "pause",
        /// `abort`: roll back.
        Abort = "abort",
        /// `promote`: proceed as if the step passed.
        Promote = "promote",
    }
}

impl Default for OnInconclusiveName {
    /// Releases recorded before the key existed pause too: the spec's default.
    fn default() -> OnInconclusiveName {
        OnInconclusiveName::Pause
    }
}

impl OnInconclusiveName {
    fn is_default(&self) -> bool {
        *self == OnInconclusiveName::default()
    }
}

impl From<OnInconclusive> for OnInconclusiveName {
    fn from(o: OnInconclusive) -> OnInconclusiveName {
        match o {
            OnInconclusive::Pause => OnInconclusiveName::Pause,
            OnInconclusive::Abort => OnInconclusiveName::Abort,
            OnInconclusive::Promote => OnInconclusiveName::Promote,
        }
    }
}

impl From<OnInconclusiveName> for OnInconclusive {
    fn from(o: OnInconclusiveName) -> OnInconclusive {
        match o {
            OnInconclusiveName::Pause => OnInconclusive::Pause,
            OnInconclusiveName::Abort => OnInconclusive::Abort,
            OnInconclusiveName::Promote => OnInconclusive::Promote,
        }
    }
}

spelled! {
    /// `[service] seccomp` as stored.
    SeccompName {
        /// `default`: the allowlist.
        Default = "default",
        /// `unconfined`: no filter.
        Unconfined = "unconfined",
    }
}

impl Default for SeccompName {
    /// Releases recorded before the key existed get the allowlist: sealed by default.
    fn default() -> SeccompName {
        SeccompName::Default
    }
}

impl From<Seccomp> for SeccompName {
    fn from(s: Seccomp) -> SeccompName {
        match s {
            Seccomp::Default => SeccompName::Default,
            Seccomp::Unconfined => SeccompName::Unconfined,
        }
    }
}

impl From<SeccompName> for Seccomp {
    fn from(s: SeccompName) -> Seccomp {
        match s {
            SeccompName::Default => Seccomp::Default,
            SeccompName::Unconfined => Seccomp::Unconfined,
        }
    }
}

/// One `[service] capabilities` entry as stored: the name as capabilities(7) writes it
/// without `CAP_` (`"CHOWN"`), the one spelling that decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilityName(pub Capability);

impl Serialize for CapabilityName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for CapabilityName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CapabilityName, D::Error> {
        let s = String::deserialize(d)?;
        Capability::canonical(&s).map(CapabilityName).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown capability {s:?}, expected a name as capabilities(7) writes it without \
                 `CAP_`, e.g. \"CHOWN\""
            ))
        })
    }
}

/// One `[service] writable` entry as stored: the path alone (`"/tmp"`, sized by
/// `tmpfs_size_bytes`, the only form releases recorded before sizes had) or with its own size
/// (`{"path": "/var/cache", "size_bytes": 268435456}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritableConfig {
    /// The tmpfs path.
    pub path: String,
    /// Its own size cap; `None` means `tmpfs_size_bytes`.
    pub size_bytes: Option<u64>,
}

/// The table form of a [`WritableConfig`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SizedWritable {
    path: String,
    size_bytes: u64,
}

impl Serialize for WritableConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.size_bytes {
            None => s.serialize_str(&self.path),
            Some(size_bytes) => SizedWritable {
                path: self.path.clone(),
                size_bytes,
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for WritableConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<WritableConfig, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = WritableConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a path or {\"path\", \"size_bytes\"}")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WritableConfig, E> {
                Ok(WritableConfig {
                    path: v.to_owned(),
                    size_bytes: None,
                })
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<WritableConfig, A::Error> {
                let sized =
                    SizedWritable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(WritableConfig {
                    path: sized.path,
                    size_bytes: Some(sized.size_bytes),
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

impl From<ProviderKind> for ProviderName {
    fn from(p: ProviderKind) -> ProviderName {
        match p {
            ProviderKind::Local => ProviderName::Local,
            ProviderKind::Docker => ProviderName::Docker,
            ProviderKind::Swarm => ProviderName::Swarm,
        }
    }
}

impl From<ProviderName> for ProviderKind {
    fn from(p: ProviderName) -> ProviderKind {
        match p {
            ProviderName::Local => ProviderKind::Local,
            ProviderName::Docker => ProviderKind::Docker,
            ProviderName::Swarm => ProviderKind::Swarm,
        }
    }
}

impl From<ExecPolicy> for ExecPolicyName {
    fn from(e: ExecPolicy) -> ExecPolicyName {
        match e {
            ExecPolicy::Taint => ExecPolicyName::Taint,
            ExecPolicy::Allow => ExecPolicyName::Allow,
        }
    }
}

impl From<ExecPolicyName> for ExecPolicy {
    fn from(e: ExecPolicyName) -> ExecPolicy {
        match e {
            ExecPolicyName::Taint => ExecPolicy::Taint,
            ExecPolicyName::Allow => ExecPolicy::Allow,
        }
    }
}

impl From<Promote> for PromoteName {
    fn from(p: Promote) -> PromoteName {
        match p {
            Promote::Auto => PromoteName::Auto,
            Promote::Manual => PromoteName::Manual,
        }
    }
}

impl From<PromoteName> for Promote {
    fn from(p: PromoteName) -> Promote {
        match p {
            PromoteName::Auto => Promote::Auto,
            PromoteName::Manual => Promote::Manual,
        }
    }
}

/// `max_surge` or `max_unavailable` as stored: `"3"` or `"25%"`, in the one way each number
/// is written (no sign, no leading zero, no space), a percentage at most 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountText(pub CountOrPercent);

impl CountText {
    /// Parses the stored text; the error says what was expected.
    pub fn parse(s: &str) -> Result<CountText, String> {
        let (digits, percent) = match s.strip_suffix('%') {
            Some(d) => (d, true),
            None => (s, false),
        };
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        let parsed = match (canonical, percent) {
            (false, _) => None,
            (true, true) => digits
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .map(CountOrPercent::Percent),
            (true, false) => digits.parse::<u32>().ok().map(CountOrPercent::Count),
        };
        parsed.map(CountText).ok_or_else(|| {
            format!(
                "invalid count {s:?}, expected a whole number such as \"3\" or a percentage \
                 from \"0%\" to \"100%\""
            )
        })
    }
}

impl std::fmt::Display for CountText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            CountOrPercent::Count(n) => write!(f, "{n}"),
            CountOrPercent::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for CountText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CountText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CountText, D::Error> {
        let s = String::deserialize(d)?;
        CountText::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Default for TargetConfig {
    fn default() -> TargetConfig {
        TargetConfig::from(&TargetSpec::default())
    }
}

impl From<&TargetSpec> for TargetConfig {
    fn from(t: &TargetSpec) -> TargetConfig {
        TargetConfig {
            provider: t.provider.into(),
            runtime: t.runtime.clone(),
            docker_host: t.docker_host.clone(),
            exec: t.exec.into(),
            placement: t.placement.clone(),
            registry: t.registry.clone(),
            registry_insecure: t.registry_insecure,
        }
    }
}

/// `[service]` as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Port inside an instance with its own network.
    pub port: u16,
    /// Instances of the live release.
    pub replicas: u32,
    /// Instance environment.
    pub env: BTreeMap<String, String>,
    /// tmpfs paths.
    pub writable: Vec<WritableConfig>,
    /// The size of a tmpfs without its own, in bytes (releases recorded before it: 64 MiB).
    #[serde(default = "default_tmpfs_size_bytes")]
    pub tmpfs_size_bytes: u64,
    /// Bytes.
    pub memory: Option<u64>,
    /// Cores.
    pub cpus: Option<f64>,
    /// SIGTERM → SIGKILL.
    pub stop_grace_ms: u64,
    /// `[service] init`. Releases recorded before it had none and keep running without one:
    /// a release runs as it was recorded, so only new releases get the spec's default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
    /// Health check.
    pub health: HealthConfig,
    /// `[service] user`; `None` (and releases recorded before it): the image's, else 65534.
    #[serde(default)]
    pub user: Option<String>,
    /// The pids limit (releases recorded before it: the spec's default).
    #[serde(default = "default_pids")]
    pub pids: u32,
    /// `default` or `unconfined` (releases recorded before it: `default`).
    #[serde(default)]
    pub seccomp: SeccompName,
    /// `[service] network` unless it is the default `kiln` (so releases recorded before it
    /// read and re-encode unchanged, and run on the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Capabilities added to the minimal set (releases recorded before it: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<CapabilityName>,
    /// The opt-in to dangerous `capabilities` (releases recorded before it: none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_dangerous_capabilities: bool,
    /// `[service.secrets]`: sources and fingerprints, never values (releases recorded
    /// before it: none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretConfig>,
}

/// The rules a secret keeps on its own: a valid name, an absolute file or directory, an env
/// variable's name, a command.
pub fn check_secret(name: &str, s: &SecretConfig) -> std::result::Result<(), String> {
    let broken = |r: std::result::Result<(), Broken>| r.map_err(|b| b.message);
    broken(rules::secret_name(name, s.expose_env))?;
    match &s.source {
        SecretSourceConfig::File(f) if !f.is_absolute() => {
            Err(format!("file {} is not absolute", f.display()))
        }
        SecretSourceConfig::File(_) => Ok(()),
        SecretSourceConfig::Env(v) => broken(rules::env_var(v, "", false)),
        SecretSourceConfig::Command { argv, dir } => {
            broken(rules::command("command", argv.iter().map(String::as_str)))?;
            if dir.is_absolute() {
                Ok(())
            } else {
                Err(format!("dir {} is not absolute", dir.display()))
            }
        }
    }
}

/// One secret as a release records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// Where the daemon reads the value.
    pub source: SecretSourceConfig,
    /// Also in the instance's environment.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expose_env: bool,
    /// The value's keyed fingerprint, filled in by the daemon at apply (a client's is
    /// replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// Where a secret's value comes from, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretSourceConfig {
    /// A file's content (an absolute path).
    File(PathBuf),
    /// An environment variable of the daemon.
    Env(String),
    /// A command's output.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Where it runs (absolute).
        dir: PathBuf,
    },
}

impl From<&kiln_spec::SecretSource> for SecretSourceConfig {
    fn from(s: &kiln_spec::SecretSource) -> SecretSourceConfig {
        match s {
            kiln_spec::SecretSource::File(p) => SecretSourceConfig::File(p.clone()),
            kiln_spec::SecretSource::Env(v) => SecretSourceConfig::Env(v.clone()),
            kiln_spec::SecretSource::Command { argv, dir } => SecretSourceConfig::Command {
                argv: argv.clone(),
                dir: dir.clone(),
            },
        }
    }
}

fn default_tmpfs_size_bytes() -> u64 {
    ServiceSpec::DEFAULT_TMPFS_SIZE
}

fn default_pids() -> u32 {
    ServiceSpec::DEFAULT_PIDS
}

impl ServiceConfig {
    /// Each writable path with its size cap in bytes.
    pub fn tmpfs(&self) -> impl Iterator<Item = (&str, u64)> {
        self.writable.iter().map(|w| {
            (
                w.path.as_str(),
                w.size_bytes.unwrap_or(self.tmpfs_size_bytes),
            )
        })
    }
}

/// `[service.health]` as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// HTTP path or TCP when `None`.
    pub path: Option<String>,
    /// Between checks.
    pub interval_ms: u64,
    /// One check.
    pub timeout_ms: u64,
    /// Passes to healthy.
    pub healthy_threshold: u32,
    /// Failures to unhealthy.
    pub unhealthy_threshold: u32,
    /// Grace after start.
    pub start_period_ms: u64,
}

/// `[deploy]` as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// `rolling`, `blue-green` or `canary`.
    pub strategy: StrategyName,
    /// `auto` or `manual`.
    pub promote: PromoteName,
    /// Canary steps.
    pub steps: Vec<StepConfig>,
    /// Canary analysis.
    pub analysis: Option<AnalysisConfig>,
    /// Canary: stable scales down as the canary scales up (absent, false, in releases
    /// recorded before it existed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scale_stable: bool,
    /// `3` or `25%`.
    pub max_surge: CountText,
    /// `0` or `25%`.
    pub max_unavailable: CountText,
    /// No progress for this long rolls back.
    pub progress_deadline_ms: u64,
    /// Warm previous release.
    pub keep_previous_ms: u64,
    /// Migration.
    pub migrate: Option<MigrateConfig>,
}

/// One canary step as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Percent.
    pub weight: u8,
    /// Step length.
    pub pause_ms: Option<u64>,
}

/// `[deploy.analysis]` as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisConfig {
    /// Fraction.
    pub max_error_rate: f64,
    /// Bound on p99.
    pub max_p99_ms: Option<u64>,
    /// Inconclusive below.
    pub min_requests: u64,
    /// Compare with stable.
    pub compare_to_stable: bool,
    /// What a step that stays inconclusive leads to (absent, `pause`, in releases recorded
    /// before it existed).
    #[serde(default, skip_serializing_if = "OnInconclusiveName::is_default")]
    pub on_inconclusive: OnInconclusiveName,
}

/// How a canary release without `[deploy.analysis]` is judged.
pub(crate) fn default_analysis() -> AnalysisConfig {
    AnalysisConfig {
        max_error_rate: 0.01,
        max_p99_ms: None,
        min_requests: 50,
        compare_to_stable: true,
        on_inconclusive: OnInconclusiveName::Pause,
    }
}

/// `[deploy.migrate]` as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateConfig {
    /// Command.
    pub command: Vec<String>,
    /// Schema after.
    pub schema: u32,
    /// Oldest compatible schema.
    pub compatible_from: u32,
    /// Hold requests while it runs (releases recorded before it: no).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause: bool,
}

/// `[route]` as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Host names.
    pub hosts: Vec<String>,
    /// PEM files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Sticky cookie.
    pub sticky: bool,
    /// Drain bound.
    pub drain_timeout_ms: u64,
    /// Request bound.
    pub request_timeout_ms: u64,
    /// The header that pins a request to a release by name (`r3`), for previews.
    #[serde(default)]
    pub preview_header: Option<String>,
    /// The largest request body, in bytes; `None` means no limit.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// The largest request head, in bytes (releases recorded before it existed: 64 KiB).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u64,
}

fn default_max_header_bytes() -> u64 {
    64 * 1024
}

impl RouteConfig {
    /// The router's limits checked as `kiln.toml`'s are, worded with its keys. Part of
    /// [`ReleaseConfig::validate`], which checks them and everything else.
    pub fn check(&self) -> Result<(), String> {
        if let Err(b) = rules::header_size(self.max_header_bytes) {
            return Err(format!("[route] max_header_size {b}"));
        }
        if let Some(n) = self.max_body_bytes
            && let Err(b) = rules::size(n)
        {
            return Err(format!("[route] max_body_size {b}"));
        }
        Ok(())
    }
}

/// `d` in whole milliseconds, as stored. A duration the spec allows is never zero, and
/// must not become zero here (`"500us"` would store "no time at all"): under a millisecond
/// counts as one. Longer durations are truncated as before.
fn ms(d: Duration) -> u64 {
    let n = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if n == 0 && !d.is_zero() { 1 } else { n }
}

fn dur(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

impl ReleaseConfig {
    /// Decodes a configuration sent to the API or read from the ledger. Only the shape and
    /// the spellings are checked here; [`ReleaseConfig::validate`] checks the values.
    pub fn decode(value: &serde_json::Value) -> Result<ReleaseConfig, ConfigError> {
        serde_path_to_error::deserialize(value).map_err(|e| ConfigError {
            field: json_path(e.path()),
            message: e.inner().to_string(),
        })
    }

    /// Every way this configuration breaks the rules `kiln.toml` gets, each at its JSON path
    /// and in field order; `Ok` when there is none. What `from_spec` makes from a valid spec
    /// always passes.
    ///
    /// Two of the spec's rules need to know whether a key was written, which a stored
    /// configuration cannot tell: a key that only applies to another strategy or provider
    /// counts as written when it differs from what `from_spec` stores for it, and the health
    /// `timeout` may exceed the `interval` (the spec allows it while `timeout` is defaulted).
    /// TLS files are not checked here: whether they exist is the controller's I/O.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut p = Problems::default();
        self.service.validate(&mut p);
        self.deploy.validate(self.service.replicas, &mut p);
        self.route.validate(&mut p);
        self.target.validate(&mut p);
        self.policy.validate("policy", &mut p);
        self.daemon_policy.validate("daemon_policy", &mut p);
        if p.0.is_empty() { Ok(()) } else { Err(p.0) }
    }

    /// The configuration a validated spec describes.
    pub fn from_spec(spec: &Spec) -> ReleaseConfig {
        let s = &spec.service;
        let h = &s.health;
        let d = &spec.deploy;
        let (strategy, promote, steps, analysis, scale_stable) = match &d.strategy {
            Strategy::Rolling => (
                StrategyName::Rolling,
                Promote::Auto,
                Vec::new(),
                None,
                false,
            ),
            Strategy::BlueGreen { promote } => {
                (StrategyName::BlueGreen, *promote, Vec::new(), None, false)
            }
            Strategy::Canary {
                promote,
                steps,
                analysis,
                scale_stable,
            } => (
                StrategyName::Canary,
                *promote,
                steps.clone(),
                Some(analysis.clone()),
                *scale_stable,
            ),
        };
        let r = &spec.route;
        ReleaseConfig {
            service: ServiceConfig {
                port: s.port,
                replicas: s.replicas,
                env: s.env.clone(),
                writable: s
                    .writable
                    .iter()
                    .map(|w: &Writable| WritableConfig {
                        path: w.path.clone(),
                        size_bytes: w.size,
                    })
                    .collect(),
                tmpfs_size_bytes: s.tmpfs_size,
                memory: s.memory,
                cpus: s.cpus,
                stop_grace_ms: ms(s.stop_grace),
                init: s.init,
                user: s.user.clone(),
                pids: s.pids,
                seccomp: s.seccomp.into(),
                network: (s.network != Network::Kiln).then(|| s.network.as_str().to_owned()),
                capabilities: s.capabilities.iter().copied().map(CapabilityName).collect(),
                allow_dangerous_capabilities: s.allow_dangerous_capabilities,
                secrets: s
                    .secrets
                    .iter()
                    .map(|x| {
                        let config = SecretConfig {
                            source: (&x.source).into(),
                            expose_env: x.expose_env,
                            fingerprint: None,
                        };
                        (x.name.clone(), config)
                    })
                    .collect(),
                health: HealthConfig {
                    path: h.path.clone(),
                    interval_ms: ms(h.interval),
                    timeout_ms: ms(h.timeout),
                    healthy_threshold: h.healthy_threshold,
                    unhealthy_threshold: h.unhealthy_threshold,
                    start_period_ms: ms(h.start_period),
                },
            },
            deploy: DeployConfig {
                strategy,
                promote: promote.into(),
                steps: steps
                    .iter()
                    .map(|s| StepConfig {
                        weight: s.weight,
                        pause_ms: s.pause.map(ms),
                    })
                    .collect(),
                analysis: analysis.map(|a| AnalysisConfig {
                    max_error_rate: a.max_error_rate,
                    max_p99_ms: a.max_p99.map(ms),
                    min_requests: a.min_requests,
                    compare_to_stable: a.compare_to_stable,
                    on_inconclusive: a.on_inconclusive.into(),
                }),
                scale_stable,
                max_surge: CountText(d.max_surge),
                max_unavailable: CountText(d.max_unavailable),
                progress_deadline_ms: ms(d.progress_deadline),
                keep_previous_ms: ms(d.keep_previous),
                migrate: d.migrate.as_ref().map(|m| MigrateConfig {
                    command: m.command.clone(),
                    schema: m.schema,
                    compatible_from: m.compatible_from,
                    pause: m.pause,
                }),
            },
            route: RouteConfig {
                listen: r.listen,
                hosts: r.hosts.clone(),
                tls: r.tls.as_ref().map(|t| (t.cert.clone(), t.key.clone())),
                sticky: r.sticky == Sticky::Cookie,
                drain_timeout_ms: ms(r.drain_timeout),
                request_timeout_ms: ms(r.request_timeout),
                preview_header: r.preview_header.clone(),
                max_body_bytes: r.max_body_size,
                max_header_bytes: r.max_header_size,
            },
            target: TargetConfig::from(&spec.target),
            test_required: spec.image.test.is_some(),
            policy: PolicyConfig::from(&spec.policy),
            daemon_policy: PolicyConfig::default(),
        }
    }

    /// Where instances run.
    pub fn target(&self) -> TargetSpec {
        let t = &self.target;
        TargetSpec {
            provider: t.provider.into(),
            runtime: t.runtime.clone(),
            docker_host: t.docker_host.clone(),
            exec: t.exec.into(),
            placement: t.placement.clone(),
            registry: t.registry.clone(),
            registry_insecure: t.registry_insecure,
        }
    }

    /// The health check instances get.
    pub fn health(&self) -> HealthCheck {
        let h = &self.service.health;
        HealthCheck {
            path: h.path.clone(),
            interval: dur(h.interval_ms),
            timeout: dur(h.timeout_ms),
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
            start_period: dur(h.start_period_ms),
        }
    }

    /// The rollout settings for the state machine.
    pub fn deploy_spec(&self) -> DeploySpec {
        let d = &self.deploy;
        let promote = Promote::from(d.promote);
        let strategy = match d.strategy {
            StrategyName::Rolling => Strategy::Rolling,
            StrategyName::BlueGreen => Strategy::BlueGreen { promote },
            StrategyName::Canary => Strategy::Canary {
                promote,
                steps: d
                    .steps
                    .iter()
                    .map(|s| CanaryStep {
                        weight: s.weight,
                        pause: s.pause_ms.map(dur),
                    })
                    .collect(),
                analysis: {
                    let a = d.analysis.clone().unwrap_or_else(default_analysis);
                    Analysis {
                        max_error_rate: a.max_error_rate,
                        max_p99: a.max_p99_ms.map(dur),
                        min_requests: a.min_requests,
                        compare_to_stable: a.compare_to_stable,
                        on_inconclusive: a.on_inconclusive.into(),
                    }
                },
                scale_stable: d.scale_stable,
            },
        };
        DeploySpec {
            strategy,
            max_surge: d.max_surge.0,
            max_unavailable: d.max_unavailable.0,
            progress_deadline: dur(d.progress_deadline_ms),
            keep_previous: dur(d.keep_previous_ms),
            migrate: d.migrate.as_ref().map(|m| Migrate {
                command: m.command.clone(),
                schema: m.schema,
                compatible_from: m.compatible_from,
                pause: m.pause,
            }),
        }
    }

    /// Whether the daemon must see a passed test attestation before applying the image.
    pub fn test_required(&self) -> bool {
        self.test_required
    }
}

/// The problems [`ReleaseConfig::validate`] has found so far.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    /// Records `result`'s problem, if any, at `field`.
    fn check(&mut self, field: &str, result: Result<(), Broken>) {
        if let Err(b) = result {
            self.0.push(ConfigError {
                field: field.to_owned(),
                message: b.message,
            });
        }
    }

    /// A problem at `field` that no shared rule names.
    fn add(&mut self, field: &str, message: String) {
        self.0.push(ConfigError {
            field: field.to_owned(),
            message,
        });
    }

    /// A duration stored in milliseconds.
    fn duration(&mut self, field: &str, ms: u64) {
        self.check(field, rules::duration(dur(ms)));
    }
}

impl ServiceConfig {
    fn validate(&self, p: &mut Problems) {
        p.check("service.port", rules::PORT.check(self.port));
        p.check("service.replicas", rules::REPLICAS.check(self.replicas));
        for (name, value) in &self.env {
            let mut field = "service.env".to_owned();
            push_key(&mut field, name);
            p.check(&field, rules::env_var(name, value, true));
        }
        for (i, b) in rules::writable(self.writable.iter().map(|w| w.path.as_str())) {
            p.check(&format!("service.writable[{i}]"), Err(b));
        }
        for (i, w) in self.writable.iter().enumerate() {
            if let Some(n) = w.size_bytes {
                p.check(&format!("service.writable[{i}].size_bytes"), rules::size(n));
            }
        }
        p.check(
            "service.tmpfs_size_bytes",
            rules::size(self.tmpfs_size_bytes),
        );
        if let Some(m) = self.memory {
            p.check("service.memory", rules::size(m));
        }
        if let Some(c) = self.cpus {
            p.check("service.cpus", rules::positive(c));
        }
        p.duration("service.stop_grace_ms", self.stop_grace_ms);
        let h = &self.health;
        if let Some(path) = &h.path {
            p.check("service.health.path", rules::health_path(path));
        }
        p.duration("service.health.interval_ms", h.interval_ms);
        p.duration("service.health.timeout_ms", h.timeout_ms);
        p.check(
            "service.health.healthy_threshold",
            rules::HEALTH_THRESHOLD.check(h.healthy_threshold),
        );
        p.check(
            "service.health.unhealthy_threshold",
            rules::HEALTH_THRESHOLD.check(h.unhealthy_threshold),
        );
        p.duration("service.health.start_period_ms", h.start_period_ms);
        if let Some(u) = &self.user {
            p.check("service.user", rules::user(u));
        }
        p.check("service.pids", rules::PIDS.check(self.pids));
        if let Some(n) = &self.network {
            p.check("service.network", rules::network(n));
        }
        self.validate_secrets(p);
        for (i, b) in
            rules::capabilities(&self.capability_list(), self.allow_dangerous_capabilities)
        {
            let field = match i {
                Some(i) => format!("service.capabilities[{i}]"),
                None => "service.allow_dangerous_capabilities".to_owned(),
            };
            p.check(&field, Err(b));
        }
    }

    /// The rules a stored secret keeps (`check_secret`), and a name exposed in the
    /// environment not also in `env`.
    fn validate_secrets(&self, p: &mut Problems) {
        for (name, s) in &self.secrets {
            let field = format!("service.secrets.{name}");
            if let Err(message) = check_secret(name, s) {
                p.add(&field, message);
            }
            if s.expose_env && self.env.contains_key(name) {
                p.add(&field, format!("{name} is also set in service.env"));
            }
        }
    }

    /// The capabilities added to an instance's minimal set.
    pub fn capability_list(&self) -> Vec<Capability> {
        self.capabilities.iter().map(|c| c.0).collect()
    }
}

impl DeployConfig {
    fn validate(&self, replicas: u32, p: &mut Problems) {
        let strategy = self.strategy.as_str();
        // What `from_spec` stores for a key the spec left out counts as not set.
        let set = |key: &str| match key {
            "steps" => !self.steps.is_empty(),
            "analysis" => self.analysis.is_some(),
            "scale_stable" => self.scale_stable,
            "promote" => self.promote != PromoteName::Auto,
            _ => false,
        };
        for (key, b) in rules::strategy_keys(strategy, set) {
            p.check(&format!("deploy.{key}"), Err(b));
        }
        for (field, count) in [
            ("deploy.max_surge", self.max_surge),
            ("deploy.max_unavailable", self.max_unavailable),
        ] {
            // Only a value built in code gets here: decoding refuses it.
            if let CountOrPercent::Percent(pc) = count.0
                && pc > 100
            {
                p.0.push(ConfigError {
                    field: field.to_owned(),
                    message: format!("must be at most 100%, got {pc}%"),
                });
            }
        }
        p.check(
            "deploy.max_surge",
            rules::rolling_progress(strategy, self.max_surge.0, self.max_unavailable.0, replicas),
        );
        if self.strategy == StrategyName::Canary {
            self.validate_canary(p);
        }
        p.duration("deploy.progress_deadline_ms", self.progress_deadline_ms);
        p.duration("deploy.keep_previous_ms", self.keep_previous_ms);
        if let Some(m) = &self.migrate {
            p.check(
                "deploy.migrate.command",
                rules::command("command", m.command.iter().map(String::as_str)),
            );
            p.check(
                "deploy.migrate.schema",
                rules::SCHEMA_VERSION.check(m.schema),
            );
            p.check(
                "deploy.migrate.compatible_from",
                rules::SCHEMA_VERSION
                    .check(m.compatible_from)
                    .and_then(|()| rules::compatible_from(m.compatible_from, m.schema)),
            );
        }
    }
}

impl DeployConfig {
    /// Canary steps and analysis.
    fn validate_canary(&self, p: &mut Problems) {
        p.check("deploy.steps", rules::canary_has_steps(self.steps.len()));
        let mut previous = None;
        for (i, step) in self.steps.iter().enumerate() {
            let weight = i64::from(step.weight);
            let field = format!("deploy.steps[{i}].weight");
            p.check(&field, rules::CANARY_WEIGHT.check(weight));
            if let Some((_, before)) = previous {
                p.check(&field, rules::canary_weight_follows(before, weight));
            }
            previous = Some((i, weight));
            if let Some(ms) = step.pause_ms {
                p.duration(&format!("deploy.steps[{i}].pause_ms"), ms);
            }
        }
        if let Some((i, last)) = previous {
            let field = format!("deploy.steps[{i}].weight");
            p.check(&field, rules::canary_last_weight(last));
        }
        if let Some(a) = &self.analysis {
            p.check(
                "deploy.analysis.max_error_rate",
                rules::ratio(a.max_error_rate),
            );
            if let Some(ms) = a.max_p99_ms {
                p.duration("deploy.analysis.max_p99_ms", ms);
            }
            p.check(
                "deploy.analysis.min_requests",
                rules::MIN_REQUESTS.check(a.min_requests),
            );
        }
    }
}

impl RouteConfig {
    fn validate(&self, p: &mut Problems) {
        for (i, h) in self.hosts.iter().enumerate() {
            p.check(&format!("route.hosts[{i}]"), rules::host(h));
        }
        p.duration("route.drain_timeout_ms", self.drain_timeout_ms);
        p.duration("route.request_timeout_ms", self.request_timeout_ms);
        if let Some(h) = &self.preview_header {
            p.check("route.preview_header", rules::preview_header(h));
        }
        if let Some(n) = self.max_body_bytes {
            p.check("route.max_body_bytes", rules::size(n));
        }
        p.check(
            "route.max_header_bytes",
            rules::header_size(self.max_header_bytes),
        );
    }
}

impl TargetConfig {
    fn validate(&self, p: &mut Problems) {
        // What `from_spec` stores for a key the spec left out counts as not set.
        let set = |key: &str| match key {
            "docker_host" => self.docker_host.is_some(),
            "exec" => self.exec != ExecPolicyName::Taint,
            "placement" => !self.placement.is_empty(),
            "registry" => self.registry.is_some(),
            "registry_insecure" => self.registry_insecure,
            _ => false,
        };
        for (key, b) in rules::target_keys(self.provider.into(), set) {
            p.check(&format!("target.{key}"), Err(b));
        }
        for c in &self.placement {
            p.check("target.placement", rules::placement(c));
        }
        if let Some(r) = &self.registry {
            p.check("target.registry", rules::registry(r).map(|_| ()));
        }
        p.check("target.runtime", rules::runtime(&self.runtime));
    }
}

/// `path` as this module names fields: `deploy.steps[1].weight`, with a map key that is not
/// a plain word quoted (`service.env["A B"]`) so that no key can forge a path or put a control
/// character in a message.
fn json_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => push_key(&mut out, key),
            Segment::Unknown => push_key(&mut out, "?"),
        }
    }
    if out.is_empty() {
        "config".to_owned()
    } else {
        out
    }
}

/// Appends `.key` to a field path, or `["key"]` when the key is not a plain word.
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !plain {
        path.push_str(&format!("[{key:?}]"));
        return;
    }
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn spec(extra: &str) -> Spec {
        let src = format!(
            "name = \"a\"\n[image]\n[service]\nreplicas = 2\nenv = {{ A = \"1\" }}\n{extra}"
        );
        Spec::parse(&src, "kiln.toml", std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn round_trips_through_json_and_back_to_the_deploy_spec() {
        let s = spec(
            "[deploy]\nstrategy = \"canary\"\nmax_surge = \"25%\"\n[[deploy.steps]]\nweight = 10\npause = \"5s\"\n[[deploy.steps]]\nweight = 100\n",
        );
        let c = ReleaseConfig::from_spec(&s);
        let back: ReleaseConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.deploy_spec(), s.deploy);
        assert_eq!(back.health(), s.service.health);
    }

    /// A release as the daemon recorded it before these fields were typed: the stored format
    /// must not change, or old ledgers would stop decoding.
    const RECORDED: &str = r#"
    {
      "service": {
        "port": 8080,
        "replicas": 2,
        "env": {
          "A": "1"
        },
        "writable": [
          "/tmp",
          {
            "path": "/data",
            "size_bytes": 1048576
          }
        ],
        "tmpfs_size_bytes": 67108864,
        "memory": null,
        "cpus": null,
        "stop_grace_ms": 10000,
        "init": true,
        "health": {
          "path": null,
          "interval_ms": 1000,
          "timeout_ms": 1000,
          "healthy_threshold": 1,
          "unhealthy_threshold": 3,
          "start_period_ms": 30000
        },
        "user": "app",
        "pids": 512,
        "seccomp": "default"
      },
      "deploy": {
        "strategy": "canary",
        "promote": "manual",
        "steps": [
          {
            "weight": 10,
            "pause_ms": 5000
          },
          {
            "weight": 100,
            "pause_ms": null
          }
        ],
        "analysis": {
          "max_error_rate": 0.01,
          "max_p99_ms": null,
          "min_requests": 50,
          "compare_to_stable": true
        },
        "max_surge": "25%",
        "max_unavailable": "1",
        "progress_deadline_ms": 300000,
        "keep_previous_ms": 600000,
        "migrate": {
          "command": [
            "/migrate"
          ],
          "schema": 2,
          "compatible_from": 2
        }
      },
      "route": {
        "listen": "127.0.0.1:8080",
        "hosts": [],
        "tls": null,
        "sticky": false,
        "drain_timeout_ms": 30000,
        "request_timeout_ms": 60000,
        "preview_header": null,
        "max_body_bytes": null,
        "max_header_bytes": 65536
      },
      "target": {
        "provider": "docker",
        "runtime": "runc",
        "docker_host": null,
        "exec": "allow"
      }
    }
"#;

    /// The `kiln.toml` that `RECORDED` was made from.
    const RECORDED_SPEC: &str = r#"
name = "a"
[image]
[service]
replicas = 2
env = { A = "1" }
writable = ["/tmp", { path = "/data", size = "1MiB" }]
user = "app"
[deploy]
strategy = "canary"
promote = "manual"
max_surge = "25%"
max_unavailable = 1
[[deploy.steps]]
weight = 10
pause = "5s"
[[deploy.steps]]
weight = 100
[deploy.migrate]
command = ["/migrate"]
schema = 2
[target]
provider = "docker"
exec = "allow"
"#;

    #[test]
    fn the_stored_format_is_unchanged_for_valid_data() {
        let s = Spec::parse(RECORDED_SPEC, "kiln.toml", std::path::Path::new(".")).unwrap();
        let recorded: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        let c: ReleaseConfig = serde_json::from_value(recorded.clone()).unwrap();
        assert_eq!(c, ReleaseConfig::from_spec(&s));
        assert_eq!(serde_json::to_value(&c).unwrap(), recorded);
        assert_eq!(c.deploy_spec(), s.deploy);
        assert_eq!(c.target(), s.target);
    }

    #[test]
    fn a_release_recorded_before_target_runs_on_the_local_provider() {
        let mut recorded: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        recorded.as_object_mut().unwrap().remove("target");
        let c: ReleaseConfig = serde_json::from_value(recorded).unwrap();
        assert_eq!(c.target(), TargetSpec::default());
    }

    #[test]
    fn a_release_recorded_before_sealing_runs_sealed() {
        let mut recorded: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        let service = recorded["service"].as_object_mut().unwrap();
        for key in ["tmpfs_size_bytes", "user", "pids", "seccomp"] {
            service.remove(key);
        }
        service.insert("writable".to_owned(), serde_json::json!(["/tmp"]));
        let c = ReleaseConfig::decode(&recorded).unwrap();
        assert_eq!(c.validate(), Ok(()));
        let s = &c.service;
        assert_eq!(s.tmpfs().collect::<Vec<_>>(), [("/tmp", 64 << 20)]);
        assert_eq!(s.user, None);
        assert_eq!(s.pids, ServiceSpec::DEFAULT_PIDS);
        assert_eq!(Seccomp::from(s.seccomp), Seccomp::Default);
        assert_eq!(s.capability_list(), []);
        assert!(!s.allow_dangerous_capabilities);
    }

    #[test]
    fn a_release_recorded_before_init_keeps_running_without_one() {
        let mut recorded: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        let service = recorded["service"].as_object_mut().unwrap();
        service.remove("init");
        let c = ReleaseConfig::decode(&recorded).unwrap();
        assert!(!c.service.init);
        // And it is stored again as it was.
        assert!(
            serde_json::to_value(&c).unwrap()["service"]
                .get("init")
                .is_none()
        );
    }

    #[test]
    fn counts_decode_only_in_their_one_spelling() {
        for (text, want) in [
            ("0", Some(CountOrPercent::Count(0))),
            ("3", Some(CountOrPercent::Count(3))),
            ("4294967295", Some(CountOrPercent::Count(u32::MAX))),
            ("0%", Some(CountOrPercent::Percent(0))),
            ("25%", Some(CountOrPercent::Percent(25))),
            ("100%", Some(CountOrPercent::Percent(100))),
            ("", None),
            ("%", None),
            ("abc", None),
            ("-1", None),
            ("+3", None),
            ("03", None),
            (" 3", None),
            ("3 ", None),
            ("2.5", None),
            ("25 %", None),
            ("101%", None),
            ("4294967296", None),
        ] {
            assert_eq!(CountText::parse(text).ok().map(|c| c.0), want, "{text:?}");
            if let Some(c) = want {
                assert_eq!(CountText(c).to_string(), text);
            }
        }
    }

    #[test]
    fn names_spell_as_the_spec_does() {
        let strategies: Vec<&str> = StrategyName::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(strategies, kiln_spec::STRATEGIES);
        for p in [
            ProviderKind::Local,
            ProviderKind::Docker,
            ProviderKind::Swarm,
        ] {
            assert_eq!(ProviderName::from(p).as_str(), p.as_str());
            assert_eq!(ProviderKind::from(ProviderName::from(p)), p);
        }
        for e in [ExecPolicy::Taint, ExecPolicy::Allow] {
            assert_eq!(ExecPolicyName::from(e).as_str(), e.as_str());
            assert_eq!(ExecPolicy::from(ExecPolicyName::from(e)), e);
        }
        for p in [Promote::Auto, Promote::Manual] {
            assert_eq!(Promote::from(PromoteName::from(p)), p);
        }
    }

    /// Edits to `RECORDED` and what the daemon says of the result: the decode error, or
    /// every problem `validate` finds, in order. A case is edit lines — `POINTER = JSON` sets
    /// a value, `-POINTER` removes it — then the expected lines, indented; a case with none
    /// expects no problem. Cases are separated by blank lines.
    const REFUSED: &str = r#"
# RECORDED itself is valid.
/service/replicas = 2

# Decoding: shapes and spellings.
/service/capabilities = ["CAP_CHOWN"]
    service.capabilities[0]: unknown capability "CAP_CHOWN", expected a name as capabilities(7) writes it without `CAP_`, e.g. "CHOWN"

/service/capabilities = ["CHOWN", "SETUID", "CHOWN", "SYS_ADMIN"]
    service.capabilities[2]: capability CHOWN is listed twice
    service.capabilities[3]: capability SYS_ADMIN is dangerous (mounts, makes namespaces and does most of what root does: the usual way out of a container) and needs `allow_dangerous_capabilities = true`

/service/capabilities = ["SYS_ADMIN"]
/service/allow_dangerous_capabilities = true

/service/capabilities = ["SETGID"]
/service/allow_dangerous_capabilities = true
    service.allow_dangerous_capabilities: `allow_dangerous_capabilities` is set, but no capability listed is dangerous

/target/provider = "dockr"
    target.provider: unknown variant "dockr", expected "local", "docker" or "swarm"

/target/exec = "sometimes"
    target.exec: unknown variant "sometimes", expected "taint" or "allow"

/deploy/strategy = "canery"
    deploy.strategy: unknown variant "canery", expected "rolling", "blue-green" or "canary"

/deploy/promote = "later"
    deploy.promote: unknown variant "later", expected "auto" or "manual"

/deploy/max_surge = "lots"
    deploy.max_surge: invalid count "lots", expected a whole number such as "3" or a percentage from "0%" to "100%"

/deploy/max_unavailable = "150%"
    deploy.max_unavailable: invalid count "150%", expected a whole number such as "3" or a percentage from "0%" to "100%"

/deploy/max_surge = 3
    deploy.max_surge: invalid type: integer `3`, expected a string

/deploy/steps/1 = {"weight": 300, "pause_ms": null}
    deploy.steps[1].weight: invalid value: integer `300`, expected u8

/service/replicas = -1
    service.replicas: invalid value: integer `-1`, expected u32

/service/env = {"A": 1}
    service.env.A: invalid type: integer `1`, expected a string

/service/env = {"A B": null}
    service.env["A B"]: invalid type: null, expected a string

/route/listen = "localhost:80"
    route.listen: invalid socket address syntax

/service/health/extra = 1
    service.health.extra: unknown field `extra`, expected one of `path`, `interval_ms`, `timeout_ms`, `healthy_threshold`, `unhealthy_threshold`, `start_period_ms`

-/service
    config: missing field `service`

# Validation: the rules kiln.toml gets.
/service/replicas = 1000000
    service.replicas: must be between 1 and 1000, got 1000000

/service/replicas = 0
    service.replicas: must be between 1 and 1000, got 0

/service/port = 0
    service.port: must be between 1 and 65535, got 0

/service/env = {"A": "1\u0000"}
    service.env.A: the value of A contains a NUL byte

/service/env = {"1BAD": "x", "A\u0000B": "x", "PORT": "9000"}
    service.env.1BAD: invalid environment variable name "1BAD"
    service.env["A\0B"]: invalid environment variable name "A\0B"
    service.env.PORT: `PORT` is set by kiln for each instance

/service/writable = ["tmp", "/", "/a/../b", "/tmp/", "/x", "/x"]
    service.writable[0]: writable path "tmp" must be absolute and normalised
    service.writable[1]: the root `/` cannot be writable
    service.writable[2]: writable path "/a/../b" must be absolute and normalised
    service.writable[3]: writable path "/tmp/" must be absolute and normalised
    service.writable[5]: "/x" is listed twice

/service/seccomp = "off"
    service.seccomp: unknown variant "off", expected "default" or "unconfined"

/service/writable = [7]
    service.writable[0]: invalid type: integer `7`, expected a path or {"path", "size_bytes"}

/service/writable = [{"path": "/tmp", "size": 1}]
    service.writable[0].size: unknown field `size`, expected `path` or `size_bytes`

/service/writable = [{"path": "/tmp", "size_bytes": 0}]
/service/tmpfs_size_bytes = 0
/service/user = "a:b:c"
/service/pids = 0
    service.writable[0].size_bytes: must be greater than zero, got 0
    service.tmpfs_size_bytes: must be greater than zero, got 0
    service.user: invalid user "a:b:c"
    service.pids: must be between 1 and 4194304, got 0

/service/memory = 0
/service/cpus = -0.5
/service/stop_grace_ms = 0
    service.memory: must be greater than zero, got 0
    service.cpus: must be greater than 0, got -0.5
    service.stop_grace_ms: must be greater than zero

/service/health/path = "healthz"
/service/health/interval_ms = 0
/service/health/healthy_threshold = 0
/service/health/unhealthy_threshold = 101
    service.health.path: health `path` must start with `/`, got "healthz"
    service.health.interval_ms: must be greater than zero
    service.health.healthy_threshold: must be between 1 and 100, got 0
    service.health.unhealthy_threshold: must be between 1 and 100, got 101

/service/health/path = "/ok\u0000"
    service.health.path: health `path` must not contain a NUL byte, got "/ok\0"

/deploy/steps = [{"weight": 10, "pause_ms": 0}, {"weight": 5, "pause_ms": null}]
    deploy.steps[0].pause_ms: must be greater than zero
    deploy.steps[1].weight: canary weights must strictly increase, but 5 follows 10
    deploy.steps[1].weight: canary steps must end at weight 100, but the last step is 5

/deploy/steps = [{"weight": 0, "pause_ms": null}, {"weight": 100, "pause_ms": null}]
    deploy.steps[0].weight: must be between 1 and 100, got 0

/deploy/steps = []
    deploy.steps: the canary strategy needs at least one [[deploy.steps]]

/deploy/analysis = {"max_error_rate": 2.0, "max_p99_ms": 0, "min_requests": 0, "compare_to_stable": true}
    deploy.analysis.max_error_rate: must be between 0 and 1
    deploy.analysis.max_p99_ms: must be greater than zero
    deploy.analysis.min_requests: must be between 1 and 1000000000, got 0

/deploy/analysis/on_inconclusive = "wait"
    deploy.analysis.on_inconclusive: unknown variant "wait", expected "pause", "abort" or "promote"

/deploy/scale_stable = "yes"
    deploy.scale_stable: invalid type: string "yes", expected a boolean

/deploy/strategy = "rolling"
/deploy/max_surge = "0"
/deploy/max_unavailable = "0%"
/deploy/scale_stable = true
    deploy.steps: `steps` only applies to the canary strategy, but strategy is "rolling"
    deploy.analysis: `analysis` only applies to the canary strategy, but strategy is "rolling"
    deploy.scale_stable: `scale_stable` only applies to the canary strategy, but strategy is "rolling"
    deploy.promote: `promote` only applies to blue-green and canary
    deploy.max_surge: `max_surge` and `max_unavailable` are both 0, so a rolling update could never make progress

/deploy/strategy = "blue-green"
/deploy/steps = []
/deploy/analysis = null
/deploy/keep_previous_ms = 0
    deploy.keep_previous_ms: must be greater than zero

/deploy/migrate = {"command": ["/migrate", "\u0000"], "schema": 2, "compatible_from": 3}
    deploy.migrate.command: `command` contains a NUL byte
    deploy.migrate.compatible_from: `compatible_from` (3) is newer than `schema` (2)

/deploy/migrate = {"command": [], "schema": 2000000, "compatible_from": 0}
    deploy.migrate.command: `command` must name a program
    deploy.migrate.schema: must be between 0 and 1000000, got 2000000

/route/hosts = ["app.example.com", "http://x", "a\u0000b"]
/route/preview_header = "X Release"
/route/max_body_bytes = 0
/route/max_header_bytes = 100
/route/request_timeout_ms = 0
    route.hosts[1]: invalid host name "http://x"
    route.hosts[2]: invalid host name "a\0b"
    route.request_timeout_ms: must be greater than zero
    route.preview_header: invalid header name "X Release"
    route.max_body_bytes: must be greater than zero, got 0
    route.max_header_bytes: must be between 8KiB and 1MiB, got 100 bytes

/target/provider = "local"
/target/docker_host = "unix:///run/docker.sock"
/target/runtime = ""
    target.docker_host: `docker_host` only applies to provider = "docker" or "swarm"
    target.exec: `exec` only applies to provider = "docker" or "swarm"
    target.runtime: `runtime` must name a program

/target/provider = "swarm"
/target/registry = "registry.example.com/Team"
    target.registry: registry "registry.example.com/Team": invalid path component "Team" (lowercase letters and digits, joined by `.`, `_`, `__` or `-`)

/target/provider = "docker"
/target/registry = "registry.example.com"
/target/registry_insecure = true
    target.registry: `registry` only applies to provider = "swarm"
    target.registry_insecure: `registry_insecure` only applies to provider = "swarm"
"#;

    /// What the daemon says of `RECORDED` after `edits` (see `REFUSED`).
    fn problems(edits: &[&str]) -> Vec<String> {
        let mut json: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        for edit in edits {
            let (pointer, value) = match edit.strip_prefix('-') {
                Some(pointer) => (pointer, None),
                None => {
                    let (pointer, value) = edit.split_once(" = ").unwrap();
                    (pointer, Some(serde_json::from_str(value).unwrap()))
                }
            };
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            match (json.pointer_mut(parent).unwrap(), value) {
                (serde_json::Value::Object(m), Some(v)) => {
                    m.insert(key.to_owned(), v);
                }
                (serde_json::Value::Object(m), None) => {
                    m.remove(key);
                }
                (serde_json::Value::Array(a), Some(v)) => a[key.parse::<usize>().unwrap()] = v,
                (other, _) => panic!("cannot apply {edit} to {other}"),
            }
        }
        match ReleaseConfig::decode(&json).map(|c| c.validate()) {
            Err(e) => vec![e.to_string()],
            Ok(Ok(())) => Vec::new(),
            Ok(Err(errors)) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_bad_release_config_is_refused_at_its_field() {
        let mut failures = Vec::new();
        let mut cases = 0;
        for case in REFUSED.split("\n\n") {
            let lines = case
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with('#'));
            let (expected, edits): (Vec<&str>, Vec<&str>) =
                lines.partition(|l| l.starts_with("    "));
            assert!(!edits.is_empty(), "a case without edits:\n{case}");
            let want: Vec<&str> = expected.iter().map(|l| l.trim_start()).collect();
            let got = problems(&edits);
            if got != want {
                failures.push(format!(
                    "{}\n  want {want:#?}\n  got {got:#?}",
                    edits.join("\n")
                ));
            }
            cases += 1;
        }
        assert!(cases > 30, "only {cases} cases");
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    #[test]
    fn validate_answers_for_every_key_the_strategy_and_target_rules_ask_about() {
        // The `set` closures in validate know these keys; a new one must be taught to them.
        let asked: Vec<&str> = rules::strategy_keys("rolling", |_| true)
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(asked, ["steps", "analysis", "scale_stable", "promote"]);
        let asked: Vec<&str> = rules::target_keys(ProviderKind::Local, |_| true)
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(
            asked,
            [
                "docker_host",
                "exec",
                "placement",
                "registry",
                "registry_insecure"
            ]
        );
    }

    #[test]
    fn every_valid_spec_fixture_gives_a_config_that_validates() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/tests/fixtures/valid");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let spec = Spec::load(&path).unwrap();
            let c = ReleaseConfig::from_spec(&spec);
            assert_eq!(c.validate(), Ok(()), "{}", path.display());
            assert_eq!(
                ReleaseConfig::decode(&serde_json::to_value(&c).unwrap()),
                Ok(c)
            );
            seen += 1;
        }
        assert!(seen >= 3, "only {seen} fixtures in {}", dir.display());
    }

    #[test]
    fn a_duration_under_a_millisecond_is_stored_as_one_not_zero() {
        // The spec allows "500us"; stored as 0 ms it would mean "no time at all".
        let c = ReleaseConfig::from_spec(&spec(
            "[service.health]\ninterval = \"500us\"\ntimeout = \"500us\"\n",
        ));
        assert_eq!(c.service.health.interval_ms, 1);
        assert_eq!(c.service.health.timeout_ms, 1);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(ms(Duration::from_micros(1500)), 1);
        assert_eq!(ms(Duration::ZERO), 0);
    }

    #[test]
    fn route_check_keeps_the_spec_s_wording() {
        let mut c = ReleaseConfig::from_spec(&spec(""));
        assert_eq!(c.route.check(), Ok(()));
        c.route.max_header_bytes = 100;
        assert_eq!(
            c.route.check(),
            Err("[route] max_header_size must be between 8KiB and 1MiB, got 100 bytes".to_owned())
        );
        c.route.max_header_bytes = 8 * 1024;
        c.route.max_body_bytes = Some(0);
        assert_eq!(
            c.route.check(),
            Err("[route] max_body_size must be greater than zero, got 0".to_owned())
        );
    }

    #[test]
    fn decode_accepts_what_the_spec_produces() {
        let c = ReleaseConfig::from_spec(&spec(""));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(ReleaseConfig::decode(&json), Ok(c));
    }
}
