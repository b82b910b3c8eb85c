//! The daemon's own Prometheus metrics (text format 0.0.4), rendered after the router's by
//! `Controller::metrics`: reconcile pass durations, rollouts, canary verdicts, drift findings,
//! instances and API requests.
//!
//! **Invariant:** a counter moves where its event happens, once per real event: a rollout's
//! outcome and a step's verdict when the ledger has recorded them (the planner emits each
//! once), a drift finding the first time a report shows it on an instance, an API request
//! when its response is made. Every label value comes from a closed set (strategy, outcome,
//! verdict, finding kind, state, health, an API route *pattern*, a status code), so the
//! number of series is bounded whatever clients send.
//!
//! Deliberately absent: per-app labels (an app name is the user's, and the router's metrics
//! already carry it), and any I/O: this module only counts and renders.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Display, Write as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_deploy::{RolloutEvent, Verdict};
use kiln_runtime::{DriftFinding, Health, InstanceId, InstanceState, Observation};

use crate::executor::lock;

/// Upper bounds (seconds) of `kiln_reconcile_seconds`' buckets: a pass over a few apps takes
/// milliseconds, one that waits on a slow provider or router seconds.
pub(crate) const RECONCILE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The strategies a rollout runs (`kiln_spec::Strategy::name`), shown at zero before any.
const STRATEGIES: [&str; 3] = ["rolling", "blue-green", "canary"];

/// How a rollout ends.
const OUTCOMES: [&str; 2] = ["completed", "aborted"];

/// A canary step's verdicts.
const VERDICTS: [&str; 3] = ["pass", "fail", "inconclusive"];

/// Every drift finding's kind ([`finding_kind`]).
const DRIFT_KINDS: [&str; 6] = ["write", "layer", "config", "vanished", "exec", "setting"];

/// Every instance state, for the gauge's zeros.
const STATES: [InstanceState; 4] = [
    InstanceState::Created,
    InstanceState::Running,
    InstanceState::Exited,
    InstanceState::Vanished,
];

/// Every health, for the gauge's zeros.
const HEALTHS: [Health; 5] = [
    Health::Unknown,
    Health::Starting,
    Health::Healthy,
    Health::Unhealthy,
    Health::Failed,
];

/// The route label of a request that matches no operation: raw paths are never labels.
pub(crate) const OTHER_ROUTE: &str = "other";

