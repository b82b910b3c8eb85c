//! A listen address: accepting connections, terminating TLS, speaking HTTP/1.1 and HTTP/2 to
//! clients, and handing each request to the app its host names.
//!
//! The apps on a listener are fixed when it is bound; their route tables change freely.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::access_log;
use crate::app::App;
use crate::batch::{ClientWatch, Socket};
use crate::client_conn::{Activity, Builders, ChooseProtocol, ClientConnection, Tracked};
use crate::closing::{Closing, Finish};
use crate::config::{ListenerConfig, TlsFiles};
use crate::conn_timer::ConnectionTimer;
use crate::error::{ConfigError, ListenerError};
use crate::forward::{self, Routed, Shared};
use crate::hosts::HostTable;
use crate::peer::Peer;
use crate::request_id;
use crate::spread::{Counted, Group, Handed, Membership};

/// A bound listen address serving its apps.
pub struct Listener {
    /// Registered with a runtime only when served, so that a copy ([`Listener::try_clone`])
    /// can be served on another thread's runtime. Taken by `serve`, which closes it as soon
    /// as it stops accepting.
    tcp: Option<std::net::TcpListener>,
    /// The copies of this listener, to spread connections over their threads.
    group: Arc<Group>,
    /// This copy's place in `group`, when joined before it is served (by `Workers::serve`,
    /// for all copies at once); else it joins when served.
    membership: Option<Membership>,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    header_read_timeout: Duration,
    max_header_bytes: usize,
    /// How HTTP/2 connections are served (shared: unlike HTTP/1.1's, its timer is not per
    /// connection).
    http2: Arc<hyper::server::conn::http2::Builder<TokioExecutor>>,
}

impl Listener {
    /// Validates the apps' host names against each other, loads the TLS files if any, and
    /// binds the address. Nothing is served until [`Listener::serve`].
    pub async fn bind(
        config: ListenerConfig,
        apps: Vec<Arc<App>>,
    ) -> Result<Listener, ListenerError> {
        Listener::build(config, apps, None)
    }

    /// As [`Listener::bind`], on `socket`, a copy of the listening socket of another listener
    /// on `config.listen` ([`Listener::socket_copy`], taken before that one was served): the
    /// way to change the apps on a live address. The socket is never closed in between, so
    /// no connection queued on it or arriving is refused, and the old listener, stopped,
    /// serves what it accepted. (A new socket bound beside the old one with `SO_REUSEPORT`
    /// lost the connections the kernel had queued on the old one when it closed: 1 in
    /// ~7,000 one-shot connections across a rebind, in a test.)
    pub async fn bind_to(
        config: ListenerConfig,
        apps: Vec<Arc<App>>,
        socket: std::net::TcpListener,
    ) -> Result<Listener, ListenerError> {
        Listener::build(config, apps, Some(socket))
    }

    fn build(
        config: ListenerConfig,
        apps: Vec<Arc<App>>,
        socket: Option<std::net::TcpListener>,
    ) -> Result<Listener, ListenerError> {
        if apps.is_empty() {
            return Err(ConfigError::NoApps {
                listen: config.listen,
            }
            .into());
        }
        let max_header_bytes = apps
            .iter()
            .map(|a| a.config().max_header_bytes)
            .max()
            .unwrap_or_default();
        if let Some(app) = apps.iter().find(|a| a.config().max_header_bytes < 8192) {
            return Err(ConfigError::HeaderLimitTooSmall {
                app: app.name().to_owned(),
                got: app.config().max_header_bytes,
            }
            .into());
        }
        let hosts = HostTable::build(apps.iter().map(|a| (a.name(), a.config().hosts.as_slice())))?;
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let tcp = match socket {
            Some(socket) => Ok(socket),
            None => bind(config.listen, config.reuse_port, config.send_timeout),
        }
        .map_err(|source| ListenerError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Listener {
            tcp: Some(tcp),
            group: Arc::default(),
            membership: None,
            shared: Arc::new(Shared {
                apps,
                hosts,
                scheme: if tls.is_some() { "https" } else { "http" },
                access_log: config.access_log.clone(),
            }),
            tls,
            header_read_timeout: config.header_read_timeout,
            max_header_bytes,
            http2: Arc::new(http2_builder(max_header_bytes)),
        })
    }

