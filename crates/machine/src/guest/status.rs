//! What the machine says about itself: the app's health, checked as `[service.health]`
//! says (an HTTP `GET` of its path, or a TCP connect, on the guest's loopback), and a
//! status endpoint on its own port (`GET /health`) for the platform's load balancer or
//! health check: `200` while the app runs and is healthy (or has no check), `503`
//! otherwise, with a JSON body naming the image, the root hash, the address, the app's
//! state and its cgroup's figures.
//!
//! The endpoint reads only a bounded request head (4 KiB, 2 s), answers one connection at a
//! time and says nothing secret: a hostile client can make it wait, not learn more or grow
//! the init's memory.

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cgroup::Cgroup;
use super::config::Health;

/// The longest request head the endpoint reads.
const HEAD_MAX: usize = 4096;
/// How long a client has to send its request head and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The health check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// No check was configured.
    Unchecked,
    /// Not yet healthy.
    Starting,
    /// Passed `healthy_threshold` checks in a row.
    Healthy,
    /// Failed `unhealthy_threshold` checks in a row (outside the start period).
    Unhealthy,
}

/// Counts consecutive passes and failures into a [`Verdict`], as the local provider does:
/// failures in the start period do not count until the app has once been healthy.
#[derive(Debug, Clone)]
pub struct Tally {
    verdict: Verdict,
    passes: u32,
    failures: u32,
}

impl Tally {
    /// A tally for an app just started.
    pub fn new() -> Tally {
        Tally {
            verdict: Verdict::Starting,
            passes: 0,
            failures: 0,
        }
    }

    /// The verdict after one more check, `since_start` after the app started.
    pub fn record(&mut self, health: &Health, passed: bool, since_start: Duration) -> Verdict {
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if self.passes >= health.healthy_threshold {
                self.verdict = Verdict::Healthy;
            }
        } else {
            self.passes = 0;
            let grace = self.verdict == Verdict::Starting && since_start < health.start_period;
            if !grace {
                self.failures = self.failures.saturating_add(1);
                if self.failures >= health.unhealthy_threshold {
                    self.verdict = Verdict::Unhealthy;
                }
            }
        }
        self.verdict
    }
}

impl Default for Tally {
    fn default() -> Tally {
        Tally::new()
    }
}

/// One check of the app: a TCP connect to its port on loopback, then with a path an HTTP
/// `GET` whose status must be 2xx or 3xx, all within the check's timeout.
pub fn check(health: &Health) -> bool {
    let deadline = Instant::now() + health.timeout;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, health.port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, health.timeout) else {
        return false;
    };
    let Some(path) = &health.path else {
        return true;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero()
        || stream.set_read_timeout(Some(left)).is_err()
        || stream.set_write_timeout(Some(left)).is_err()
    {
        return false;
    }
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: kiln-init\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && passes(&head)
}

/// Whether a response starting with `head` (`HTTP/1.x NNN`) has a 2xx or 3xx status.
pub fn passes(head: &[u8]) -> bool {
    head.starts_with(b"HTTP/1.")
        && head.len() >= 12
        && head[8] == b' '
        && matches!(head[9], b'2' | b'3')
        && head[10].is_ascii_digit()
        && head[11].is_ascii_digit()
}

/// What the endpoint reports, shared by the init's threads.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The image's manifest digest.
    pub image: String,
    /// The verity root hash the root was checked against.
    pub root_hash: String,
    /// Whether UEFI Secure Boot was on (the firmware checked the kernel image's signature,
    /// so the root hash is the signer's); `None` when the firmware does not say.
    pub secure_boot: Option<bool>,
    /// `eth0`'s address (`ADDR/PREFIX`), if it has one.
    pub address: Option<String>,
    /// How it got it: `dhcp`, `static` or `none`.
    pub network: &'static str,
    /// The app's program.
    pub app: String,
    /// The app's pid while it runs.
    pub pid: Option<u32>,
    /// `running`, or how it ended.
    pub state: String,
    /// The health check's verdict.
    pub health: Verdict,
    /// Milliseconds since the init started (as of the last [`refresh`]).
    pub uptime_ms: u128,
    /// When the init started.
    #[serde(skip)]
    pub booted: Instant,
    /// The app's cgroup's `memory.current`, `memory.max`, `pids.current`, `pids.max`,
    /// `cpu.max` and the `oom_kill` count of `memory.events`.
    pub cgroup: std::collections::BTreeMap<&'static str, String>,
}

