//! Health checks: the pure state machine ([`HealthMachine`]), the probes ([`HttpProber`],
//! [`TcpProber`], behind the [`Prober`] trait) and the timer loop that drives them
//! ([`monitor`]).
//!
//! States: `starting` → `healthy` ↔ `unhealthy`; an exited process is `failed`, for good.
//! Failures during the start period do not count. While `starting`, the gap between probes
//! is a tenth of the time since start (at least [`FIRST_PROBE`], at most `interval`), so
//! noticing readiness adds at most ~10% to an instance's start-up time: one that is ready in
//! 25 ms is healthy by ~28 ms, not one interval later. Once it has a verdict, probes run
//! every `interval`. This module knows nothing of how an instance runs: liveness is a function it
//! is given.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use kiln_spec::HealthCheck;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::types::Health;

/// The shortest gap between two probes while starting (a refused localhost connection costs
/// microseconds, so this is cheap).
pub const FIRST_PROBE: Duration = Duration::from_millis(1);

/// The health state machine of one instance: a pure function of probe results and time.
#[derive(Debug, Clone)]
pub struct HealthMachine {
    check: HealthCheck,
    state: Health,
    passes: u32,
    failures: u32,
    started: Instant,
}

impl HealthMachine {
    /// A machine for an instance started at `started`.
    pub fn new(check: HealthCheck, started: Instant) -> HealthMachine {
        HealthMachine {
            check,
            state: Health::Starting,
            passes: 0,
            failures: 0,
            started,
        }
    }

    /// The state now.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Records one probe result at `now` and returns the new state.
    pub fn record(&mut self, pass: bool, now: Instant) -> Health {
        if self.state == Health::Failed {
            return self.state;
        }
        if pass {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if self.state != Health::Healthy && self.passes >= self.check.healthy_threshold {
                self.state = Health::Healthy;
            }
        } else {
            self.passes = 0;
            let in_start_period =
                self.state == Health::Starting && now < self.started + self.check.start_period;
            if !in_start_period {
                self.failures = self.failures.saturating_add(1);
                if self.failures >= self.check.unhealthy_threshold {
                    self.state = Health::Unhealthy;
                }
            }
        }
        self.state
    }

    /// The process exited: the instance is failed for good.
    pub fn exited(&mut self) -> Health {
        self.state = Health::Failed;
        self.state
    }

    /// How long to wait before the next probe, at `now`.
    pub fn next_delay(&self, now: Instant) -> Duration {
        if self.state == Health::Starting {
            let since_start = now.saturating_duration_since(self.started);
            (since_start / 10).clamp(FIRST_PROBE, self.check.interval.max(FIRST_PROBE))
        } else {
            self.check.interval
        }
    }
}

/// One health probe of one instance.
#[async_trait]
pub trait Prober: Send + Sync {
    /// Probes once; `Err` says why the probe failed. The caller bounds it by the timeout.
    async fn probe(&self) -> Result<(), String>;
}

/// Passes when a TCP connection to the address opens.
#[derive(Debug, Clone)]
pub struct TcpProber {
    /// Where the instance listens.
    pub addr: SocketAddr,
}

#[async_trait]
impl Prober for TcpProber {
    async fn probe(&self) -> Result<(), String> {
        tokio::net::TcpStream::connect(self.addr)
            .await
            .map(drop)
            .map_err(|e| format!("connect {}: {e}", self.addr))
    }
}

/// Passes when `GET path` answers 2xx.
#[derive(Debug, Clone)]
pub struct HttpProber {
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// The path, starting with `/`.
    pub path: String,
}

#[async_trait]
impl Prober for HttpProber {
    async fn probe(&self) -> Result<(), String> {
        let status = http_get_status(self.addr, &self.path).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {} answered {status}", self.path))
        }
    }
}

