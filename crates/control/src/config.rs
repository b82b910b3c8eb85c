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
//! `target.provider: unknown variant "dockr", expected "local" or "docker"`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_spec::{
    Analysis, CanaryStep, CountOrPercent, DeploySpec, ExecPolicy, HealthCheck, Migrate, Promote,
    ProviderKind, Spec, Sticky, Strategy, TargetSpec,
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

/// `unknown variant "dockr", expected "local" or "docker"`.
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

impl From<ProviderKind> for ProviderName {
    fn from(p: ProviderKind) -> ProviderName {
        match p {
            ProviderKind::Local => ProviderName::Local,
            ProviderKind::Docker => ProviderName::Docker,
        }
    }
}

impl From<ProviderName> for ProviderKind {
    fn from(p: ProviderName) -> ProviderKind {
        match p {
            ProviderName::Local => ProviderKind::Local,
            ProviderName::Docker => ProviderKind::Docker,
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
    pub writable: Vec<String>,
    /// Bytes.
    pub memory: Option<u64>,
    /// Cores.
    pub cpus: Option<f64>,
    /// SIGTERM → SIGKILL.
    pub stop_grace_ms: u64,
    /// Health check.
    pub health: HealthConfig,
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
    /// The checks `kiln.toml` gets, for a configuration that came through the API instead.
    pub fn check(&self) -> Result<(), String> {
        if !(8 * 1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err(format!(
                "[route] max_header_size must be between 8KiB and 1MiB, got {} bytes",
                self.max_header_bytes
            ));
        }
        if self.max_body_bytes == Some(0) {
            return Err("[route] max_body_size must be greater than zero".to_owned());
        }
        Ok(())
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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

    /// The configuration a validated spec describes.
    pub fn from_spec(spec: &Spec) -> ReleaseConfig {
        let s = &spec.service;
        let h = &s.health;
        let d = &spec.deploy;
        let (strategy, promote, steps, analysis) = match &d.strategy {
            Strategy::Rolling => (StrategyName::Rolling, Promote::Auto, Vec::new(), None),
            Strategy::BlueGreen { promote } => {
                (StrategyName::BlueGreen, *promote, Vec::new(), None)
            }
            Strategy::Canary {
                promote,
                steps,
                analysis,
            } => (
                StrategyName::Canary,
                *promote,
                steps.clone(),
                Some(analysis.clone()),
            ),
        };
        let r = &spec.route;
        ReleaseConfig {
            service: ServiceConfig {
                port: s.port,
                replicas: s.replicas,
                env: s.env.clone(),
                writable: s.writable.clone(),
                memory: s.memory,
                cpus: s.cpus,
                stop_grace_ms: ms(s.stop_grace),
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
                }),
                max_surge: CountText(d.max_surge),
                max_unavailable: CountText(d.max_unavailable),
                progress_deadline_ms: ms(d.progress_deadline),
                keep_previous_ms: ms(d.keep_previous),
                migrate: d.migrate.as_ref().map(|m| MigrateConfig {
                    command: m.command.clone(),
                    schema: m.schema,
                    compatible_from: m.compatible_from,
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
                analysis: d
                    .analysis
                    .as_ref()
                    .map(|a| Analysis {
                        max_error_rate: a.max_error_rate,
                        max_p99: a.max_p99_ms.map(dur),
                        min_requests: a.min_requests,
                        compare_to_stable: a.compare_to_stable,
                    })
                    .unwrap_or(Analysis {
                        max_error_rate: 0.01,
                        max_p99: None,
                        min_requests: 50,
                        compare_to_stable: true,
                    }),
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
            }),
        }
    }

    /// Lines describing how `self` differs from `before` (`key: old → new`), for `kiln plan`.
    pub fn diff(&self, before: &ReleaseConfig) -> Vec<String> {
        let a = serde_json::to_value(before).unwrap_or_default();
        let b = serde_json::to_value(self).unwrap_or_default();
        let mut out = Vec::new();
        diff_values("", &a, &b, &mut out);
        out
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

fn diff_values(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_values(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{path}: {a} → {b}")),
        _ => {}
    }
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
          "/tmp"
        ],
        "memory": null,
        "cpus": null,
        "stop_grace_ms": 10000,
        "health": {
          "path": null,
          "interval_ms": 1000,
          "timeout_ms": 1000,
          "healthy_threshold": 1,
          "unhealthy_threshold": 3,
          "start_period_ms": 30000
        }
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
writable = ["/tmp"]
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
        for p in [ProviderKind::Local, ProviderKind::Docker] {
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

    /// `RECORDED` with the value at `pointer` replaced by `value` (or removed when `None`),
    /// decoded as the API decodes it.
    fn decode_edited(
        pointer: &str,
        value: Option<serde_json::Value>,
    ) -> Result<ReleaseConfig, ConfigError> {
        let mut json: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let parent = json.pointer_mut(parent).unwrap();
        match (parent, value) {
            (serde_json::Value::Object(m), Some(v)) => {
                m.insert(key.to_owned(), v);
            }
            (serde_json::Value::Object(m), None) => {
                m.remove(key);
            }
            (serde_json::Value::Array(a), Some(v)) => a[key.parse::<usize>().unwrap()] = v,
            (other, _) => panic!("cannot edit {pointer} in {other}"),
        }
        ReleaseConfig::decode(&json)
    }

    #[test]
    fn decode_names_the_field_that_fails() {
        use serde_json::json;
        let cases: &[(&str, Option<serde_json::Value>, &str)] = &[
            (
                "/target/provider",
                Some(json!("dockr")),
                r#"target.provider: unknown variant "dockr", expected "local" or "docker""#,
            ),
            (
                "/target/exec",
                Some(json!("sometimes")),
                r#"target.exec: unknown variant "sometimes", expected "taint" or "allow""#,
            ),
            (
                "/deploy/strategy",
                Some(json!("canery")),
                r#"deploy.strategy: unknown variant "canery", expected "rolling", "blue-green" or "canary""#,
            ),
            (
                "/deploy/promote",
                Some(json!("later")),
                r#"deploy.promote: unknown variant "later", expected "auto" or "manual""#,
            ),
            (
                "/deploy/max_surge",
                Some(json!("lots")),
                r#"deploy.max_surge: invalid count "lots", expected a whole number such as "3" or a percentage from "0%" to "100%""#,
            ),
            (
                "/deploy/max_unavailable",
                Some(json!("150%")),
                r#"deploy.max_unavailable: invalid count "150%", expected a whole number such as "3" or a percentage from "0%" to "100%""#,
            ),
            (
                "/deploy/max_surge",
                Some(json!(3)),
                "deploy.max_surge: invalid type: integer `3`, expected a string",
            ),
            (
                "/deploy/steps/1",
                Some(json!({"weight": 300, "pause_ms": null})),
                "deploy.steps[1].weight: invalid value: integer `300`, expected u8",
            ),
            (
                "/service/replicas",
                Some(json!(-1)),
                "service.replicas: invalid value: integer `-1`, expected u32",
            ),
            (
                "/service/env/A",
                Some(json!(1)),
                "service.env.A: invalid type: integer `1`, expected a string",
            ),
            (
                "/service/env/A B",
                Some(json!(null)),
                r#"service.env["A B"]: invalid type: null, expected a string"#,
            ),
            (
                "/route/listen",
                Some(json!("localhost:80")),
                "route.listen: invalid socket address syntax",
            ),
            (
                "/service/health/extra",
                Some(json!(1)),
                "service.health.extra: unknown field `extra`, expected one of `path`, `interval_ms`, \
                 `timeout_ms`, `healthy_threshold`, `unhealthy_threshold`, `start_period_ms`",
            ),
            ("/service", None, "config: missing field `service`"),
        ];
        for (pointer, value, want) in cases {
            let got = decode_edited(pointer, value.clone())
                .map(|_| ())
                .map_err(|e| e.to_string());
            assert_eq!(got, Err((*want).to_owned()), "{pointer} = {value:?}");
        }
    }

    #[test]
    fn decode_accepts_what_the_spec_produces() {
        let c = ReleaseConfig::from_spec(&spec(""));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(ReleaseConfig::decode(&json), Ok(c));
    }

    #[test]
    fn diff_names_changed_keys() {
        let a = ReleaseConfig::from_spec(&spec(""));
        let mut b = a.clone();
        b.service.env.insert("A".into(), "2".into());
        b.service.replicas = 3;
        assert_eq!(
            b.diff(&a),
            ["service.env.A: \"1\" → \"2\"", "service.replicas: 2 → 3"]
        );
        assert!(a.diff(&a).is_empty());
    }
}
