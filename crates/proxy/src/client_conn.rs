//! A client connection served as HTTP/1.1 or HTTP/2. Over TLS, ALPN says which; on plain TCP
//! the first bytes do (the HTTP/2 connection preface, for h2c with prior knowledge). They are
//! peeked at, not read, so HTTP/1.1 reads its first request straight from the socket.
//!
//! hyper-util's `auto` server did this by reading the first 24 bytes into a buffer of its own
//! and replaying them through a wrapper on every later read. Measured on connection-per-request
//! load (`wrk -H "Connection: close"`, 1 router thread), the router's CPU per request went from
//! 23.6–24.2 to 22.0–22.7 µs without it.
//!
//! Until its first request arrives a connection has its listener's header read timeout, and a
//! graceful shutdown closes it: hyper's HTTP/1.1 timer starts only once the protocol is known
//! (so a first head may take up to twice the timeout: the wait for its first byte, then
//! hyper's), and its HTTP/2 server has none for a client that opens with the preface and
//! stops there.
//!
//! An HTTP/2 connection is also sent GOAWAY once no request has been open for the header read
//! timeout, as nginx's `keepalive_timeout` does (HTTP/1.1 needs nothing of ours: hyper's
//! header read timer bounds the wait for the next request). A request is open from its arrival
//! until its response body is sent whole or dropped ([`Activity`]), so a long server-sent
//! event stream keeps its connection.
//!
//! An HTTP/2 connection that is told to go (idle, no first request in time, or its listener
//! stopping) is sent GOAWAY, so that its client knows which requests were taken, and is
//! closed once no request has been open for [`GOAWAY_GRACE`]: hyper's graceful shutdown ends
//! it only when the client acknowledges the PING sent with GOAWAY (and waits for the
//! handshake first), which a gone or frozen client never does.
//!
//! Over TLS a client that offers no ALPN is served HTTP/1.1 (HTTP/2 over TLS requires ALPN,
//! RFC 9113 §3.2).

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::Version;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::access_log::Pending;
use crate::batch::Socket;
use crate::closing::Finish;

/// The HTTP/2 connection preface a client with prior knowledge opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many bytes of the preface tell HTTP/2 from an HTTP/1.1 request line: `PRI ` is no
/// HTTP/1.1 method (RFC 9113 reserves it for the preface). Clients send the preface in one
/// write, so its first segment holds at least this much.
const PREFACE_DECIDES: usize = 4;

/// The protocol a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    Http2,
}

