//! End-to-end tests of progressive delivery on real runc with real load: canaries judged by
//! the router's own measurements (abort on errors, abort on latency, promotion of a good
//! version), blue-green switches, a green that never becomes healthy, and migrations that
//! make a rollback unsafe. Same prerequisites as `control.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const CANARY: &str = r#"[deploy]
strategy = "canary"
keep_previous = "10m"
progress_deadline = "1m"

[[deploy.steps]]
weight = 10
pause = "4s"

[[deploy.steps]]
weight = 50
pause = "3s"

[[deploy.steps]]
weight = 100

[deploy.analysis]
max_error_rate = "1%"
max_p99 = "1s"
min_requests = 50
compare_to_stable = true
"#;

fn apply_code(state: &Path, spec: &Path, image: &str) -> (i32, String) {
    let out = kiln(state)
        .args(["apply", "-f"])
        .arg(spec)
        .args(["--image", image])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Starts a daemon, deploys v1 (2 replicas, rolling) and returns what the test needs.
fn stable_v1(dir: &Path) -> (Daemon, std::path::PathBuf, u16, String) {
    let state = dir.join("state");
    let port = free_port();
    let daemon = Daemon::start(&state);
    let spec = write_spec(dir, port, "v1", 2);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    (daemon, state, port, image)
}

#[test]
fn canary_failing_20_percent_aborts_at_the_first_step() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, state, port, image) = stable_v1(dir.path());
    let load = Load::start(port, 8);
    let spec = write_spec_with(
        dir.path(),
        port,
        r#"HELLO_VERSION = "v2", HELLO_FAIL_RATE = "0.2""#,
        2,
        CANARY,
    );
    let started = load.counts();
    let (code, out) = apply_code(&state, &spec, &image);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("aborted at step 1 (10%): error rate"), "{out}");
    let at_abort = load.counts();
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed) = load.finish();
    let during = (at_abort.0 - started.0) + (at_abort.1 - started.1);
    let failed_during = at_abort.1 - started.1;
    eprintln!(
        "canary at 10% failing 20%: {failed_during} of {during} requests failed before the abort \
         (bound: 10% × 20% = 2% → {:.0}); {} failed after it ({ok} ok in all)",
        during as f64 * 0.02,
        failed - at_abort.1
    );
    // Only the canary's share failed, and nothing after the abort.
    assert!(failed_during > 0);
    assert!(
        (failed_during as f64) <= during as f64 * 0.02 * 2.0 + 10.0,
        "{failed_during} of {during}"
    );
    assert_eq!(failed, at_abort.1, "requests failed after the abort");
    let s = status(&state);
    assert_eq!(s["phase"], "aborted");
    assert_eq!(s["weights"], serde_json::json!({"1": 100}));
    let judged = history(&state)
        .iter()
        .any(|e| e["kind"] == "rollout.step_judged");
    assert!(judged);
}

#[test]
fn canary_of_a_good_version_promotes_through_every_step() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, state, port, image) = stable_v1(dir.path());
    let load = Load::start(port, 8);
    let spec = write_spec_with(dir.path(), port, r#"HELLO_VERSION = "v2""#, 2, CANARY);
    let (code, out) = apply_code(&state, &spec, &image);
    let (ok, failed) = load.finish();
    assert_eq!(code, 0, "{out}");
    eprintln!("good canary: {ok} requests ok, {failed} failed");
    assert_eq!(failed, 0);
    let steps: Vec<String> = history(&state)
        .iter()
        .filter(|e| e["kind"] == "rollout.step_started")
        .map(|e| e["data"]["weight"].to_string())
        .collect();
    assert_eq!(steps, ["10", "50"]);
    assert_eq!(status(&state)["weights"], serde_json::json!({"2": 100}));
}

#[test]
fn canary_200ms_slower_aborts_on_latency() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, state, port, image) = stable_v1(dir.path());
    let load = Load::start(port, 8);
    let spec = write_spec_with(
        dir.path(),
        port,
        r#"HELLO_VERSION = "v2", HELLO_LATENCY_MS = "200""#,
        2,
        CANARY,
    );
    let (code, out) = apply_code(&state, &spec, &image);
    let _ = load.finish();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("aborted at step 1 (10%): p99"), "{out}");
}

/// A canary nobody sends traffic to: every step stays inconclusive.
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

