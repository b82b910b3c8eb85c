//! kiln's image store over the OCI Distribution API, pull side only: what a Docker Engine
//! (a Swarm node) pulls kiln's images from, by digest, without an outside registry.
//!
//! - `GET /v2/`: 200, `Docker-Distribution-API-Version: registry/2.0`.
//! - `GET|HEAD /v2/kiln/<app>/manifests/sha256:…`: the manifest's (or image index's) exact
//!   bytes with its media type. By digest only: a tag (but the referrers tag below) is
//!   `MANIFEST_UNKNOWN`.
//! - `GET|HEAD /v2/kiln/<app>/blobs/sha256:…`: the blob, streamed; one `Range` honoured.
//! - `GET|HEAD /v2/kiln/<app>/referrers/sha256:…`: the OCI referrers API, an image index of
//!   the image's signatures and attestations (each with its `artifactType` and annotations;
//!   empty when it has none), filtered by `?artifactType=` (then `OCI-Filters-Applied`).
//! - `GET|HEAD /v2/kiln/<app>/manifests/sha256-<hex>`: the referrers-tag fallback, the one
//!   tag served: the same index as the store keeps it, for clients without the API.
//! - Anything else: the spec's error JSON (`{"errors":[{"code","message"}]}`), from
//!   [`error_response`], the one place a failure becomes a status and a code.
//!
//! The repository name must follow the spec's grammar and be `kiln/<app>`
//! ([`path::check_name`]); the app part is a label only (it shows in `docker images`): every
//! image of the store is served under any such name, found by digest alone.
//!
//! Plain HTTP on a loopback address (the Docker Engine pulls over plain HTTP from
//! 127.0.0.0/8 without configuration); TLS on any other address, with a certificate signed
//! by a CA kiln makes once in `<state>/registry/` (`tls.rs`), unless the operator asks
//! for plain HTTP there (`insecure`, warned).
//!
//! **Invariant:** read-only; a file is only ever opened through [`BlobFiles`] with a
//! [`Digest`] (no name, path or client string reaches the file system). A blob is verified
//! as it streams: when its content does not hash to its digest the transfer is cut off before
//! its last byte, so a client never receives a whole corrupt blob; a manifest, and a blob
//! before any part of it is sent, are verified whole. A body is never held in memory beyond
//! a chunk ([`CHUNK`]). At most [`MAX_CONNECTIONS`] connections are served at once; a
//! connection that sends no request head in [`HEADER_READ_TIMEOUT`] (or no TLS handshake in
//! as long) is closed, and one whose peer stops reading is cut off by the kernel after
//! [`SEND_TIMEOUT`] (`TCP_USER_TIMEOUT`).
//!
//! **API boundary:** no knowledge of the image layout (the binary backs [`BlobFiles`] with
//! the store); no push, no delete, no tag listing, no authentication: anyone who can reach
//! the address can pull any image of the store, so a non-loopback address should be one only
//! the nodes reach.

pub mod path;
pub mod tls;

use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kiln_runtime::Digest;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use self::path::{Range, Refusal, Request};
pub use self::tls::{Ca, TlsError};

/// The image store as the registry reads it.
pub trait BlobFiles: Send + Sync {
    /// Opens the stored blob `digest` (read-only); `Ok(None)` when the store has none.
    fn open_blob(&self, digest: &Digest) -> std::io::Result<Option<File>>;

    /// The digest of the referrers-tag index of image `subject` (the OCI image index of its
    /// signatures and attestations, tagged `sha256-<hex>` in the store), its referrers
    /// checked; `Ok(None)` when it has none. A store that keeps no referrers has none.
    fn referrers_index(&self, subject: &Digest) -> Result<Option<Digest>, String> {
        let _ = subject;
        Ok(None)
    }
}

/// Where nodes pull kiln's images from: what the daemon hands the providers that need it
/// (Swarm). An image's reference is [`Endpoint::reference`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The address served (the port the system chose when asked for port 0).
    pub addr: SocketAddr,
    /// Whether it is served over TLS (then nodes must trust [`Endpoint::ca`]).
    pub tls: bool,
    /// The CA certificate nodes install as `/etc/docker/certs.d/<host>/ca.crt`, with TLS.
    pub ca: Option<PathBuf>,
}

