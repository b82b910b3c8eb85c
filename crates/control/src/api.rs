//! The daemon's HTTP/JSON API, served on `<state>/kiln.sock` (mode 0600) and optionally on
//! TCP with a bearer token. `docs/openapi.json` describes it; a test checks that [`ROUTES`]
//! and the document list the same operations.
//!
//! **Invariant:** [`error_response`] is the one place errors become HTTP statuses, and a 5xx
//! body never carries internals (they go to the daemon's log). The actor the ledger records
//! is the connection's (`peer.rs`: the socket peer's user, or the token), never a name the
//! request carries; an `actor` a client still sends is accepted and ignored. A connection
//! that sends no request head in [`HEADER_READ_TIMEOUT`] is closed.
//!
//! Images reach a daemon elsewhere through `/v1/blobs/…` and `/v1/images/…` (`blobs.rs`
//! streams a blob into the store, which stages it until its manifest passes an import's
//! checks); a test attestation is taken over the unix socket only, as secret sources are.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use crate::controller::Controller;
use crate::dto::ApplyRequest;
use crate::error::ControlError;

/// Every operation the API serves, as (method, path pattern); `{x}` is a path parameter.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/apps"),
    ("GET", "/v1/apps/{app}"),
    ("DELETE", "/v1/apps/{app}"),
    ("GET", "/v1/apps/{app}/releases"),
    ("POST", "/v1/apps/{app}/releases"),
    ("POST", "/v1/apps/{app}/rollback"),
    ("POST", "/v1/apps/{app}/promote"),
    ("POST", "/v1/apps/{app}/abort"),
    ("POST", "/v1/apps/{app}/scale"),
    ("POST", "/v1/apps/{app}/pause"),
    ("POST", "/v1/apps/{app}/resume"),
    ("PUT", "/v1/apps/{app}/maintenance"),
    ("DELETE", "/v1/apps/{app}/maintenance"),
    ("GET", "/v1/apps/{app}/instances"),
    ("GET", "/v1/instances/{instance}/logs"),
    ("GET", "/v1/events"),
    ("GET", "/v1/verify"),
    ("GET", "/v1/ledger/export"),
    ("POST", "/v1/fingerprints"),
    ("POST", "/v1/blobs/missing"),
    ("PUT", "/v1/blobs/{digest}"),
    ("PUT", "/v1/images/{digest}"),
    ("PUT", "/v1/images/{digest}/attestation"),
    ("PUT", "/v1/images/{digest}/referrers"),
    ("GET", "/v1/sources"),
    ("POST", "/v1/sources"),
    ("DELETE", "/v1/sources/{name}"),
    ("POST", "/v1/sources/{name}/webhook"),
    ("POST", "/v1/apps/{app}/sync"),
    ("GET", "/v1/apps/{app}/plan"),
    ("GET", "/metrics"),
];

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// How long a connection may take to send a whole request head, from its opening or from the
/// end of its previous response; then it is closed. hyper runs the one timer for both waits, so
/// this is also the keep-alive idle timeout: a client that connects and sends nothing, or a
/// head a byte at a time, holds a connection (a file descriptor, a task) no longer than this.
/// kiln's own client opens a connection per request on the unix socket; over SSH it keeps one
/// and replaces it after `client::SSH_IDLE`, well under this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request body may take to arrive once its head has: a 408 after that, so a
/// client that stops halfway through a body does not hold its connection either.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An API failure: a status and a message for the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let status = match &e {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) | ControlError::Router(_) | ControlError::Corrupt(_) => {
                StatusCode::CONFLICT
            }
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::Forbidden(_) => StatusCode::FORBIDDEN,
            ControlError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ControlError::Provider(kiln_runtime::ProviderError::NotFound(_)) => {
                StatusCode::NOT_FOUND
            }
            ControlError::Provider(_) => StatusCode::BAD_GATEWAY,
            ControlError::Ledger(_) | ControlError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