    /// The bound address (useful when binding port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket()?.local_addr()
    }

    /// A copy of the listening socket, for [`Listener::bind_to`] (before this one is served).
    pub fn socket_copy(&self) -> std::io::Result<std::net::TcpListener> {
        self.socket()?.try_clone()
    }

    fn socket(&self) -> std::io::Result<&std::net::TcpListener> {
        self.tcp
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the listener's socket has been served"))
    }

    /// Another listener on the same socket and apps, to serve on another thread (on a
    /// single-threaded runtime each, the router's way: see [`crate::Workers`]).
    ///
    /// Copies being served keep their threads' connection counts even: a thread that accepts
    /// a connection while another serves fewer passes it over (see `spread`).
    pub fn try_clone(&self) -> std::io::Result<Listener> {
        Ok(Listener {
            tcp: Some(self.socket()?.try_clone()?),
            group: Arc::clone(&self.group),
            membership: None,
            tls: self.tls.clone(),
            shared: Arc::clone(&self.shared),
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
            http2: Arc::clone(&self.http2),
        })
    }

    /// Joins the copies' group ahead of serving, for the thread that counts its connections
    /// in `load`: every copy is a member before any accepts, so the first connections are
    /// spread even over threads that have not run yet.
    pub(crate) fn join_ahead(&mut self, load: Arc<std::sync::atomic::AtomicUsize>) {
        self.membership = Some(self.group.join_counting(load));
    }

    /// Serves until `shutdown` resolves, then stops accepting, asks every connection to finish
    /// its requests (HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY), and
    /// returns when they have, or after the longest drain timeout of its apps.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) {
        let registered = self
            .tcp
            .take()
            .ok_or_else(|| std::io::Error::other("served twice"))
            .and_then(TcpListener::from_std);
        let tcp = match registered {
            Ok(tcp) => tcp,
            Err(error) => {
                tracing::error!(%error, "cannot serve the listener's socket on this runtime");
                return;
            }
        };
        let closing = Arc::new(Closing::default());
        let mut membership = match self.membership.take() {
            Some(membership) => membership,
            None => self.group.join(),
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = tcp.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Some((stream, peer, load)) = membership.place(stream, peer) {
                            self.spawn_connection(stream, peer, load, &closing);
                        }
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(handed) = membership.inbox.recv() => self.take(handed, &closing),
                () = &mut shutdown => break,
            }
        }
        // Stop listening now, not after the drain: while the socket is open the kernel keeps
        // queueing connections on it (with SO_REUSEPORT, its share of the address's) that
        // nobody would accept. Those already queued are served; the socket closes when the
        // last copy lets go of it.
        match tcp.into_std() {
            Ok(socket) => {
                while let Ok((stream, peer)) = socket.accept() {
                    let registered = stream
                        .set_nonblocking(true)
                        .and_then(|()| TcpStream::from_std(stream));
                    match registered {
                        Ok(stream) => {
                            let load = membership.count();
                            self.spawn_connection(stream, peer, load, &closing);
                        }
                        Err(error) => tracing::warn!(%peer, %error, "cannot serve a connection"),
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot take the queued connections"),
        }
        // Connections passed to this thread just before it stopped are served like the rest.
        for handed in membership.leave() {
            self.take(handed, &closing);
        }
        let grace = self
            .shared
            .apps
            .iter()
            .map(|a| a.config().drain_timeout)
            .max()
            .unwrap_or_default();
        if tokio::time::timeout(grace, closing.close()).await.is_err() {
            tracing::warn!("connections still open after the drain timeout");
        }
    }

    /// How a connection is served once its protocol is known (fresh per connection: its
    /// HTTP/1.1 timer is its own).
    fn builders(&self) -> Builders {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(ConnectionTimer::default())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(self.max_header_bytes)
            // Copy each response into one buffer and write it with one `write`: for the small
            // responses that dominate, cheaper than queueing the body as its own slice for a
            // vectored write (measured: 21.3k -> 20.8k instructions per request; a 200 MB
            // download is as fast).
            .writev(false)
            // A client that shuts down its sending side after its request still gets the
            // response (HTTP-compliant; HAProxy's default, where nginx aborts the request). The
            // reason is cost: without it hyper probes the client socket for end-of-stream while
            // each request waits, and that probe makes it allocate a fresh read buffer per
            // request because the waiting request's headers still share the old one (measured:
            // -4% instructions per request). Trade-off: a client that vanishes while its request
            // waits is noticed when the response is written, so the request runs on, bounded by
            // the app's request timeout, as a served one would.
            .half_close(true);
        Builders {
            http1,
            http2: Arc::clone(&self.http2),
            first_request_timeout: self.header_read_timeout,
            // HTTP/1.1's idle connections wait this long for their next head (hyper's header
            // read timer): HTTP/2's wait as long.
            idle_timeout: self.header_read_timeout,
        }
    }

    /// Serves a connection another thread passed to this one.
    fn take(&self, handed: Handed, closing: &Arc<Closing>) {
        match TcpStream::from_std(handed.stream) {
            Ok(stream) => self.spawn_connection(stream, handed.peer, handed.load, closing),
            Err(error) => tracing::warn!(peer = %handed.peer, %error, "cannot take a connection"),
        }
    }

    fn spawn_connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        load: Counted,
        closing: &Arc<Closing>,
    ) {
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&self.shared);
        let builders = self.builders();
        let closing = Arc::clone(closing);
        let tls = self.tls.clone();
        let handshake_timeout = self.header_read_timeout;
        tokio::spawn(async move {
            // The connection counts on this thread until it ends.
            let _load = load;
            // Responses leave with the thread's batch (see `batch`); a client still sending
            // when the connection ends is given a lingering close.
            let sent_body = Arc::new(AtomicBool::new(false));
            let stream = Socket::client(stream, Arc::clone(&sent_body));
            // Only the access log asks (a reference count per connection otherwise).
            let watch = shared.access_log.is_some().then(|| stream.watch());
            let client = Client {
                peer,
                shared,
                sent_body,
                watch,
            };
            match tls {
                None => serve_io(stream, client, builders, &closing).await,
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_io(stream, client, builders, &closing).await,
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// A client connection, as its requests see it.
struct Client {
    peer: SocketAddr,
    shared: Arc<Shared>,
    /// Set once a request with a body arrives (see [`Socket::client`]).
    sent_body: Arc<AtomicBool>,
    /// Whether the client is still there, for the access log (when there is one).
    watch: Option<ClientWatch>,
}

async fn serve_io<I>(io: I, client: Client, builders: Builders, closing: &Arc<Closing>)
where
    I: ChooseProtocol + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Client {
        peer,
        shared,
        sent_body,
        watch,
    } = client;
    // The client's forwarding identity is worked out once for the connection's life.
    let addr = peer;
    let peer = Peer::new(peer, shared.scheme);
    let activity = Activity::new();
    let client = Arc::new((shared, peer, Arc::clone(&activity), sent_body, watch));
    let service = service_fn(move |mut req: Request<Incoming>| {
        // Noted when the request arrives, not when its future first runs: HTTP/2 runs it as a
        // task of its own, later.
        let (shared, _, activity, sent_body, _) = &*client;
        let open = activity.start(req.version());
        if !hyper::body::Body::is_end_stream(req.body()) && !sent_body.load(Ordering::Relaxed) {
            sent_body.store(true, Ordering::Relaxed);
        }
        let id = request_id::ensure(req.headers_mut());
        // What the access log needs of the request, taken before it is forwarded.
        let arrived = shared.access_log.is_some().then(|| Arrived {
            at: std::time::Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            http1: req.version() < hyper::Version::HTTP_2,
        });
        let client = Arc::clone(&client);
        async move {
            let (shared, peer, _, _, watch) = &*client;
            let mut request = Unanswered {
                shared,
                client: peer.addr(),
                routed: Routed {
                    wanted: arrived.is_some(),
                    ..Routed::default()
                },
                arrived,
                id,
            };
            let mut response = forward::handle(shared, peer, req, &mut request.routed).await;
            let (logged, id) = request.answered(response.status().as_u16(), watch.as_ref());
            response
                .headers_mut()
                .insert(request_id::X_REQUEST_ID.clone(), id);
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, open, logged)))
        }
    });
    let connection = AnswerFirst {
        connection: Box::pin(ClientConnection::new(
            io,
            service,
            builders,
            Arc::clone(&activity),
        )),
        activity,
        finish_pending: None,
    };
    if let Err(error) = closing.watch(connection).await {
        tracing::debug!(peer = %addr, %error, "client connection ended");
    }
}