/// The status, behind a lock the endpoint, the checker and the supervisor share.
pub type Shared = Arc<Mutex<Status>>;

/// The verdict an endpoint answers with: 200 while the app runs and is healthy or
/// unchecked, 503 otherwise.
pub fn http_status(status: &Status) -> u16 {
    let up = status.pid.is_some() && matches!(status.health, Verdict::Healthy | Verdict::Unchecked);
    if up { 200 } else { 503 }
}

/// The response to a request head: `GET`/`HEAD /health` (query ignored) gets the status,
/// any other path 404, any other method 405, anything unreadable 400.
pub fn respond(head: &[u8], status: &Status) -> Vec<u8> {
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .map(str::trim_end);
    let mut words = line.unwrap_or("").split(' ');
    let (method, target, version) = (words.next(), words.next(), words.next());
    let (code, body) = match (method, target, version) {
        (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => {
            let path = t.split('?').next().unwrap_or(t);
            match (m, path) {
                ("GET" | "HEAD", "/health") => {
                    let json = serde_json::to_string_pretty(status).unwrap_or_default();
                    (http_status(status), format!("{json}\n"))
                }
                ("GET" | "HEAD", _) => (404, "not found: try /health\n".to_owned()),
                _ => (405, "only GET and HEAD\n".to_owned()),
            }
        }
        _ => (400, "bad request\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let kind = if code == 200 || code == 503 {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != Some("HEAD") {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Reads the uptime and the app's cgroup figures into the status.
pub fn refresh(status: &mut Status, cgroup: &Cgroup) {
    status.uptime_ms = status.booted.elapsed().as_millis();
    let mut figures = std::collections::BTreeMap::new();
    for file in [
        "memory.current",
        "memory.max",
        "pids.current",
        "pids.max",
        "cpu.max",
    ] {
        if let Some(v) = cgroup.read(file) {
            figures.insert(file, v);
        }
    }
    if let Some(kills) = cgroup.read("memory.events").and_then(|e| {
        e.lines()
            .find_map(|l| l.strip_prefix("oom_kill ").map(str::to_owned))
    }) {
        figures.insert("oom_kill", kills);
    }
    status.cgroup = figures;
}

/// Serves the endpoint on `port` (all addresses) for the machine's life; a thread's body.
pub fn serve(listener: TcpListener, shared: &Shared, cgroup: &Cgroup) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            continue;
        };
        let _ = answer(stream, shared, cgroup);
    }
}

fn answer(mut stream: TcpStream, shared: &Shared, cgroup: &Cgroup) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HEAD_MAX {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n.min(HEAD_MAX - head.len())]);
    }
    let response = {
        let mut status = shared.lock().unwrap_or_else(PoisonError::into_inner);
        refresh(&mut status, cgroup);
        respond(&head, &status)
    };
    stream.write_all(&response)
}