/// The one mapping from errors to responses.
pub fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    // A 5xx body never carries internals (paths, command lines): they go to the log.
    let message = if e.status == StatusCode::BAD_GATEWAY {
        tracing::error!(status = %e.status, error = %e.message, "provider failed");
        "the instance provider failed; the daemon's log has the details".to_owned()
    } else if e.status.is_server_error() {
        tracing::error!(status = %e.status, error = %e.message, "internal error");
        "internal error; the daemon's log has the details".to_owned()
    } else {
        e.message.clone()
    };
    json_response(e.status, &json!({ "error": message }))
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn ok(v: Value) -> Result<Response<Full<Bytes>>, ApiError> {
    Ok(json_response(StatusCode::OK, &v))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The body of promote and abort. `actor` is what older clients claimed to be: accepted, so
/// they keep working, and ignored (the connection says who acts).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActorBody {
    #[serde(default, rename = "actor")]
    _actor: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    force: bool,
    /// Ignored, as in [`ActorBody`].
    #[serde(default, rename = "actor")]
    _actor: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    replicas: u32,
    /// Ignored, as in [`ActorBody`].
    #[serde(default, rename = "actor")]
    _actor: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    #[serde(default)]
    max_hold_ms: Option<u64>,
    #[serde(default)]
    max_held: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaintenanceBody {
    message: String,
    #[serde(default)]
    retry_after_s: Option<u64>,
}

/// `Retry-After` of a maintenance page when the request names none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);

async fn body<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, ApiError> {
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    let bytes = tokio::time::timeout(BODY_READ_TIMEOUT, collect)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the request body: {e}"),
            )
        })?
        .to_bytes();
    let bytes = if bytes.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        bytes
    };
    // The error names the field (`config.target.provider: unknown variant …`).
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let why = e.into_inner();
        let message = if field == "." {
            format!("invalid request body: {why}")
        } else {
            format!("invalid request body: {field}: {why}")
        };
        ApiError::new(StatusCode::BAD_REQUEST, message)
    })
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// Handles one request from `actor`, who the connection says sent it, and counts it
/// (`kiln_api_requests_total`) by its route pattern and status.
pub async fn handle(
    c: Arc<Controller>,
    actor: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let metrics = Arc::clone(&c.exec.metrics);
    let pattern = route_pattern(req.method(), req.uri().path());
    let response = match route(c, actor, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    metrics.api_request(pattern, response.status().as_u16());
    response
}

/// The operation of [`ROUTES`] a request is for, as its pattern (`/v1/apps/{app}`): that of
/// its method and path, else the first with its path (a 405), else `other`. Never the path
/// itself: that would make a metric series of every name a client sends.
pub(crate) fn route_pattern(method: &Method, path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut on_path = ROUTES.iter().filter(|(_, p)| matches_pattern(p, &parts));
    let first = on_path.clone().next();
    on_path
        .find(|(m, _)| *m == method.as_str())
        .or(first)
        .map_or(crate::metrics::OTHER_ROUTE, |(_, p)| p)
}

async fn route(
    c: Arc<Controller>,
    actor: &str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    // An app name is checked at the door, for every operation that names one, so a bad
    // name is a 400 naming it rather than a 404 or a ledger error.
    if let Some(app) = query(&req, "app") {
        crate::gate::check_stored_name(&app)?;
    }
    match (&method, parts.as_slice()) {
        (_, ["v1", "apps", app, rest @ ..]) => {
            crate::gate::check_stored_name(app)?;
            let app = (*app).to_owned();
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            app_operation(&c, actor, req, &app, &rest).await
        }
        (&Method::GET, ["v1", "health"]) => {
            ok(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
        }
        (&Method::GET, ["v1", "apps"]) => ok(json!(c.app_names().await)),
        (&Method::GET, ["v1", "instances", id, "logs"]) => {
            let from = query(&req, "from")
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
            let chunk = c.logs(id, from).await?;
            ok(json!({"data": String::from_utf8_lossy(&chunk.data), "next": chunk.next}))
        }
        (&Method::GET, ["v1", "events"]) => {
            let app = query(&req, "app");
            let limit = query(&req, "limit").and_then(|l| l.parse().ok());
            ok(to_json(&c.events(app.as_deref(), limit)?)?)
        }
        (&Method::POST, ["v1", "fingerprints"]) => {
            refuse_secret_sources_over_tcp(actor, true)?;
            let r: crate::dto::FingerprintRequest = body(req).await?;
            ok(to_json(&c.fingerprints(r).await?)?)
        }
        (&Method::POST, ["v1", "blobs", "missing"]) => {
            let b: MissingBody = body(req).await?;
            let store = image_store(&c)?;
            if b.digests.len() > MAX_DIGESTS {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("at most {MAX_DIGESTS} digests per request"),
                ));
            }
            let digests = b
                .digests
                .iter()
                .map(|d| parse_digest(d))
                .collect::<Result<Vec<_>, _>>()?;
            let missing = tokio::task::spawn_blocking(move || store.missing(&digests))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            ok(json!({ "missing": missing }))
        }
        (&Method::PUT, ["v1", "blobs", digest]) => {
            let digest = parse_digest(digest)?;
            let store = image_store(&c)?;
            let declared = req
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let stored = crate::blobs::receive(store, digest.clone(), declared, req.into_body())
                .await
                .map_err(upload_error)?;
            ok(json!({ "digest": digest, "size": stored, "stored": stored.is_some() }))
        }
        (&Method::PUT, ["v1", "images", digest]) => {
            let digest = parse_digest(digest)?;
            let store = image_store(&c)?;
            let tag = query(&req, "tag");
            let bytes = body_bytes(req, MAX_MANIFEST).await?;
            let received = tokio::task::spawn_blocking(move || {
                store.receive_image(&digest, &bytes, tag.as_deref())
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(blob_error)?;
            ok(received)
        }
        (&Method::PUT, ["v1", "images", digest, "attestation"]) => {
            // An attestation is what lets an image past the tested-image gate: only a user
            // of this host may hand one over (as they could write it into the store), never
            // a holder of the TCP token.
            if crate::peer::is_token(actor) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "test attestations are accepted over the daemon's unix socket (or SSH) \
                     only, not with the TCP token: run `kiln test` where the daemon runs",
                ));
            }
            let digest = parse_digest(digest)?;
            let store = image_store(&c)?;
            let attestation: Value = body(req).await?;
            tokio::task::spawn_blocking(move || store.receive_attestation(&digest, &attestation))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
                .map_err(blob_error)?;
            ok(json!({ "recorded": true }))
        }
        (&Method::PUT, ["v1", "images", digest, "referrers"]) => {
            let digest = parse_digest(digest)?;
            let store = image_store(&c)?;
            let bytes = body_bytes(req, MAX_REFERRER).await?;
            let referrer: crate::blobs::ReferrerUpload = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("body: {e}")))?;
            // What no signature vouches for is taken from a user of this host only, as a
            // test attestation is.
            let local = !crate::peer::is_token(actor);
            let recorded = tokio::task::spawn_blocking(move || {
                store.receive_referrer(&digest, &referrer, local)
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(blob_error)?;
            ok(recorded)
        }
        (&Method::GET, ["v1", "sources"]) => ok(to_json(&c.list_sources().await?)?),
        (&Method::POST, ["v1", "sources"]) => {
            refuse_over_tcp(actor, "sources are added")?;
            let config: crate::sources::SourceConfig = body(req).await?;
            ok(to_json(&c.add_source(config).await?)?)
        }
        (&Method::DELETE, ["v1", "sources", name]) => {
            refuse_over_tcp(actor, "sources are removed")?;
            c.remove_source(name).await?;
            ok(json!({"source": name, "removed": true}))
        }
        (&Method::POST, ["v1", "sources", name, "webhook"]) => {
            let signature = crate::sources::webhook::SIGNATURE_HEADERS
                .iter()
                .find_map(|h| req.headers().get(*h))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let name = (*name).to_owned();
            let bytes = body_bytes(req, crate::sources::webhook::MAX_BODY).await?;
            c.source_webhook(&name, signature.as_deref(), &bytes)
                .await?;
            Ok(json_response(
                StatusCode::ACCEPTED,
                &json!({"source": name, "fetch": "requested"}),
            ))
        }
        (&Method::GET, ["v1", "verify"]) => ok(kiln_ledger::verify_json(&c.verify()?)),
        (&Method::GET, ["v1", "ledger", "export"]) => ok(c.export_ledger()?),
        (&Method::GET, ["metrics"]) => {
            let mut r = Response::new(Full::new(Bytes::from(c.metrics().await?)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(r)
        }
        _ => Err(unknown(&method, &path, &parts)),
    }
}

/// The most digests one `POST /v1/blobs/missing` may ask about.
const MAX_DIGESTS: usize = 4096;

/// The largest manifest accepted (what the OCI distribution spec has registries accept).
const MAX_MANIFEST: usize = 4 << 20;

/// The largest referrer body accepted: an SBOM of a large tree, as JSON text in JSON.
const MAX_REFERRER: usize = 32 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MissingBody {
    digests: Vec<String>,
}

fn parse_digest(d: &str) -> Result<kiln_runtime::Digest, ApiError> {
    kiln_runtime::Digest::parse(d)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("digest: {e}")))
}