/// A logged HTTP/1.1 request that waited this long for its answer is looked at once before
/// it (one peek at the client's socket): its client may have given up. A quicker one is not:
/// the peek is a system call per response, the cost that `half_close` saves.
const GAVE_UP_AFTER: Duration = Duration::from_millis(100);

/// What the access log needs of a request, noted when it arrives.
struct Arrived {
    at: std::time::Instant,
    method: hyper::Method,
    uri: hyper::Uri,
    http1: bool,
}

/// A request until its response head is given. Dropped before that (its client reset the
/// HTTP/2 stream or the connection went, and hyper dropped the request's future), it is
/// logged with status 499, nginx's "client closed request", and 0 bytes: always, like a 5xx,
/// never sampled away.
struct Unanswered<'a> {
    shared: &'a Shared,
    client: std::net::IpAddr,
    routed: Routed,
    /// `None` when the access log is off, or once answered.
    arrived: Option<Arrived>,
    id: hyper::header::HeaderValue,
}

/// nginx's status for a request its client gave up on before the answer.
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Unanswered<'_> {
    /// The response's head is given with `status`: its access log line to come (if it is
    /// logged), and the request's id. An HTTP/1.1 client that left while a slow request waited
    /// is noticed here (the router does not watch its socket meanwhile, see `half_close`) and
    /// logged with 499 at once; its answer goes to a closed connection, as before.
    fn answered(
        mut self,
        status: u16,
        watch: Option<&ClientWatch>,
    ) -> (Option<Box<access_log::Pending>>, hyper::header::HeaderValue) {
        let arrived = self.arrived.take();
        let logged = match (&self.shared.access_log, arrived) {
            (Some(log), Some(arrived)) => {
                if arrived.http1
                    && arrived.at.elapsed() >= GAVE_UP_AFTER
                    && watch.is_some_and(ClientWatch::closed)
                {
                    drop(self.begin(log, CLIENT_CLOSED_REQUEST, &arrived));
                    None
                } else if log.logs(status) {
                    Some(self.begin(log, status, &arrived))
                } else {
                    None
                }
            }
            _ => None,
        };
        let id = std::mem::replace(&mut self.id, hyper::header::HeaderValue::from_static(""));
        (logged, id)
    }

    fn begin(
        &self,
        log: &crate::AccessLog,
        status: u16,
        arrived: &Arrived,
    ) -> Box<access_log::Pending> {
        let routed = &self.routed;
        let fields = access_log::Fields {
            app: routed
                .app
                .and_then(|i| self.shared.apps.get(i))
                .map(|a| a.name()),
            release: routed.release.as_deref(),
            instance: routed.instance,
            method: arrived.method.as_str(),
            path: arrived.uri.path(),
            status,
            request_id: self.id.to_str().unwrap_or_default(),
            client: self.client,
        };
        log.begin(&fields, arrived.at)
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let (Some(log), Some(arrived)) = (&self.shared.access_log, self.arrived.take()) {
            drop(self.begin(log, CLIENT_CLOSED_REQUEST, &arrived));
        }
    }
}