impl Endpoint {
    /// `IP:PORT` (`[IPv6]:PORT`): the registry part of a reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `<host>/kiln/<app>`: the repository an app's images are pulled as.
    pub fn prefix(&self, app: &str) -> String {
        format!("{}/{}", self.host(), path::repository(app))
    }

    /// `<host>/kiln/<app>@sha256:…`: what a node pulls (and runs) for image `manifest`.
    pub fn reference(&self, app: &str, manifest: &Digest) -> String {
        format!("{}@{manifest}", self.prefix(app))
    }

    /// Where a node's Docker Engine looks for the CA that signs this registry.
    pub fn docker_ca_path(&self) -> String {
        format!("/etc/docker/certs.d/{}/ca.crt", self.host())
    }
}

/// Why the registry cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// An address such as `0.0.0.0`: it goes into image references, so it must be one nodes
    /// can reach.
    #[error(
        "the registry address {0} is unspecified: image references name it, so give an address \
         the nodes reach (e.g. this host's address on their network)"
    )]
    Unspecified(SocketAddr),
    /// The address cannot be bound.
    #[error("cannot listen for the registry on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The CA or the server certificate.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The most connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a connection may take to send a request head (and to finish a TLS handshake),
/// and stay idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long sent data may go unacknowledged (a peer that stops reading) before the kernel
/// drops the connection.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of a blob is read (and held) at a time.
pub const CHUNK: usize = 256 << 10;

/// The largest manifest served: what the distribution spec has registries accept.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// The largest request head accepted.
const MAX_HEAD: usize = 16 << 10;

/// A bound registry, not yet serving.
pub struct Registry {
    endpoint: Endpoint,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Registry {
    /// Binds `addr`; TLS unless the address is loopback or `insecure` says plain HTTP, with
    /// the CA of `state` (`<state>/registry/`, made on first use).
    pub async fn bind(
        addr: SocketAddr,
        insecure: bool,
        state: &Path,
    ) -> Result<Registry, RegistryError> {
        if addr.ip().is_unspecified() {
            return Err(RegistryError::Unspecified(addr));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RegistryError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| RegistryError::Bind { addr, source })?;
        // Accepted sockets inherit it: a client that stops reading a blob is cut off.
        let millis = u32::try_from(SEND_TIMEOUT.as_millis()).unwrap_or(u32::MAX);
        if let Err(error) = rustix::net::sockopt::set_tcp_user_timeout(&listener, millis) {
            tracing::warn!(%addr, %error, "registry: cannot set the send timeout (TCP_USER_TIMEOUT)");
        }
        let plain = addr.ip().is_loopback() || insecure;
        let (tls, ca) = if plain {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "registry: serving plain HTTP on a non-loopback address (--registry-insecure): \
                     anyone on the path can read or alter images in transit (nodes still check \
                     digests), and each node's engine must list it in insecure-registries"
                );
            }
            (None, None)
        } else {
            let ca = Ca::load_or_create(&state.join("registry"))?;
            let host = host_name();
            let config = ca.server_config(addr.ip(), host.as_deref())?;
            (
                Some(tokio_rustls::TlsAcceptor::from(config)),
                Some(ca.cert_path.clone()),
            )
        };
        Ok(Registry {
            endpoint: Endpoint {
                addr,
                tls: tls.is_some(),
                ca,
            },
            listener,
            tls,
        })
    }

    /// Where nodes pull from.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Serves `files` until `stop` resolves (connections in flight finish on their own).
    pub async fn serve(
        self,
        files: Arc<dyn BlobFiles>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                () = &mut stop => return,
                permit = Arc::clone(&limit).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let stream = tokio::select! {
                () = &mut stop => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of descriptors, say: wait a little rather than spin.
                        tracing::warn!(%error, "registry: cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let files = Arc::clone(&files);
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tls {
                    None => serve_connection(TokioIo::new(stream), files).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => serve_connection(TokioIo::new(stream), files).await,
                            Ok(Err(error)) => {
                                tracing::debug!(%error, "registry: TLS handshake failed");
                            }
                            Err(_) => tracing::debug!("registry: TLS handshake timed out"),
                        }
                    }
                }
            });
        }
    }
}