/// The issue: a first canary release with no traffic walked its steps with nothing to compare
/// to, found "0 requests, fewer than min_requests" and was aborted, leaving nothing live; and
/// a later inconclusive step always aborted. Now the first release goes live at once, and the
/// second waits at its step, saying why, until `kiln promote`.
#[test]
fn canary_without_traffic_goes_live_first_then_waits_for_a_decision() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    let spec = write_spec_with(dir.path(), port, r#"HELLO_VERSION = "v1""#, 2, QUIET_CANARY);
    let image = build(&state, &spec);
    let (code, out) = apply_code(&state, &spec, &image);
    assert_eq!(code, 0, "{out}");
    let s = status(&state);
    assert_eq!(
        (s["live"].as_u64(), s["phase"].as_str()),
        (Some(1), Some("completed"))
    );
    assert_eq!(s["weights"], serde_json::json!({"1": 100}));
    let events = history(&state);
    assert!(
        !events.iter().any(|e| e["kind"] == "rollout.step_started"),
        "{events:#?}"
    );
    let completed = events
        .iter()
        .find(|e| e["kind"] == "rollout.completed")
        .expect("rollout.completed");
    assert_eq!(
        completed["data"]["reason"],
        "first release: no live release to compare with"
    );

    // Release 2, still without traffic: `kiln apply` follows the rollout while it waits.
    let spec = write_spec_with(dir.path(), port, r#"HELLO_VERSION = "v2""#, 2, QUIET_CANARY);
    let mut applying = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .arg("--state")
        .arg(&state)
        .args(["apply", "-f"])
        .arg(&spec)
        .args(["--image", &image])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(&state, Duration::from_secs(60), |s| {
        s["awaiting_decision"].is_string()
    });
    let out = kiln(&state).args(["status", "web"]).assert().success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(
        text.contains("awaiting a decision: step 1 (50%) inconclusive: 0 of 50 requests needed"),
        "{text}"
    );
    let s = status(&state);
    assert_eq!(s["phase"], "progressing");
    assert_eq!(s["weights"], serde_json::json!({"1": 50, "2": 50}));

    kiln(&state).args(["promote", "web"]).assert().success();
    wait_until(&state, Duration::from_secs(60), |s| {
        s["live"] == 2 && s["phase"] == "completed"
    });
    // The `kiln apply` that followed it ends with success.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = applying.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "kiln apply did not return");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    let judged = history(&state)
        .into_iter()
        .find(|e| e["kind"] == "rollout.step_judged")
        .expect("rollout.step_judged");
    assert_eq!(judged["data"]["verdict"]["verdict"], "inconclusive");
}

const BLUE_GREEN: &str = r#"[deploy]
strategy = "blue-green"
keep_previous = "10m"
progress_deadline = "12s"
"#;

#[test]
fn blue_green_switches_under_load_fail_no_request() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, state, port, image) = stable_v1(dir.path());
    let load = Load::start(port, 8);
    for v in 2..=11 {
        let spec = write_spec_with(
            dir.path(),
            port,
            &format!(r#"HELLO_VERSION = "v{v}""#),
            2,
            BLUE_GREEN,
        );
        let (code, out) = apply_code(&state, &spec, &image);
        assert_eq!(code, 0, "{out}");
    }
    let (ok, failed) = load.finish();
    eprintln!("10 blue-green switches: {ok} requests ok, {failed} failed");
    assert!(ok > 1000);
    assert_eq!(failed, 0);
}

#[test]
fn green_that_never_becomes_healthy_never_gets_traffic() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, state, port, image) = stable_v1(dir.path());
    let load = Load::start(port, 4);
    let spec = write_spec_with(
        dir.path(),
        port,
        r#"HELLO_VERSION = "v2", HELLO_NEVER_HEALTHY = "1""#,
        2,
        BLUE_GREEN,
    );
    let started = Instant::now();
    let (code, out) = apply_code(&state, &spec, &image);
    let (ok, failed) = load.finish();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("progress deadline 12s exceeded"), "{out}");
    eprintln!("failing green aborted after {:?}: {out}", started.elapsed());
    assert_eq!(failed, 0, "{ok} ok");
    for e in &history(&state) {
        if e["kind"] == "route.changed" {
            let w = e["data"]["weights"]["2"].as_u64().unwrap_or(0);
            assert_eq!(w, 0, "green got traffic: {e}");
        }
    }
}

fn migrating(schema: u32, compatible_from: u32) -> String {
    format!(
        "[deploy]\nkeep_previous = \"10m\"\nprogress_deadline = \"30s\"\n\n[deploy.migrate]\n\
         command = [\"/hello\", \"migrate\"]\nschema = {schema}\ncompatible_from = {compatible_from}\n"
    )
}

#[test]
fn rollback_across_an_incompatible_migration_is_refused() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    let spec = write_spec_with(
        dir.path(),
        port,
        r#"HELLO_VERSION = "v1""#,
        1,
        &migrating(2, 2),
    );
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    // Release 2 migrates to schema 3 and needs it: release 1 (schema 2) cannot run on it.
    write_spec_with(
        dir.path(),
        port,
        r#"HELLO_VERSION = "v2""#,
        1,
        &migrating(3, 3),
    );
    kiln(&state)
        .args(["plan", "-f"])
        .arg(&spec)
        .assert()
        .stdout(predicates::str::contains("schema: live 2 → 3"));
    apply(&state, &spec, &image);
    let events: Vec<String> = history(&state)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        events
            .iter()
            .filter(|k| *k == "migration.completed")
            .count()
            == 2,
        "{events:?}"
    );
    kiln(&state)
        .args(["rollback", "web"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains(
            "works with schema 2, but the live schema is 3",
        ));
    assert_eq!(status(&state)["live"], 2);

    // Release 3 migrates to schema 3 but still works with schema-2 code: rollback allowed.
    write_spec_with(
        dir.path(),
        port,
        r#"HELLO_VERSION = "v3""#,
        1,
        &migrating(3, 2),
    );
    apply(&state, &spec, &image);
    kiln(&state)
        .args(["rollback", "web", "--to", "1"])
        .assert()
        .success();
    assert_eq!(status(&state)["live"], 1);

    // A failing migration aborts its release before it gets traffic.
    write_spec_with(
        dir.path(),
        port,
        r#"HELLO_VERSION = "v4", HELLO_MIGRATION_FAILS = "1""#,
        1,
        &migrating(4, 4),
    );
    let out = kiln(&state)
        .args(["apply", "-f"])
        .arg(&spec)
        .args(["--image", &image])
        .timeout(Duration::from_secs(60))
        .assert()
        .code(1)
        .get_output()
        .stderr
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("migration failed: exit 1"), "{out}");
    assert!(out.contains("already exists"), "{out}");
    assert_eq!(status(&state)["live"], 1);
}
