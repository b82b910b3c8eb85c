//! The daemon enforces its own gates, whatever client calls it: raw API requests to a real
//! `kiln serve` (TCP with a bearer token) that the CLI would never send are refused with a
//! 400 naming the field, nothing is recorded, and the daemon keeps answering. A provider that
//! keeps failing gives a bounded number of events. A release edited in the ledger is reported
//! as corrupt by name instead of deployed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "gate-token";

/// A daemon serving its API on TCP too.
fn daemon(state: &Path) -> (Daemon, u16) {
    std::fs::create_dir_all(state).unwrap();
    let token = state.with_extension("token");
    std::fs::write(&token, TOKEN).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(
        state,
        &[
            "--api-listen",
            &addr,
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    (d, port)
}

/// One HTTP/1.1 request over TCP with the token; returns the status and the JSON body.
fn call(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (_, text) = out.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(text).unwrap_or(Value::Null))
}

/// What the CLI would send for a plain spec on `listen_port`.
fn apply_body(listen_port: u16, extra: &str) -> Value {
    let src = format!(
        "name = \"web\"\n[image]\n[service]\n{extra}\n[route]\nlisten = \"127.0.0.1:{listen_port}\"\n"
    );
    let spec = kiln_spec::Spec::parse(&src, "kiln.toml", Path::new(".")).unwrap();
    json!({
        "image": format!("sha256:{}", "a".repeat(64)),
        "config": kiln_control::ReleaseConfig::from_spec(&spec),
        "spec_digest": "sha256:x",
        "source_commit": null,
        "actor": "raw-api",
    })
}

fn refused(port: u16, app: &str, body: &Value, naming: &str) {
    let (status, answer) = call(
        port,
        "POST",
        &format!("/v1/apps/{app}/releases"),
        Some(body),
    );
    let message = answer["error"].as_str().unwrap_or_default();
    assert_eq!(status, 400, "{answer}");
    assert!(
        message.contains(naming),
        "{message:?} does not name {naming:?}"
    );
}

#[test]
fn raw_api_requests_the_cli_would_never_send_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_daemon, port) = daemon(&state);
    let listen = free_port();

    let mut huge = apply_body(listen, "");
    huge["config"]["service"]["replicas"] = json!(1_000_000);
    refused(port, "web", &huge, "service.replicas");

    let mut nul = apply_body(listen, "");
    nul["config"]["service"]["env"] = json!({"GREETING": "a\u{0}b"});
    refused(port, "web", &nul, "service.env");

    let mut provider = apply_body(listen, "");
    provider["config"]["target"]["provider"] = json!("dockr");
    refused(port, "web", &provider, "target.provider");

    let mut image = apply_body(listen, "");
    image["image"] = json!("sha256:not-a-digest");
    refused(port, "web", &image, "image");

    let body = apply_body(listen, "");
    refused(port, "a%20b", &body, "app");
    refused(port, &"a".repeat(300), &body, "app");
    refused(port, "Web", &body, "app");
    let (status, answer) = call(port, "GET", "/v1/apps/a%20b", None);
    assert_eq!(status, 400, "{answer}");

    // Nothing was recorded, and the daemon answers as before.
    let (status, apps) = call(port, "GET", "/v1/apps", None);
    assert_eq!((status, apps), (200, json!([])));
    let (status, events) = call(port, "GET", "/v1/events", None);
    assert_eq!((status, apps_events(&events)), (200, vec![]));
    let (status, _) = call(port, "GET", "/v1/health", None);
    assert_eq!(status, 200);
}

#[test]
fn an_untested_image_is_refused_by_the_daemon_when_the_spec_has_tests() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_daemon, port) = daemon(&state);
    let mut body = apply_body(free_port(), "");
    body["config"]["test_required"] = json!(true);
    refused(port, "web", &body, "has not passed its tests");
    let (_, events) = call(port, "GET", "/v1/events", None);
    assert_eq!(apps_events(&events), Vec::<&Value>::new());
}

/// The events about apps: all but the ledger's own (`ledger.anchored` at a first start).
fn apps_events(events: &Value) -> Vec<&Value> {
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["app"] != kiln_ledger::LEDGER_APP)
        .collect()
}

/// Events about creating instances of `web`.
fn create_events(port: u16) -> Vec<Value> {
    let (_, events) = call(port, "GET", "/v1/events?app=web", None);
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["kind"]
                .as_str()
                .unwrap_or("")
                .starts_with("instance.create")
        })
        .cloned()
        .collect()
}

