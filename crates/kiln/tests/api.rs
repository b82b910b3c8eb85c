//! End-to-end: the daemon's API does not trust its clients (issue 15, part 3). On a real
//! `kiln serve` with real runc: the ledger's actor is who the connection says (the socket
//! peer's user, the TCP token), whatever a body claims; an API connection that sends nothing
//! is closed after the header read timeout; a 5xx body names no host path while the daemon's
//! log has it; the daemon raises its open-file limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use kiln_control::api::HEADER_READ_TIMEOUT;
use serde_json::{Value, json};

const TOKEN: &str = "api-test-token";

/// A soft open-file limit below any host's hard one, for the daemon to raise.
const LOW_NOFILE: u64 = 256;

/// `kiln serve` with the TCP API on `port`, started with a soft open-file limit of
/// [`LOW_NOFILE`] (the daemon's own process: `sh` execs it).
fn daemon(state: &Path, token_file: &Path, port: u16) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.with_extension("log"))
        .unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -Sn {LOW_NOFILE} && exec \"$0\" \"$@\""))
        .arg(assert_cmd::cargo::cargo_bin("kiln"))
        .arg("--state")
        .arg(state)
        .args(["serve", "--api-listen", &format!("127.0.0.1:{port}")])
        .arg("--token-file")
        .arg(token_file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let daemon = Daemon {
        state: state.to_owned(),
        child: Some(child),
        args: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(state.join("kiln.sock")).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

/// One request over the daemon's Unix socket, as any local program could send it; the
/// status and the JSON body.
fn unix_call(state: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = std::os::unix::net::UnixStream::connect(state.join("kiln.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (_, text) = out.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(text).unwrap_or(Value::Null))
}

/// The same over TCP with the bearer token.
fn tcp_call(port: u16, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.to_string();
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

/// The soft and hard "Max open files" of a process.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

/// Reads from `s` until the server closes it; how long that took. Fails if it stays open
/// for a minute.
fn until_closed(mut s: std::net::TcpStream, since: Instant) -> Duration {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut sink = Vec::new();
    match s.read_to_end(&mut sink) {
        // A reset is a close too.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the API kept an idle connection open ({e}): read {sink:?}"),
    }
    since.elapsed()
}

#[test]
fn the_api_trusts_the_connection_not_the_client() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let api_port = free_port();
    let d = daemon(&state, &token_file, api_port);
    let pid = d.child.as_ref().unwrap().id();

    // The open-file limit: raised from what the daemon was started with to the hard limit.
    let (soft, hard) = open_file_limits(pid);
    assert_eq!(soft, hard, "the daemon kept its soft open-file limit");
    assert_ne!(soft, LOW_NOFILE.to_string());

    // Idle connections: one that never sends a byte, one that sent a request and stays.
    let silent_since = Instant::now();
    let silent = std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap();
    let silent = std::thread::spawn(move || until_closed(silent, silent_since));
    let mut kept = std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap();
    write!(
        kept,
        "GET /v1/health HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let kept_since = Instant::now();
    let kept = std::thread::spawn(move || until_closed(kept, kept_since));

    // An apply over the socket whose body claims to be someone else.
    let port = free_port();
    let spec_file = write_spec(dir.path(), port, "v1", 1);
    let image = build(&state, &spec_file);
    let spec = kiln_spec::Spec::parse(
        &std::fs::read_to_string(&spec_file).unwrap(),
        "kiln.toml",
        dir.path(),
    )
    .unwrap();
    let apply = json!({
        "image": image,
        "config": kiln_control::ReleaseConfig::from_spec(&spec),
        "spec_digest": format!("sha256:{}", "0".repeat(64)),
        "source_commit": null,
        "actor": "mallory@evil",
    });
    let (status, release) = unix_call(&state, "POST", "/v1/apps/web/releases", Some(&apply));
    assert_eq!(status, 200, "{release}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    // The runc prerequisites include running as root.
    let peer = format!("root@{}", host.trim());
    assert_eq!(release["actor"], json!(peer), "{release}");
    wait_until(&state, Duration::from_secs(60), |s| {
        s["phase"] == "completed" && routed(s).len() == 1
    });
    let instance = routed(&common::status(&state))[0].clone();

    // Over TCP the actor is the token's holder, whatever the body claims.
    let (status, scaled) = tcp_call(
        api_port,
        "POST",
        "/v1/apps/web/scale",
        &json!({"replicas": 1, "actor": "mallory@evil"}),
    );
    assert_eq!(status, 200, "{scaled}");

    let events = history(&state);
    let created: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "release.created")
        .collect();
    assert_eq!(created.len(), 1, "{events:#?}");
    assert_eq!(created[0]["data"]["actor"], json!(peer));
    let scaled: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "app.scaled")
        .collect();
    assert_eq!(scaled.len(), 1, "{events:#?}");
    assert_eq!(scaled[0]["data"]["actor"], json!("token@127.0.0.1"));
    let text = serde_json::to_string(&events).unwrap();
    assert!(
        !text.contains("mallory"),
        "a claimed actor was recorded: {text}"
    );

    // A provider failure (the instance's log is a directory now): a 502 naming no path, while
    // the daemon's log has it.
    let log = state
        .join("instances")
        .join(&instance)
        .join("logs/output.log");
    std::fs::remove_file(&log).unwrap();
    std::fs::create_dir(&log).unwrap();
    let (status, answer) = unix_call(
        &state,
        "GET",
        &format!("/v1/instances/{instance}/logs?from=0"),
        None,
    );
    assert_eq!(status, 502, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(
        !message.contains('/') && !message.contains("output.log"),
        "a 5xx body carries internals: {message}"
    );
    let daemon_log = std::fs::read_to_string(state.with_extension("log")).unwrap();
    assert!(
        daemon_log.contains(&log.display().to_string()),
        "the daemon's log lacks the failure's detail:\n{daemon_log}"
    );
    assert_eq!(
        daemon_log.matches("raised the open-file limit").count(),
        1,
        "{daemon_log}"
    );

    // Both idle connections were closed, neither before the timeout (less a second for
    // when the daemon's timer started relative to ours).
    for (what, idle) in [("silent", silent), ("kept-alive", kept)] {
        let idle = idle.join().unwrap();
        assert!(
            idle + Duration::from_secs(1) >= HEADER_READ_TIMEOUT,
            "the {what} connection was closed after {idle:?}, before the timeout"
        );
    }
}