/// Checks the app every interval for the machine's life, and keeps the verdict in the
/// status; a thread's body. A change of verdict is said on the console.
pub fn watch(health: &Health, started: Instant, shared: &Shared, say: impl Fn(&str)) {
    let mut tally = Tally::new();
    let mut said = Verdict::Starting;
    loop {
        let began = Instant::now();
        let verdict = tally.record(health, check(health), started.elapsed());
        shared.lock().unwrap_or_else(PoisonError::into_inner).health = verdict;
        if verdict != said {
            say(&format!("the app is {}", verdict_word(verdict)));
            said = verdict;
        }
        std::thread::sleep(health.interval.saturating_sub(began.elapsed()));
    }
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Unchecked => "unchecked",
        Verdict::Starting => "starting",
        Verdict::Healthy => "healthy",
        Verdict::Unhealthy => "unhealthy",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn health(healthy: u32, unhealthy: u32, start_ms: u64) -> Health {
        Health {
            port: 8080,
            path: Some("/healthz".to_owned()),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            start_period: Duration::from_millis(start_ms),
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn thresholds_and_the_start_period() {
        let h = health(2, 2, 10_000);
        let mut t = Tally::new();
        assert_eq!(t.record(&h, false, S(1)), Verdict::Starting, "in the grace");
        assert_eq!(t.record(&h, false, S(2)), Verdict::Starting, "in the grace");
        assert_eq!(
            t.record(&h, true, S(3)),
            Verdict::Starting,
            "one pass of two"
        );
        assert_eq!(t.record(&h, true, S(4)), Verdict::Healthy);
        // Once healthy, the start period no longer forgives.
        assert_eq!(
            t.record(&h, false, S(5)),
            Verdict::Healthy,
            "one failure of two"
        );
        assert_eq!(t.record(&h, false, S(6)), Verdict::Unhealthy);
        assert_eq!(
            t.record(&h, true, S(7)),
            Verdict::Unhealthy,
            "one pass of two"
        );
        assert_eq!(t.record(&h, true, S(8)), Verdict::Healthy);
        let mut t = Tally::new();
        assert_eq!(t.record(&h, false, S(11)), Verdict::Starting);
        assert_eq!(
            t.record(&h, false, S(12)),
            Verdict::Unhealthy,
            "after the grace"
        );
    }

    #[test]
    fn status_lines_that_pass() {
        assert!(passes(b"HTTP/1.1 200 "));
        assert!(passes(b"HTTP/1.0 302 "));
        assert!(!passes(b"HTTP/1.1 503 "));
        assert!(!passes(b"HTTP/1.1 404 "));
        assert!(!passes(b"HTTP/1.1 2"));
        assert!(!passes(b"SSH-2.0-Open"));
    }

    fn status(pid: Option<u32>, health: Verdict) -> Status {
        Status {
            image: "sha256:ab".to_owned(),
            root_hash: "12bf".to_owned(),
            secure_boot: Some(true),
            address: Some("10.0.2.15/24".to_owned()),
            network: "dhcp",
            app: "/hello".to_owned(),
            pid,
            state: "running".to_owned(),
            health,
            uptime_ms: 1234,
            booted: Instant::now(),
            cgroup: [("memory.max", "67108864".to_owned())]
                .into_iter()
                .collect(),
        }
    }

    fn head_of(response: &[u8]) -> String {
        let text = String::from_utf8_lossy(response);
        text.lines().next().unwrap().to_owned()
    }

    #[test]
    fn the_endpoint_answers_the_status() {
        let up = status(Some(7), Verdict::Healthy);
        let r = respond(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", &up);
        assert_eq!(head_of(&r), "HTTP/1.1 200 OK");
        let text = String::from_utf8(r).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["health"], "healthy");
        assert_eq!(json["image"], "sha256:ab");
        assert_eq!(json["cgroup"]["memory.max"], "67108864");
        let r = respond(b"HEAD /health?x=1 HTTP/1.0\r\n\r\n", &up);
        assert!(
            String::from_utf8(r).unwrap().ends_with("\r\n\r\n"),
            "HEAD: no body"
        );
        let unchecked = status(Some(7), Verdict::Unchecked);
        assert_eq!(http_status(&unchecked), 200);
    }

    #[test]
    fn unhealthy_starting_or_gone_is_503() {
        for s in [
            status(Some(7), Verdict::Unhealthy),
            status(Some(7), Verdict::Starting),
            status(None, Verdict::Healthy),
        ] {
            let r = respond(b"GET /health HTTP/1.1\r\n\r\n", &s);
            assert_eq!(head_of(&r), "HTTP/1.1 503 Service Unavailable");
        }
    }

    #[test]
    fn other_requests_are_refused() {
        let up = status(Some(7), Verdict::Healthy);
        let cases: [(&[u8], &str); 5] = [
            (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (
                b"POST /health HTTP/1.1\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            (b"GET /health\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"\xff\xfe\r\n", "HTTP/1.1 400 Bad Request"),
            (b"", "HTTP/1.1 400 Bad Request"),
        ];
        for (head, want) in cases {
            assert_eq!(head_of(&respond(head, &up)), want, "{head:?}");
        }
    }
}
