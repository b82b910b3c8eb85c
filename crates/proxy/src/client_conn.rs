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
//! stops there (its graceful shutdown waits for the handshake).
//!
//! Over TLS a client that offers no ALPN is served HTTP/1.1 (HTTP/2 over TLS requires ALPN,
//! RFC 9113 §3.2).

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

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
}

/// A client connection: first choosing its protocol, then served by hyper.
pub(crate) struct ClientConnection<I, S>
where
    S: HttpService<Incoming>,
{
    state: State<I, S>,
    /// Set by the service when a request arrives.
    asked: Arc<AtomicBool>,
    /// How long the first request may take.
    first_request_timeout: Duration,
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
    /// `asked` is set by `service` when a request arrives.
    pub(crate) fn new(
        io: I,
        service: S,
        builders: Builders,
        asked: Arc<AtomicBool>,
    ) -> ClientConnection<I, S> {
        ClientConnection {
            first_request_timeout: builders.first_request_timeout,
            state: State::Choosing {
                io: Some(io),
                service: Some(service),
                builders,
            },
            asked,
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
        let asked = this.asked.load(Ordering::Relaxed);
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
                State::Http2(connection) => {
                    if !asked
                        && expired(&mut this.deadline, this.first_request_timeout, cx).is_ready()
                    {
                        return Poll::Ready(Err(NO_FIRST_REQUEST.into()));
                    }
                    return Pin::new(&mut **connection).poll(cx).map_err(Into::into);
                }
            }
        }
    }
}

const NO_FIRST_REQUEST: &str = "no request before the header read timeout";

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
    /// HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY; a connection that
    /// has not had a request yet closes (HTTP/2's graceful shutdown would wait for a handshake
    /// the client may never finish).
    fn finish(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            _ if !this.asked.load(Ordering::Relaxed) => this.finishing = true,
            State::Choosing { .. } => this.finishing = true,
            State::Http1(connection) => Pin::new(connection).graceful_shutdown(),
            State::Http2(connection) => Pin::new(&mut **connection).graceful_shutdown(),
        }
    }
}
