//! The request path: pick the app by host, the release by preview header, sticky cookie or
//! weight, the instance by least outstanding requests; rewrite the request for the upstream;
//! send it with retries; and turn the outcome into the client's response and a measurement.
//!
//! **Invariant:** a request is retried only when that cannot do anything twice: after a
//! connect failure or a connection that closed before the request was written (nothing was
//! sent), or after a reset before any response byte when the request is idempotent and has no
//! body: once on a fresh connection to the same instance when the reset connection was a
//! reused idle one (the instance's keep-alive timeout racing the request), and once on another
//! instance. Bodies are never buffered to make a retry possible.
//!
//! Every response the router writes itself says so in its body (`kiln: …`), so a client can
//! tell the router's 404/502/503/504 from the app's; the one exception is the maintenance
//! page, whose body is the operator's message for the app's users.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::app::App;
use crate::body::{ProxyBody, RequestBodyError, UpstreamBody};
use crate::config::Sticky;
use crate::gate::Admission;
use crate::hosts::HostTable;
use crate::instance::{Backend, InFlight};
use crate::peer::Peer;
use crate::route::Published;
use crate::stats::UpstreamError;
use crate::sticky;
use crate::upstream::{self, Answer, Connection, ExchangeError, RequestFraming, ResponseFraming};

/// The most attempts one request makes (connects and sends together) before giving up.
const MAX_ATTEMPTS: usize = 8;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The most `Connection`-named headers a request may drop (more are forwarded).
const MAX_CONNECTION_TOKENS: usize = 16;

/// What one listener serves, shared by its connections.
pub(crate) struct Shared {
    pub(crate) apps: Vec<Arc<App>>,
    pub(crate) hosts: HostTable,
    /// `http` or `https`, for `X-Forwarded-Proto` and `Forwarded`.
    pub(crate) scheme: &'static str,
    /// Where responses are logged, if anywhere.
    pub(crate) access_log: Option<crate::AccessLog>,
}

/// Where a request went, noted for the access log (only when `wanted`: the release's name is
/// a reference count shared by every router thread).
#[derive(Default)]
pub(crate) struct Routed {
    pub(crate) wanted: bool,
    /// The app, as an index into the listener's.
    pub(crate) app: Option<usize>,
    pub(crate) release: Option<Arc<str>>,
    pub(crate) instance: Option<SocketAddr>,
}

/// Serves one client request.
pub(crate) async fn handle(
    shared: &Shared,
    peer: &Peer,
    req: Request<Incoming>,
    routed: &mut Routed,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let host = match request_host(&req) {
        Ok(host) => host,
        Err(why) => return local(StatusCode::BAD_REQUEST, format!("kiln: {why}\n")),
    };
    if !only_chunked(req.headers().get_all(header::TRANSFER_ENCODING)) {
        // The body would be framed anew as chunked only, and reach the instance still coded.
        return local(
            StatusCode::NOT_IMPLEMENTED,
            "kiln: a transfer coding other than chunked\n".to_owned(),
        );
    }
    let index = shared
        .hosts
        .lookup(host.as_ref().and_then(|h| h.to_str().ok()));
    let Some(app) = index.and_then(|i| shared.apps.get(i)) else {
        return local(
            StatusCode::NOT_FOUND,
            match host {
                Some(h) => format!("kiln: no app serves host {h:?}\n"),
                None => "kiln: the request names no host\n".to_owned(),
            },
        );
    };
    if routed.wanted {
        routed.app = index;
    }
    // The listener reads heads up to the largest limit of its apps, and only roughly (in
    // chunks): this app's own limit is checked here, on the head's size as sent.
    let max_header_bytes = app.config().max_header_bytes;
    if head_size(&req) > max_header_bytes {
        return local(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("kiln: request head larger than {max_header_bytes} bytes\n"),
        );
    }
    let max_body_bytes = app.config().max_body_bytes;
    if let Some(limit) = max_body_bytes {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return local(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("kiln: request body larger than {limit} bytes\n"),
            );
        }
    }
    let mut start = start;
    if !app.gate.is_open() {
        match app.gate.admit().await {
            // The request's timeout counts from when it goes on, not from its arrival.
            Admission::Forward => start = Instant::now(),
            Admission::Shed => return shed(),
            Admission::Maintenance {
                message,
                retry_after,
            } => return maintenance(&req, &message, retry_after),
        }
    }
    let ctx = Context {
        app,
        peer,
        scheme: shared.scheme,
        host,
        start,
        max_body_bytes,
    };
    ctx.forward(req, routed).await
}