#[test]
fn an_unreachable_docker_engine_gives_a_bounded_number_of_events_and_the_api_answers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_daemon, port) = daemon(&state);
    let body = apply_body(
        free_port(),
        "replicas = 2\n[target]\nprovider = \"docker\"\ndocker_host = \"tcp://127.0.0.1:1\"",
    );
    let (status, answer) = call(port, "POST", "/v1/apps/web/releases", Some(&body));
    assert_eq!(status, 200, "{answer}");
    // Every call answers while the provider fails (before backoff: ten events a second).
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(4) {
        let asked = Instant::now();
        let (status, _) = call(port, "GET", "/v1/health", None);
        assert_eq!(status, 200);
        slowest = slowest.max(asked.elapsed());
        let (status, _) = call(port, "GET", "/v1/apps/web", None);
        assert_eq!(status, 200);
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = create_events(port);
    eprintln!(
        "{} create events in {:?}; slowest health answer {slowest:?}",
        events.len(),
        started.elapsed()
    );
    // 200 ms, 400 ms, 800 ms, 1.6 s… between tries: at most 5 tries in 4 s, one event each.
    assert!(
        !events.is_empty() && events.len() <= 6,
        "{} events: {events:#?}",
        events.len()
    );
    assert_eq!(events[0]["kind"], "instance.create_failed");
    assert!(
        events[1..]
            .iter()
            .all(|e| e["kind"] == "instance.create_backoff"),
        "{events:#?}"
    );
}

#[test]
fn a_release_edited_in_the_ledger_is_reported_corrupt_by_name_not_deployed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut daemon, port) = daemon(&state);
    // An app on a provider whose instances never start here: only the record matters.
    let body = apply_body(
        free_port(),
        "[target]\nprovider = \"docker\"\ndocker_host = \"tcp://127.0.0.1:1\"",
    );
    let (status, answer) = call(port, "POST", "/v1/apps/web/releases", Some(&body));
    assert_eq!(status, 200, "{answer}");
    daemon.kill();

    // Someone edits the stored release behind kiln's back (dropping the trigger first).
    let db = rusqlite::Connection::open(state.join("ledger.db")).unwrap();
    // Counted once the daemon is gone: a create that failed just before the kill counts.
    let before = db
        .query_row(
            "SELECT COUNT(*) FROM events WHERE app = 'web' AND kind LIKE 'instance.create%'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as usize;
    db.execute_batch(
        "DROP TRIGGER releases_no_update;
         UPDATE releases SET body = replace(body, '\"provider\":\"docker\"', '\"provider\":\"elsewhere\"');",
    )
    .unwrap();
    drop(db);

    // The daemon verifies the ledger before it acts on it: the edited record is named and
    // it does not start, until someone accepts the ledger as it is (recorded).
    kiln(&state)
        .arg("serve")
        .timeout(Duration::from_secs(60))
        .assert()
        .code(1)
        .stderr(predicates::str::contains("release web#1"))
        .stderr(predicates::str::contains("edited"));
    daemon.args.push("--accept-broken-ledger".to_owned());
    daemon.spawn();
    let (status, answer) = call(port, "GET", "/v1/apps/web", None);
    let message = answer["error"].as_str().unwrap_or_default();
    assert_eq!(status, 409, "{answer}");
    assert!(
        message.contains("release web#1 is corrupt") && message.contains("target.provider"),
        "{message}"
    );
    let (_, apps) = call(port, "GET", "/v1/apps", None);
    assert_eq!(apps, json!(["web"]));
    let (_, events) = call(port, "GET", "/v1/events?app=web", None);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "release.corrupt"),
        "{events}"
    );
    // Nothing is started from it: read leniently, "elsewhere" used to mean the local
    // provider, whose creates would be recorded here within a few ticks.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(create_events(port).len(), before);
    // `kiln down` clears it.
    kiln(&state).args(["down", "web"]).assert().success();
    let (_, apps) = call(port, "GET", "/v1/apps", None);
    assert_eq!(apps, json!([]));
}

// A TCP token holder must not make the daemon read its host's files or run commands: a
// release naming secret sources, and a fingerprint request, are refused over TCP.
#[test]
fn secret_sources_are_refused_over_the_tcp_api() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_daemon, port) = daemon(&state);
    let mut body = apply_body(free_port(), "");
    body["config"]["service"]["secrets"] = json!({
        "SHADOW": {"source": {"file": "/etc/shadow"}}
    });
    let (status, answer) = call(port, "POST", "/v1/apps/web/releases", Some(&body));
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unix socket"),
        "{answer}"
    );
    let asked = json!({"secrets": {"X": {"source": {"command": {"argv": ["id"], "dir": "/"}}}}});
    let (status, answer) = call(port, "POST", "/v1/fingerprints", Some(&asked));
    assert_eq!(status, 403, "{answer}");
    let (_, events) = call(port, "GET", "/v1/events?app=web", None);
    assert_eq!(events, json!([]), "nothing was recorded");
}
