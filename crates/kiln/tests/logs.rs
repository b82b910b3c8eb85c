//! End-to-end tests of kiln's log: the real `kiln` binary's `tracing` events on stderr, in the
//! human format and as JSON lines, with stdout left to the command's own output. The event they
//! watch for is a real one: `kiln serve` on a state directory others could read makes it
//! private and warns so, then serves until SIGTERM.

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

/// The warning `kiln serve` logs when it makes an open state directory private.
const WARNING: &str = "the state directory was readable by other users";

/// Runs `kiln [global…] serve` on a state directory made 0755, waits until the daemon says
/// it serves and has logged the warning, stops it with SIGTERM and returns what it wrote.
fn serve_on_an_open_state(global: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .env_remove("KILN_STATE")
        .env_remove("KILN_LOG")
        .env_remove("KILN_LOG_FORMAT")
        .env("NO_COLOR", "1")
        .arg("--state")
        .arg(&state)
        .args(global)
        .arg("serve")
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
        && has(&seen, Stream::Stderr, WARNING))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("the daemon did not serve and warn ({e}): {seen:#?}");
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
    let run = serve_on_an_open_state(&["--log-format", "json"]);
    let events: Vec<serde_json::Value> = run
        .stderr
        .iter()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {line}"))
        })
        .collect();
    let warned = events
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(WARNING))
        })
        .unwrap_or_else(|| panic!("no warning: {events:#?}"));
    assert_eq!(warned["level"], "WARN", "{warned}");
    assert!(warned["timestamp"].is_string(), "{warned}");
    assert!(
        warned["state"].as_str().unwrap().ends_with("/state"),
        "{warned}"
    );
    assert_eq!(warned["was"], "0755", "{warned}");
    for event in &events {
        assert!(event["level"].is_string(), "{event}");
        assert!(event["message"].is_string(), "{event}");
    }
    // The command's own output stays on stdout, and no log event goes there.
    assert!(run.stdout.contains("kiln daemon serving"), "{}", run.stdout);
    assert!(!run.stdout.contains(WARNING), "{}", run.stdout);
}

#[test]
fn human_logs_are_text_lines_with_key_value_fields() {
    let run = serve_on_an_open_state(&[]);
    let warned = run.stderr.iter().find(|l| l.contains(WARNING)).unwrap();
    assert!(warned.contains("WARN"), "{warned}");
    assert!(warned.contains("state="), "{warned}");
    assert!(warned.contains("was=\"0755\""), "{warned}");
    assert!(!warned.starts_with('{'), "{warned}");
    // Not a terminal, and NO_COLOR is set: no escape codes.
    assert!(!warned.contains('\x1b'), "{warned:?}");
    // The target (kiln::…) is left out of the human format.
    assert!(!warned.contains("kiln::"), "{warned}");
    assert!(!run.stdout.contains(WARNING), "{}", run.stdout);
}

// The TCP API's address is bound before the daemon says it serves: one in use stops it with
// the address and the reason, rather than a log line behind a daemon that looks up.
#[test]
fn a_taken_api_address_stops_serve_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .env_remove("KILN_STATE")
        .env("NO_COLOR", "1")
        .arg("--state")
        .arg(dir.path().join("state"))
        .args(["serve", "--api-listen", &addr, "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen for the API on {addr}"))
            && stderr.contains("in use"),
        "{stderr}"
    );
    drop(taken);
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