/// A transport that can tell which protocol its client speaks.
pub(crate) trait ChooseProtocol {
    /// Ready once the protocol is known; registers `cx` otherwise.
    fn poll_protocol(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Protocol>>;
}

impl ChooseProtocol for Socket {
    /// By the first bytes (peeked): the HTTP/2 preface, or anything else for HTTP/1.1. A
    /// client that closes without a byte is HTTP/1.1 (hyper sees it leave).
    fn poll_protocol(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Protocol>> {
        let mut first = [0_u8; PREFACE_DECIDES];
        let mut buf = ReadBuf::new(&mut first);
        let n = ready!(self.poll_peek(cx, &mut buf))?;
        let first = buf.filled();
        Poll::Ready(Ok(
            if n == PREFACE_DECIDES && H2_PREFACE.starts_with(first) {
                Protocol::Http2
            } else {
                Protocol::Http1
            },
        ))
    }
}

impl ChooseProtocol for tokio_rustls::server::TlsStream<Socket> {
    /// By ALPN: `h2`, or HTTP/1.1 for `http/1.1` and for a client that offered none.
    fn poll_protocol(&mut self, _: &mut Context<'_>) -> Poll<io::Result<Protocol>> {
        let h2 = self.get_ref().1.alpn_protocol() == Some(b"h2");
        Poll::Ready(Ok(if h2 { Protocol::Http2 } else { Protocol::Http1 }))
    }
}

/// How a listener serves its connections, once their protocol is known.
#[derive(Clone)]
pub(crate) struct Builders {
    pub(crate) http1: http1::Builder,
    pub(crate) http2: Arc<http2::Builder<TokioExecutor>>,
    /// How long the first request may take to arrive.
    pub(crate) first_request_timeout: Duration,
    /// How long an HTTP/2 connection may go without an open stream.
    pub(crate) idle_timeout: Duration,
}

/// What a client connection's requests are doing: shared by its service, which notes each
/// request ([`Activity::start`]), and the connection, which closes when they stop coming.
pub(crate) struct Activity {
    /// Whence `last_end_ms` counts.
    epoch: Instant,
    /// Set when the first request arrives.
    asked: AtomicBool,
    /// Requests whose response has not been sent whole (or dropped) yet.
    open: AtomicUsize,
    /// When the last of them ended, in milliseconds since `epoch`.
    last_end_ms: AtomicU64,
    /// HTTP/2 requests that arrived.
    started: AtomicU64,
    /// Requests that arrived, either protocol.
    requests: AtomicU64,
    /// HTTP/2 requests dropped before their response head was given (the client reset the
    /// stream while the router was forwarding it).
    cancelled: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            asked: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            started: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        })
    }

    /// Whether a request has arrived.
    pub(crate) fn asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }

    /// A request arrived. An HTTP/2 one stays open until the returned guard, which goes with
    /// its response body ([`Tracked`]), is dropped; HTTP/1.1 needs none (hyper's header read
    /// timer bounds its idle connections), and its hot path is spared the clock read.
    pub(crate) fn start(self: &Arc<Activity>, version: Version) -> Option<OpenRequest> {
        if !self.asked() {
            self.asked.store(true, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        if version != Version::HTTP_2 {
            return None;
        }
        self.open.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::Relaxed);
        Some(OpenRequest {
            activity: Arc::clone(self),
            answered: false,
        })
    }

    /// How many requests have arrived.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Whether the connection speaks HTTP/2 (known once a request arrived).
    pub(crate) fn http2(&self) -> bool {
        self.started.load(Ordering::Relaxed) > 0
    }

    /// Whether an HTTP/2 connection has served its [`MAX_HTTP2_REQUESTS`].
    fn served_enough(&self) -> bool {
        self.started.load(Ordering::Relaxed) >= MAX_HTTP2_REQUESTS
    }

    /// Whether an HTTP/2 client resets most of the requests the router is forwarding: the
    /// "rapid reset" of CVE-2023-44487 once streams are accepted, where each reset request
    /// costs an instance connection. At least [`RESETS_TOLERATED`] resets, and more than half
    /// of the requests (after Envoy's premature-reset rule, which also looks at the share).
    fn resets_too_many(&self) -> bool {
        let started = self.started.load(Ordering::Relaxed);
        let cancelled = self.cancelled.load(Ordering::Relaxed);
        cancelled >= RESETS_TOLERATED && cancelled * 2 > started
    }

    /// How long no request has been open: `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.open.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.last_end_ms.load(Ordering::SeqCst));
        Some(
            Instant::now()
                .duration_since(self.epoch)
                .saturating_sub(since),
        )
    }
}

/// How many requests one HTTP/2 connection serves before it is sent GOAWAY (nginx's
/// `keepalive_requests`): a client opens a new connection, and no connection lives for ever.
const MAX_HTTP2_REQUESTS: u64 = 1000;

/// How many requests an HTTP/2 client may reset before its answer before the router looks
/// at the share of them.
const RESETS_TOLERATED: u64 = 100;