/// How long an HTTP/1.1 connection between requests (or a fresh one before its first) is
/// given to send its next request when its listener stops.
const NEXT_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// A client connection that is asked to finish only once it has sent its next request (or
/// [`NEXT_REQUEST_GRACE`] passed): an HTTP/1.1 one is then answered with `Connection: close`.
///
/// A graceful shutdown closes an HTTP/1.1 connection that is between requests at once. But
/// its client may be sending its next request as it closes (under load, a keep-alive client
/// nearly always is), and it has been told nothing: that request fails (a read error in
/// `wrk`, 1 in ~3 connections per stop, measured across a router handover). The same holds
/// for a fresh connection, between requests until its first is read (one accepted just
/// before its listener stopped, or queued on the socket as it did). So the connection is
/// answered once more, that answer telling the client to close. One that sends nothing (a
/// browser's idle keep-alive, a preconnect) is closed after the grace. HTTP/2 is sent GOAWAY
/// at once once it had a request: GOAWAY says which requests were taken.
struct AnswerFirst<C> {
    connection: Pin<Box<C>>,
    /// Notes the connection's requests.
    activity: Arc<Activity>,
    /// Asked to finish: the requests counted then, and the end of the grace.
    finish_pending: Option<(u64, Pin<Box<tokio::time::Sleep>>)>,
}

