//! `kiln pause`, `kiln resume` and `kiln maintenance` end to end: the real binary, runc, the
//! router under load; and the CLI's manners with a reader that goes away (`| head`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Daemon, Load, apply, build, kiln, runc_prerequisites, serial, status, write_spec};

/// One request to the router with `accept`; returns (status line, headers and body).
fn get(port: u16, accept: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: web\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.lines().next().unwrap_or("").to_owned();
    (status, out)
}

fn up(dir: &Path, state: &Path, port: u16) {
    let spec = write_spec(dir, port, "v1", 2);
    let image = build(state, &spec);
    apply(state, &spec, &image);
    let (status, _) = get(port, "*/*");
    assert!(status.contains("200"), "{status}");
}

fn kinds(state: &Path) -> Vec<String> {
    common::history(state)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn pause_under_load_holds_requests_and_resume_lets_them_go_without_a_failure() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = common::free_port();
    let mut daemon = Daemon::start(&state);
    up(dir.path(), &state, port);

    let load = Load::start(port, 8);
    std::thread::sleep(Duration::from_millis(500));
    kiln(&state)
        .args(["pause", "web", "--max-hold", "30s"])
        .assert()
        .success();
    // In-flight requests finish; then nothing gets through for 2 s.
    std::thread::sleep(Duration::from_millis(200));
    let (ok_paused, _) = load.counts();
    std::thread::sleep(Duration::from_secs(2));
    let (ok_later, failed) = load.counts();
    assert_eq!(ok_later, ok_paused, "requests went through a paused router");
    assert_eq!(failed, 0);
    let s = status(&state);
    assert_eq!(s["gate"]["mode"], "paused", "{s:#}");
    assert_eq!(s["gate"]["held"], 8, "one held request per connection");

    let resumed = Instant::now();
    let out = kiln(&state).args(["resume", "web"]).assert().success();
    let said = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(said.contains("8 held request(s) let go"), "{said}");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = load.finish();
    eprintln!(
        "paused 2.2 s: {ok_paused} ok before, {ok} after resume ({} ms ago), {failed} failed",
        resumed.elapsed().as_millis()
    );
    assert_eq!(failed, 0, "a request failed across pause and resume");
    assert!(
        ok > ok_paused + 8,
        "held requests were answered and traffic went on"
    );
    let kinds = kinds(&state);
    assert!(kinds.contains(&"app.paused".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"app.resumed".to_owned()), "{kinds:?}");

    // A pause survives a crash of the daemon: the restarted one holds requests at once.
    kiln(&state)
        .args(["pause", "web", "--max-hold", "1s"])
        .assert()
        .success();
    daemon.kill();
    daemon.spawn();
    common::wait_until(&state, Duration::from_secs(20), |s| {
        s["gate"]["mode"] == "paused"
    });
    let started = Instant::now();
    let (line, body) = get(port, "*/*");
    assert!(line.contains("503"), "{line}");
    assert!(body.contains("held too long"), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    kiln(&state).args(["resume", "web"]).assert().success();
    assert!(get(port, "*/*").0.contains("200"));

    // `kiln status | head -1`: the reader goes away; the CLI ends quietly, no panic.
    closed_stdout(&state, &["status", "web"]);
}

// `[deploy.migrate] pause = true`: the router holds the app's requests while the migration
// runs and lets them go when it ends; nothing fails, and both are recorded with the reason.
#[test]
fn a_migration_with_pause_holds_requests_while_it_runs() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = common::free_port();
    let _daemon = Daemon::start(&state);
    up(dir.path(), &state, port);
    let load = Load::start(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    let spec = common::write_spec_with(
        dir.path(),
        port,
        "HELLO_VERSION = \"v2\", HELLO_MIGRATION_MS = \"2000\"",
        2,
        "[deploy]\nkeep_previous = \"10m\"\nprogress_deadline = \"1m\"\n\n[deploy.migrate]\n\
         command = [\"/hello\", \"migrate\"]\nschema = 1\npause = true\n",
    );
    let image = build(&state, &spec);
    let started = Instant::now();
    apply(&state, &spec, &image);
    let (ok, failed) = load.finish();
    eprintln!(
        "a 2 s migration with pause: {ok} ok, {failed} failed, apply took {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(failed, 0, "a request failed across the migration's pause");
    assert_eq!(status(&state)["gate"]["mode"], "open");
    let history = common::history(&state);
    let reason = |kind: &str| {
        history
            .iter()
            .filter(|e| e["kind"] == kind)
            .filter_map(|e| e["data"]["reason"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        reason("app.paused"),
        ["migration of release 2"],
        "{history:#?}"
    );
    assert_eq!(
        reason("app.resumed"),
        ["migration of release 2 completed"],
        "{history:#?}"
    );
}

#[test]
fn past_max_hold_or_max_held_the_oldest_get_503() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = common::free_port();
    let _daemon = Daemon::start(&state);
    up(dir.path(), &state, port);

    kiln(&state)
        .args(["pause", "web", "--max-hold", "1s", "--max-held", "2"])
        .assert()
        .success();
    // Past max_hold: a 503 after about a second.
    let started = Instant::now();
    let (line, out) = get(port, "*/*");
    let waited = started.elapsed();
    assert!(line.contains("503"), "{line}");
    assert!(out.to_ascii_lowercase().contains("retry-after"), "{out}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Past max_held: the oldest of three is pushed out at once, the other two go on at resume.
    let (tx, rx) = std::sync::mpsc::channel();
    kiln(&state)
        .args(["pause", "web", "--max-hold", "30s", "--max-held", "2"])
        .assert()
        .success();
    for i in 0..3 {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let (line, _) = get(port, "*/*");
            tx.send((i, line, Instant::now())).unwrap();
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    let (first, line, _) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(first, 0, "the oldest is shed first");
    assert!(line.contains("503"), "{line}");
    let resumed = Instant::now();
    kiln(&state).args(["resume", "web"]).assert().success();
    for _ in 0..2 {
        let (_, line, at) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(line.contains("200"), "{line}");
        assert!(at >= resumed);
    }
}

#[test]
fn maintenance_serves_the_message_with_503_and_off_restores_traffic() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = common::free_port();
    let _daemon = Daemon::start(&state);
    up(dir.path(), &state, port);

    kiln(&state)
        .args([
            "maintenance",
            "web",
            "--message",
            "Back at 10:00 <UTC>",
            "--retry-after",
            "10m",
        ])
        .assert()
        .success();
    let (line, html) = get(port, "text/html,application/xhtml+xml");
    assert!(line.contains("503"), "{line}");
    let lower = html.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 600"), "{html}");
    assert!(lower.contains("content-type: text/html"), "{html}");
    assert!(html.contains("Back at 10:00 &lt;UTC&gt;"), "{html}");
    let (line, text) = get(port, "*/*");
    assert!(line.contains("503"), "{line}");
    assert!(text.ends_with("\r\n\r\nBack at 10:00 <UTC>\n"), "{text}");
    assert_eq!(status(&state)["gate"]["mode"], "maintenance");

    kiln(&state)
        .args(["maintenance", "web", "--off"])
        .assert()
        .success();
    let (line, body) = get(port, "*/*");
    assert!(line.contains("200"), "{line}");
    assert!(body.contains("hello from v1"), "{body}");
    let kinds = kinds(&state);
    assert!(kinds.contains(&"app.maintenance".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"app.resumed".to_owned()), "{kinds:?}");
}

/// Runs `kiln ARGS` with a stdout whose reader is already gone (`| head -0`): it must end
/// as it would have, without a panic or a backtrace.
fn closed_stdout(state: &Path, args: &[&str]) {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .arg("--state")
        .arg(state)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "kiln {args:?}: {stderr}");
    assert!(
        out.status.success(),
        "kiln {args:?}: {:?} {stderr}",
        out.status
    );
}

#[test]
fn image_inspect_takes_four_hex_digits_and_a_closed_pipe() {
    if !runc_prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = write_spec(dir.path(), common::free_port(), "v1", 1);
    let image = build(&state, &spec);
    let hex = image.strip_prefix("sha256:").unwrap();
    let out = kiln(&state)
        .args(["image", "inspect", &hex[..4], "--json"])
        .assert()
        .success();
    let said = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    assert!(said.contains(&image), "{said}");
    closed_stdout(&state, &["image", "inspect", &hex[..4]]);
    closed_stdout(&state, &["images"]);
}