struct Context<'a> {
    app: &'a Arc<App>,
    peer: &'a Peer,
    scheme: &'static str,
    /// The request's host as the client named it (`Host` or the URI authority).
    host: Option<HeaderValue>,
    start: Instant,
    max_body_bytes: Option<u64>,
}

/// Which release a request goes to and how it was chosen.
struct Choice {
    release: usize,
    /// Pinned by the preview header: never falls back to another release.
    pinned: bool,
    /// Chosen by weight for a sticky app: tell the client which release it got.
    set_cookie: bool,
}

/// A response head from an instance, with what the response body must hold on to.
struct Served {
    answer: Answer,
    conn: Connection,
    in_flight: InFlight,
    /// The release's index in `reloaded`, or in the table the request first read.
    release: usize,
    /// The table the request read again when every candidate of the first had left it.
    reloaded: Option<Arc<Published>>,
}

enum Failure {
    /// No instance could take the request.
    NoInstance,
    /// Instances were tried and all failed.
    Upstream,
    /// No response head before the request's deadline.
    Timeout,
    /// The client's body grew past the listener's limit.
    TooLarge(u64),
    /// The client's body broke off.
    ClientBody,
}

impl Context<'_> {
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        routed: &mut Routed,
    ) -> Response<ProxyBody> {
        let table = self.app.current();
        let choice = match self.choose(&table, &req) {
            Ok(choice) => choice,
            Err(response) => return *response,
        };
        let client_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body = UpstreamBody::streamed(body, self.max_body_bytes);
        let framing = upstream::request_framing(&parts.headers, &body);
        let upgrade = client_upgrade
            .is_some()
            .then(|| parts.headers.get(header::UPGRADE))
            .flatten();
        // The head is encoded once; a retry sends the same bytes to another instance.
        let head = request_head(
            &parts,
            self.host.as_ref(),
            self.peer,
            self.scheme,
            upgrade,
            framing,
        );
        // Only a request that has sent nothing but its head can be sent again after a reset.
        let replayable = framing == RequestFraming::Empty
            && is_idempotent(&parts.method)
            && client_upgrade.is_none();
        let body = (framing != RequestFraming::Empty).then_some((body, framing));
        let request = Outgoing {
            head,
            body,
            replayable,
            head_request: parts.method == Method::HEAD,
        };
        // Borrowed, not cloned: on two threads every reference-count change on the shared
        // table is a cache line moving between cores.
        let chosen_stats = table.releases.get(choice.release).map(|r| &r.stats);
        // The deadline counts from the request's arrival, so no second clock read is needed.
        let deadline = self.start + self.app.config().request_timeout;
        let outcome = self.send(&table, &choice, request, deadline).await;
        // One clock read gives both the latency and the stats window's second.
        let end = Instant::now();
        let now = self.app.second_at(end);
        let latency = end.saturating_duration_since(self.start);
        if routed.wanted {
            routed.release = table
                .releases
                .get(choice.release)
                .map(|r| Arc::clone(&r.name));
        }
        let failure = |status: StatusCode, text: &str| {
            if let Some(stats) = &chosen_stats {
                stats.record(now, status.as_u16(), latency);
            }
            local(status, format!("kiln: {text}\n"))
        };
        let served = match outcome {
            Ok(served) => served,
            Err(Failure::NoInstance) => {
                return failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy instance can take the request",
                );
            }
            Err(Failure::Upstream) => {
                return failure(StatusCode::BAD_GATEWAY, "the upstream instance failed");
            }
            Err(Failure::Timeout) => {
                if let Some(stats) = &chosen_stats {
                    stats.upstream_error(UpstreamError::Timeout);
                }
                return failure(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream instance did not answer in time",
                );
            }
            Err(Failure::TooLarge(limit)) => {
                return failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body larger than {limit} bytes"),
                );
            }
            Err(Failure::ClientBody) => {
                return failure(StatusCode::BAD_REQUEST, "the request body broke off");
            }
        };
        let Served {
            answer,
            conn,
            in_flight,
            release,
            reloaded,
        } = served;
        let Some(live) = reloaded.as_deref().unwrap_or(&table).releases.get(release) else {
            return local(StatusCode::BAD_GATEWAY, "kiln: route changed\n".to_owned());
        };
        let Answer {
            response,
            framing,
            keep_alive,
        } = answer;
        live.stats.record(now, response.status().as_u16(), latency);
        live.stats.saw_response(end);
        if routed.wanted {
            routed.release = Some(Arc::clone(&live.name));
            routed.instance = Some(in_flight.instance().addr);
        }

        if framing == ResponseFraming::Upgrade {
            let Some(client_upgrade) = client_upgrade else {
                return local(
                    StatusCode::BAD_GATEWAY,
                    "kiln: the upstream switched protocols unasked\n".to_owned(),
                );
            };
            tokio::spawn(tunnel(client_upgrade, conn, in_flight));
            return response.map(|()| ProxyBody::empty());
        }

        let mut response =
            response.map(|()| ProxyBody::upstream(conn, framing, keep_alive, in_flight));
        if choice.set_cookie
            && let Some(cookie) = sticky::set_cookie(&live.name)
        {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        response
    }

    fn choose(
        &self,
        table: &Published,
        req: &Request<Incoming>,
    ) -> Result<Choice, Box<Response<ProxyBody>>> {
        let config = self.app.config();
        if let Some(name) = config
            .preview_header
            .as_ref()
            .and_then(|h| req.headers().get(h))
        {
            let name = name.to_str().unwrap_or_default();
            return match table.by_name(name) {
                Some(release) => Ok(Choice {
                    release,
                    pinned: true,
                    set_cookie: false,
                }),
                None => Err(Box::new(local(
                    StatusCode::NOT_FOUND,
                    format!(
                        "kiln: app {:?} has no release {name:?} to preview\n",
                        self.app.name()
                    ),
                ))),
            };
        }
        let sticky = config.sticky == Sticky::Cookie;
        if sticky {
            let remembered = sticky::release_from_cookies(req.headers().get_all(header::COOKIE))
                .and_then(|name| table.sticky(name));
            if let Some(release) = remembered {
                return Ok(Choice {
                    release,
                    pinned: false,
                    set_cookie: false,
                });
            }
        }
        match table.pick_weighted() {
            Some(release) => Ok(Choice {
                release,
                pinned: false,
                set_cookie: sticky,
            }),
            None => Err(Box::new(local(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "kiln: app {:?} has no release taking traffic\n",
                    self.app.name()
                ),
            ))),
        }
    }

    /// Tries instances until one answers with a response head.
    async fn send(
        &self,
        original: &Published,
        choice: &Choice,
        mut request: Outgoing,
        deadline: Instant,
    ) -> Result<Served, Failure> {
        // Instances that failed this request, and those that left the route after it read the
        // table (forgotten when it reads the table again: a quick switch back may restore them).
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut refused: Vec<SocketAddr> = Vec::new();
        let mut reloads = 0;
        let mut reloaded: Option<Arc<Published>> = None;
        // The preferred release, as an index into the table in use.
        let mut preferred = Some(choice.release);
        let mut table_is_stale = false;
        let mut failed = false;
        let mut stale_retried = false;
        let mut attempts = 0;
        while attempts < MAX_ATTEMPTS {
            let table = reloaded.as_deref().unwrap_or(original);
            let skip: Vec<SocketAddr> = tried.iter().chain(&refused).copied().collect();
            let Some((release, instance)) = pick_instance(table, preferred, choice.pinned, &skip)
            else {
                if table_is_stale && reloads < MAX_ATTEMPTS {
                    // Every candidate left the route after this request read the table: read
                    // the new one and choose again.
                    table_is_stale = false;
                    reloads += 1;
                    refused.clear();
                    let name = preferred
                        .and_then(|i| table.releases.get(i))
                        .map(|r| Arc::clone(&r.name));
                    let table = self.app.current();
                    preferred = if choice.pinned {
                        name.and_then(|name| table.by_name(&name))
                    } else {
                        name.and_then(|name| table.sticky(&name))
                            .or_else(|| table.pick_weighted())
                    };
                    reloaded = Some(table);
                    continue;
                }
                break;
            };
            let Some(in_flight) = instance.acquire() else {
                table_is_stale = true;
                refused.push(instance.addr);
                continue;
            };
            attempts += 1;
            let stats = table.releases.get(release).map(|r| &r.stats);
            let record = |kind| {
                if let Some(stats) = stats {
                    stats.upstream_error(kind);
                }
            };
            let mut conn = match instance.connection(deadline, !request.replayable).await {
                Ok(Some(conn)) => conn,
                Ok(None) => {
                    record(UpstreamError::Connect);
                    failed = true;
                    tried.push(instance.addr);
                    continue;
                }
                Err(_) => return Err(Failure::Timeout),
            };
            let exchanged = conn
                .exchange(
                    &request.head,
                    &mut request.body,
                    request.head_request,
                    deadline,
                )
                .await;
            match exchanged {
                Ok(answer) => {
                    return Ok(Served {
                        answer,
                        conn,
                        in_flight,
                        release,
                        reloaded,
                    });
                }
                Err(ExchangeError::Unsent) => {
                    // The connection was dead before the request went out (an idle connection
                    // the instance had just closed): nothing was sent, so any request may go
                    // again. Its idle siblings are likely just as stale (the instance
                    // restarted), so they go too.
                    record(UpstreamError::Reset);
                    failed = true;
                    instance.clear_idle();
                }
                Err(ExchangeError::Reset) => {
                    record(UpstreamError::Reset);
                    failed = true;
                    tracing::debug!(instance = %instance.addr, "upstream reset");
                    if request.replayable && conn.is_reused() && !stale_retried {
                        // An idle connection the instance closed as it was reused (its
                        // keep-alive timeout racing this request): the request most likely
                        // never reached the application. Once, it goes again to the same
                        // instance on a fresh connection; the idle siblings go too.
                        stale_retried = true;
                        instance.clear_idle();
                        continue;
                    }
                    if !std::mem::take(&mut request.replayable) {
                        return Err(Failure::Upstream);
                    }
                    tried.push(instance.addr);
                }
                Err(ExchangeError::Invalid) => {
                    record(UpstreamError::Reset);
                    tracing::debug!(instance = %instance.addr, "invalid upstream response");
                    return Err(Failure::Upstream);
                }
                Err(ExchangeError::Timeout) => return Err(Failure::Timeout),
                Err(ExchangeError::Body(RequestBodyError::TooLarge { limit })) => {
                    return Err(Failure::TooLarge(limit));
                }
                Err(ExchangeError::Body(RequestBodyError::Client(error))) => {
                    tracing::debug!(%error, "client request body failed");
                    return Err(Failure::ClientBody);
                }
            }
        }
        Err(if failed {
            Failure::Upstream
        } else {
            Failure::NoInstance
        })
    }
}