impl<C> AnswerFirst<C> {
    /// Whether a pending finish is due: a request arrived since, or the grace passed.
    fn due(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.finish_pending {
            Some((seen, grace)) => {
                self.activity.requests() > *seen || grace.as_mut().poll(cx).is_ready()
            }
            None => false,
        }
    }
}

impl<C: Finish> Future for AnswerFirst<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if this.due(cx) {
            this.finish_pending = None;
            this.connection.as_mut().finish();
        }
        let polled = this.connection.as_mut().poll(cx);
        // A request read in this poll is still waiting for its response: asked to finish
        // now, hyper sends that response with `Connection: close`.
        if polled.is_pending() && this.due(cx) {
            this.finish_pending = None;
            this.connection.as_mut().finish();
            cx.waker().wake_by_ref();
        }
        polled
    }
}

impl<C: Finish> Finish for AnswerFirst<C> {
    fn finish(self: Pin<&mut Self>) {
        let this = self.get_mut();
        if this.activity.http2() {
            this.connection.as_mut().finish();
        } else {
            let grace = Box::pin(tokio::time::sleep(NEXT_REQUEST_GRACE));
            this.finish_pending = Some((this.activity.requests(), grace));
        }
    }
}

/// Most streams one HTTP/2 connection may have open at once (nginx's
/// `http2_max_concurrent_streams`; hyper's default is 200).
const HTTP2_MAX_STREAMS: u32 = 128;

/// How much of a response hyper buffers per HTTP/2 stream for a client that does not take it
/// (hyper's default is 400 KiB: with 200 streams, a client that opened its windows and read
/// nothing pinned about 80 MiB per connection, 101 MiB of memory measured).
const HTTP2_SEND_BUFFER: usize = 64 * 1024;

fn http2_builder(max_header_bytes: usize) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_MAX_STREAMS)
        .max_send_buf_size(HTTP2_SEND_BUFFER)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    http2
}

/// A listening socket (non-blocking), not yet registered with any runtime.
fn bind(
    addr: SocketAddr,
    reuse_port: bool,
    send_timeout: Duration,
) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As std and tokio do for a plain bind: a restarted router must not wait out TIME_WAIT.
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    // Accepted sockets inherit it: no system call per connection.
    let millis = u32::try_from(send_timeout.as_millis()).unwrap_or(u32::MAX);
    if let Err(error) = rustix::net::sockopt::set_tcp_user_timeout(&socket, millis) {
        // A kernel without it still serves; only a client that stops reading is not cut off.
        tracing::warn!(%addr, %error, "cannot set the send timeout (TCP_USER_TIMEOUT)");
    }
    socket.bind(addr)?;
    socket.listen(4096)?.into_std()
}

fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, ListenerError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| ListenerError::TlsFile {
            what: "certificate",
            path: files.cert.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ListenerError::TlsFile {
            what: "certificate",
            path: files.cert.clone(),
            message: "no certificate in the file".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| ListenerError::TlsFile {
        what: "private key",
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let tls_error = |source| ListenerError::TlsConfig {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_error)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(tls_error)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The send timeout is set once on the listening socket: every accepted socket must carry
    /// it (Linux copies it to the connections it accepts).
    #[tokio::test]
    async fn accepted_sockets_inherit_the_send_timeout() {
        let listener = bind(
            "127.0.0.1:0".parse().unwrap(),
            false,
            Duration::from_millis(1234),
        )
        .unwrap();
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(
            rustix::net::sockopt::tcp_user_timeout(&accepted).unwrap(),
            1234
        );
    }
}
