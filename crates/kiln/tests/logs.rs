//! End-to-end tests of kiln's log: the real `kiln` binary's `tracing` events on stderr, in the
//! human format and as JSON lines, with stdout left to the command's own output. The event they
//! watch for is a real one: `kiln serve` whose TCP API address is already taken logs
//! "API stopped" and goes on serving its Unix socket until SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::BufRead;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What one `kiln serve` run wrote.
struct Run {
    stdout: String,
    stderr: Vec<String>,
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// Sends each line `from` writes to `tx`, tagged with `stream`.
fn forward(
    from: impl std::io::Read + Send + 'static,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines() {
            if tx.send((stream, line.unwrap())).is_err() {
                break;
            }
        }
    })
}

/// Runs `kiln [global…] serve` with its TCP API on an address in use, waits until the daemon
/// says it serves and has logged "API stopped", stops it with SIGTERM and returns what it
/// wrote.
fn serve_on_a_taken_port(global: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .env_remove("KILN_STATE")
        .env_remove("KILN_LOG")
        .env_remove("KILN_LOG_FORMAT")
        .env("NO_COLOR", "1")
        .arg("--state")
        .arg(&state)
        .args(global)
        .args(["serve", "--api-listen", &addr, "--token-file"])
        .arg(&token_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Lines arrive on a channel, so the wait for them has a deadline rather than a sleep.
    let (tx, lines) = mpsc::channel();
    let readers = [
        forward(child.stdout.take().unwrap(), Stream::Stdout, tx.clone()),
        forward(child.stderr.take().unwrap(), Stream::Stderr, tx),
    ];
    let mut seen = Vec::new();
    let has = |seen: &[(Stream, String)], stream: Stream, text: &str| {
        seen.iter().any(|(s, l)| *s == stream && l.contains(text))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    // A SIGTERM before the daemon serves is a stop during start-up (exit 143): wait for both.
    while !(has(&seen, Stream::Stdout, "kiln daemon serving")
        && has(&seen, Stream::Stderr, "API stopped"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("the daemon did not serve and log \"API stopped\" ({e}): {seen:#?}");
            }
        }
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    for reader in readers {
        reader.join().unwrap();
    }
    seen.extend(lines.try_iter());
    assert!(status.success(), "{status:?}: {seen:#?}");
    drop(taken);
    let (mut stdout, mut stderr) = (String::new(), Vec::new());
    for (stream, line) in seen {
        match stream {
            Stream::Stdout => {
                stdout.push_str(&line);
                stdout.push('\n');
            }
            Stream::Stderr => stderr.push(line),
        }
    }
    Run { stdout, stderr }
}

#[test]
fn json_logs_are_one_object_per_line_with_level_message_and_fields() {
    let run = serve_on_a_taken_port(&["--log-format", "json"]);
    let events: Vec<serde_json::Value> = run
        .stderr
        .iter()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {line}"))
        })
        .collect();
    let stopped = events
        .iter()
        .find(|e| e["message"] == "API stopped")
        .unwrap_or_else(|| panic!("no \"API stopped\" event: {events:#?}"));
    assert_eq!(stopped["level"], "ERROR", "{stopped}");
    assert!(stopped["timestamp"].is_string(), "{stopped}");
    assert!(stopped["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        stopped["error"].as_str().unwrap().contains("in use"),
        "{stopped}"
    );
    for event in &events {
        assert!(event["level"].is_string(), "{event}");
        assert!(event["message"].is_string(), "{event}");
    }
    // The command's own output stays on stdout, and no log event goes there.
    assert!(run.stdout.contains("kiln daemon serving"), "{}", run.stdout);
    assert!(!run.stdout.contains("API stopped"), "{}", run.stdout);
}

#[test]
fn human_logs_are_text_lines_with_key_value_fields() {
    let run = serve_on_a_taken_port(&[]);
    let stopped = run
        .stderr
        .iter()
        .find(|l| l.contains("API stopped"))
        .unwrap();
    assert!(stopped.contains("ERROR"), "{stopped}");
    assert!(stopped.contains("addr=127.0.0.1:"), "{stopped}");
    assert!(stopped.contains("error="), "{stopped}");
    assert!(!stopped.starts_with('{'), "{stopped}");
    // Not a terminal, and NO_COLOR is set: no escape codes.
    assert!(!stopped.contains('\x1b'), "{stopped:?}");
    // The target (kiln::cmd::daemon) is left out of the human format.
    assert!(!stopped.contains("kiln::cmd"), "{stopped}");
    assert!(!run.stdout.contains("API stopped"), "{}", run.stdout);
}

#[test]
fn an_invalid_kiln_log_filter_is_reported_before_the_command_runs() {
    let out = Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .env_remove("KILN_STATE")
        .env("NO_COLOR", "1")
        .env("KILN_LOG", "kiln=loud")
        .args(["schema"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KILN_LOG=\"kiln=loud\""), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn log_format_comes_from_kiln_log_format_and_rejects_unknown_formats() {
    let out = Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .env_remove("KILN_STATE")
        .env("NO_COLOR", "1")
        .env("KILN_LOG_FORMAT", "xml")
        .args(["schema"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--log-format"), "{stderr}");
}
