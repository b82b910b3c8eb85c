//! Shared by the router's end-to-end tests: in-process backends (small hyper servers), a
//! router on a real socket, a keep-alive client, and `wrk` as the load generator.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kiln_proxy::{App, AppConfig, Listener, ListenerConfig, Serving, Workers, WorkersConfig};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

pub type BoxBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(text: impl Into<Bytes>) -> BoxBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An in-process backend. Paths:
/// - `/` answers its name; `/slow` waits 2 ms first;
/// - `/headers` answers the request headers, one `name: value` per line;
/// - `/drip` streams 100,000 chunks of 100 bytes of `x` as fast as they are taken;
/// - `/sse` sends one event, waits for [`Backend::sse_next`], sends a second, ends;
/// - `/upload` counts the request body into [`Backend::received`] and answers the count;
/// - `/hang` never answers;
/// - `/reject` answers 413 at once without reading the request body;
/// - an `Upgrade` request gets 101 and an echo of every byte.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub served: Arc<AtomicU64>,
    pub served_notify: Arc<Notify>,
    pub received: Arc<AtomicU64>,
    pub sse_next: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let served_notify = Arc::new(Notify::new());
        let received = Arc::new(AtomicU64::new(0));
        let sse_next = Arc::new(Semaphore::new(0));
        let state = Arc::new(State {
            name: name.to_owned(),
            served: Arc::clone(&served),
            served_notify: Arc::clone(&served_notify),
            received: Arc::clone(&received),
            sse_next: Arc::clone(&sse_next),
        });
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the task closes every one of them.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(state.handle(req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Backend {
            addr,
            name: name.to_owned(),
            served,
            served_notify,
            received,
            sse_next,
            task,
        }
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Waits until this backend has served more than `than` requests.
    pub async fn served_more_than(&self, than: u64) {
        loop {
            let notified = self.served_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.served() > than {
                return;
            }
            notified.await;
        }
    }

    /// Stops listening and closes every connection, as a stopped instance would.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    name: String,
    served: Arc<AtomicU64>,
    served_notify: Arc<Notify>,
    received: Arc<AtomicU64>,
    sse_next: Arc<Semaphore>,
}

impl State {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<BoxBody> {
        let response = if req.headers().contains_key(hyper::header::UPGRADE) {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(full(""))
                .unwrap()
        } else {
            match req.uri().path() {
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Response::new(full(format!("{}\n", self.name)))
                }
                "/headers" => {
                    let mut text = String::new();
                    for (k, v) in req.headers() {
                        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                    }
                    Response::new(full(text))
                }
                "/sse" => {
                    let next = Arc::clone(&self.sse_next);
                    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
                    tokio::spawn(async move {
                        let _ = tx.send(Bytes::from("data: one\n\n")).await;
                        let _permit = next.acquire().await;
                        let _ = tx.send(Bytes::from("data: two\n\n")).await;
                    });
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(ChannelBody(rx).boxed())
                        .unwrap()
                }
                "/drip" => {
                    // Many small chunks, as fast as they are taken: 100,000 × 100 bytes of 'x'.
                    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
                    tokio::spawn(async move {
                        for _ in 0..100_000 {
                            if tx.send(Bytes::from(vec![b'x'; 100])).await.is_err() {
                                return;
                            }
                        }
                    });
                    Response::new(ChannelBody(rx).boxed())
                }
                "/upload" => {
                    let mut body = req.into_body();
                    let mut total = 0_u64;
                    while let Some(frame) = body.frame().await {
                        let Ok(frame) = frame else { break };
                        if let Some(data) = frame.data_ref() {
                            total += data.len() as u64;
                            self.received.fetch_add(data.len() as u64, Ordering::SeqCst);
                        }
                    }
                    Response::new(full(format!("{total}\n")))
                }
                "/hang" => std::future::pending().await,
                "/reject" => Response::builder()
                    .status(StatusCode::PAYLOAD_TOO_LARGE)
                    .body(full("rejected\n"))
                    .unwrap(),
                _ => Response::new(full(format!("{}\n", self.name))),
            }
        };
        self.served.fetch_add(1, Ordering::SeqCst);
        self.served_notify.notify_waiters();
        response
    }
}