/// This host's name, for the server certificate (a node may name the registry by it).
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

async fn serve_connection<I>(io: TokioIo<I>, files: Arc<dyn BlobFiles>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let files = Arc::clone(&files);
        async move { Ok::<_, Infallible>(handle(files, req).await) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    if let Err(error) = http.serve_connection(io, svc).await {
        tracing::debug!(%error, "registry: connection ended");
    }
}

/// Why a request failed, as the distribution spec names it.
#[derive(Debug)]
pub enum Failure {
    /// A request kiln's registry does not serve: 404 or 405, or a bad name or digest: 400.
    Refused(Refusal),
    /// No manifest with this digest (or the blob is not a manifest): 404 `MANIFEST_UNKNOWN`.
    ManifestUnknown(String),
    /// No blob with this digest: 404 `BLOB_UNKNOWN`.
    BlobUnknown(Digest),
    /// A `Range` past the end of a blob of this size: 416.
    RangeUnsatisfiable(u64),
    /// The store failed, or holds a corrupt blob: 500 (the message goes to the log only).
    Internal(String),
}

/// The one mapping of failures to responses: status, the spec's error code and a message.
pub fn error_response(f: &Failure, head: bool) -> Response<Body> {
    let (status, code, message) = match f {
        Failure::Refused(r) => match r {
            Refusal::NotFound(m) => (StatusCode::NOT_FOUND, "UNSUPPORTED", m.clone()),
            Refusal::Unsupported(m) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", m.clone()),
            Refusal::NameInvalid(m) => (StatusCode::BAD_REQUEST, "NAME_INVALID", m.clone()),
            Refusal::NameUnknown(m) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN", m.clone()),
            Refusal::ManifestByTag(m) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", m.clone()),
            Refusal::DigestInvalid(m) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID", m.clone()),
        },
        Failure::ManifestUnknown(m) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", m.clone()),
        Failure::BlobUnknown(d) => (
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {d} is not in kiln's image store"),
        ),
        Failure::RangeUnsatisfiable(size) => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            format!("the range asked for lies past the end of the blob ({size} bytes)"),
        ),
        Failure::Internal(m) => {
            tracing::error!(error = %m, "registry: internal error");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "internal error; the daemon's log has the details".to_owned(),
            )
        }
    };
    let body = serde_json::to_vec(&json!({"errors": [{"code": code, "message": message}]}))
        .unwrap_or_default();
    let mut r = full(status, Bytes::from(body), "application/json", head);
    if let Failure::RangeUnsatisfiable(size) = f
        && let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}"))
    {
        r.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    r
}

/// Answers one request.
pub async fn handle(files: Arc<dyn BlobFiles>, req: hyper::Request<Incoming>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let read = head || req.method() == Method::GET;
    let answer = match path::parse(read, req.uri().path()) {
        Err(refusal) => Err(Failure::Refused(refusal)),
        Ok(Request::Base) => Ok(full(
            StatusCode::OK,
            Bytes::from_static(b"{}"),
            "application/json",
            head,
        )),
        Ok(Request::Manifest { digest, .. }) => manifest(files, digest, head).await,
        Ok(Request::ReferrersTag { subject, .. }) => {
            match referrers_index(&files, &subject).await {
                Ok(Some(index)) => manifest(files, index, head).await,
                Ok(None) => Err(Failure::ManifestUnknown(format!(
                    "image {subject} has no referrers in kiln's image store (no tag {})",
                    shown_tag(&subject)
                ))),
                Err(f) => Err(f),
            }
        }
        Ok(Request::Referrers { subject, .. }) => {
            let filter = artifact_type_filter(req.uri().query());
            referrers(files, subject, filter, head).await
        }
        Ok(Request::Blob { digest, .. }) => {
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            blob(files, digest, head, range.as_deref()).await
        }
    };
    let mut r = answer.unwrap_or_else(|f| error_response(&f, head));
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

/// The media types a manifest may have, and whether one is an index.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The media type of a zstd layer.
const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The media type of `bytes` when they are a manifest or an index: the one it declares, or,
/// for an OCI document without `mediaType`, the one its shape says.
pub fn manifest_media_type(bytes: &[u8]) -> Option<&'static str> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let object = v.as_object()?;
    if object
        .get("schemaVersion")
        .and_then(serde_json::Value::as_u64)
        != Some(2)
    {
        return None;
    }
    match object.get("mediaType") {
        Some(t) => MANIFEST_TYPES
            .iter()
            .copied()
            .find(|m| t.as_str() == Some(*m)),
        None if object.contains_key("config") && object.contains_key("layers") => {
            Some(MANIFEST_TYPES[0])
        }
        None if object.contains_key("manifests") => Some(MANIFEST_TYPES[1]),
        None => None,
    }
}

