//! Request ids and the access log, through the real binary: `kiln serve --access-log FILE`
//! makes its router log each response as a JSON line; every request reaches its instance with
//! an `X-Request-Id` (a new one, or the client's when well-formed), returned on the response;
//! a daemon started again without the flag replaces the router with one that logs nothing.
//! Needs root, runc and the release build of `hello`; skipped with a note without them, except
//! in CI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// `GET /request-id` (the hello app answers with the `X-Request-Id` it got), with `id` sent as
/// the request's own when given: the response's `X-Request-Id` and the id the instance saw.
fn request_id(addr: SocketAddr, id: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let given = id.map_or_else(String::new, |id| format!("X-Request-Id: {id}\r\n"));
    write!(
        s,
        "GET /request-id HTTP/1.1\r\nHost: web\r\n{given}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{out}");
    let returned = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-request-id")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no X-Request-Id in the response: {out}"));
    (returned, body.trim_end().to_owned())
}

/// The access log's lines, parsed.
fn lines(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// Waits until the log has a line for each of `ids`; returns those lines in that order.
fn wait_for_lines(log: &Path, ids: &[&str]) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = lines(log);
        let found: Vec<serde_json::Value> = ids
            .iter()
            .filter_map(|id| all.iter().find(|l| l["request_id"] == *id).cloned())
            .collect();
        if found.len() == ids.len() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no line for each of {ids:?} in {}: {all:#?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a router other than `old` serves the state and `old` has exited.
fn wait_for_new_router(state: &Path, old: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while router_pid(state) == old || !exited(old) {
        assert!(
            Instant::now() < deadline,
            "router {old} was not replaced and gone"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn responses_are_logged_with_the_request_id_that_reached_the_instance() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("access.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let daemon = Daemon::start_with(&state, &["--access-log", log.to_str().unwrap()]);
    let spec = write_spec(dir.path(), port, "v1", 1);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    wait_until(&state, Duration::from_secs(30), |s| routed(s).len() == 1);

    // No id: the router makes one, the instance gets it, the client gets it back.
    let (made, seen) = request_id(addr, None);
    assert_eq!(made, seen);
    assert!(
        made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()),
        "{made}"
    );
    // A client's well-formed id is kept; one too long is replaced.
    let (kept, seen) = request_id(addr, Some("client-given-42"));
    assert_eq!(
        (kept.as_str(), seen.as_str()),
        ("client-given-42", "client-given-42")
    );
    let long = "x".repeat(300);
    let (replaced, seen) = request_id(addr, Some(&long));
    assert_eq!(replaced, seen);
    assert_eq!(replaced.len(), 32, "{replaced}");

    let logged = wait_for_lines(&log, &[&made, "client-given-42", &replaced]);
    for (line, id) in logged.iter().zip([&made, "client-given-42", &replaced]) {
        assert_eq!(line["app"], "web", "{line}");
        assert!(line["release"].is_string(), "{line}");
        assert!(
            line["instance"]
                .as_str()
                .is_some_and(|i| i.parse::<SocketAddr>().is_ok()),
            "{line}"
        );
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["path"], "/request-id", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        // The body is the id and a newline.
        assert_eq!(line["bytes"], id.len() + 1, "{line}");
        assert!(
            line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0),
            "{line}"
        );
        assert_eq!(line["client"], "127.0.0.1", "{line}");
        let time = line["time"].as_str().unwrap();
        assert!(
            time.len() == 24 && time.ends_with('Z') && humantime::parse_rfc3339(time).is_ok(),
            "{line}"
        );
    }

    // Started again without the flag, the daemon replaces the router (other flags); the new
    // one still gives ids but logs nothing. The old one wrote its last lines before exiting.
    let old = router_pid(&state);
    drop(daemon);
    let _daemon = Daemon::start(&state);
    wait_for_new_router(&state, old);
    wait_until(&state, Duration::from_secs(30), |s| routed(s).len() == 1);
    // The restarted daemon judges its instances again before the table routes to them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = raw_get(addr, "web", "/version");
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "web never answered: {answer}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = std::fs::read_to_string(&log).unwrap();
    let (_, seen) = request_id(addr, Some("after-the-log-is-off"));
    assert_eq!(seen, "after-the-log-is-off");
    let (made, seen) = request_id(addr, None);
    assert_eq!(made, seen);
    let router = std::fs::read_to_string(state.join("router.log")).unwrap_or_default();
    assert!(!router.contains("after-the-log-is-off"), "{router}");
    // A router writes its last lines before it exits: stop this one (SIGTERM), then look.
    let new = router_pid(&state);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &new.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exited(new) {
        assert!(Instant::now() < deadline, "router {new} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), before);
}

#[test]
fn a_sampling_rate_outside_0_to_1_or_without_a_log_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("access.log");
    let log = log.to_str().unwrap();
    for args in [
        vec!["serve", "--access-log", log, "--access-log-sample", "1.5"],
        vec!["serve", "--access-log", log, "--access-log-sample=-0.1"],
        vec!["serve", "--access-log-sample", "0.5"],
        vec!["router", "--access-log", log, "--access-log-sample", "x"],
    ] {
        let out = kiln(&state).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("access-log"), "{args:?}: {stderr}");
    }
    assert!(!state.exists(), "a usage error touched the state");
}

/// `GET /` (slow: the example waits before answering) with `id` as its request id, the
/// connection closed by the client before the answer.
fn give_up(addr: SocketAddr, id: &str) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: web\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.flush().unwrap();
    drop(s);
}

#[test]
fn a_request_the_client_gave_up_on_is_logged_with_499_even_when_sampled_away() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("access.log");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // A sampling rate of 0: only what is always logged is.
    let _daemon = Daemon::start_with(
        &state,
        &[
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-sample",
            "0",
        ],
    );
    let spec = write_spec_with(
        dir.path(),
        port,
        "HELLO_VERSION = \"v1\", HELLO_LATENCY_MS = \"1500\"",
        1,
        "[deploy]\nprogress_deadline = \"1m\"\n",
    );
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    wait_until(&state, Duration::from_secs(30), |s| routed(s).len() == 1);

    // Answered: sampled away.
    let (answered, _) = request_id(addr, None);
    let started = Instant::now();
    give_up(addr, "gave-up-early");
    let line = wait_for_lines(&log, &["gave-up-early"]).remove(0);
    eprintln!(
        "the 499 line came {:?} after the request",
        started.elapsed()
    );
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["bytes"], 0, "{line}");
    assert_eq!(line["app"], "web", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/", "{line}");
    assert!(
        line["instance"]
            .as_str()
            .is_some_and(|i| i.parse::<SocketAddr>().is_ok()),
        "{line}"
    );
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    let all = lines(&log);
    assert_eq!(all.len(), 1, "only the 499 is logged: {all:#?}");
    assert!(all.iter().all(|l| l["request_id"] != answered.as_str()));
}

#[test]
fn sighup_reopens_the_access_log_after_it_is_renamed_and_no_line_is_lost_or_doubled() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _daemon = Daemon::start_with(&state, &["--access-log", log.to_str().unwrap()]);
    let spec = write_spec(dir.path(), port, "v1", 1);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    wait_until(&state, Duration::from_secs(30), |s| routed(s).len() == 1);
    let router = router_pid(&state);

    // A client sends requests one after another while the log is rotated under it.
    let sending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let client = {
        let sending = std::sync::Arc::clone(&sending);
        std::thread::spawn(move || {
            let mut n = 0_u32;
            while sending.load(std::sync::atomic::Ordering::Relaxed) || n < 20 {
                let id = format!("during-{n}");
                let (returned, _) = request_id(addr, Some(&id));
                assert_eq!(returned, id);
                n += 1;
            }
            n
        })
    };
    // Some lines reach the file before the rename.
    wait_for_lines(&log, &["during-0", "during-5"]);
    std::fs::rename(&log, &rotated).unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-HUP", &router.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The router opens a new file at the path.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log.exists() {
        assert!(Instant::now() < deadline, "no new access log after SIGHUP");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Requests after the reopen are logged in the new file.
    let (after, _) = request_id(addr, Some("after-the-reopen"));
    assert_eq!(after, "after-the-reopen");
    wait_for_lines(&log, &["after-the-reopen"]);
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let sent = client.join().unwrap();

    // Every request of the client is in exactly one of the two files, once.
    let ids: Vec<String> = (0..sent).map(|n| format!("during-{n}")).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (old, new) = loop {
        let (old, new) = (lines(&rotated), lines(&log));
        let seen = old.len() + new.len();
        if seen > sent as usize || Instant::now() >= deadline {
            break (old, new);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let count = |id: &str| {
        old.iter()
            .chain(&new)
            .filter(|l| l["request_id"] == id)
            .count()
    };
    for id in &ids {
        assert_eq!(count(id), 1, "{id}: old {old:#?}\nnew {new:#?}");
    }
    assert_eq!(count("after-the-reopen"), 1);
    assert!(new.iter().any(|l| l["request_id"] == "after-the-reopen"));
    assert_eq!(old.len() + new.len(), ids.len() + 1);
    assert!(
        old.iter().any(|l| l["request_id"] == "during-0"),
        "{old:#?}"
    );
    eprintln!(
        "{sent} requests during the rotation: {} lines in the old file, {} in the new",
        old.len(),
        new.len()
    );
    // The signal reopened the log; it did not stop or replace the router.
    assert_eq!(router_pid(&state), router);
    assert!(!exited(router));
}
