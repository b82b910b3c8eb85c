//! The request path: pick the app by host, the release by preview header, sticky cookie or
//! weight, the instance by least outstanding requests; rewrite the request for the upstream;
//! send it with retries; and turn the outcome into the client's response and a measurement.
//!
//! **Invariant:** a request is retried only when that cannot do anything twice: after a
//! connect failure or a connection that closed before the request was written (nothing was
//! sent), or once after a reset before any response byte when the request is idempotent and
//! has no body. Bodies are never buffered to make a retry possible.
//!
//! Every response the router writes itself says so in its body (`kiln: …`), so a client can
//! tell the router's 404/502/503/504 from the app's.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::app::App;
use crate::body::{ProxyBody, Upstream, UpstreamBody};
use crate::config::Sticky;
use crate::hosts::HostTable;
use crate::instance::{InFlight, InstanceState, Sender};
use crate::peer::Peer;
use crate::route::Published;
use crate::stats::UpstreamError;
use crate::sticky;

/// The most attempts one request makes (connects and sends together) before giving up.
const MAX_ATTEMPTS: usize = 8;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What one listener serves, shared by its connections.
pub(crate) struct Shared {
    pub(crate) apps: Vec<Arc<App>>,
    pub(crate) hosts: HostTable,
    pub(crate) max_body_bytes: Option<u64>,
    /// `http` or `https`, for `X-Forwarded-Proto` and `Forwarded`.
    pub(crate) scheme: &'static str,
}

/// Serves one client request.
pub(crate) async fn handle(
    shared: &Shared,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let host = request_host(&req);
    let Some(app) = shared
        .hosts
        .lookup(host.as_ref().and_then(|h| h.to_str().ok()))
        .and_then(|i| shared.apps.get(i))
    else {
        return local(
            StatusCode::NOT_FOUND,
            match host {
                Some(h) => format!("kiln: no app serves host {h:?}\n"),
                None => "kiln: the request names no host\n".to_owned(),
            },
        );
    };
    if let Some(limit) = shared.max_body_bytes {
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
    let ctx = Context {
        app,
        peer,
        scheme: shared.scheme,
        host,
        start,
        max_body_bytes: shared.max_body_bytes,
    };
    ctx.forward(req).await
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
    response: Response<Incoming>,
    sender: Sender,
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
}

impl Context<'_> {
    async fn forward(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let table = self.app.current();
        let choice = match self.choose(&table, &req) {
            Ok(choice) => choice,
            Err(response) => return *response,
        };
        let client_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let bodiless = body.is_end_stream();
        let upstream = self.upstream_request(parts, body, client_upgrade.is_some());
        // Keep what a replay needs only for requests that may be replayed.
        let replay = (bodiless && is_idempotent(upstream.method()) && client_upgrade.is_none())
            .then(|| {
                (
                    upstream.method().clone(),
                    upstream.uri().clone(),
                    upstream.headers().clone(),
                )
            });
        // Borrowed, not cloned: on two threads every reference-count change on the shared
        // table is a cache line moving between cores.
        let chosen_stats = table.releases.get(choice.release).map(|r| &r.stats);
        let attempt = self.send(&table, &choice, upstream, replay);
        // The deadline counts from the request's arrival, so no second clock read is needed.
        let deadline = self.start + self.app.config().request_timeout;
        let outcome = tokio::time::timeout_at(deadline, attempt).await;
        // One clock read gives both the latency and the stats window's second.
        let end = Instant::now();
        let now = self.app.second_at(end);
        let latency = end.saturating_duration_since(self.start);
        let failure = |status: StatusCode, text: &str| {
            if let Some(stats) = &chosen_stats {
                stats.record(now, status.as_u16(), latency);
            }
            local(status, format!("kiln: {text}\n"))
        };
        let served = match outcome {
            Ok(Ok(served)) => served,
            Ok(Err(Failure::NoInstance)) => {
                return failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy instance can take the request",
                );
            }
            Ok(Err(Failure::Upstream)) => {
                return failure(StatusCode::BAD_GATEWAY, "the upstream instance failed");
            }
            Err(_) => {
                if let Some(stats) = &chosen_stats {
                    stats.upstream_error(UpstreamError::Timeout);
                }
                return failure(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream instance did not answer in time",
                );
            }
        };
        let Served {
            mut response,
            sender,
            in_flight,
            release,
            reloaded,
        } = served;
        let Some(live) = reloaded.as_deref().unwrap_or(&table).releases.get(release) else {
            return local(StatusCode::BAD_GATEWAY, "kiln: route changed\n".to_owned());
        };
        live.stats.record(now, response.status().as_u16(), latency);
        live.stats.saw_response(end);

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return local(
                    StatusCode::BAD_GATEWAY,
                    "kiln: the upstream switched protocols unasked\n".to_owned(),
                );
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade, in_flight));
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, ProxyBody::empty());
        }

        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if choice.set_cookie
            && let Some(cookie) = sticky::set_cookie(&live.name)
        {
            parts.headers.append(header::SET_COOKIE, cookie);
        }
        Response::from_parts(
            parts,
            ProxyBody::Upstream(Upstream::new(body, in_flight, sender)),
        )
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
        mut req: Request<UpstreamBody>,
        mut replay: Option<(Method, Uri, HeaderMap)>,
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
            let Ok(mut sender) = instance.connection().await else {
                record(UpstreamError::Connect);
                failed = true;
                tried.push(instance.addr);
                continue;
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(Served {
                        response,
                        sender,
                        in_flight,
                        release,
                        reloaded,
                    });
                }
                Err(mut error) => {
                    record(UpstreamError::Reset);
                    failed = true;
                    if let Some(unsent) = error.take_message() {
                        // The connection closed before the request went out (an idle
                        // connection the instance had just closed): nothing was sent, so any
                        // request may go again, on a fresh connection. Its idle siblings are
                        // likely just as stale (the instance restarted), so they go too.
                        instance.clear_idle();
                        req = unsent;
                        continue;
                    }
                    tracing::debug!(instance = %instance.addr, error = %error.into_error(), "upstream reset");
                    let Some((method, uri, headers)) = replay.take() else {
                        return Err(Failure::Upstream);
                    };
                    tried.push(instance.addr);
                    req = rebuild(method, uri, headers);
                }
            }
        }
        Err(if failed {
            Failure::Upstream
        } else {
            Failure::NoInstance
        })
    }

    /// The request as the instance gets it: origin-form URI, HTTP/1.1, no hop-by-hop headers,
    /// and the forwarding headers.
    fn upstream_request(
        &self,
        mut parts: hyper::http::request::Parts,
        body: Incoming,
        upgrade: bool,
    ) -> Request<UpstreamBody> {
        let upgrade_protocol = upgrade
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade_protocol {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol);
        }
        if let Some(host) = &self.host {
            if !headers.contains_key(header::HOST) {
                // HTTP/2 carries the host as `:authority`; HTTP/1.1 instances need `Host`.
                headers.insert(header::HOST, host.clone());
            }
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        // The values come from the connection's `Peer`, built once per client connection:
        // per request they are reference-counted clones, not freshly formatted strings.
        let forwarded_for = self.peer.forwarded_for(headers.get(&X_FORWARDED_FOR));
        headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
        // This router is the edge: what a client claims about the scheme is not passed on.
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(self.scheme),
        );
        headers.append(FORWARDED.clone(), self.peer.forwarded(self.host.as_ref()));
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let path = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
            parts.uri = Uri::from(path);
        }
        parts.version = Version::HTTP_11;
        Request::from_parts(parts, UpstreamBody::streamed(body, self.max_body_bytes))
    }
}