/// The stored manifest `digest`, read whole (at most [`MAX_MANIFEST`]) and verified;
/// `None` when the store has no such blob.
async fn read_manifest(
    files: Arc<dyn BlobFiles>,
    digest: &Digest,
) -> Result<Option<Vec<u8>>, Failure> {
    let d = digest.clone();
    tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, Failure> {
        let Some(file) = files.open_blob(&d).map_err(|e| internal(&d, &e))? else {
            return Ok(None);
        };
        let size = file.metadata().map_err(|e| internal(&d, &e))?.len();
        if size > MAX_MANIFEST {
            return Err(Failure::ManifestUnknown(format!(
                "{d} is larger than any manifest kiln serves ({MAX_MANIFEST} bytes): ask for \
                 it under blobs/"
            )));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&file, MAX_MANIFEST + 1),
            &mut bytes,
        )
        .map_err(|e| internal(&d, &e))?;
        let actual = Digest::of(&bytes);
        if actual != d {
            return Err(Failure::Internal(format!(
                "blob {d} is corrupt: its content hashes to {actual}"
            )));
        }
        Ok(Some(bytes))
    })
    .await
    .map_err(|e| Failure::Internal(format!("reading manifest {digest}: {e}")))?
}

async fn manifest(
    files: Arc<dyn BlobFiles>,
    digest: Digest,
    head: bool,
) -> Result<Response<Body>, Failure> {
    let bytes = read_manifest(files, &digest).await?;
    let Some(bytes) = bytes else {
        return Err(Failure::ManifestUnknown(format!(
            "manifest {digest} is not in kiln's image store"
        )));
    };
    let Some(media_type) = manifest_media_type(&bytes) else {
        return Err(Failure::ManifestUnknown(format!(
            "{digest} is not a manifest or an image index (ask for it under blobs/)"
        )));
    };
    // Served all the same (other clients read them); said once per pull, where the operator
    // looks when a node's pull fails.
    if bytes
        .windows(ZSTD_LAYER.len())
        .any(|w| w == ZSTD_LAYER.as_bytes())
    {
        tracing::warn!(
            manifest = %digest,
            "registry: this image has zstd layers, which Docker Engine 20.10 cannot pull \
             (build it with [image] compression = \"gzip\")"
        );
    }
    let mut r = full(StatusCode::OK, Bytes::from(bytes), media_type, head);
    set_digest(&mut r, &digest);
    Ok(r)
}

async fn blob(
    files: Arc<dyn BlobFiles>,
    digest: Digest,
    head: bool,
    range: Option<&str>,
) -> Result<Response<Body>, Failure> {
    let d = digest.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<Option<(File, u64)>, Failure> {
        let Some(file) = files.open_blob(&d).map_err(|e| internal(&d, &e))? else {
            return Ok(None);
        };
        let size = file.metadata().map_err(|e| internal(&d, &e))?.len();
        Ok(Some((file, size)))
    })
    .await
    .map_err(|e| Failure::Internal(format!("opening blob {digest}: {e}")))??;
    let Some((file, size)) = opened else {
        return Err(Failure::BlobUnknown(digest));
    };
    let file = Arc::new(file);
    let (status, start, end) = match path::parse_range(range, size) {
        Range::Unsatisfiable => return Err(Failure::RangeUnsatisfiable(size)),
        Range::Whole => (StatusCode::OK, 0, size),
        Range::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
    };
    let body = if head {
        Body::empty()
    } else if status == StatusCode::OK && size > 0 {
        // Verified as it streams: the last chunk goes only once the whole hashes right.
        Body::stream(file, 0, size, Some(digest.clone()))
    } else {
        // A part (or an empty blob): the whole is verified before any of it is sent.
        let (f, d) = (Arc::clone(&file), digest.clone());
        tokio::task::spawn_blocking(move || verify(&f, size, &d))
            .await
            .map_err(|e| Failure::Internal(format!("verifying blob {digest}: {e}")))??;
        Body::stream(file, start, end, None)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    set_digest(&mut r, &digest);
    Ok(r)
}