/// A request counted open in its connection's [`Activity`] until this is dropped.
pub(crate) struct OpenRequest {
    activity: Arc<Activity>,
    /// Its response head was given: set when it goes with its body ([`Tracked`]).
    answered: bool,
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let activity = &self.activity;
        if !self.answered {
            activity.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        let ms = u64::try_from(Instant::now().duration_since(activity.epoch).as_millis())
            .unwrap_or(u64::MAX);
        // `fetch_max`: ends that race must not move it back.
        activity.last_end_ms.fetch_max(ms, Ordering::SeqCst);
        activity.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request open (if it is counted) until it is sent whole or
/// dropped, and counts the bytes sent for its access log line (if it is logged), which is
/// written when it is dropped.
pub(crate) struct Tracked<B> {
    body: B,
    _open: Option<OpenRequest>,
    logged: Option<Box<Pending>>,
}

impl<B> Tracked<B> {
    pub(crate) fn new(
        body: B,
        mut open: Option<OpenRequest>,
        logged: Option<Box<Pending>>,
    ) -> Tracked<B> {
        if let Some(open) = &mut open {
            open.answered = true;
        }
        Tracked {
            body,
            _open: open,
            logged,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Some(logged) = &mut this.logged
            && let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            logged.sent(data.len());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client connection: first choosing its protocol, then served by hyper.
pub(crate) struct ClientConnection<I, S>
where
    S: HttpService<Incoming>,
{
    state: State<I, S>,
    /// What the service notes of the connection's requests.
    activity: Arc<Activity>,
    /// How long the first request may take.
    first_request_timeout: Duration,
    /// How long an HTTP/2 connection may go without an open request.
    idle_timeout: Duration,
    /// HTTP/2, once a request arrived: when to look whether the connection has gone quiet
    /// (for the idle timeout, then, once GOAWAY is sent, for [`GOAWAY_GRACE`]).
    quiet_check: Option<Pin<Box<Sleep>>>,
    /// HTTP/2: it was sent GOAWAY.
    goaway_sent: bool,
    /// Until the first request, once waiting started: closed when it passes (see the
    /// module's doc). HTTP/1.1 needs none once chosen: hyper's header read timer runs.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Asked to finish before the first request: close.
    finishing: bool,
}

// A connection spends its life in `Http1` (or `Http2`), and its caller boxes it whole: a
// smaller `Choosing` would save nothing.
#[allow(clippy::large_enum_variant)]
enum State<I, S>
where
    S: HttpService<Incoming>,
{
    Choosing {
        /// Both always there while choosing; taken together when the protocol is known.
        io: Option<I>,
        service: Option<S>,
        builders: Builders,
    },
    Http1(http1::UpgradeableConnection<TokioIo<I>, S>),
    /// Boxed: twice the size of an HTTP/1.1 connection, and long-lived where HTTP/1.1 ones
    /// may be one request each.
    Http2(Box<http2::Connection<TokioIo<I>, S, TokioExecutor>>),
}

impl<I, S> ClientConnection<I, S>
where
    S: HttpService<Incoming>,
{
    /// `service` notes each request in `activity`.
    pub(crate) fn new(
        io: I,
        service: S,
        builders: Builders,
        activity: Arc<Activity>,
    ) -> ClientConnection<I, S> {
        ClientConnection {
            first_request_timeout: builders.first_request_timeout,
            idle_timeout: builders.idle_timeout,
            quiet_check: None,
            goaway_sent: false,
            state: State::Choosing {
                io: Some(io),
                service: Some(service),
                builders,
            },
            activity,
            deadline: None,
            finishing: false,
        }
    }
}

impl<I, S, B> Future for ClientConnection<I, S>
where
    I: ChooseProtocol + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Output = Result<(), Box<dyn StdError + Send + Sync>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.finishing {
            return Poll::Ready(Ok(()));
        }
        let asked = this.activity.asked();
        if asked {
            // Served a request: from now on hyper's timers and the drain timeout apply.
            this.deadline = None;
        }
        let state = &mut this.state;
        loop {
            match state {
                State::Choosing {
                    io,
                    service,
                    builders,
                } => {
                    let Some(transport) = io.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    let Poll::Ready(protocol) = transport.poll_protocol(cx) else {
                        return expired(&mut this.deadline, this.first_request_timeout, cx);
                    };
                    let (Some(transport), Some(service)) = (io.take(), service.take()) else {
                        return Poll::Ready(Ok(()));
                    };
                    let transport = TokioIo::new(transport);
                    *state = match protocol? {
                        Protocol::Http1 => {
                            // hyper's header read timer takes over.
                            this.deadline = None;
                            State::Http1(
                                builders
                                    .http1
                                    .serve_connection(transport, service)
                                    .with_upgrades(),
                            )
                        }
                        Protocol::Http2 => State::Http2(Box::new(
                            builders.http2.serve_connection(transport, service),
                        )),
                    };
                }
                State::Http1(connection) => {
                    return Pin::new(connection).poll(cx).map_err(Into::into);
                }
                State::Http2(_) => {
                    if this.activity.resets_too_many() {
                        // Closed at once, as Envoy does: a graceful GOAWAY takes new streams
                        // until the client acknowledges its PING, which this one need not do.
                        return Poll::Ready(Err(TOO_MANY_RESETS.into()));
                    }
                    if !this.goaway_sent {
                        let tell = if this.activity.served_enough() {
                            true
                        } else if asked {
                            went_quiet(&mut this.quiet_check, &this.activity, this.idle_timeout, cx)
                        } else {
                            expired(&mut this.deadline, this.first_request_timeout, cx).is_ready()
                        };
                        if tell {
                            // Idle, or no first request in time: GOAWAY (hyper sends it once
                            // the handshake is done), so the client knows which requests were
                            // taken and opens its next one on a new connection.
                            this.go_away();
                        }
                    }
                    if this.goaway_sent
                        && went_quiet(&mut this.quiet_check, &this.activity, GOAWAY_GRACE, cx)
                    {
                        return Poll::Ready(Err(GOAWAY_UNANSWERED.into()));
                    }
                    let State::Http2(connection) = &mut this.state else {
                        return Poll::Ready(Ok(()));
                    };
                    return Pin::new(&mut **connection).poll(cx).map_err(Into::into);
                }
            }
        }
    }
}

impl<I, S, B> ClientConnection<I, S>
where
    I: ChooseProtocol + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    /// HTTP/2: sends GOAWAY (once), and starts the [`GOAWAY_GRACE`] after which a connection
    /// with nothing open is closed.
    fn go_away(&mut self) {
        if let State::Http2(connection) = &mut self.state
            && !self.goaway_sent
        {
            self.goaway_sent = true;
            self.quiet_check = None;
            Pin::new(&mut **connection).graceful_shutdown();
        }
    }
}

const NO_FIRST_REQUEST: &str = "no request before the header read timeout";

const GOAWAY_UNANSWERED: &str = "sent GOAWAY, and not closed by the client in time";

const TOO_MANY_RESETS: &str = "the client reset most of its requests";

/// How long an HTTP/2 connection sent GOAWAY, with no request open, is left to end by itself
/// before it is closed. hyper's graceful shutdown ends it once the client acknowledges the
/// PING sent with GOAWAY (an exchange of a round trip), and waits for the handshake first: a
/// client that never answers (gone, frozen, or hostile) would hold it forever.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// Whether no request has been open for `timeout`: looked at when `check` (armed on first
/// use) fires, which is then set for the soonest time it could be.
fn went_quiet(
    check: &mut Option<Pin<Box<Sleep>>>,
    activity: &Activity,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> bool {
    let sleep = check.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
    while sleep.as_mut().poll(cx).is_ready() {
        let next = match activity.idle_for() {
            Some(idle) if idle >= timeout => return true,
            Some(idle) => timeout - idle,
            None => timeout,
        };
        sleep.as_mut().reset(Instant::now() + next);
    }
    false
}

/// Pending until the first request's deadline (armed on first use) passes, then an error.
fn expired(
    deadline: &mut Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Box<dyn StdError + Send + Sync>>> {
    let deadline = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
    ready!(deadline.as_mut().poll(cx));
    Poll::Ready(Err(NO_FIRST_REQUEST.into()))
}

impl<I, S, B> Finish for ClientConnection<I, S>
where
    I: ChooseProtocol + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    /// HTTP/1.1 closes after the current response, or at once if it has not had a request
    /// yet; HTTP/2 sends GOAWAY, and closes once its requests are done (or [`GOAWAY_GRACE`]
    /// after that, if its client does not end it).
    fn finish(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            State::Http2(_) => this.go_away(),
            _ if !this.activity.asked() => this.finishing = true,
            State::Choosing { .. } => this.finishing = true,
            State::Http1(connection) => Pin::new(connection).graceful_shutdown(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_from_the_end_of_its_last_open_request() {
        let activity = Activity::new();
        assert!(!activity.asked());
        assert!(activity.start(Version::HTTP_11).is_none());
        assert!(activity.asked());
        assert_eq!(activity.idle_for(), Some(Duration::ZERO));
        let (first, second) = (
            activity.start(Version::HTTP_2),
            activity.start(Version::HTTP_2),
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(activity.idle_for(), None);
        drop(first);
        assert_eq!(activity.idle_for(), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(second);
        assert_eq!(activity.idle_for(), Some(Duration::ZERO));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(activity.idle_for(), Some(Duration::from_secs(3)));
    }

    #[tokio::test]
    async fn a_connection_has_had_enough_after_many_resets_or_its_request_cap() {
        let answer = |activity: &Arc<Activity>| {
            drop(Tracked::new((), activity.start(Version::HTTP_2), None));
        };
        let reset = |activity: &Arc<Activity>| drop(activity.start(Version::HTTP_2));
        // 99 resets among 99 requests: tolerated; the 100th is not.
        let activity = Activity::new();
        (0..99).for_each(|_| reset(&activity));
        assert!(!activity.resets_too_many());
        reset(&activity);
        assert!(activity.resets_too_many());
        // As many resets, but not the most of the requests: a client that cancels some.
        let activity = Activity::new();
        (0..150).for_each(|_| answer(&activity));
        (0..150).for_each(|_| reset(&activity));
        assert!(!activity.resets_too_many());
        // HTTP/1.1 requests are not counted.
        let activity = Activity::new();
        (0..MAX_HTTP2_REQUESTS).for_each(|_| drop(activity.start(Version::HTTP_11)));
        assert!(!activity.served_enough());
        (0..MAX_HTTP2_REQUESTS).for_each(|_| answer(&activity));
        assert!(activity.served_enough() && !activity.resets_too_many());
    }
}
