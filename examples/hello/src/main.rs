//! `hello`: the example app that kiln builds, tests and rolls out in its demo and its tests.
//!
//! It listens on `$PORT` (default 8080) on every address (`$HOST` to narrow it) and answers:
//!
//! - `GET /` with `hello from <version>` where the version is `$HELLO_VERSION` (default `v1`);
//! - `GET /healthz` with `ok` (or 503 when `HELLO_NEVER_HEALTHY=1`);
//! - `GET /version` with just the version;
//! - `GET /request-id` with the `X-Request-Id` it was sent (empty when none), to show what
//!   kiln's router passes on;
//! - `POST /write?path=P` by writing a file at `P` (200), or why it cannot (500): a sealed
//!   instance or machine image writes only under its `writable` paths.
//!
//! Knobs that later rollout tests turn, all read once at start:
//!
//! - `HELLO_FAIL_RATE=0.2`: answer that fraction of `/` requests with a 500, spread evenly
//!   (request n fails when `floor(n * rate)` grows), so a 20% failure is exactly 20%.
//! - `HELLO_LATENCY_MS=200`: wait that long before answering `/`.
//! - `HELLO_NEVER_HEALTHY=1`: `/healthz` always answers 503.
//! - `HELLO_STARTUP_DELAY_MS=500`: wait that long before listening.
//! - `HELLO_PAGE=/www/page.txt`: answer `/` with that file's content, read at start (a file
//!   of the image that a test can tell apart from a tampered copy).
//!
//! `hello migrate` is a one-shot stand-in for a schema migration (kiln's `[deploy.migrate]`):
//! it prints what it did and exits 0, or exits 1 when `HELLO_MIGRATION_FAILS=1`; it takes
//! `HELLO_MIGRATION_MS` milliseconds first when that is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the app was told by its environment.
struct Knobs {
    version: String,
    fail_rate: f64,
    latency: Duration,
    never_healthy: bool,
    startup_delay: Duration,
    page: Option<Bytes>,
}

impl Knobs {
    fn from_env() -> Result<Knobs, String> {
        let version = std::env::var("HELLO_VERSION").unwrap_or_else(|_| "v1".to_owned());
        let fail_rate = match std::env::var("HELLO_FAIL_RATE") {
            Ok(s) => match s.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(format!(
                        "HELLO_FAIL_RATE must be between 0 and 1, got {s:?}"
                    ));
                }
            },
            Err(_) => 0.0,
        };
        Ok(Knobs {
            version,
            fail_rate,
            latency: Duration::from_millis(env_u64("HELLO_LATENCY_MS")?),
            never_healthy: std::env::var("HELLO_NEVER_HEALTHY").is_ok_and(|v| v == "1"),
            startup_delay: Duration::from_millis(env_u64("HELLO_STARTUP_DELAY_MS")?),
            page: match std::env::var("HELLO_PAGE") {
                Ok(path) => Some(
                    std::fs::read(&path)
                        .map_err(|e| format!("cannot read HELLO_PAGE {path}: {e}"))?
                        .into(),
                ),
                Err(_) => None,
            },
        })
    }
}

fn env_u64(name: &str) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .map_err(|_| format!("{name} must be a whole number, got {s:?}")),
        Err(_) => Ok(0),
    }
}

/// Shared by every connection.
struct App {
    knobs: Knobs,
    served: AtomicU64,
}

impl App {
    /// Whether request number `n` (1-based) of `/` is one of the failing fraction.
    fn should_fail(&self, n: u64) -> bool {
        let rate = self.knobs.fail_rate;
        // Precision is fine: the counts stay far below 2^52.
        #[allow(clippy::cast_precision_loss)]
        let (now, before) = ((n as f64 * rate).floor(), ((n - 1) as f64 * rate).floor());
        now > before
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") if self.knobs.never_healthy => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "never healthy\n".to_owned(),
            ),
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".to_owned()),
            (&Method::GET | &Method::HEAD, "/version") => {
                text(StatusCode::OK, format!("{}\n", self.knobs.version))
            }
            (&Method::GET | &Method::HEAD, "/request-id") => {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                text(StatusCode::OK, format!("{id}\n"))
            }
            // Tries to write a file: how a test shows that a sealed instance or machine
            // image keeps its root read-only and only its `writable` paths writable.
            (&Method::POST, "/write") => {
                let path = req
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("path="))
                    .unwrap_or("");
                match std::fs::write(path, b"written by hello\n") {
                    Ok(()) => text(StatusCode::OK, format!("wrote {path}\n")),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot write {path}: {e}\n"),
                    ),
                }
            }
            (_, "/") => {
                let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
                if !self.knobs.latency.is_zero() {
                    tokio::time::sleep(self.knobs.latency).await;
                }
                if self.should_fail(n) {
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("injected failure from {}\n", self.knobs.version),
                    )
                } else if let Some(page) = &self.knobs.page {
                    let mut resp = Response::new(Full::new(page.clone()));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    resp
                } else {
                    text(
                        StatusCode::OK,
                        format!("hello from {}\n", self.knobs.version),
                    )
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("migrate") {
        return migrate();
    }
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::FAILURE
        }
    }
}

fn migrate() -> ExitCode {
    let version = std::env::var("HELLO_VERSION").unwrap_or_else(|_| "v1".to_owned());
    if let Some(ms) = std::env::var("HELLO_MIGRATION_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if std::env::var("HELLO_MIGRATION_FAILS").is_ok_and(|v| v == "1") {
        eprintln!("hello {version}: migration failed: column \"greeting\" already exists");
        return ExitCode::FAILURE;
    }
    println!("hello {version}: schema migrated");
    ExitCode::SUCCESS
}

async fn serve() -> Result<(), String> {
    let knobs = Knobs::from_env()?;
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| format!("PORT must be a port number, got {p:?}"))?,
        Err(_) => 8080,
    };
    let host = std::env::var("HOST").unwrap_or_else(|_| "0.0.0.0".to_owned());
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|_| format!("HOST must be an IP address, got {host:?}"))?;
    if !knobs.startup_delay.is_zero() {
        tokio::time::sleep(knobs.startup_delay).await;
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    eprintln!("hello {} listening on {addr}", knobs.version);
    let app = Arc::new(App {
        knobs,
        served: AtomicU64::new(0),
    });

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("hello: accept failed: {e}");
                    continue;
                }
            },
            _ = sigterm.recv() => {
                eprintln!("hello: SIGTERM, exiting");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            // A client that hangs up mid-request is not this server's error to report.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(rate: f64) -> App {
        App {
            knobs: Knobs {
                version: "t".into(),
                fail_rate: rate,
                latency: Duration::ZERO,
                never_healthy: false,
                startup_delay: Duration::ZERO,
                page: None,
            },
            served: AtomicU64::new(0),
        }
    }

    #[test]
    fn fail_rate_is_exact_over_whole_periods() {
        for (rate, n, want) in [
            (0.2, 1000, 200),
            (0.0, 1000, 0),
            (1.0, 50, 50),
            (0.01, 300, 3),
        ] {
            let a = app(rate);
            let failed = (1..=n).filter(|&i| a.should_fail(i)).count();
            assert_eq!(failed, want, "rate {rate} over {n}");
        }
    }
}
