//! End-to-end test of the daemon's own Prometheus metrics on `GET /metrics`: a real `kiln
//! serve` on runc, the example app, `/metrics` read over the daemon's unix socket as a local
//! scraper (or a `socat` bridge) would. Needs root, runc and the release build of `hello`;
//! skipped with a note without them, except in CI where it must run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// One `GET path` over the daemon's unix socket: the status, the head and the body.
fn unix_get(state: &Path, path: &str) -> (u16, String, String) {
    let mut s = std::os::unix::net::UnixStream::connect(state.join("kiln.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// The daemon's `/metrics` text.
fn scrape(state: &Path) -> String {
    let (status, head, body) = unix_get(state, "/metrics");
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// The value of the one sample named exactly `series` (name and labels as rendered).
fn value(text: &str, series: &str) -> f64 {
    let found: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(found.len(), 1, "{series} in\n{text}");
    found[0]
}

/// Scrapes until `ok` holds for the text, or fails after `limit` with the last text.
fn scrape_until(state: &Path, limit: Duration, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let text = scrape(state);
        if ok(&text) {
            return text;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const COMPLETED: &str = r#"kiln_rollouts_total{strategy="rolling",outcome="completed"}"#;
const PASSES: &str = "kiln_reconcile_seconds_count";
const DRIFT_WRITES: &str = r#"kiln_drift_findings_total{kind="write"}"#;
const STATUS_OK: &str = r#"kiln_api_requests_total{route="/v1/apps/{app}",status="200"}"#;
const HEALTHY: &str = r#"kiln_instances{state="running",health="healthy"}"#;

#[test]
fn the_daemon_counts_rollouts_passes_drift_and_api_requests() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);

    // Before anything ran: every family declared, the counters at zero.
    let text = scrape(&state);
    for family in [
        "kiln_reconcile_seconds histogram",
        "kiln_rollouts_total counter",
        "kiln_analysis_verdicts_total counter",
        "kiln_drift_findings_total counter",
        "kiln_instances gauge",
        "kiln_api_requests_total counter",
    ] {
        assert!(
            text.contains(&format!("\n# TYPE {family}\n")),
            "{family}\n{text}"
        );
    }
    assert_eq!(value(&text, COMPLETED), 0.0);
    assert_eq!(value(&text, DRIFT_WRITES), 0.0);

    let spec = write_spec(dir.path(), port, "v1", 2);
    let image = build(&state, &spec);
    // `kiln apply` returns once the rollout completed.
    apply(&state, &spec, &image);
    let text = scrape(&state);
    assert_eq!(value(&text, COMPLETED), 1.0, "{text}");
    assert_eq!(
        value(
            &text,
            r#"kiln_rollouts_total{strategy="rolling",outcome="aborted"}"#
        ),
        0.0
    );
    let passes = value(&text, PASSES);
    assert!(passes > 0.0, "{text}");
    assert_eq!(
        value(&text, r#"kiln_reconcile_seconds_bucket{le="+Inf"}"#),
        passes,
        "the +Inf bucket is the count"
    );
    assert!(value(&text, "kiln_reconcile_seconds_sum") > 0.0, "{text}");

    // More passes: the pass count grows, the rollout is still counted once (not per tick).
    let text = scrape_until(
        &state,
        Duration::from_secs(10),
        "more reconcile passes",
        |t| value(t, PASSES) >= passes + 10.0,
    );
    assert_eq!(value(&text, COMPLETED), 1.0, "{text}");
    let text = scrape_until(
        &state,
        Duration::from_secs(10),
        "two healthy instances",
        |t| value(t, HEALTHY) == 2.0,
    );
    assert_eq!(value(&text, DRIFT_WRITES), 0.0, "{text}");

    // `kiln status web` is one GET /v1/apps/web, counted under its route's pattern.
    let before = value(&text, STATUS_OK);
    kiln(&state).args(["status", "web"]).assert().success();
    let text = scrape(&state);
    assert_eq!(value(&text, STATUS_OK), before + 1.0, "{text}");
    // A path that is no operation is `other`, never itself.
    let (code, _, _) = unix_get(&state, "/v1/made-up-by-a-client");
    assert_eq!(code, 404);
    let text = scrape(&state);
    assert_eq!(
        value(
            &text,
            r#"kiln_api_requests_total{route="other",status="404"}"#
        ),
        1.0,
        "{text}"
    );
    assert!(!text.contains("made-up-by-a-client"), "{text}");
    assert!(
        value(
            &text,
            r#"kiln_api_requests_total{route="/metrics",status="200"}"#
        ) >= 1.0,
        "{text}"
    );

    // Drift injected: a file written from the host into an instance's read-only area.
    let victim = routed(&status(&state))[0].clone();
    std::fs::write(
        state.join("instances").join(&victim).join("upper/evil"),
        "x",
    )
    .unwrap();
    scrape_until(&state, Duration::from_secs(10), "the drift counted", |t| {
        value(t, DRIFT_WRITES) >= 1.0
    });
    // Replaced; the finding was counted once, however many times it was reported (the
    // watcher, the periodic rescan).
    wait_until(&state, Duration::from_secs(20), |s| {
        let r = routed(s);
        r.len() == 2 && !r.contains(&victim)
    });
    let text = scrape_until(
        &state,
        Duration::from_secs(10),
        "two healthy instances",
        |t| value(t, HEALTHY) == 2.0,
    );
    assert_eq!(value(&text, DRIFT_WRITES), 1.0, "{text}");
    assert!(value(&text, PASSES) > passes, "{text}");
    // A replacement is no rollout.
    assert_eq!(value(&text, COMPLETED), 1.0, "{text}");
    let (count, sum) = (
        value(&text, PASSES),
        value(&text, "kiln_reconcile_seconds_sum"),
    );
    eprintln!(
        "{count} reconcile passes, {:.2} ms each on average; /metrics is {} bytes",
        sum / count * 1000.0,
        text.len()
    );

    // A second release: one more completed rollout.
    write_spec(dir.path(), port, "v2", 2);
    apply(&state, &spec, &image);
    let text = scrape(&state);
    assert_eq!(value(&text, COMPLETED), 2.0, "{text}");
}

/// A canary nobody sends traffic to: its first release goes live at once, a later one stays
/// inconclusive at its step until someone decides.
const QUIET_CANARY: &str = r#"[deploy]
strategy = "canary"
keep_previous = "10m"
progress_deadline = "1m"

[[deploy.steps]]
weight = 50
pause = "1s"

[[deploy.steps]]
weight = 100

[deploy.analysis]
min_requests = 50
"#;

/// How many events of `kind` the app's history holds.
fn events_of(state: &Path, kind: &str) -> f64 {
    history(state).iter().filter(|e| e["kind"] == kind).count() as f64
}

#[test]
fn canary_verdicts_and_outcomes_are_counted_once_as_the_ledger_records_them() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    let spec = write_spec_with(dir.path(), port, r#"HELLO_VERSION = "v1""#, 1, QUIET_CANARY);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    let canary =
        |outcome: &str| format!(r#"kiln_rollouts_total{{strategy="canary",outcome="{outcome}"}}"#);
    let inconclusive = r#"kiln_analysis_verdicts_total{verdict="inconclusive"}"#;
    let text = scrape(&state);
    assert_eq!(value(&text, &canary("completed")), 1.0, "{text}");
    assert_eq!(value(&text, COMPLETED), 0.0, "{text}");

    // Release 2 waits at its step, judged inconclusive, for many passes.
    let spec = write_spec_with(dir.path(), port, r#"HELLO_VERSION = "v2""#, 1, QUIET_CANARY);
    kiln(&state)
        .args(["apply", "--no-wait", "-f"])
        .arg(&spec)
        .args(["--image", &image])
        .assert()
        .success();
    wait_until(&state, Duration::from_secs(60), |s| {
        s["awaiting_decision"].is_string()
    });
    let text = scrape(&state);
    let judged = value(&text, inconclusive);
    assert!(judged >= 1.0, "{text}");
    let passes = value(&text, PASSES);
    let text = scrape_until(
        &state,
        Duration::from_secs(10),
        "more reconcile passes",
        |t| value(t, PASSES) >= passes + 10.0,
    );
    assert_eq!(
        value(&text, inconclusive),
        judged,
        "counted per tick:\n{text}"
    );
    assert_eq!(judged, events_of(&state, "rollout.step_judged"));
    assert_eq!(
        value(&text, r#"kiln_analysis_verdicts_total{verdict="pass"}"#)
            + value(&text, r#"kiln_analysis_verdicts_total{verdict="fail"}"#),
        0.0,
        "{text}"
    );

    kiln(&state).args(["abort", "web"]).assert().success();
    wait_until(&state, Duration::from_secs(60), |s| s["phase"] == "aborted");
    let text = scrape(&state);
    assert_eq!(value(&text, &canary("aborted")), 1.0, "{text}");
    assert_eq!(value(&text, &canary("completed")), 1.0, "{text}");
    assert_eq!(events_of(&state, "rollout.aborted"), 1.0);
    assert_eq!(events_of(&state, "rollout.completed"), 1.0);
}

/// The value of the one sample named exactly `series`, 0 while it has none (a counter's
/// labels appear with their first count).
fn value_or_zero(text: &str, series: &str) -> f64 {
    if text.lines().any(|l| l.starts_with(&format!("{series} "))) {
        value(text, series)
    } else {
        0.0
    }
}

/// One GET to the daemon's TCP API listener on `port`, with `auth` as the whole
/// `Authorization` header when given: the status.
fn tcp_status(port: u16, path: &str, auth: Option<&str>) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kiln\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out[9..12].parse().unwrap()
}

#[test]
fn tcp_requests_refused_for_want_of_the_token_are_counted_as_401_by_route() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let port = free_port();
    let _daemon = Daemon::start_with(
        &state,
        &[
            "--api-listen",
            &format!("127.0.0.1:{port}"),
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the TCP API did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    const APPS_401: &str = r#"kiln_api_requests_total{route="/v1/apps",status="401"}"#;
    const APP_401: &str = r#"kiln_api_requests_total{route="/v1/apps/{app}",status="401"}"#;
    const METRICS_401: &str = r#"kiln_api_requests_total{route="/metrics",status="401"}"#;
    const OTHER_401: &str = r#"kiln_api_requests_total{route="other",status="401"}"#;
    const APPS_200: &str = r#"kiln_api_requests_total{route="/v1/apps",status="200"}"#;
    let before = scrape(&state);
    for series in [APPS_401, APP_401, METRICS_401, OTHER_401, APPS_200] {
        assert_eq!(value_or_zero(&before, series), 0.0, "{series}\n{before}");
    }

    // No token, a wrong one, a token not sent as a bearer: each refused and counted under
    // its route's pattern (a path that is no operation as `other`), never its path.
    assert_eq!(tcp_status(port, "/v1/apps", None), 401);
    assert_eq!(tcp_status(port, "/v1/apps", Some("Bearer wrong")), 401);
    assert_eq!(
        tcp_status(port, "/v1/apps/secret-name", Some("s3cret-token")),
        401
    );
    assert_eq!(tcp_status(port, "/metrics", None), 401);
    assert_eq!(tcp_status(port, "/v1/made-up-by-a-scanner", None), 401);
    // The token: served and counted as such.
    assert_eq!(
        tcp_status(port, "/v1/apps", Some("Bearer s3cret-token")),
        200
    );

    let text = scrape(&state);
    assert_eq!(value(&text, APPS_401), 2.0, "{text}");
    assert_eq!(value(&text, APP_401), 1.0, "{text}");
    assert_eq!(value(&text, METRICS_401), 1.0, "{text}");
    assert_eq!(value(&text, OTHER_401), 1.0, "{text}");
    assert_eq!(value(&text, APPS_200), 1.0, "{text}");
    assert!(!text.contains("secret-name"), "{text}");
    assert!(!text.contains("made-up-by-a-scanner"), "{text}");
}