/// A request ready for an instance.
struct Outgoing {
    /// The encoded request line and headers.
    head: Vec<u8>,
    /// The body still to send, if any (taken by the attempt that sends it).
    body: Option<(UpstreamBody, RequestFraming)>,
    /// Whether the request may be sent once more after a reset (cleared when it has been).
    replayable: bool,
    head_request: bool,
}

/// The request head as the instance gets it: origin-form target, HTTP/1.1, the client's
/// end-to-end headers in their order, then the forwarding headers and the body's framing.
fn request_head(
    parts: &hyper::http::request::Parts,
    host: Option<&HeaderValue>,
    peer: &Peer,
    scheme: &'static str,
    upgrade: Option<&HeaderValue>,
    framing: RequestFraming,
) -> Vec<u8> {
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str);
    let mut head = Vec::with_capacity(256 + target.len());
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    // First (RFC 9110 §7.2), and always the host the request was routed by: the target's
    // authority of an absolute-form or HTTP/2 request wins over a `Host` line (RFC 9112
    // §3.2.2), and HTTP/1.1 instances need one even when an HTTP/1.0 or HTTP/2 client sent
    // none (empty then, as for a target without authority).
    upstream::push_header(
        &mut head,
        b"host",
        host.map_or(&b""[..], HeaderValue::as_bytes),
    );
    let start = head.len();
    // Nearly always the client's `Connection` header names only headers that go anyway
    // (`keep-alive`, `upgrade`), and one walk over the headers writes them. When it names
    // others, they are collected and the headers written again without them.
    let copied = match copy_headers(&mut head, &parts.headers, &[]) {
        Ok(copied) => copied,
        Err(NamesOthers) => {
            head.truncate(start);
            let mut named: [&str; MAX_CONNECTION_TOKENS] = [""; MAX_CONNECTION_TOKENS];
            let tokens = parts
                .headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim);
            let mut count = 0;
            for (slot, token) in named.iter_mut().zip(tokens) {
                *slot = token;
                count += 1;
            }
            let named = named.get(..count).unwrap_or_default();
            // With `named` given, the copy does not fail.
            copy_headers(&mut head, &parts.headers, named).unwrap_or_default()
        }
    };
    if let Some(host) = host {
        upstream::push_header(&mut head, b"x-forwarded-host", host.as_bytes());
    }
    if let Some(protocol) = upgrade {
        head.extend_from_slice(b"connection: upgrade\r\n");
        upstream::push_header(&mut head, b"upgrade", protocol.as_bytes());
    }
    // The values come from the connection's `Peer`, built once per client connection.
    let joined;
    let earlier = if copied.more_forwarded_for {
        // Several lines are one list (RFC 9110 §5.3): rare, so joined only then.
        joined = join_lines(parts.headers.get_all(&X_FORWARDED_FOR));
        Some(&joined)
    } else {
        copied.forwarded_for
    };
    let forwarded_for = peer.forwarded_for(earlier);
    upstream::push_header(&mut head, b"x-forwarded-for", forwarded_for.as_bytes());
    // This router is the edge: what a client claims about the scheme is not passed on.
    upstream::push_header(&mut head, b"x-forwarded-proto", scheme.as_bytes());
    upstream::push_header(&mut head, b"forwarded", peer.forwarded(host).as_bytes());
    // The body is framed by this router, never by the client's own framing headers: a
    // `Connection` option naming `Content-Length` must not leave the body unframed.
    match framing {
        RequestFraming::Length(n) => {
            let _ = write!(head, "content-length: {n}\r\n");
        }
        RequestFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::Empty if parts.headers.contains_key(header::CONTENT_LENGTH) => {
            head.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestFraming::Empty => {}
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The lines of a list header as one value, joined by ", ".
fn join_lines(lines: hyper::header::GetAll<'_, HeaderValue>) -> HeaderValue {
    let mut list = Vec::new();
    for line in lines {
        if !list.is_empty() {
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(line.as_bytes());
    }
    // Joined valid values with a separator are a valid value.
    HeaderValue::from_maybe_shared(Bytes::from(list))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// What copying the client's headers found.
#[derive(Default)]
struct Copied<'h> {
    /// The client's own `X-Forwarded-For` (its first line), to which this hop is appended.
    forwarded_for: Option<&'h HeaderValue>,
    /// It has more than one line.
    more_forwarded_for: bool,
}

/// The client's `Connection` header names headers other than the hop-by-hop ones.
struct NamesOthers;

/// Writes the client's end-to-end headers, in order. The hop-by-hop ones, those in `named`,
/// and the ones this router writes itself (`Host`, the framing and forwarding headers) are
/// left out. Fails when `named` is empty and the `Connection` header names headers that are
/// not left out anyway.
fn copy_headers<'h>(
    head: &mut Vec<u8>,
    headers: &'h HeaderMap,
    named: &[&str],
) -> Result<Copied<'h>, NamesOthers> {
    let mut copied = Copied::default();
    // The last line written is a `Cookie` (a map yields a name's values one after another).
    let mut in_cookie = false;
    for (name, value) in headers {
        if name == header::COOKIE {
            if is_named(named, name.as_str()) {
                in_cookie = false;
                continue;
            }
            if in_cookie {
                // HTTP/2 sends cookies as separate fields; an HTTP/1.1 server expects them in
                // one line, joined by "; " (RFC 9113 §8.2.3).
                head.truncate(head.len() - 2);
                head.extend_from_slice(b"; ");
                head.extend_from_slice(value.as_bytes());
                head.extend_from_slice(b"\r\n");
                continue;
            }
            in_cookie = true;
            upstream::push_header(head, name.as_str().as_bytes(), value.as_bytes());
            continue;
        }
        in_cookie = false;
        if name == header::CONNECTION {
            if named.is_empty() && names_others(value) {
                return Err(NamesOthers);
            }
            continue;
        }
        if name == X_FORWARDED_FOR {
            if is_named(named, X_FORWARDED_FOR.as_str()) {
                continue;
            }
            if copied.forwarded_for.is_some() {
                copied.more_forwarded_for = true;
            } else {
                copied.forwarded_for = Some(value);
            }
            continue;
        }
        if is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
            || is_named(named, name.as_str())
        {
            continue;
        }
        upstream::push_header(head, name.as_str().as_bytes(), value.as_bytes());
    }
    Ok(copied)
}

fn is_named(named: &[&str], name: &str) -> bool {
    named.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Whether a `Connection` value names a header that is not hop-by-hop already.
fn names_others(value: &HeaderValue) -> bool {
    value.as_bytes().split(|&b| b == b',').any(|token| {
        let token = token.trim_ascii();
        !(token.is_empty()
            || token.eq_ignore_ascii_case(b"keep-alive")
            || token.eq_ignore_ascii_case(b"close")
            || token.eq_ignore_ascii_case(b"upgrade")
            || token.eq_ignore_ascii_case(b"te"))
    })
}

/// The next instance to try: the chosen release's least loaded untried healthy instance, else
/// (unless pinned) one of another release that takes weighted traffic.
fn pick_instance<'t>(
    table: &'t Published,
    preferred: Option<usize>,
    pinned: bool,
    tried: &[SocketAddr],
) -> Option<(usize, &'t Arc<Backend>)> {
    if let Some(i) = preferred
        && let Some(instance) = table
            .releases
            .get(i)
            .and_then(|r| r.least_outstanding(tried))
    {
        return Some((i, instance));
    }
    if pinned {
        return None;
    }
    table
        .releases
        .iter()
        .enumerate()
        .filter(|(i, r)| Some(*i) != preferred && r.weight > 0)
        .find_map(|(i, r)| r.least_outstanding(tried).map(|instance| (i, instance)))
}

/// Copies bytes both ways between an upgraded client and instance until either side closes;
/// the request stays in flight (and its instance undrained) until then.
async fn tunnel(client: OnUpgrade, upstream: Connection, in_flight: InFlight) {
    let Ok(client) = client.await else { return };
    let mut client = TokioIo::new(client);
    // Bytes the instance sent right after its 101 were read with the head.
    let (mut upstream, early) = upstream.into_parts();
    if !early.is_empty() && client.write_all(&early).await.is_err() {
        return;
    }
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, "upgraded connection ended");
    }
    drop(in_flight);
}