/// A histogram of durations with fixed buckets; lock-free to observe.
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`'s own.
    buckets: Vec<AtomicU64>,
    /// The sum of every observation, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one observation of `d`.
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Its samples: cumulative buckets, `+Inf`, `_sum` and `_count` (the `+Inf` bucket's,
    /// so the two always agree).
    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), ToString::to_string);
            sample(out, &format!("{name}_bucket"), &[("le", &le)], cumulative);
        }
        let sum = Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed)).as_secs_f64();
        sample(out, &format!("{name}_sum"), &[], sum);
        sample(out, &format!("{name}_count"), &[], cumulative);
    }
}

/// The daemon's counters. Shared by the executor (and so by its background tasks) and the
/// API through the controller.
pub(crate) struct Metrics {
    reconcile: Histogram,
    /// (strategy, outcome) → rollouts.
    rollouts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// verdict → canary steps judged.
    verdicts: Mutex<BTreeMap<&'static str, u64>>,
    /// kind → drift findings.
    drift: Mutex<BTreeMap<&'static str, u64>>,
    /// The findings counted so far per instance: a provider reports an instance's findings
    /// as a whole each time one is added, and each is counted once.
    drift_seen: Mutex<BTreeMap<InstanceId, BTreeSet<String>>>,
    /// (route pattern, status) → API requests.
    api: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            reconcile: Histogram::new(RECONCILE_BUCKETS),
            rollouts: Mutex::default(),
            verdicts: Mutex::default(),
            drift: Mutex::default(),
            drift_seen: Mutex::default(),
            api: Mutex::default(),
        }
    }
}

impl Metrics {
    /// One reconcile pass took `d`.
    pub(crate) fn reconcile_pass(&self, d: Duration) {
        self.reconcile.observe(d);
    }

    /// A rollout event of a rollout with `strategy` that the ledger has just recorded.
    pub(crate) fn rollout_event(&self, strategy: &'static str, e: &RolloutEvent) {
        match e {
            RolloutEvent::Completed { .. } => {
                *lock(&self.rollouts)
                    .entry((strategy, "completed"))
                    .or_default() += 1;
            }
            RolloutEvent::Aborted { .. } => {
                *lock(&self.rollouts)
                    .entry((strategy, "aborted"))
                    .or_default() += 1;
            }
            RolloutEvent::StepJudged { verdict, .. } => {
                let name = match verdict {
                    Verdict::Pass { .. } => "pass",
                    Verdict::Fail { .. } => "fail",
                    Verdict::Inconclusive { .. } => "inconclusive",
                };
                *lock(&self.verdicts).entry(name).or_default() += 1;
            }
            // Recorded as a judged step whose verdict is inconclusive.
            RolloutEvent::StepInconclusive { .. } => {
                *lock(&self.verdicts).entry("inconclusive").or_default() += 1;
            }
            RolloutEvent::StepStarted { .. }
            | RolloutEvent::AwaitingPromotion { .. }
            | RolloutEvent::PreviousRetired { .. } => {}
        }
    }

    /// Drift reported on the daemon's `instance`: counts the findings not counted before.
    pub(crate) fn drift_findings(&self, instance: &InstanceId, findings: &[DriftFinding]) {
        let mut seen = lock(&self.drift_seen);
        let seen = seen.entry(instance.clone()).or_default();
        let mut drift = lock(&self.drift);
        for f in findings {
            if seen.insert(f.to_string()) {
                *drift.entry(finding_kind(f)).or_default() += 1;
            }
        }
    }

    /// Forgets the findings counted on instances no longer listed (destroyed), so the memory
    /// of what was counted does not grow with every instance the daemon ever ran.
    pub(crate) fn retain_instances(&self, listed: &BTreeSet<&InstanceId>) {
        lock(&self.drift_seen).retain(|id, _| listed.contains(id));
    }

    /// An API request to `route` (a pattern of [`crate::api::ROUTES`], or [`OTHER_ROUTE`])
    /// answered `status`.
    pub(crate) fn api_request(&self, route: &'static str, status: u16) {
        *lock(&self.api).entry((route, status)).or_default() += 1;
    }

    /// Every metric of the daemon, `observed` being the reconciler's last listing.
    pub(crate) fn render(&self, out: &mut String, observed: &[Observation]) {
        family(
            out,
            "kiln_reconcile_seconds",
            "histogram",
            "Duration of one reconcile pass over every app.",
        );
        self.reconcile.render(out, "kiln_reconcile_seconds");

        family(
            out,
            "kiln_rollouts_total",
            "counter",
            "Rollouts that ended, by strategy and outcome.",
        );
        let mut rollouts = lock(&self.rollouts).clone();
        for s in STRATEGIES {
            for o in OUTCOMES {
                rollouts.entry((s, o)).or_default();
            }
        }
        for ((strategy, outcome), n) in rollouts {
            let labels = [("strategy", strategy), ("outcome", outcome)];
            sample(out, "kiln_rollouts_total", &labels, n);
        }

        family(
            out,
            "kiln_analysis_verdicts_total",
            "counter",
            "Canary analysis verdicts on a step.",
        );
        let mut verdicts = lock(&self.verdicts).clone();
        for v in VERDICTS {
            verdicts.entry(v).or_default();
        }
        for (verdict, n) in verdicts {
            sample(
                out,
                "kiln_analysis_verdicts_total",
                &[("verdict", verdict)],
                n,
            );
        }

        family(
            out,
            "kiln_drift_findings_total",
            "counter",
            "Drift found on the daemon's instances, by kind; each finding counted once per instance.",
        );
        let mut drift = lock(&self.drift).clone();
        for k in DRIFT_KINDS {
            drift.entry(k).or_default();
        }
        for (kind, n) in drift {
            sample(out, "kiln_drift_findings_total", &[("kind", kind)], n);
        }

        family(
            out,
            "kiln_instances",
            "gauge",
            "Instances in the reconciler's last listing, by state and health.",
        );
        let mut instances: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for s in STATES {
            for h in HEALTHS {
                instances.insert((s.as_str(), h.as_str()), 0);
            }
        }
        for o in observed {
            *instances
                .entry((o.state.as_str(), o.health.as_str()))
                .or_default() += 1;
        }
        for ((state, health), n) in instances {
            let labels = [("state", state), ("health", health)];
            sample(out, "kiln_instances", &labels, n);
        }

        family(
            out,
            "kiln_api_requests_total",
            "counter",
            "API requests by route pattern and status code.",
        );
        for ((route, status), n) in lock(&self.api).clone() {
            let status = status.to_string();
            let labels = [("route", route), ("status", status.as_str())];
            sample(out, "kiln_api_requests_total", &labels, n);
        }
    }
}

/// A drift finding's kind, as its label.
fn finding_kind(f: &DriftFinding) -> &'static str {
    match f {
        DriftFinding::Write { .. } => "write",
        DriftFinding::Layer { .. } => "layer",
        DriftFinding::Config { .. } => "config",
        DriftFinding::Vanished { .. } => "vanished",
        DriftFinding::Exec { .. } => "exec",
        DriftFinding::Setting { .. } => "setting",
    }
}

/// A metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A label value as the text format wants it: `\`, `"` and line feeds escaped.
pub(crate) fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Help text as the text format wants it: `\` and line feeds escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn render(m: &Metrics, observed: &[Observation]) -> String {
        let mut out = String::new();
        m.render(&mut out, observed);
        out
    }

    /// The lines of `text` that are samples of `family` (its name, then `{`, `_` or a space).
    fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| {
                l.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with([' ', '{', '_']))
            })
            .collect()
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("two\nlines"), "two\\nlines");
        assert_eq!(escape_label("/v1/apps/{app}"), "/v1/apps/{app}");
        let mut out = String::new();
        sample(&mut out, "x_total", &[("k", "q\"\\\n"), ("j", "v")], 3);
        assert_eq!(out, "x_total{k=\"q\\\"\\\\\\n\",j=\"v\"} 3\n");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }

    #[test]
    fn the_histogram_has_cumulative_buckets_inf_sum_and_count() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for ms in [5, 5, 50, 500, 5000] {
            h.observe(Duration::from_millis(ms));
        }
        // On a bound is in its bucket (`le`).
        h.observe(Duration::from_millis(100));
        let mut out = String::new();
        h.render(&mut out, "t_seconds");
        assert_eq!(
            out,
            "t_seconds_bucket{le=\"0.01\"} 2\n\
             t_seconds_bucket{le=\"0.1\"} 4\n\
             t_seconds_bucket{le=\"1\"} 5\n\
             t_seconds_bucket{le=\"+Inf\"} 6\n\
             t_seconds_sum 5.66\n\
             t_seconds_count 6\n"
        );
    }

    #[test]
    fn every_family_has_help_and_type_and_zeros_before_any_event() {
        let out = render(&Metrics::default(), &[]);
        for (name, kind) in [
            ("kiln_reconcile_seconds", "histogram"),
            ("kiln_rollouts_total", "counter"),
            ("kiln_analysis_verdicts_total", "counter"),
            ("kiln_drift_findings_total", "counter"),
            ("kiln_instances", "gauge"),
            ("kiln_api_requests_total", "counter"),
        ] {
            assert!(out.contains(&format!("# HELP {name} ")), "{name}\n{out}");
            assert!(
                out.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}\n{out}"
            );
        }
        assert_eq!(
            samples(&out, "kiln_reconcile_seconds").len(),
            RECONCILE_BUCKETS.len() + 3
        );
        assert!(out.contains("kiln_reconcile_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert_eq!(samples(&out, "kiln_rollouts_total").len(), 6);
        assert!(
            out.contains("kiln_rollouts_total{strategy=\"blue-green\",outcome=\"aborted\"} 0\n")
        );
        assert_eq!(samples(&out, "kiln_analysis_verdicts_total").len(), 3);
        assert_eq!(samples(&out, "kiln_drift_findings_total").len(), 6);
        assert_eq!(samples(&out, "kiln_instances").len(), 20);
        assert!(samples(&out, "kiln_api_requests_total").is_empty());
        // Every sample line is `name{labels} value` with a number for the value.
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = l.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn rollouts_and_verdicts_count_their_events() {
        let m = Metrics::default();
        let metrics = kiln_deploy::StepMetrics {
            canary: kiln_deploy::Measurement {
                requests: 10,
                errors: 0,
                p99_ms: 1.0,
            },
            stable: kiln_deploy::Measurement {
                requests: 10,
                errors: 0,
                p99_ms: 1.0,
            },
        };
        let judged = |verdict| RolloutEvent::StepJudged {
            step: 1,
            weight: 10,
            verdict,
        };
        for e in [
            RolloutEvent::StepStarted {
                step: 1,
                weight: 10,
            },
            judged(Verdict::Pass { metrics }),
            judged(Verdict::Fail {
                metrics,
                reason: "x".to_owned(),
            }),
            judged(Verdict::Inconclusive { metrics }),
            RolloutEvent::Completed {
                release: 2,
                shortcut: None,
            },
        ] {
            m.rollout_event("canary", &e);
        }
        m.rollout_event(
            "rolling",
            &RolloutEvent::Completed {
                release: 3,
                shortcut: None,
            },
        );
        m.rollout_event(
            "rolling",
            &RolloutEvent::Aborted {
                reason: "r".to_owned(),
            },
        );
        let out = render(&m, &[]);
        for line in [
            "kiln_rollouts_total{strategy=\"canary\",outcome=\"completed\"} 1",
            "kiln_rollouts_total{strategy=\"canary\",outcome=\"aborted\"} 0",
            "kiln_rollouts_total{strategy=\"rolling\",outcome=\"completed\"} 1",
            "kiln_rollouts_total{strategy=\"rolling\",outcome=\"aborted\"} 1",
            "kiln_analysis_verdicts_total{verdict=\"pass\"} 1",
            "kiln_analysis_verdicts_total{verdict=\"fail\"} 1",
            "kiln_analysis_verdicts_total{verdict=\"inconclusive\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line}\n{out}");
        }
    }

    #[test]
    fn a_drift_finding_is_counted_once_per_instance() {
        let m = Metrics::default();
        let a = InstanceId::new("web-aaaa").unwrap();
        let b = InstanceId::new("web-bbbb").unwrap();
        let write = |p: &str| DriftFinding::Write { path: p.to_owned() };
        let exec = DriftFinding::Exec {
            command: "sh".to_owned(),
        };
        // A provider reports an instance's findings as a whole each time one is added.
        m.drift_findings(&a, &[write("/evil")]);
        m.drift_findings(&a, &[write("/evil"), exec.clone()]);
        m.drift_findings(&b, &[write("/evil")]);
        let out = render(&m, &[]);
        assert!(
            out.contains("kiln_drift_findings_total{kind=\"write\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("kiln_drift_findings_total{kind=\"exec\"} 1\n"),
            "{out}"
        );
        // A destroyed instance is forgotten; ids are never reused, so nothing is counted twice.
        m.retain_instances(&[&b].into_iter().collect());
        assert_eq!(lock(&m.drift_seen).len(), 1);
        m.drift_findings(&b, &[write("/evil")]);
        let out = render(&m, &[]);
        assert!(
            out.contains("kiln_drift_findings_total{kind=\"write\"} 2\n"),
            "{out}"
        );
    }

    #[test]
    fn instances_are_counted_by_state_and_health() {
        let o = |state, health| Observation {
            id: InstanceId::new("web-aaaa").unwrap(),
            image: kiln_runtime::Digest::parse(&format!("sha256:{}", "0".repeat(64))).unwrap(),
            app: "web".to_owned(),
            state,
            exit_code: None,
            health,
            addr: "127.0.0.1:1".parse().unwrap(),
            listening: None,
            pid: None,
            created: std::time::SystemTime::UNIX_EPOCH,
            labels: BTreeMap::new(),
        };
        let observed = [
            o(InstanceState::Running, Health::Healthy),
            o(InstanceState::Running, Health::Healthy),
            o(InstanceState::Exited, Health::Failed),
        ];
        let out = render(&Metrics::default(), &observed);
        assert!(out.contains("kiln_instances{state=\"running\",health=\"healthy\"} 2\n"));
        assert!(out.contains("kiln_instances{state=\"exited\",health=\"failed\"} 1\n"));
        assert!(out.contains("kiln_instances{state=\"created\",health=\"unknown\"} 0\n"));
    }

    #[test]
    fn api_requests_are_counted_by_route_and_status() {
        let m = Metrics::default();
        m.api_request("/v1/apps/{app}", 200);
        m.api_request("/v1/apps/{app}", 200);
        m.api_request("/v1/apps/{app}", 404);
        m.api_request(OTHER_ROUTE, 404);
        let out = render(&m, &[]);
        assert_eq!(
            samples(&out, "kiln_api_requests_total"),
            [
                "kiln_api_requests_total{route=\"/v1/apps/{app}\",status=\"200\"} 2",
                "kiln_api_requests_total{route=\"/v1/apps/{app}\",status=\"404\"} 1",
                "kiln_api_requests_total{route=\"other\",status=\"404\"} 1",
            ]
        );
    }
}