/// The status of `GET path` on `addr` (HTTP/1.1, one connection, no body read).
pub async fn http_get_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake with {addr}: {e}"))?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header("user-agent", "kiln-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad health path {path:?}: {e}"))?;
    let result = sender
        .send_request(request)
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("GET {path} on {addr}: {e}"));
    driver.abort();
    result
}

/// The prober `check` asks for on `addr`: HTTP when it has a path, else TCP.
pub fn prober_for(check: &HealthCheck, addr: SocketAddr) -> Arc<dyn Prober> {
    match &check.path {
        Some(path) => Arc::new(HttpProber {
            addr,
            path: path.clone(),
        }),
        None => Arc::new(TcpProber { addr }),
    }
}

/// Whether the instance's process still runs; checked before and after every probe.
pub type Liveness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Drives `machine` with `prober` until the process exits, publishing every state change on
/// `tx`. Runs until the process exits (then publishes `failed` and returns) or the task is
/// aborted.
pub async fn monitor(
    mut machine: HealthMachine,
    prober: Arc<dyn Prober>,
    alive: Liveness,
    tx: watch::Sender<Health>,
) {
    let timeout = machine.check.timeout;
    tx.send_replace(machine.state());
    loop {
        if !alive() {
            tx.send_replace(machine.exited());
            return;
        }
        let pass = matches!(
            tokio::time::timeout(timeout, prober.probe()).await,
            Ok(Ok(()))
        );
        if !alive() {
            tx.send_replace(machine.exited());
            return;
        }
        let state = machine.record(pass, Instant::now());
        tx.send_if_modified(|s| std::mem::replace(s, state) != state);
        let delay = machine.next_delay(Instant::now());
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn check(healthy: u32, unhealthy: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck {
            path: Some("/healthz".to_owned()),
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(200),
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            start_period: Duration::from_millis(start_period_ms),
        }
    }

    /// Answers from a script; `None` hangs past any timeout; an empty script passes.
    struct Scripted {
        script: Mutex<VecDeque<Option<bool>>>,
    }

    impl Scripted {
        fn new(script: &[Option<bool>]) -> Arc<Scripted> {
            Arc::new(Scripted {
                script: Mutex::new(script.iter().copied().collect()),
            })
        }
    }

    #[async_trait]
    impl Prober for Scripted {
        async fn probe(&self) -> Result<(), String> {
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some(Some(true)) | None => Ok(()),
                Some(Some(false)) => Err("scripted failure".to_owned()),
                Some(None) => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
            }
        }
    }

    /// Runs the monitor and returns its first `count` state changes with the virtual time
    /// each happened. The first probe of each script fails so `starting` is observable
    /// (a watch channel only keeps the latest value).
    async fn transitions(
        check: HealthCheck,
        prober: Arc<dyn Prober>,
        count: usize,
    ) -> Vec<(Health, Duration)> {
        let start = Instant::now();
        let (tx, mut rx) = watch::channel(Health::Unknown);
        let task = tokio::spawn(monitor(
            HealthMachine::new(check, start),
            prober,
            Arc::new(|| true),
            tx,
        ));
        let mut seen = Vec::new();
        while seen.len() < count {
            rx.changed().await.unwrap();
            seen.push((*rx.borrow_and_update(), start.elapsed()));
        }
        task.abort();
        seen
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn machine_thresholds_and_start_period() {
        let t0 = Instant::now();
        let mut m = HealthMachine::new(check(2, 2, 1000), t0);
        // Failures inside the start period do not count.
        for _ in 0..5 {
            assert_eq!(m.record(false, t0), Health::Starting);
        }
        assert_eq!(m.record(true, t0), Health::Starting);
        assert_eq!(m.record(true, t0), Health::Healthy);
        assert_eq!(m.record(false, t0), Health::Healthy);
        assert_eq!(m.record(false, t0), Health::Unhealthy);
        assert_eq!(m.record(true, t0), Health::Unhealthy);
        assert_eq!(m.record(false, t0), Health::Unhealthy);
        assert_eq!(m.record(true, t0), Health::Unhealthy);
        assert_eq!(m.record(true, t0), Health::Healthy);
        assert_eq!(m.exited(), Health::Failed);
        assert_eq!(m.record(true, t0), Health::Failed);
    }

    #[test]
    fn starting_failures_count_after_the_start_period() {
        let t0 = Instant::now();
        let mut m = HealthMachine::new(check(1, 2, 1000), t0);
        let late = t0 + ms(1000);
        assert_eq!(m.record(false, late), Health::Starting);
        assert_eq!(m.record(false, late), Health::Unhealthy);
    }

    #[test]
    fn starting_probes_are_a_tenth_of_the_time_since_start_apart() {
        let t0 = Instant::now();
        let mut m = HealthMachine::new(check(1, 1, 60_000), t0);
        let delays: Vec<Duration> = [0, 5, 50, 1000, 10_000]
            .map(|n| m.next_delay(t0 + ms(n)))
            .to_vec();
        assert_eq!(delays, [ms(1), ms(1), ms(5), ms(100), ms(500)]);
        m.record(true, t0);
        assert_eq!(m.next_delay(t0), ms(500), "healthy: every interval");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_instance_is_healthy_after_its_first_passing_probe() {
        let seen = transitions(
            check(1, 2, 10_000),
            Scripted::new(&[Some(false), Some(false), Some(true)]),
            2,
        )
        .await;
        // Probes at 0, 1 and 2 ms: healthy at 2 ms, not one 500 ms interval later.
        assert_eq!(seen, [(Health::Starting, ms(0)), (Health::Healthy, ms(2))]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_probe_times_out_and_counts_as_a_failure() {
        let seen = transitions(
            check(1, 2, 0),
            Scripted::new(&[Some(false), Some(true), None, None]),
            3,
        )
        .await;
        // Healthy at 1 ms; then probes every 500 ms, each cut at the 200 ms timeout:
        // 501→701 and 1201→1401 make two failures in a row.
        assert_eq!(
            seen,
            [
                (Health::Starting, ms(0)),
                (Health::Healthy, ms(1)),
                (Health::Unhealthy, ms(1401)),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn goes_unhealthy_then_healthy_again() {
        let script = [
            Some(false),
            Some(true),
            Some(false),
            Some(false),
            Some(true),
        ];
        let seen = transitions(check(1, 2, 0), Scripted::new(&script), 4).await;
        assert_eq!(
            seen,
            [
                (Health::Starting, ms(0)),
                (Health::Healthy, ms(1)),
                (Health::Unhealthy, ms(1001)),
                (Health::Healthy, ms(1501)),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_exited_process_is_failed() {
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let liveness: Liveness = Arc::new(move || flag.load(Ordering::SeqCst));
        let start = Instant::now();
        let (tx, mut rx) = watch::channel(Health::Unknown);
        let task = tokio::spawn(monitor(
            HealthMachine::new(check(1, 1, 0), start),
            Scripted::new(&[]),
            liveness,
            tx,
        ));
        rx.wait_for(|h| *h == Health::Healthy).await.unwrap();
        alive.store(false, Ordering::SeqCst);
        rx.wait_for(|h| *h == Health::Failed).await.unwrap();
        // The monitor ends by itself once the process is gone.
        task.await.unwrap();
    }

    #[tokio::test]
    async fn http_and_tcp_probers_against_a_real_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let status = if req.starts_with("GET /ok ") {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let ok = HttpProber {
            addr,
            path: "/ok".to_owned(),
        };
        assert_eq!(ok.probe().await, Ok(()));
        let bad = HttpProber {
            addr,
            path: "/bad".to_owned(),
        };
        assert_eq!(bad.probe().await, Err("GET /bad answered 503".to_owned()));
        assert_eq!(TcpProber { addr }.probe().await, Ok(()));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        assert!(TcpProber { addr: closed_addr }.probe().await.is_err());
    }
}
