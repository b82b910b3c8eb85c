//! End-to-end, without a browser: what the dashboard's listener (`kiln serve --ui-listen`)
//! lets a client do (issue 20). Anyone may read the page, the feed and the API's read
//! operations; nothing else without the token; an action must be JSON from the page's own
//! origin; a request naming another host (DNS rebinding) is refused; without a token file
//! the dashboard takes no action at all. The browser's side is `tests/dashboard.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use common::*;
use serde_json::Value;

const TOKEN: &str = "dashboard-http-token";

/// One request to the dashboard on `port`: status, headers (lowercase names) and body.
fn call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    write!(s, "{head}\r\n{body}").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Waits until the dashboard's listener answers.
fn wait_listening(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

#[test]
fn the_dashboard_reads_for_anyone_and_acts_only_with_the_token() {
    if !runc_prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _d = Daemon::start_with(
        &state,
        &[
            "--ui-listen",
            &listen,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    wait_listening(port);

    // The page: embedded, under 300 KB with its script and style, locked against framing
    // and scripts from elsewhere.
    let (status, head, html) = call(port, "GET", "/", &[], "");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    assert!(
        head.contains("frame-ancestors 'none'") && head.contains("x-frame-options: deny"),
        "{head}"
    );
    let mut total = html.len();
    for asset in ["/ui/app.js", "/ui/app.css"] {
        let (status, _, text) = call(port, "GET", asset, &[], "");
        assert_eq!(status, 200, "{asset}");
        total += text.len();
    }
    eprintln!("the dashboard's own load: {total} bytes (HTML, JS and CSS, uncompressed)");
    assert!(total < 300 * 1024, "{total} bytes");

    // DNS rebinding: a page of another site whose name resolves here names its own host.
    let (status, _, body) = call(port, "GET", "/ui/state", &[("Host", "evil.example")], "");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("evil.example"), "{body}");
    let (status, _, _) = call(
        port,
        "GET",
        "/ui/state",
        &[("Host", &format!("localhost:{port}"))],
        "",
    );
    assert_eq!(status, 200);

    // Who is who.
    let session = |auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (status, _, body) = call(port, "GET", "/ui/session", &headers, "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    assert_eq!(session(None)["authorized"], false);
    assert_eq!(session(None)["actions"], true);
    assert_eq!(session(Some("Bearer wrong"))["authorized"], false);
    assert_eq!(session(Some(&bearer()))["authorized"], true);

    // Reads of the API: what status and history show, without a token; not the rest.
    for read in ["/v1/apps", "/v1/health", "/ui/events?app=none"] {
        let (status, _, body) = call(port, "GET", read, &[], "");
        assert_eq!(status, 200, "{read}: {body}");
    }
    for private in ["/v1/sources", "/v1/ledger/export", "/v1/instances/x/logs"] {
        let (status, _, body) = call(port, "GET", private, &[], "");
        assert_eq!(status, 401, "{private}: {body}");
    }

    let (status, _, _) = call(port, "GET", "/metrics", &[], "");
    assert_eq!(status, 404, "the daemon's metrics are on the API, not here");

    // Actions: the token, JSON, the page's own origin; then it is the CLI's API.
    let abort = "/v1/apps/nothing/abort";
    let json = ("Content-Type", "application/json");
    let (status, _, body) = call(port, "POST", abort, &[json], "{}");
    assert_eq!(status, 401, "{body}");
    let auth = bearer();
    let (status, _, body) = call(
        port,
        "POST",
        abort,
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        "{}",
    );
    assert_eq!(status, 415, "a form's body: {body}");
    let (status, _, body) = call(
        port,
        "POST",
        abort,
        &[
            ("Authorization", &auth),
            json,
            ("Origin", "http://evil.example"),
        ],
        "{}",
    );
    assert_eq!(status, 403, "{body}");
    let origin = format!("http://127.0.0.1:{port}");
    let (status, _, body) = call(
        port,
        "POST",
        abort,
        &[("Authorization", &auth), json, ("Origin", &origin)],
        "{}",
    );
    assert_eq!(status, 404, "the API's own answer: {body}");
    assert!(body.contains("no app named nothing"), "{body}");
    // What a token holder may not do over TCP stays refused here.
    let (status, _, body) = call(
        port,
        "POST",
        "/v1/sources",
        &[("Authorization", &auth), json],
        r#"{"name":"x","url":"file:///tmp","branch":"main"}"#,
    );
    assert_eq!(status, 403, "{body}");

    // The feed: server-sent events, the state at once.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /ui/feed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut lines = BufReader::new(s).lines();
    let mut saw_type = false;
    let state = loop {
        let line = lines.next().expect("the feed ended").unwrap();
        saw_type |= line.eq_ignore_ascii_case("content-type: text/event-stream");
        if let Some(data) = line.strip_prefix("data: ") {
            break serde_json::from_str::<Value>(data).unwrap();
        }
    };
    assert!(saw_type);
    assert!(state["apps"].is_array(), "{state}");
}

#[test]
fn without_a_token_file_the_dashboard_takes_no_action() {
    if !runc_prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _d = Daemon::start_with(&state, &["--ui-listen", &listen]);
    wait_listening(port);
    let (status, _, body) = call(
        port,
        "GET",
        "/ui/session",
        &[("Authorization", "Bearer anything")],
        "",
    );
    assert_eq!(status, 200);
    let session: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(session["actions"], false);
    assert_eq!(session["authorized"], false);
    let (status, _, body) = call(
        port,
        "POST",
        "/v1/apps/web/abort",
        &[
            ("Authorization", "Bearer anything"),
            ("Content-Type", "application/json"),
        ],
        "{}",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("read-only"), "{body}");
}