fn image_store(c: &Controller) -> Result<Arc<dyn crate::blobs::ImageStore>, ApiError> {
    c.image_store().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this daemon has no image store to send images to",
        )
    })
}

fn blob_error(e: crate::blobs::BlobError) -> ApiError {
    use crate::blobs::BlobError;
    let status = match &e {
        BlobError::Invalid(_) => StatusCode::BAD_REQUEST,
        BlobError::Forbidden(_) => StatusCode::FORBIDDEN,
        BlobError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        BlobError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

fn upload_error(e: crate::blobs::UploadError) -> ApiError {
    use crate::blobs::UploadError;
    match e {
        UploadError::Store(e) => blob_error(e),
        UploadError::Timeout => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the blob's body stalled (nothing for {} s, or under {} bytes/s); nothing was kept",
                crate::blobs::BLOB_IDLE_TIMEOUT.as_secs(),
                crate::blobs::BLOB_MIN_RATE
            ),
        ),
        UploadError::Body(why) => ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the blob's body broke: {why}; nothing was kept"),
        ),
        UploadError::Busy => ApiError::new(
            StatusCode::CONFLICT,
            "another image upload is in progress; try again",
        ),
    }
}

/// A raw request body of at most `max` bytes, within [`BODY_READ_TIMEOUT`].
async fn body_bytes(req: Request<Incoming>, max: usize) -> Result<Bytes, ApiError> {
    let collect = Limited::new(req.into_body(), max).collect();
    Ok(tokio::time::timeout(BODY_READ_TIMEOUT, collect)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the request body: {e}"),
            )
        })?
        .to_bytes())
}

