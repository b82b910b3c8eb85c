//! The dashboard: a page the daemon serves on its own TCP listener (`kiln serve --ui-listen`),
//! with its assets embedded in the binary (`crates/control/ui/`), a live feed of every app's
//! state as server-sent events, and the API behind it.
//!
//! **Who may do what.** Anyone who reaches the listener may read: the page, the feed, and the
//! API's read operations in [`READS`] (what `kiln status`, `kiln history` and `kiln verify`
//! show; never instance logs, sources or the ledger export). Every other request is an
//! action and is passed to the same API the CLI calls ([`crate::api::handle`]) only with the
//! daemon's bearer token (`--token-file`; without one the dashboard is read-only for all),
//! recorded with the actor `token@<address> (dashboard)`, so that what a token holder may not
//! do over TCP (secret sources, sources) stays refused.
//!
//! **Browsers.** The token travels in an `Authorization` header the page's script sets, never
//! in a cookie, so another site cannot make a visitor's browser act with it; and an action
//! must also say `Content-Type: application/json` (a form cannot) and, when it carries an
//! `Origin`, come from this page's own. Every request's `Host` must be an address or
//! `localhost` (or a name given with `--ui-host`), so a hostile page cannot read the dashboard
//! through a DNS name rebound to this listener. Responses forbid framing and scripts from
//! elsewhere (`Content-Security-Policy`).

mod feed;
mod timeline;

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::controller::Controller;

pub use feed::Feed;

/// The API's read operations the dashboard serves without a token.
pub const READS: &[&str] = &[
    "/v1/health",
    "/v1/apps",
    "/v1/apps/{app}",
    "/v1/apps/{app}/releases",
    "/v1/apps/{app}/instances",
];

/// The most feeds (server-sent event streams) served at once.
const MAX_FEEDS: usize = 64;

/// How long a feed may wait for its client to take an event before it is ended.
const FEED_STALL: std::time::Duration = std::time::Duration::from_secs(30);

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// What the dashboard listener knows beyond the controller.
pub struct UiConfig {
    /// The bearer token actions need; `None` makes the dashboard read-only.
    pub token: Option<String>,
    /// Host names (besides addresses and `localhost`) requests may name, for a dashboard
    /// reached through a proxy or a DNS name.
    pub hosts: Vec<String>,
}

struct Ui {
    c: Arc<Controller>,
    feed: Arc<Feed>,
    /// `Bearer <token>`.
    bearer: Option<String>,
    hosts: Vec<String>,
    feeds: Arc<tokio::sync::Semaphore>,
}

