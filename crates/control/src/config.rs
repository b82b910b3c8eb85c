//! `ReleaseConfig`: a release's runtime configuration as the ledger stores it.
//!
//! A storage format, so its own serde type: the validated `kiln_spec::Spec` is turned into
//! this at apply time, and the daemon rebuilds what it runs from it after a restart without
//! needing the spec file or its build context.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kiln_spec::{
    Analysis, CanaryStep, CountOrPercent, DeploySpec, ExecPolicy, HealthCheck, Migrate, Promote,
    ProviderKind, Spec, Sticky, Strategy, TargetSpec,
};
use serde::{Deserialize, Serialize};

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
    pub provider: String,
    /// The OCI runtime of the local provider.
    pub runtime: String,
    /// The Docker Engine address.
    pub docker_host: Option<String>,
    /// `taint` or `allow`.
    pub exec: String,
}

impl Default for TargetConfig {
    fn default() -> TargetConfig {
        TargetConfig::from(&TargetSpec::default())
    }
}

impl From<&TargetSpec> for TargetConfig {
    fn from(t: &TargetSpec) -> TargetConfig {
        TargetConfig {
            provider: t.provider.as_str().to_owned(),
            runtime: t.runtime.clone(),
            docker_host: t.docker_host.clone(),
            exec: t.exec.as_str().to_owned(),
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
    pub strategy: String,
    /// `auto` or `manual`.
    pub promote: String,
    /// Canary steps.
    pub steps: Vec<StepConfig>,
    /// Canary analysis.
    pub analysis: Option<AnalysisConfig>,
    /// `3` or `25%`.
    pub max_surge: String,
    /// `0` or `25%`.
    pub max_unavailable: String,
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

fn count_text(c: CountOrPercent) -> String {
    match c {
        CountOrPercent::Count(n) => n.to_string(),
        CountOrPercent::Percent(p) => format!("{p}%"),
    }
}

fn count_parse(s: &str) -> CountOrPercent {
    match s.strip_suffix('%') {
        Some(p) => CountOrPercent::Percent(p.parse().unwrap_or(0)),
        None => CountOrPercent::Count(s.parse().unwrap_or(0)),
    }
}

impl ReleaseConfig {
    /// The configuration a validated spec describes.
    pub fn from_spec(spec: &Spec) -> ReleaseConfig {
        let s = &spec.service;
        let h = &s.health;
        let d = &spec.deploy;
        let (strategy, promote, steps, analysis) = match &d.strategy {
            Strategy::Rolling => ("rolling", Promote::Auto, Vec::new(), None),
            Strategy::BlueGreen { promote } => ("blue-green", *promote, Vec::new(), None),
            Strategy::Canary {
                promote,
                steps,
                analysis,
            } => ("canary", *promote, steps.clone(), Some(analysis.clone())),
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
                strategy: strategy.to_owned(),
                promote: match promote {
                    Promote::Auto => "auto",
                    Promote::Manual => "manual",
                }
                .to_owned(),
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
                max_surge: count_text(d.max_surge),
                max_unavailable: count_text(d.max_unavailable),
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
            provider: if t.provider == "docker" {
                ProviderKind::Docker
            } else {
                ProviderKind::Local
            },
            runtime: t.runtime.clone(),
            docker_host: t.docker_host.clone(),
            exec: if t.exec == "allow" {
                ExecPolicy::Allow
            } else {
                ExecPolicy::Taint
            },
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
        let promote = if d.promote == "manual" {
            Promote::Manual
        } else {
            Promote::Auto
        };
        let strategy = match d.strategy.as_str() {
            "blue-green" => Strategy::BlueGreen { promote },
            "canary" => Strategy::Canary {
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
            _ => Strategy::Rolling,
        };
        DeploySpec {
            strategy,
            max_surge: count_parse(&d.max_surge),
            max_unavailable: count_parse(&d.max_unavailable),
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
    #![allow(clippy::unwrap_used)]
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