/// Secret sources make the daemon read a file of its host, its own environment or run a
/// command, as its user: only a user of this host (the unix socket, itself private to the
/// daemon's user) may name them, never a holder of the TCP token.
fn refuse_secret_sources_over_tcp(actor: &str, names_sources: bool) -> Result<(), ApiError> {
    if names_sources && crate::peer::is_token(actor) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "secret sources ([service.secrets]) are read by the daemon as its own user: \
             apply them over the daemon's unix socket, not with the TCP token"
                .to_owned(),
        ));
    }
    Ok(())
}

/// What a holder of the TCP token may not do: what makes the daemon read, run or fetch as
/// its own user on a repository's word.
fn refuse_over_tcp(actor: &str, what: &str) -> Result<(), ApiError> {
    if crate::peer::is_token(actor) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{what} over the daemon's unix socket (or SSH) only, not with the TCP token"),
        ));
    }
    Ok(())
}

/// The operations on one app: `/v1/apps/{app}/…`.
async fn app_operation(
    c: &Arc<Controller>,
    actor: &str,
    req: Request<Incoming>,
    app: &str,
    rest: &[String],
) -> Result<Response<Full<Bytes>>, ApiError> {
    let method = req.method().clone();
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    match (&method, rest.as_slice()) {
        (&Method::GET, []) => ok(to_json(&c.status(app).await?)?),
        (&Method::DELETE, []) => {
            // An `?actor=` older clients send is ignored, as in `ActorBody`.
            let n = c.down(app, actor).await?;
            ok(json!({"app": app, "instances_destroyed": n}))
        }
        (&Method::GET, ["releases"]) => ok(to_json(&c.releases(app)?)?),
        (&Method::POST, ["releases"]) => {
            let mut r: ApplyRequest = body(req).await?;
            refuse_secret_sources_over_tcp(actor, !r.config.service.secrets.is_empty())?;
            r.actor = actor.to_owned();
            ok(to_json(&c.apply(app, r).await?)?)
        }
        (&Method::POST, ["rollback"]) => {
            let b: RollbackBody = body(req).await?;
            let outcome = c.rollback(app, b.to, b.force, actor).await?;
            ok(to_json(&outcome)?)
        }
        (&Method::POST, ["promote"]) => {
            let _: ActorBody = body(req).await?;
            c.promote(app, actor).await?;
            ok(json!({"app": app, "promote": "requested"}))
        }
        (&Method::POST, ["abort"]) => {
            let _: ActorBody = body(req).await?;
            c.abort(app, actor).await?;
            ok(json!({"app": app, "abort": "requested"}))
        }
        (&Method::POST, ["scale"]) => {
            let b: ScaleBody = body(req).await?;
            c.scale(app, b.replicas, actor).await?;
            ok(json!({"app": app, "replicas": b.replicas}))
        }
        (&Method::POST, ["pause"]) => {
            let b: PauseBody = body(req).await?;
            let max_hold = b
                .max_hold_ms
                .map_or(crate::pause::DEFAULT_MAX_HOLD, Duration::from_millis);
            let max_held = b.max_held.unwrap_or(crate::pause::DEFAULT_MAX_HELD);
            let gate = c.pause(app, max_hold, max_held, actor).await?;
            ok(json!({"app": app, "gate": to_json(&gate)?}))
        }
        (&Method::POST, ["resume"]) | (&Method::DELETE, ["maintenance"]) => {
            let _: ActorBody = body(req).await?;
            let released = c.resume(app, actor).await?;
            ok(json!({"app": app, "gate": {"mode": "open"}, "released": released}))
        }
        (&Method::PUT, ["maintenance"]) => {
            let b: MaintenanceBody = body(req).await?;
            let retry_after = b
                .retry_after_s
                .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs);
            let gate = c.maintenance(app, &b.message, retry_after, actor).await?;
            ok(json!({"app": app, "gate": to_json(&gate)?}))
        }
        (&Method::GET, ["instances"]) => ok(json!(c.instances(app).await?)),
        (&Method::POST, ["sync"]) => {
            let _: ActorBody = body(req).await?;
            ok(c.sync(app, actor).await?)
        }
        (&Method::GET, ["plan"]) => ok(c.waiting_plan(app).await?),
        _ => {
            let path = req.uri().path().to_owned();
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            Err(unknown(&method, &path, &parts))
        }
    }
}