/// Serves the dashboard on `listener` until `stop` resolves.
pub async fn serve_ui_on(
    listener: tokio::net::TcpListener,
    config: UiConfig,
    c: Arc<Controller>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let (feed, sampler) = Feed::start(Arc::clone(&c));
    // The sampler stops with the listener, however this future ends.
    let _sampler = AbortOnDrop(sampler);
    let ui = Arc::new(Ui {
        c,
        feed,
        bearer: config.token.map(|t| format!("Bearer {t}")),
        hosts: config.hosts,
        feeds: Arc::new(tokio::sync::Semaphore::new(MAX_FEEDS)),
    });
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, client)) = accepted else { continue };
                let ui = Arc::clone(&ui);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let ui = Arc::clone(&ui);
                        async move { Ok::<_, Infallible>(ui.handle(client.ip(), req).await) }
                    });
                    let _ = crate::api::http1()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Ui {
    async fn handle(&self, client: IpAddr, req: Request<Incoming>) -> Response<UiBody> {
        let mut response = match self.route(client, req).await {
            Ok(r) => r,
            Err((status, message)) => plain(crate::api::error_response(&crate::api::ApiError {
                status,
                message,
            })),
        };
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        response
    }

    async fn route(
        &self,
        client: IpAddr,
        req: Request<Incoming>,
    ) -> Result<Response<UiBody>, (StatusCode, String)> {
        check_host(req.headers().get(header::HOST), &self.hosts)?;
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        if method == Method::GET || method == Method::HEAD {
            match path.as_str() {
                "/" | "/index.html" => return Ok(asset(INDEX_HTML, "text/html; charset=utf-8")),
                "/ui/app.js" => return Ok(asset(APP_JS, "text/javascript; charset=utf-8")),
                "/ui/app.css" => return Ok(asset(APP_CSS, "text/css; charset=utf-8")),
                // Browsers ask; there is none.
                "/favicon.ico" => {
                    let mut r = Response::new(UiBody::Full(Full::new(Bytes::new())));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    return Ok(r);
                }
                "/ui/session" => {
                    let authorized = self.authorized(&req);
                    return Ok(json_body(&json!({
                        "authorized": authorized,
                        "actions": self.bearer.is_some(),
                        "version": env!("CARGO_PKG_VERSION"),
                    })));
                }
                "/ui/state" => return Ok(json_bytes(self.feed.latest())),
                "/ui/feed" => return self.stream(),
                "/ui/series" => {
                    let app = query(&req, "app").unwrap_or_default();
                    return Ok(json_body(&self.feed.series(&app)));
                }
                "/ui/events" => {
                    let app = query(&req, "app").unwrap_or_default();
                    crate::gate::check_stored_name(&app).map_err(bad_request)?;
                    let limit = query(&req, "limit")
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(timeline::DEFAULT_EVENTS)
                        .min(timeline::MAX_EVENTS);
                    let detailed = self.authorized(&req);
                    let body = timeline::of_app(&self.c, &app, limit, detailed).map_err(|e| {
                        let e = crate::api::ApiError::from(e);
                        (e.status, e.message)
                    })?;
                    return Ok(json_body(&body));
                }
                _ => {}
            }
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            if READS.iter().any(|p| crate::api::matches_pattern(p, &parts)) {
                // Reads carry no actor: nothing is recorded.
                return Ok(plain(
                    crate::api::handle(Arc::clone(&self.c), "dashboard", req).await,
                ));
            }
            if !path.starts_with("/v1/") {
                return Err((StatusCode::NOT_FOUND, format!("nothing at {path}")));
            }
        }
        // An action, or a read the dashboard does not serve without the token.
        let Some(_) = &self.bearer else {
            return Err((
                StatusCode::FORBIDDEN,
                "this dashboard is read-only: the daemon has no --token-file".to_owned(),
            ));
        };
        if !self.authorized(&req) {
            let pattern = crate::api::route_pattern(req.method(), req.uri().path());
            self.c
                .exec
                .metrics
                .api_request(pattern, StatusCode::UNAUTHORIZED.as_u16());
            return Err((
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (the daemon's --token-file)".to_owned(),
            ));
        }
        if method != Method::GET && method != Method::HEAD {
            check_same_origin(&req)?;
        }
        let actor = crate::peer::dashboard_actor(client);
        Ok(plain(
            crate::api::handle(Arc::clone(&self.c), &actor, req).await,
        ))
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(bearer) = &self.bearer else {
            return false;
        };
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| crate::api::constant_time_eq(v.as_bytes(), bearer.as_bytes()))
    }

    /// The feed: the latest state at once, then each new one, as `state` events.
    fn stream(&self) -> Result<Response<UiBody>, (StatusCode, String)> {
        let Ok(permit) = Arc::clone(&self.feeds).try_acquire_owned() else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_FEEDS} dashboards are already watching; try again later"),
            ));
        };
        let mut states = self.feed.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let state = states.borrow_and_update().clone();
                // A client that stopped reading gives its place back.
                let sent =
                    tokio::time::timeout(FEED_STALL, tx.send(feed::sse_event("state", &state)));
                if !matches!(sent.await, Ok(Ok(()))) {
                    return;
                }
                tokio::select! {
                    changed = states.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        let mut r = Response::new(UiBody::Stream(rx));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // nginx in front would otherwise hold the events back.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        Ok(r)
    }
}