/// The media type of an image index, which the referrers API answers.
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// `sha256-<hex>`: the referrers tag of `subject`.
fn shown_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// The digest of `subject`'s referrers index in the store, read on a blocking thread.
async fn referrers_index(
    files: &Arc<dyn BlobFiles>,
    subject: &Digest,
) -> Result<Option<Digest>, Failure> {
    let (f, s) = (Arc::clone(files), subject.clone());
    let failed = |e: String| Failure::Internal(format!("reading the referrers of {subject}: {e}"));
    tokio::task::spawn_blocking(move || f.referrers_index(&s))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(failed)
}

/// The `artifactType` a referrers request filters by (`?artifactType=…`, percent-decoded;
/// the first one when several are given).
pub fn artifact_type_filter(query: Option<&str>) -> Option<String> {
    let value = query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("artifactType="))?;
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = value.get(i + 1..i + 3).filter(|_| bytes[i] == b'%');
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// The OCI referrers API: an image index of `subject`'s referrers (empty when it has none),
/// only those of artifact type `filter` when one is given.
async fn referrers(
    files: Arc<dyn BlobFiles>,
    subject: Digest,
    filter: Option<String>,
    head: bool,
) -> Result<Response<Body>, Failure> {
    let mut listed = Vec::new();
    if let Some(index) = referrers_index(&files, &subject).await? {
        let Some(bytes) = read_manifest(files, &index).await? else {
            return Err(Failure::Internal(format!(
                "the referrers index {index} of {subject} is not in the store"
            )));
        };
        let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            Failure::Internal(format!(
                "the referrers index {index} of {subject} is not JSON: {e}"
            ))
        })?;
        if let Some(serde_json::Value::Array(manifests)) = doc.get("manifests") {
            listed.clone_from(manifests);
        }
    }
    if let Some(t) = &filter {
        listed.retain(|d| d.get("artifactType").and_then(|v| v.as_str()) == Some(t.as_str()));
    }
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": listed,
    }))
    .map_err(|e| Failure::Internal(format!("encoding the referrers of {subject}: {e}")))?;
    let mut r = full(StatusCode::OK, Bytes::from(body), OCI_INDEX, head);
    if filter.is_some() {
        r.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(r)
}

/// Hashes the whole of `file` (`size` bytes) a chunk at a time against `digest`.
fn verify(file: &File, size: u64, digest: &Digest) -> Result<(), Failure> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < size {
        let n = usize::try_from((size - at).min(CHUNK as u64)).unwrap_or(CHUNK);
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| internal(digest, &e))?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    let actual = Digest::from_sha256(hasher.finalize().into());
    if &actual == digest {
        Ok(())
    } else {
        Err(Failure::Internal(format!(
            "blob {digest} is corrupt: its content hashes to {actual}"
        )))
    }
}

fn internal(digest: &Digest, e: &std::io::Error) -> Failure {
    Failure::Internal(format!("reading blob {digest} from the store: {e}"))
}

fn set_digest(r: &mut Response<Body>, digest: &Digest) {
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        r.headers_mut().insert("docker-content-digest", v);
    }
}