/// 405 for a known path with another method, 404 for no operation at all.
fn unknown(method: &Method, path: &str, parts: &[&str]) -> ApiError {
    if ROUTES.iter().any(|(_, p)| matches_pattern(p, parts)) {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        )
    } else {
        ApiError::new(StatusCode::NOT_FOUND, format!("no API operation at {path}"))
    }
}

pub(crate) fn matches_pattern(pattern: &str, parts: &[&str]) -> bool {
    let p: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    p.len() == parts.len()
        && p.iter()
            .zip(parts)
            .all(|(a, b)| a.starts_with('{') || a == b)
}

/// Serves the API on a Unix socket until `stop` resolves. A stale socket file (no daemon
/// answering) is replaced; a live one is an error.
///
/// The socket gets its mode from the process umask as it is bound: the kiln binary sets 077
/// before anything else, so the socket is never connectable by another user, not even in the
/// moment a chmod after `bind` would leave open; and it lies in the private state directory.
pub async fn serve_unix(
    path: PathBuf,
    c: Arc<Controller>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let path = path.as_path();
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("a kiln daemon already serves {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // The kernel's word on who connected, taken once per connection.
                let uid = match stream.peer_cred() {
                    Ok(cred) => cred.uid(),
                    Err(e) => {
                        tracing::warn!(error = %e, "API connection refused: no peer credentials");
                        continue;
                    }
                };
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    // Named here, not in the accept loop: it reads /etc/passwd.
                    let actor: Arc<str> = Arc::from(crate::peer::unix_actor(uid));
                    let svc = hyper::service::service_fn(move |req| {
                        let c = Arc::clone(&c);
                        let actor = Arc::clone(&actor);
                        async move { Ok::<_, Infallible>(handle(c, &actor, req).await) }
                    });
                    let _ = http1().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Serves the API on TCP, requiring `Authorization: Bearer <token>` on every request.
pub async fn serve_tcp(
    addr: std::net::SocketAddr,
    token: String,
    c: Arc<Controller>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_tcp_on(listener, token, c, stop).await
}

/// [`serve_tcp`] on a listener already bound (so the caller knows the address is served,
/// or why not, before it says the daemon is up).
pub async fn serve_tcp_on(
    listener: tokio::net::TcpListener,
    token: String,
    c: Arc<Controller>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let token: Arc<str> = Arc::from(format!("Bearer {token}"));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, client)) = accepted else { continue };
                let actor: Arc<str> = Arc::from(crate::peer::tcp_actor(client.ip()));
                let c = Arc::clone(&c);
                let token = Arc::clone(&token);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let c = Arc::clone(&c);
                        let token = Arc::clone(&token);
                        let actor = Arc::clone(&actor);
                        async move {
                            // A forge cannot hold the token: a webhook proves itself by its
                            // signature, which the operation checks.
                            let webhook = req.method() == Method::POST
                                && matches_pattern(
                                    "/v1/sources/{name}/webhook",
                                    &req.uri().path().trim_matches('/').split('/').collect::<Vec<_>>(),
                                );
                            let authorized = webhook || req
                                .headers()
                                .get(hyper::header::AUTHORIZATION)
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(|v| constant_time_eq(v.as_bytes(), token.as_bytes()));
                            if !authorized {
                                let pattern = route_pattern(req.method(), req.uri().path());
                                c.exec.metrics.api_request(pattern, StatusCode::UNAUTHORIZED.as_u16());
                                return Ok::<_, Infallible>(error_response(&ApiError::new(
                                    StatusCode::UNAUTHORIZED,
                                    "a bearer token is required (see --token-file)",
                                )));
                            }
                            Ok(handle(c, &actor, req).await)
                        }
                    });
                    let _ = http1().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        }
    }
}

/// The HTTP/1.1 server of one API connection, with its timeouts.
pub(crate) fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_counted_by_its_route_pattern_never_its_path() {
        let check = |method: Method, path: &str, want: &str| {
            assert_eq!(route_pattern(&method, path), want, "{method} {path}");
        };
        check(Method::GET, "/v1/apps/web", "/v1/apps/{app}");
        check(Method::DELETE, "/v1/apps/web/", "/v1/apps/{app}");
        check(
            Method::GET,
            "/v1/apps/web/releases",
            "/v1/apps/{app}/releases",
        );
        check(Method::GET, "/metrics", "/metrics");
        // A literal segment wins where a parameter would match too, as in `route`.
        check(Method::POST, "/v1/blobs/missing", "/v1/blobs/missing");
        check(Method::PUT, "/v1/blobs/missing", "/v1/blobs/{digest}");
        // A 405 still names the operation's path.
        check(Method::PATCH, "/v1/apps/web", "/v1/apps/{app}");
        check(Method::GET, "/v1/apps/web/nothing/here", "other");
        check(Method::GET, "/secret-name-a-client-made-up", "other");
    }
}
