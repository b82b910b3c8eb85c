//! `wrk`, the HTTP load generator the tests that count failed requests run.

use std::process::{Child, Command, Stdio};

/// `wrk` loading `port` for `seconds`, its report parsed once it ends.
pub struct Wrk {
    child: Child,
}

/// What `wrk` counted.
#[derive(Debug)]
pub struct WrkReport {
    pub requests: u64,
    /// Socket errors (connect, read, write, timeout) and non-2xx/3xx answers.
    pub failed: u64,
    pub text: String,
}

impl Wrk {
    pub fn start(port: u16, seconds: u64) -> Wrk {
        let child = Command::new("wrk")
            .args(["-t2", "-c16", &format!("-d{seconds}s"), "-H", "Host: web"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Wrk { child }
    }

    /// Stops it (SIGINT: it prints its report) and reads the report.
    pub fn finish(self) -> WrkReport {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let out = self.child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let number = |s: &str| -> u64 { s.trim().trim_end_matches(',').parse().unwrap_or(0) };
        let mut requests = 0;
        let mut failed = 0;
        for line in text.lines() {
            let line = line.trim();
            if let Some((n, _)) = line.split_once(" requests in ") {
                requests = number(n);
            } else if let Some(errors) = line.strip_prefix("Socket errors:") {
                // "connect 0, read 3, write 0, timeout 0"
                failed += errors
                    .split(',')
                    .filter_map(|part| part.split_whitespace().nth(1))
                    .map(number)
                    .sum::<u64>();
            } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
                failed += number(n);
            }
        }
        assert!(out.status.success(), "wrk failed: {text}");
        WrkReport {
            requests,
            failed,
            text,
        }
    }
}

pub fn wrk_available() -> bool {
    let found = Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "wrk is required in CI (scripts/ci-setup.sh installs it)"
        );
        eprintln!("note: skipped: wrk is not installed");
    }
    found
}