/// A response body fed by a channel, one frame per message.
pub struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// A router on 127.0.0.1 with `apps`, served as the daemon serves it (a router thread of its
/// own, with batched writes) until the returned handle is dropped.
pub struct Router {
    pub addr: SocketAddr,
    _serving: Serving,
    _threads: Workers,
}

pub async fn router(apps: Vec<Arc<App>>) -> Router {
    router_with(ListenerConfig::new("127.0.0.1:0".parse().unwrap()), apps).await
}

pub async fn router_with(config: ListenerConfig, apps: Vec<Arc<App>>) -> Router {
    let listener = Listener::bind(config, apps).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let threads = Workers::start(WorkersConfig {
        threads: 1,
        pin: false,
    })
    .unwrap();
    let serving = threads.serve(listener).unwrap();
    Router {
        addr,
        _serving: serving,
        _threads: threads,
    }
}

pub fn app(name: &str) -> AppConfig {
    AppConfig::new(name)
}

/// One keep-alive HTTP/1.1 client connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<BoxBody>,
    pub host: String,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client {
            sender,
            host: "app.example".to_owned(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send(Request::get(path), full("")).await
    }

    pub async fn send(&mut self, builder: hyper::http::request::Builder, body: BoxBody) -> Reply {
        let builder = if builder
            .headers_ref()
            .is_some_and(|h| h.contains_key("host"))
        {
            builder
        } else {
            builder.header("host", self.host.as_str())
        };
        self.sender.ready().await.unwrap();
        let response = self
            .sender
            .send_request(builder.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of `total` bytes sent in `chunk`-byte frames, counting what it has produced.
pub struct CountingBody {
    pub left: u64,
    pub chunk: Bytes,
    pub sent: Arc<AtomicU64>,
    /// Called after each frame with the bytes produced so far.
    pub on_frame: Box<dyn FnMut(u64) + Send + Sync>,
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        let data = self.chunk.slice(..usize::try_from(n).unwrap());
        let total = self.sent.fetch_add(n, Ordering::SeqCst) + n;
        (self.on_frame)(total);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// `wrk` running against a URL until [`Wrk::stop`].
pub struct Wrk {
    child: Child,
}

/// What `wrk` reported.
#[derive(Debug)]
pub struct WrkReport {
    pub requests: u64,
    pub non_2xx_3xx: u64,
    pub socket_errors: u64,
    pub output: String,
}

impl Wrk {
    /// Starts `wrk` with `connections` connections for at most five minutes.
    pub fn start(url: &str, connections: u32) -> Wrk {
        let child = Command::new("wrk")
            .args([
                "-t1",
                &format!("-c{connections}"),
                "-d300s",
                "--timeout",
                "10s",
                url,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("wrk must be installed (apt-get install -y wrk)");
        Wrk { child }
    }

    /// Interrupts `wrk` (it prints its summary on SIGINT) and parses the summary.
    pub fn stop(mut self) -> WrkReport {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let output = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        parse_wrk(&text)
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_wrk(text: &str) -> WrkReport {
    let number_after = |line: &str, label: &str| -> Option<u64> {
        let rest = line.split(label).nth(1)?;
        rest.trim()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let mut report = WrkReport {
        requests: 0,
        non_2xx_3xx: 0,
        socket_errors: 0,
        output: text.to_owned(),
    };
    let mut found_requests = false;
    for line in text.lines() {
        let line = line.trim();
        if line.contains(" requests in ") {
            report.requests = line.split_whitespace().next().unwrap().parse().unwrap();
            found_requests = true;
        }
        if line.starts_with("Non-2xx or 3xx responses:") {
            report.non_2xx_3xx = number_after(line, ":").unwrap();
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            report.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        }
    }
    assert!(found_requests, "wrk printed no summary:\n{text}");
    report
}

/// Reads from `stream` until a whole request head (up to its blank line) has arrived; false
/// if the peer closed or failed first. Bytes past the head are read with it and dropped.
pub async fn read_head(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0_u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}