fn bad_request(e: crate::error::ControlError) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, e.to_string())
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// Refuses a request whose `Host` names something other than an address, `localhost` or
/// one of `hosts`: a page of another site that had its name resolve to this listener.
fn check_host(host: Option<&HeaderValue>, hosts: &[String]) -> Result<(), (StatusCode, String)> {
    let host = host.and_then(|h| h.to_str().ok()).unwrap_or("");
    if host_allowed(host, hosts) {
        Ok(())
    } else {
        Err((
            StatusCode::FORBIDDEN,
            format!(
                "the dashboard answers requests for its address or localhost, not for {host:?} \
                 (name it with --ui-host)"
            ),
        ))
    }
}

fn host_allowed(host: &str, hosts: &[String]) -> bool {
    let name = strip_port(host);
    let port = &host[name.len()..];
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if name.is_empty() || !port_ok {
        return false;
    }
    // A fully qualified name may end with a dot.
    let name = name.strip_suffix('.').unwrap_or(name);
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// `host` without its `:port` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i)
            if !host[i..].contains(']')
                && (host.starts_with('[') || host[..i].find(':').is_none()) =>
        {
            &host[..i]
        }
        _ => host,
    }
}

/// An action must be JSON (which a form on another site cannot send without the browser
/// asking this listener first, and it never says yes) and, when the browser says where it
/// comes from, come from this page.
fn check_same_origin(req: &Request<Incoming>) -> Result<(), (StatusCode, String)> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "an action's body must be sent as application/json".to_owned(),
        ));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host));
        if !same {
            return Err((
                StatusCode::FORBIDDEN,
                format!("an action from another origin ({origin}) is refused"),
            ));
        }
    }
    Ok(())
}

fn asset(text: &'static str, content_type: &'static str) -> Response<UiBody> {
    let mut r = Response::new(UiBody::Full(Full::new(Bytes::from_static(text.as_bytes()))));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn json_bytes(bytes: Bytes) -> Response<UiBody> {
    let mut r = Response::new(UiBody::Full(Full::new(bytes)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json_body(v: &serde_json::Value) -> Response<UiBody> {
    json_bytes(Bytes::from(serde_json::to_vec(v).unwrap_or_default()))
}

fn plain(r: Response<Full<Bytes>>) -> Response<UiBody> {
    r.map(UiBody::Full)
}

/// A response body: whole, or the feed's events as they come.
pub enum UiBody {
    /// All of it at once.
    Full(Full<Bytes>),
    /// Chunks until the sender goes.
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for UiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            UiBody::Full(full) => Pin::new(full).poll_frame(cx),
            UiBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UiBody::Full(full) => full.is_end_stream(),
            UiBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UiBody::Full(full) => full.size_hint(),
            UiBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_addresses_localhost_or_named() {
        let none: &[String] = &[];
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:9",
            "LOCALHOST",
            "[::1]:8080",
            "[::1]",
            "10.1.2.3:80",
        ] {
            assert!(host_allowed(ok, none), "{ok}");
        }
        for refused in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
        ] {
            assert!(!host_allowed(refused, none), "{refused}");
        }
        let named = ["kiln.internal".to_owned()];
        assert!(host_allowed("kiln.internal:7070", &named));
        assert!(host_allowed("kiln.internal.", &named));
        assert!(!host_allowed("other.internal:7070", &named));
    }

    #[test]
    fn the_port_is_stripped_from_a_host() {
        assert_eq!(strip_port("a:1"), "a");
        assert_eq!(strip_port("a"), "a");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn every_read_is_an_api_get() {
        for read in READS {
            assert!(
                crate::api::ROUTES.contains(&("GET", read)),
                "{read} is not a GET of the API"
            );
        }
    }
}