/// A whole response body in memory; for HEAD, the headers only (the same `Content-Length`).
fn full(
    status: StatusCode,
    bytes: Bytes,
    content_type: &'static str,
    head: bool,
) -> Response<Body> {
    let len = bytes.len();
    let mut r = Response::new(if head {
        Body::empty()
    } else {
        Body::full(bytes)
    });
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// A registry response's body: bytes in memory, or a blob read a chunk at a time.
pub struct Body(Inner);

enum Inner {
    Full(Option<Bytes>),
    Stream {
        rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
        left: u64,
    },
}

impl Body {
    fn empty() -> Body {
        Body(Inner::Full(None))
    }

    fn full(bytes: Bytes) -> Body {
        Body(Inner::Full(Some(bytes)))
    }

    /// Bytes `start..end` of `file`, read on blocking threads a [`CHUNK`] at a time as the
    /// client takes them; with `verify`, the file's whole content must hash to it or the last
    /// chunk is replaced by an error (which cuts the connection off).
    fn stream(file: Arc<File>, start: u64, end: u64, verify: Option<Digest>) -> Body {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let mut hasher = verify.as_ref().map(|_| Sha256::new());
            let mut at = start;
            while at < end {
                let n = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
                let last = at + n as u64 == end;
                let (f, expected, h) = (Arc::clone(&file), verify.clone(), hasher.take());
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    f.read_exact_at(&mut buf, at)?;
                    let h = h.map(|mut h| {
                        h.update(&buf);
                        h
                    });
                    if last && let (Some(h), Some(expected)) = (&h, expected) {
                        let actual = Digest::from_sha256(h.clone().finalize().into());
                        if actual != expected {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!(
                                    "blob {expected} is corrupt: its content hashes to {actual}"
                                ),
                            ));
                        }
                    }
                    Ok((Bytes::from(buf), h))
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                match read {
                    Ok((chunk, h)) => {
                        hasher = h;
                        // The client is gone: stop reading.
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                        at += n as u64;
                    }
                    Err(error) => {
                        tracing::error!(%error, "registry: a blob transfer was cut off");
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                }
            }
        });
        Body(Inner::Stream {
            rx,
            left: end - start,
        })
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match &mut self.0 {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream { rx, left } => match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    *left = left.saturating_sub(chunk.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) if *left > 0 => Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the blob's reader stopped early",
                )))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Stream { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Stream { left, .. } => SizeHint::with_exact(*left),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn artifact_type_filters_are_percent_decoded() {
        let sig = Some("application/vnd.kiln.signature.v1+sshsig".to_owned());
        assert_eq!(
            artifact_type_filter(Some(
                "artifactType=application%2Fvnd.kiln.signature.v1%2Bsshsig"
            )),
            sig
        );
        assert_eq!(
            artifact_type_filter(Some(
                "n=1&artifactType=application/vnd.kiln.signature.v1+sshsig"
            )),
            sig
        );
        assert_eq!(artifact_type_filter(None), None);
        assert_eq!(artifact_type_filter(Some("last=10")), None);
        // A broken escape is kept as sent (it then matches nothing).
        assert_eq!(
            artifact_type_filter(Some("artifactType=a%2")).as_deref(),
            Some("a%2")
        );
        assert_eq!(
            artifact_type_filter(Some("artifactType=%e2%82%ac")).as_deref(),
            Some("€")
        );
    }

    #[test]
    fn manifest_media_types() {
        let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert_eq!(manifest_media_type(oci), Some(MANIFEST_TYPES[0]));
        let bare = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(manifest_media_type(bare), Some(MANIFEST_TYPES[0]));
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(manifest_media_type(index), Some(MANIFEST_TYPES[1]));
        let list = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert_eq!(manifest_media_type(list), Some(MANIFEST_TYPES[3]));
        // An image config, a layer, another document: not manifests.
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{}}"#;
        assert_eq!(manifest_media_type(config), None);
        assert_eq!(manifest_media_type(b"\x1f\x8b\x08\x00"), None);
        let other = br#"{"schemaVersion":2,"mediaType":"text/html","config":{},"layers":[]}"#;
        assert_eq!(manifest_media_type(other), None);
        let v1 = br#"{"schemaVersion":1,"config":{},"layers":[]}"#;
        assert_eq!(manifest_media_type(v1), None);
    }

    #[test]
    fn endpoint_references() {
        let e = Endpoint {
            addr: "10.0.0.1:5000".parse().unwrap(),
            tls: true,
            ca: None,
        };
        let d = Digest::of(b"m");
        assert_eq!(e.prefix("web"), "10.0.0.1:5000/kiln/web");
        assert_eq!(
            e.reference("web", &d),
            format!("10.0.0.1:5000/kiln/web@{d}")
        );
        assert_eq!(
            e.docker_ca_path(),
            "/etc/docker/certs.d/10.0.0.1:5000/ca.crt"
        );
    }
}