/// The next instance to try: the chosen release's least loaded untried healthy instance, else
/// (unless pinned) one of another release that takes weighted traffic.
fn pick_instance<'t>(
    table: &'t Published,
    preferred: Option<usize>,
    pinned: bool,
    tried: &[SocketAddr],
) -> Option<(usize, &'t Arc<InstanceState>)> {
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

fn rebuild(method: Method, uri: Uri, headers: HeaderMap) -> Request<UpstreamBody> {
    let mut req = Request::new(UpstreamBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req
}

/// Copies bytes both ways between an upgraded client and instance until either side closes;
/// the request stays in flight (and its instance undrained) until then.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, in_flight: InFlight) {
    let (client, upstream) = tokio::join!(client, upstream);
    if let (Ok(client), Ok(upstream)) = (client, upstream) {
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(%error, "upgraded connection ended");
        }
    }
    drop(in_flight);
}

/// The request's host: the URI authority (HTTP/2, absolute-form) or the `Host` header. The
/// header is a reference-counted view of the request's bytes, so the common case copies
/// nothing.
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    req.headers().get(header::HOST).cloned()
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

/// Removes the headers that describe one connection rather than the message.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these, or only `Connection: keep-alive`: one pass over the
    // names (no hashing, no allocation) tells which removals are needed.
    let mut connection = false;
    let mut fixed = false;
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if is_hop_by_hop(name) {
            fixed = true;
        }
    }
    if connection {
        // Every header the `Connection` header names describes this connection only.
        // A repeated `Connection` header is rare enough to collect; `remove` returns only
        // the first value.
        let more: Vec<HeaderValue> = if headers.get_all(header::CONNECTION).iter().count() > 1 {
            headers
                .get_all(header::CONNECTION)
                .iter()
                .skip(1)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let first = headers.remove(header::CONNECTION);
        for value in first.iter().chain(&more) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',') {
                // A `&str` key is looked up without building a `HeaderName`.
                headers.remove(token.trim());
            }
        }
    }
    if fixed {
        for name in [
            &KEEP_ALIVE,
            &PROXY_CONNECTION,
            &header::TE,
            &header::TRAILER,
            &header::TRANSFER_ENCODING,
            &header::UPGRADE,
        ] {
            headers.remove(name);
        }
    }
}

/// The hop-by-hop headers every message loses, besides `Connection` and those it names.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_go() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("content-type", "text/plain"),
            ("x-kept", "1"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);
    }

    #[test]
    fn every_connection_header_names_headers_to_drop() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "X-One"),
            ("connection", " x-two ,close"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("x-kept", "3"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
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