/// The request's host: the URI authority (HTTP/2, absolute-form) or the `Host` header. The
/// header is a reference-counted view of the request's bytes, so the common case copies
/// nothing. A request that a server must refuse (RFC 9112 §3.2) says why: two `Host` lines, an
/// HTTP/1.1 request without one, or a host that is not `uri-host [":" port]`.
fn request_host<B>(req: &Request<B>) -> Result<Option<HeaderValue>, &'static str> {
    let mut lines = req.headers().get_all(header::HOST).iter();
    let (line, another) = (lines.next(), lines.next());
    if another.is_some() {
        return Err("the request has more than one Host header");
    }
    let host = match req.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => line.cloned(),
    };
    match host {
        None if req.version() == Version::HTTP_11 => Err("an HTTP/1.1 request without Host"),
        // An empty `Host` says the target has no authority (RFC 9112 §3.2): no host.
        Some(host) if host.is_empty() => Ok(None),
        Some(host) if !crate::hosts::is_request_host(host.as_bytes()) => {
            Err("the request's host is not a host name")
        }
        host => Ok(host),
    }
}

/// Whether the `Transfer-Encoding` lines (if any) name `chunked` once and nothing else: the
/// one coding this router frames bodies with (`chunked, chunked` would reach the instance
/// still chunked once).
fn only_chunked(lines: hyper::header::GetAll<'_, HeaderValue>) -> bool {
    let mut codings = lines
        .iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    match codings.next() {
        None => true,
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The headers that describe one connection rather than the message (RFC 9110 §7.6.1),
/// besides those `Connection` names.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// The size of a request's HTTP/1.1 head: request line and header lines (an HTTP/2 request's
/// fields count as they would there).
fn head_size<B>(req: &Request<B>) -> usize {
    // "METHOD TARGET HTTP/1.1\r\n", "name: value\r\n" each, and the blank line.
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri
            .authority()
            .map_or(0, |a| "https://".len() + a.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    line + fields + 2
}

fn local(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::local(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A request a paused app held too long, or pushed out by newer ones.
fn shed() -> Response<ProxyBody> {
    let mut response = local(
        StatusCode::SERVICE_UNAVAILABLE,
        "kiln: the app is paused; this request was held too long\n".to_owned(),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// The maintenance page: the operator's message, as HTML when the client accepts it (a
/// browser), else as text; 503 with `Retry-After`.
fn maintenance<B>(
    req: &Request<B>,
    message: &str,
    retry_after: std::time::Duration,
) -> Response<ProxyBody> {
    let html = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/html"));
    let (body, content_type) = if html {
        (maintenance_html(message), "text/html; charset=utf-8")
    } else {
        (format!("{message}\n"), "text/plain; charset=utf-8")
    };
    let mut response = Response::new(ProxyBody::local(Bytes::from(body)));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs()),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn maintenance_html(message: &str) -> String {
    let mut escaped = String::with_capacity(message.len());
    for c in message.chars() {
        match c {
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '&' => escaped.push_str("&amp;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Maintenance</title></head>\n\
         <body><main><h1>Down for maintenance</h1><p>{escaped}</p></main></body></html>\n"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_maintenance_page_is_html_for_browsers_and_text_otherwise() {
        let browser = Request::get("/")
            .header("accept", "text/html,application/xhtml+xml;q=0.9")
            .body(())
            .unwrap();
        let r = maintenance(&browser, "back <soon>", std::time::Duration::from_secs(120));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "120");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let curl = Request::get("/").header("accept", "*/*").body(()).unwrap();
        let r = maintenance(&curl, "back <soon>", std::time::Duration::from_secs(120));
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert!(maintenance_html("back <soon>").contains("<p>back &lt;soon&gt;</p>"));
    }

    #[test]
    fn a_head_is_measured_as_it_is_sent() {
        let raw = "GET /a?b HTTP/1.1\r\nhost: x\r\naccept: */*\r\n\r\n";
        let req = Request::get("/a?b")
            .header("host", "x")
            .header("accept", "*/*")
            .body(())
            .unwrap();
        assert_eq!(head_size(&req), raw.len());
    }

    fn head(req: Request<()>, host: Option<&str>, framing: RequestFraming) -> String {
        let (parts, ()) = req.into_parts();
        let peer = Peer::new("10.1.2.3:5000".parse().unwrap(), "http");
        let host = host.map(HeaderValue::from_str).transpose().unwrap();
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        let bytes = request_head(
            &parts,
            host.as_ref(),
            &peer,
            "http",
            upgrade.as_ref().filter(|_| wants_upgrade_parts(&parts)),
            framing,
        );
        String::from_utf8(bytes).unwrap()
    }

    fn wants_upgrade_parts(parts: &hyper::http::request::Parts) -> bool {
        parts.headers.contains_key(header::UPGRADE)
    }

    #[test]
    fn cookies_sent_as_several_fields_reach_the_instance_in_one_line() {
        let req = Request::get("/")
            .header("cookie", "a=1")
            .header("x-kept", "1")
            .header("cookie", "b=2")
            .header("cookie", "c=3")
            .body(())
            .unwrap();
        let head = head(req, Some("shop.example"), RequestFraming::Empty);
        assert!(
            head.contains("\r\ncookie: a=1; b=2; c=3\r\n") && head.matches("cookie").count() == 1,
            "{head}"
        );
    }

    #[test]
    fn cookies_named_in_connection_are_dropped_like_any_named_header() {
        let req = Request::get("/")
            .header("connection", "cookie")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        let head = head(req, Some("shop.example"), RequestFraming::Empty);
        assert!(!head.contains("cookie"), "{head}");
    }

    #[test]
    fn the_request_head_keeps_end_to_end_headers_and_adds_forwarding_ones() {
        let req = Request::get("http://shop.example/a?b=1")
            .header("host", "shop.example")
            .header("connection", "keep-alive, X-Private")
            .header("keep-alive", "timeout=5")
            .header("x-private", "1")
            .header("te", "trailers")
            .header("x-kept", "1")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("forwarded", "for=203.0.113.9")
            .body(())
            .unwrap();
        assert_eq!(
            head(req, Some("shop.example"), RequestFraming::Empty),
            "GET /a?b=1 HTTP/1.1\r\n\
             host: shop.example\r\n\
             x-kept: 1\r\n\
             forwarded: for=203.0.113.9\r\n\
             x-forwarded-host: shop.example\r\n\
             x-forwarded-for: 203.0.113.9, 10.1.2.3\r\n\
             x-forwarded-proto: http\r\n\
             forwarded: for=10.1.2.3;proto=http;host=\"shop.example\"\r\n\
             \r\n"
        );
    }

    #[test]
    fn a_keep_alive_connection_header_is_dropped_and_every_client_line_extended() {
        let req = Request::get("/")
            .header("host", "shop.example")
            .header("connection", "Keep-Alive")
            .header("keep-alive", "timeout=5")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-for", "198.51.100.7")
            .header("accept", "*/*")
            .body(())
            .unwrap();
        assert_eq!(
            head(req, Some("shop.example"), RequestFraming::Empty),
            "GET / HTTP/1.1\r\n\
             host: shop.example\r\n\
             accept: */*\r\n\
             x-forwarded-host: shop.example\r\n\
             x-forwarded-for: 203.0.113.9, 198.51.100.7, 10.1.2.3\r\n\
             x-forwarded-proto: http\r\n\
             forwarded: for=10.1.2.3;proto=http;host=\"shop.example\"\r\n\
             \r\n"
        );
    }

    #[test]
    fn every_connection_header_names_headers_to_drop() {
        let req = Request::post("/up")
            .header("connection", "X-One")
            .header("connection", " x-two ,close")
            .header("x-one", "1")
            .header("x-two", "2")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap();
        assert_eq!(
            head(req, None, RequestFraming::Chunked),
            "POST /up HTTP/1.1\r\n\
             host: \r\n\
             x-forwarded-for: 10.1.2.3\r\n\
             x-forwarded-proto: http\r\n\
             forwarded: for=10.1.2.3;proto=http\r\n\
             transfer-encoding: chunked\r\n\
             \r\n"
        );
    }

    #[test]
    fn an_http2_request_gets_a_host_and_an_upgrade_keeps_its_protocol() {
        let req = Request::get("https://shop.example/")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(
            head(req, Some("shop.example"), RequestFraming::Empty)
                .starts_with("GET / HTTP/1.1\r\nhost: shop.example\r\n")
        );
        let req = Request::get("/ws")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let text = head(req, None, RequestFraming::Empty);
        assert!(
            text.starts_with(
                "GET /ws HTTP/1.1\r\nhost: \r\nconnection: upgrade\r\nupgrade: websocket\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn upgrade_needs_both_headers_on_http11() {
        let req = |conn: &str, version| {
            Request::builder()
                .version(version)
                .header("upgrade", "websocket")
                .header("connection", conn)
                .body(())
                .unwrap()
        };
        assert!(wants_upgrade(&req("keep-alive, Upgrade", Version::HTTP_11)));
        assert!(!wants_upgrade(&req("keep-alive", Version::HTTP_11)));
        assert!(!wants_upgrade(&req("upgrade", Version::HTTP_2)));
    }

    #[test]
    fn only_idempotent_methods_are_replayed() {
        for (method, want) in [
            (Method::GET, true),
            (Method::HEAD, true),
            (Method::PUT, true),
            (Method::DELETE, true),
            (Method::POST, false),
            (Method::PATCH, false),
        ] {
            assert_eq!(is_idempotent(&method), want, "{method}");
        }
    }
}
