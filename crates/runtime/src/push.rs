//! Pushing kiln's images to a registry the user names (`[target] registry`), over the OCI
//! Distribution API: the alternative to the daemon's own registry endpoint for teams that run
//! one. The swarm provider pushes an image here before its first instance is created, and
//! `kiln image push` drives the same code from the command line.
//!
//! For an image (and, for an image index, each of its manifests first):
//!
//! - `HEAD /v2/<name>/manifests/<digest>`: already there, nothing more is sent;
//! - for each blob (config, layers): `HEAD /v2/<name>/blobs/<digest>`; when missing,
//!   `POST /v2/<name>/blobs/uploads/` and one monolithic `PUT <Location>&digest=<digest>`
//!   with its `Content-Length`, the blob streamed from the store file (a chunk at a time, hashed as it goes: a stored
//!   blob that does not hash to its name ends the upload with an error before its last byte);
//! - `PUT /v2/<name>/manifests/<digest>` with the manifest's exact bytes and media type;
//! - then the image's referrers (signatures, attestations: `kiln sign`), each pushed as
//!   above, and the OCI referrers-tag fallback: `PUT /v2/<name>/manifests/sha256-<hex>` with
//!   the image index of them (merged with the one the registry has, if any), so a registry
//!   without the referrers API (distribution 2.x) lists them and `skopeo copy` carries them.
//!
//! Every `Docker-Content-Digest` the registry answers must be kiln's digest, so the image
//! nodes pull is the one kiln built, byte for byte.
//!
//! The repository is `HOST[:PORT]/PATH/<app>`, `PATH` defaulting to `kiln`
//! ([`Repository::for_app`]): the same shape as the daemon's endpoint when no path is given,
//! and a team's own namespace (`registry.example.com/team/<app>`) when one is.
//!
//! HTTPS by default, verified against the system's CA roots (Debian's `ca-certificates`
//! bundle, [`SYSTEM_ROOTS`]) plus an optional extra CA file; plain HTTP only to a loopback
//! host or when asked ([`PushOptions::insecure`]), and never after a redirect from HTTPS
//! unless asked.
//!
//! **API boundary:** no image layout: blobs come from an [`ImageSource`] by digest. No
//! authentication: the registry must take anonymous pushes from kiln's address (a 401 says
//! so). No cross-repository mounts.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::image::ImageSource;
use crate::types::Digest;

/// Where Debian (and most distributions) keep the system's trusted CA certificates.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The largest manifest pushed: what the distribution spec has registries accept.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Where, under kiln's state directory, an operator puts a CA certificate (PEM) to trust
/// besides the system's roots when pushing (the swarm provider and `kiln image push` read it).
pub const EXTRA_CA: &str = "push/ca.crt";

/// How many redirects one request follows.
pub const MAX_REDIRECTS: usize = 5;

/// How long a connection (and a TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the registry may take to answer a request's head once the body is sent.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// How much of a blob is read (and held) at a time.
const CHUNK: usize = 256 << 10;

/// The most of an error body read, for its message.
const MAX_ERROR_BODY: usize = 64 << 10;

/// The media types of a manifest and of an image index, when a document does not say.
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The repository prefix `[target] registry` names: `HOST[:PORT]/PATH`, or
/// `HOST[:PORT]/kiln` when it has no path. An app's images go to `<prefix>/<app>`.
pub fn repository_prefix(registry: &str) -> String {
    match registry.split_once('/') {
        Some(_) => registry.to_owned(),
        None => format!("{registry}/kiln"),
    }
}

/// `app` as one repository path component: lowercase alphanumerics joined by single `-`
/// (`app` when nothing is left), the name an app's images are pushed and pulled under.
pub fn app_component(app: &str) -> String {
    let mut name = String::new();
    for c in app.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            name.push(c);
        } else if !name.is_empty() && !name.ends_with(['-', '.', '_']) {
            name.push('-');
        }
    }
    let name = name.trim_end_matches(['-', '.', '_']);
    if name.is_empty() { "app" } else { name }.to_owned()
}

/// A repository of a registry: `HOST[:PORT]` and a name of path components.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repository {
    host: String,
    name: String,
}

impl Repository {
    /// Parses `HOST[:PORT]/NAME` (no scheme, tag or digest), in the distribution grammar.
    pub fn parse(reference: &str) -> Result<Repository, PushError> {
        let bad = |message: String| PushError::Reference {
            reference: reference.to_owned(),
            message,
        };
        let (host, name) = kiln_spec::rules::registry(reference).map_err(|b| bad(b.message))?;
        let Some(name) = name else {
            return Err(bad(
                "no repository name after the host (HOST[:PORT]/NAME)".to_owned()
            ));
        };
        if name.len() > 255 {
            return Err(bad(
                "the repository name is longer than 255 characters".to_owned()
            ));
        }
        Ok(Repository {
            host: host.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The repository `app`'s images go to under `[target] registry` (`registry`):
    /// `<registry>/<app>` when it has a path, `<registry>/kiln/<app>` when not (the app as
    /// [`app_component`] makes it).
    pub fn for_app(registry: &str, app: &str) -> Result<Repository, PushError> {
        Repository::parse(&format!(
            "{}/{}",
            repository_prefix(registry),
            app_component(app)
        ))
    }

    /// `HOST[:PORT]`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The repository name (`team/app`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `HOST[:PORT]/NAME@sha256:…`: what an engine pulls.
    pub fn reference(&self, image: &Digest) -> String {
        format!("{}/{}@{image}", self.host, self.name)
    }

    /// Whether the host is loopback (`localhost`, `127.0.0.0/8`, `[::1]`): plain HTTP there
    /// is what an engine does without configuration.
    pub fn is_loopback(&self) -> bool {
        let (name, _) = split_host(&self.host);
        name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.name)
    }
}

/// `host[:port]` → (host without IPv6 brackets, port).
fn split_host(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((ip, after)) = rest.split_once(']')
    {
        return (ip, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

/// How to reach the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushOptions {
    /// Plain HTTP even off loopback.
    pub insecure: bool,
    /// A CA certificate file (PEM) trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pushed {
    /// The reference pushed (`HOST/NAME@sha256:…`).
    pub reference: String,
    /// Manifests (and indexes) sent.
    pub manifests_sent: usize,
    /// Manifests the registry had already (nothing below them was sent).
    pub manifests_present: usize,
    /// Blobs sent.
    pub blobs_sent: usize,
    /// Blobs the registry had already.
    pub blobs_present: usize,
    /// Bytes of blobs sent.
    pub bytes_sent: u64,
}

/// Why a push failed; each names the registry and what was being sent.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Not a `HOST[:PORT]/NAME` reference.
    #[error("{reference:?} is not a repository to push to: {message}")]
    Reference {
        /// What was given.
        reference: String,
        /// What is wrong.
        message: String,
    },
    /// Plain HTTP was needed and not allowed.
    #[error(
        "registry {registry}: plain HTTP to a host that is not loopback needs \
         registry_insecure = true (or --insecure)"
    )]
    Insecure {
        /// The registry.
        registry: String,
    },
    /// The image cannot be read from the store.
    #[error("image {digest}: {message}")]
    Image {
        /// The blob or manifest.
        digest: Digest,
        /// What is wrong.
        message: String,
    },
    /// The CA roots cannot be read.
    #[error("cannot read the CA certificates {}: {message}", path.display())]
    Roots {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The registry cannot be reached.
    #[error("registry {registry}: cannot {what}: {message}")]
    Connect {
        /// The registry (the host of the URL tried).
        registry: String,
        /// `connect`, `TLS handshake`, `send PUT …`.
        what: String,
        /// Why.
        message: String,
    },
    /// The registry answered a status kiln did not expect.
    #[error("registry {registry}: {what}: HTTP {status}{}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        /// The registry.
        registry: String,
        /// What was asked (`upload blob sha256:…`).
        what: String,
        /// The status.
        status: StatusCode,
        /// The registry's own error code and message, when it gave one.
        message: Option<String>,
    },
    /// The registry's answer breaks the protocol (a wrong digest, no `Location`, a redirect
    /// loop).
    #[error("registry {registry}: {what}: {message}")]
    Protocol {
        /// The registry.
        registry: String,
        /// What was asked.
        what: String,
        /// What is wrong with the answer.
        message: String,
    },
}

/// Pushes `image` from `source` to `repo`: the blobs the registry lacks, then the manifest
/// (an index's manifests first). Idempotent: an image already there costs one `HEAD`.
pub async fn push(
    source: &dyn ImageSource,
    image: &Digest,
    repo: &Repository,
    opts: &PushOptions,
) -> Result<Pushed, PushError> {
    let client = Client::new(repo, opts)?;
    let mut run = Run {
        client: &client,
        source,
        repo,
        sent: HashSet::new(),
        pushed: Pushed {
            reference: repo.reference(image),
            ..Pushed::default()
        },
    };
    run.manifest(image, 0).await?;
    run.referrers(image).await?;
    Ok(run.pushed)
}

/// Pushes each image to each repository at most once per process, however many callers ask
/// at the same time: the swarm provider's concurrent creates of one image push it once. A
/// failed push is not remembered, so the next caller tries again.
#[derive(Debug, Default)]
pub struct PushOnce {
    done: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<()>>>>,
}

impl PushOnce {
    /// An empty record.
    pub fn new() -> PushOnce {
        PushOnce::default()
    }

    /// Pushes `image` to `repo` unless this process did already; returns what it sent
    /// (`None`: pushed before, or by a concurrent caller).
    pub async fn ensure(
        &self,
        source: &dyn ImageSource,
        image: &Digest,
        repo: &Repository,
        opts: &PushOptions,
    ) -> Result<Option<Pushed>, PushError> {
        let cell = {
            let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(done.entry(repo.reference(image)).or_default())
        };
        let mut sent = None;
        cell.get_or_try_init(|| async {
            sent = Some(push(source, image, repo, opts).await?);
            Ok::<(), PushError>(())
        })
        .await?;
        Ok(sent)
    }
}

/// One push in progress.
struct Run<'a> {
    client: &'a Client,
    source: &'a dyn ImageSource,
    repo: &'a Repository,
    /// Blobs sent or found in this run (an index's manifests share layers).
    sent: HashSet<Digest>,
    pushed: Pushed,
}

impl Run<'_> {
    fn url(&self, rest: &str) -> Result<Uri, PushError> {
        let s = format!(
            "{}://{}/v2/{}/{rest}",
            self.client.scheme, self.repo.host, self.repo.name
        );
        s.parse().map_err(|e| PushError::Reference {
            reference: self.repo.to_string(),
            message: format!("cannot form the URL {s:?}: {e}"),
        })
    }

    fn status(&self, what: &str, status: StatusCode, message: Option<String>) -> PushError {
        let message = if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            Some(format!(
                "{}kiln sends no credentials: the registry must take pushes from this host \
                 without them",
                message.map(|m| format!("{m}; ")).unwrap_or_default()
            ))
        } else {
            message
        };
        PushError::Status {
            registry: self.repo.host.clone(),
            what: what.to_owned(),
            status,
            message,
        }
    }

    fn protocol(&self, what: &str, message: String) -> PushError {
        PushError::Protocol {
            registry: self.repo.host.clone(),
            what: what.to_owned(),
            message,
        }
    }

    /// Pushes the manifest or index `digest` and everything under it.
    async fn manifest(&mut self, digest: &Digest, depth: usize) -> Result<(), PushError> {
        let bytes = read_manifest(self.source, digest)?;
        let doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| PushError::Image {
                digest: digest.clone(),
                message: format!("not a JSON manifest: {e}"),
            })?;
        let media_type = media_type(&doc).ok_or_else(|| PushError::Image {
            digest: digest.clone(),
            message: "neither an image manifest nor an image index".to_owned(),
        })?;
        let what = format!("check manifest {digest}");
        let url = self.url(&format!("manifests/{digest}"))?;
        let answer = self
            .client
            .send(&what, Method::HEAD, url, None, &|| Ok(empty()))
            .await?;
        match answer.status() {
            StatusCode::OK => {
                self.pushed.manifests_present += 1;
                return Ok(());
            }
            StatusCode::NOT_FOUND => {}
            s => return Err(self.status(&what, s, error_message(answer).await)),
        }
        if media_type == OCI_INDEX || media_type == MANIFEST_TYPES[3] {
            if depth > 0 {
                return Err(PushError::Image {
                    digest: digest.clone(),
                    message: "an image index inside an image index is not pushed".to_owned(),
                });
            }
            for child in descriptors(digest, as_list(doc.get("manifests")))? {
                Box::pin(self.manifest(&child.0, depth + 1)).await?;
            }
        } else {
            let config = descriptors(digest, doc.get("config").map(std::slice::from_ref))?;
            let layers = descriptors(digest, as_list(doc.get("layers")))?;
            for (blob, size) in config.iter().chain(&layers) {
                self.blob(blob, *size).await?;
            }
        }
        let what = format!("put manifest {digest}");
        let url = self.url(&format!("manifests/{digest}"))?;
        let body = Bytes::from(bytes);
        let content_type = HeaderValue::from_static(media_type);
        let answer = self
            .client
            .send(&what, Method::PUT, url, Some(content_type), &|| {
                Ok(Full::new(body.clone())
                    .map_err(|never| match never {})
                    .boxed())
            })
            .await?;
        if answer.status() != StatusCode::CREATED {
            let s = answer.status();
            return Err(self.status(&what, s, error_message(answer).await));
        }
        self.check_digest(&what, &answer, digest, true)?;
        self.pushed.manifests_sent += 1;
        Ok(())
    }

    /// Pushes the referrers of `image` (its signatures and attestations: each one's blobs,
    /// then its manifest), then the referrers-tag index as the tag `sha256-<hex>`, so a
    /// registry without the referrers API still lists them. A tag the registry has already
    /// keeps the referrers it lists that kiln lacks (another host's signatures): kiln's are
    /// added to it, never put in their place.
    async fn referrers(&mut self, image: &Digest) -> Result<(), PushError> {
        let index = match self.source.referrers_index(image) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(PushError::Image {
                    digest: image.clone(),
                    message: format!("cannot read its referrers: {e}"),
                });
            }
        };
        let bytes = read_manifest(self.source, &index)?;
        let doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| PushError::Image {
                digest: index.clone(),
                message: format!("the referrers index of {image} is not JSON: {e}"),
            })?;
        let children = descriptors(&index, as_list(doc.get("manifests")))?;
        for (child, _) in &children {
            let manifest = read_manifest(self.source, child)?;
            let subject = serde_json::from_slice::<serde_json::Value>(&manifest)
                .ok()
                .and_then(|d| d.get("subject")?.get("digest")?.as_str().map(str::to_owned));
            if subject.as_deref() != Some(image.as_str()) {
                return Err(PushError::Image {
                    digest: child.clone(),
                    message: format!("listed as a referrer of {image}, but not its subject"),
                });
            }
            Box::pin(self.manifest(child, 1)).await?;
        }
        let tag = format!("sha256-{}", image.hex());
        let Some(body) = self.merged_tag(&tag, &index, doc).await? else {
            self.pushed.manifests_present += 1;
            return Ok(());
        };
        let digest = Digest::of(&body);
        let what = format!("put referrers tag {tag}");
        let url = self.url(&format!("manifests/{tag}"))?;
        let body = Bytes::from(body);
        let answer = self
            .client
            .send(
                &what,
                Method::PUT,
                url,
                Some(HeaderValue::from_static(OCI_INDEX)),
                &|| {
                    Ok(Full::new(body.clone())
                        .map_err(|never| match never {})
                        .boxed())
                },
            )
            .await?;
        if answer.status() != StatusCode::CREATED {
            let s = answer.status();
            return Err(self.status(&what, s, error_message(answer).await));
        }
        self.check_digest(&what, &answer, &digest, true)?;
        self.pushed.manifests_sent += 1;
        Ok(())
    }

    /// The bytes to put as the referrers tag `tag`: kiln's index (`ours`, digest `index`)
    /// when the registry has no such tag; kiln's with the registry's other referrers added
    /// when it lists some kiln lacks; `None` when it lists all of kiln's already.
    async fn merged_tag(
        &self,
        tag: &str,
        index: &Digest,
        mut ours: serde_json::Value,
    ) -> Result<Option<Vec<u8>>, PushError> {
        let what = format!("get referrers tag {tag}");
        let url = self.url(&format!("manifests/{tag}"))?;
        let answer = self
            .client
            .send(&what, Method::GET, url, None, &|| Ok(empty()))
            .await?;
        match answer.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return read_manifest(self.source, index).map(Some);
            }
            s => return Err(self.status(&what, s, error_message(answer).await)),
        }
        let theirs = http_body_util::Limited::new(answer.into_body(), MAX_MANIFEST as usize)
            .collect()
            .await
            .map_err(|e| self.protocol(&what, format!("cannot read the answer: {e}")))?
            .to_bytes();
        if Digest::of(&theirs) == *index {
            return Ok(None);
        }
        let theirs: serde_json::Value = serde_json::from_slice(&theirs)
            .map_err(|e| self.protocol(&what, format!("not an image index: {e}")))?;
        let digest_of =
            |d: &serde_json::Value| d.get("digest").and_then(|v| v.as_str()).map(str::to_owned);
        let listed: HashSet<String> = as_list(theirs.get("manifests"))
            .unwrap_or_default()
            .iter()
            .filter_map(digest_of)
            .collect();
        let Some(mine) = ours.get_mut("manifests").and_then(|m| m.as_array_mut()) else {
            return Err(PushError::Image {
                digest: index.clone(),
                message: "a referrers index without manifests".to_owned(),
            });
        };
        let missing = mine
            .iter()
            .filter_map(digest_of)
            .any(|d| !listed.contains(&d));
        if !missing {
            return Ok(None);
        }
        let known: HashSet<String> = mine.iter().filter_map(digest_of).collect();
        for other in as_list(theirs.get("manifests")).unwrap_or_default() {
            if digest_of(other).is_some_and(|d| !known.contains(&d)) {
                mine.push(other.clone());
            }
        }
        serde_json::to_vec(&ours)
            .map(Some)
            .map_err(|e| PushError::Image {
                digest: index.clone(),
                message: format!("cannot encode the merged referrers index: {e}"),
            })
    }

    /// Sends blob `digest` (`size` bytes, as its descriptor says) unless the registry has it.
    async fn blob(&mut self, digest: &Digest, size: u64) -> Result<(), PushError> {
        if self.sent.contains(digest) {
            return Ok(());
        }
        let what = format!("check blob {digest}");
        let answer = self
            .client
            .send(
                &what,
                Method::HEAD,
                self.url(&format!("blobs/{digest}"))?,
                None,
                &|| Ok(empty()),
            )
            .await?;
        match answer.status() {
            StatusCode::OK => {
                self.pushed.blobs_present += 1;
                self.sent.insert(digest.clone());
                return Ok(());
            }
            StatusCode::NOT_FOUND => {}
            s => return Err(self.status(&what, s, error_message(answer).await)),
        }
        // Open it before asking for an upload, so a missing blob costs the registry nothing.
        let path = blob_file(self.source, digest)?;
        let found = std::fs::metadata(&path)
            .map_err(|e| PushError::Image {
                digest: digest.clone(),
                message: format!("cannot read {}: {e}", path.display()),
            })?
            .len();
        if found != size {
            return Err(PushError::Image {
                digest: digest.clone(),
                message: format!("the store holds {found} bytes, its descriptor says {size}"),
            });
        }
        let what = format!("start the upload of blob {digest}");
        let start = self.url("blobs/uploads/")?;
        let answer = self
            .client
            .send(&what, Method::POST, start.clone(), None, &|| Ok(empty()))
            .await?;
        if answer.status() != StatusCode::ACCEPTED {
            let s = answer.status();
            return Err(self.status(&what, s, error_message(answer).await));
        }
        let location = answer
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| self.protocol(&what, "202 without a Location".to_owned()))?;
        let put = resolve_location(&start, location)
            .and_then(|u| with_digest(&u, digest))
            .map_err(|m| self.protocol(&what, m))?;
        let what = format!("upload blob {digest} ({size} bytes)");
        let opened = path.clone();
        let expected = digest.clone();
        let answer = self
            .client
            .send_sized(
                &what,
                Method::PUT,
                put,
                Some(HeaderValue::from_static("application/octet-stream")),
                Some(size),
                &|| blob_body(&opened, expected.clone(), size),
            )
            .await?;
        if answer.status() != StatusCode::CREATED {
            let s = answer.status();
            return Err(self.status(&what, s, error_message(answer).await));
        }
        self.check_digest(&what, &answer, digest, false)?;
        self.pushed.blobs_sent += 1;
        self.pushed.bytes_sent += size;
        self.sent.insert(digest.clone());
        Ok(())
    }

    /// Checks the `Docker-Content-Digest` of `answer` is `digest` (absent: an error when
    /// `required`).
    fn check_digest(
        &self,
        what: &str,
        answer: &Response<Incoming>,
        digest: &Digest,
        required: bool,
    ) -> Result<(), PushError> {
        match answer.headers().get("docker-content-digest") {
            Some(v) if v.as_bytes() == digest.as_str().as_bytes() => Ok(()),
            Some(v) => Err(self.protocol(
                what,
                format!(
                    "the registry answered Docker-Content-Digest {:?}, kiln's digest is {digest}",
                    String::from_utf8_lossy(v.as_bytes())
                ),
            )),
            None if required => Err(self.protocol(
                what,
                "the registry answered no Docker-Content-Digest".to_owned(),
            )),
            None => Ok(()),
        }
    }
}

/// The manifest media types kiln pushes (and accepts back).
const MANIFEST_TYPES: [&str; 4] = [
    OCI_MANIFEST,
    OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The media type a manifest declares, or its shape says.
fn media_type(doc: &serde_json::Value) -> Option<&'static str> {
    match doc.get("mediaType") {
        Some(serde_json::Value::String(m)) => MANIFEST_TYPES.iter().find(|k| *k == m).copied(),
        Some(_) => None,
        None if doc.get("manifests").is_some() => Some(OCI_INDEX),
        None if doc.get("config").is_some() => Some(OCI_MANIFEST),
        None => None,
    }
}

/// The `(digest, size)` of each descriptor in `list` (absent: none).
fn descriptors(
    of: &Digest,
    list: Option<&[serde_json::Value]>,
) -> Result<Vec<(Digest, u64)>, PushError> {
    let bad = |message: String| PushError::Image {
        digest: of.clone(),
        message,
    };
    let mut out = Vec::new();
    for d in list.unwrap_or_default() {
        let digest = d
            .get("digest")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("a descriptor without a digest".to_owned()))?;
        let digest = Digest::parse(digest).map_err(|e| bad(e.to_string()))?;
        let size = d
            .get("size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad(format!("descriptor {digest} without a size")))?;
        out.push((digest, size));
    }
    Ok(out)
}

/// `value` as a slice of values (`manifests`, `layers`).
fn as_list(value: Option<&serde_json::Value>) -> Option<&[serde_json::Value]> {
    value.and_then(|v| v.as_array()).map(Vec::as_slice)
}

/// The stored manifest `digest`, read whole (at most [`MAX_MANIFEST`]) and checked.
fn read_manifest(source: &dyn ImageSource, digest: &Digest) -> Result<Vec<u8>, PushError> {
    let path = blob_file(source, digest)?;
    let bad = |message: String| PushError::Image {
        digest: digest.clone(),
        message,
    };
    let len = std::fs::metadata(&path)
        .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?
        .len();
    if len > MAX_MANIFEST {
        return Err(bad(format!(
            "{len} bytes: larger than a manifest may be ({MAX_MANIFEST})"
        )));
    }
    let bytes =
        std::fs::read(&path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    let found = Digest::of(&bytes);
    if &found != digest {
        return Err(bad(format!(
            "the stored manifest hashes to {found}: the store is corrupt"
        )));
    }
    Ok(bytes)
}

/// The file of blob `digest` in `source`.
fn blob_file(source: &dyn ImageSource, digest: &Digest) -> Result<PathBuf, PushError> {
    match source.blob_path(digest) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(PushError::Image {
            digest: digest.clone(),
            message: "not in the image store".to_owned(),
        }),
        Err(e) => Err(PushError::Image {
            digest: digest.clone(),
            message: e.to_string(),
        }),
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The blob at `path` as a body read a chunk at a time and hashed as it goes: when the bytes
/// do not hash to `expected`, the last chunk is an error instead, so the registry never
/// receives the whole of a corrupt blob.
fn blob_body(path: &Path, expected: Digest, size: u64) -> Result<Body, std::io::Error> {
    let file = tokio::fs::File::from_std(std::fs::File::open(path)?);
    struct State {
        file: tokio::fs::File,
        hasher: Sha256,
        left: u64,
        expected: Digest,
        done: bool,
    }
    let state = State {
        file,
        hasher: Sha256::new(),
        left: size,
        expected,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let want = usize::try_from(s.left.min(CHUNK as u64)).unwrap_or(CHUNK);
        let mut buf = BytesMut::zeroed(want);
        let mut got = 0;
        while got < want {
            match s.file.read(&mut buf[got..]).await {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => {
                    s.done = true;
                    return Some((Err(e), s));
                }
            }
        }
        buf.truncate(got);
        s.hasher.update(&buf);
        s.left -= got as u64;
        if got < want || s.left == 0 {
            s.done = true;
            let found = Digest::from_sha256(std::mem::take(&mut s.hasher).finalize().into());
            if got < want || found != s.expected {
                return Some((
                    Err(std::io::Error::other(format!(
                        "blob {} in the store does not hash to its name (found {found}): the \
                         store is corrupt",
                        s.expected
                    ))),
                    s,
                ));
            }
        }
        Some((Ok(Frame::data(buf.freeze())), s))
    });
    Ok(BodyExt::boxed(StreamBody::new(stream)))
}

/// Resolves a `Location` the registry answered against the URL asked (`base`): absolute
/// (`https://host/…`), absolute-path (`/v2/…`) or relative to `base`'s directory.
pub fn resolve_location(base: &Uri, location: &str) -> Result<Uri, String> {
    let bad = |why: &str| format!("the Location {location:?} {why}");
    if location.is_empty() {
        return Err(bad("is empty"));
    }
    if location.contains("://") {
        let uri: Uri = location.parse().map_err(|_| bad("is not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.authority().is_some() => return Ok(uri),
            _ => return Err(bad("is not an http(s) URL")),
        }
    }
    let scheme = base.scheme_str().ok_or_else(|| bad("has no base URL"))?;
    let authority = base.authority().ok_or_else(|| bad("has no base URL"))?;
    let path = if location.starts_with("//") {
        return Err(bad("is a scheme-relative URL, which kiln does not follow"));
    } else if location.starts_with('/') {
        location.to_owned()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|_| bad("is not a URL path"))
}

/// `url` with `digest=<digest>` added to its query (after any the registry put there).
pub fn with_digest(url: &Uri, digest: &Digest) -> Result<Uri, String> {
    let sep = match url.query() {
        Some("") => "",
        Some(_) => "&",
        None => "?",
    };
    // A digest is `sha256:` and hex: `:` is allowed in a query as it is.
    format!("{url}{sep}digest={digest}")
        .parse()
        .map_err(|_| format!("cannot add the digest to the upload URL {url}"))
}

/// A registry's error body: `CODE: message` of its first error, or a short text.
async fn error_message(answer: Response<Incoming>) -> Option<String> {
    let body = http_body_util::Limited::new(answer.into_body(), MAX_ERROR_BODY)
        .collect()
        .await
        .ok()?
        .to_bytes();
    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&body)
        && let Some(e) = doc.get("errors").and_then(|e| e.get(0))
    {
        let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
        let message = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
        return Some(format!("{code}: {message}").chars().take(300).collect());
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    (!text.is_empty()).then(|| {
        text.chars()
            .take(200)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    })
}

/// An HTTP/1.1 client for one push: a connection per request (a push is a few requests per
/// blob, each long or rare), TLS by [`tokio_rustls`].
struct Client {
    scheme: &'static str,
    tls: Option<tokio_rustls::TlsConnector>,
    insecure: bool,
}

impl Client {
    fn new(repo: &Repository, opts: &PushOptions) -> Result<Client, PushError> {
        let plain = repo.is_loopback() || opts.insecure;
        if plain && !repo.is_loopback() {
            tracing::warn!(
                registry = %repo.host,
                "pushing over plain HTTP to a host that is not loopback (registry_insecure): \
                 anyone on the path can read or alter the image in transit"
            );
        }
        // TLS is set up even for plain HTTP, in case the registry redirects to HTTPS; a
        // missing system bundle only matters then.
        let tls = match tls_config(opts.ca_file.as_deref()) {
            Ok(c) => Some(tokio_rustls::TlsConnector::from(Arc::new(c))),
            Err(e) if plain => {
                tracing::debug!(error = %e, "no TLS roots for redirects");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Client {
            scheme: if plain { "http" } else { "https" },
            tls,
            insecure: opts.insecure,
        })
    }

    /// Sends one request, following up to [`MAX_REDIRECTS`] redirects (`body` makes the
    /// body anew for each), and returns the answer that is not a redirect.
    async fn send(
        &self,
        what: &str,
        method: Method,
        url: Uri,
        content_type: Option<HeaderValue>,
        body: &(dyn Fn() -> Result<Body, std::io::Error> + Sync),
    ) -> Result<Response<Incoming>, PushError> {
        self.send_sized(what, method, url, content_type, None, body)
            .await
    }

    /// [`Client::send`] with the body's length given (a stream does not know its own), so
    /// the registry gets `Content-Length` rather than chunks: some storage backends need it.
    async fn send_sized(
        &self,
        what: &str,
        method: Method,
        url: Uri,
        content_type: Option<HeaderValue>,
        length: Option<u64>,
        body: &(dyn Fn() -> Result<Body, std::io::Error> + Sync),
    ) -> Result<Response<Incoming>, PushError> {
        let mut url = url;
        for _ in 0..=MAX_REDIRECTS {
            let registry = url.authority().map(|a| a.to_string()).unwrap_or_default();
            let connect = |message: String| PushError::Connect {
                registry: registry.clone(),
                what: what.to_owned(),
                message,
            };
            let b = if method == Method::PUT || method == Method::POST {
                body().map_err(|e| connect(format!("cannot open the body: {e}")))?
            } else {
                empty()
            };
            let answer = self
                .once(&method, &url, content_type.as_ref(), length, b)
                .await
                .map_err(connect)?;
            let status = answer.status();
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Ok(answer);
            }
            let location = answer
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| PushError::Protocol {
                    registry: registry.clone(),
                    what: what.to_owned(),
                    message: format!("HTTP {status} without a Location"),
                })?;
            let next = resolve_location(&url, location).map_err(|message| PushError::Protocol {
                registry: registry.clone(),
                what: what.to_owned(),
                message,
            })?;
            if url.scheme_str() == Some("https")
                && next.scheme_str() == Some("http")
                && !self.insecure
            {
                return Err(PushError::Protocol {
                    registry,
                    what: what.to_owned(),
                    message: format!("refusing a redirect from HTTPS to plain HTTP ({next})"),
                });
            }
            // 301/302/303 turn a POST into a GET in every client; a push never wants that.
            if matches!(
                status,
                StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND | StatusCode::SEE_OTHER
            ) && method != Method::HEAD
                && method != Method::GET
            {
                return Err(PushError::Protocol {
                    registry,
                    what: what.to_owned(),
                    message: format!("HTTP {status} for a {method}, which kiln does not follow"),
                });
            }
            url = next;
        }
        Err(PushError::Protocol {
            registry: url.authority().map(|a| a.to_string()).unwrap_or_default(),
            what: what.to_owned(),
            message: format!("more than {MAX_REDIRECTS} redirects (a redirect loop?)"),
        })
    }

    /// One request on a new connection.
    async fn once(
        &self,
        method: &Method,
        url: &Uri,
        content_type: Option<&HeaderValue>,
        length: Option<u64>,
        body: Body,
    ) -> Result<Response<Incoming>, String> {
        let authority = url.authority().ok_or("the URL has no host")?;
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("unsupported URL {url}")),
        };
        let (host, port) = split_host(authority.as_str());
        let port = port.unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| format!("connect to {authority}: timed out"))?
        .map_err(|e| format!("connect to {authority}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, authority.as_str())
            .header(
                header::USER_AGENT,
                concat!("kiln/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = content_type {
            request = request.header(header::CONTENT_TYPE, t);
        }
        // A registry answers a manifest only in a media type the client accepts: without
        // this, distribution 2.x says an OCI manifest it holds is unknown.
        request = request.header(header::ACCEPT, MANIFEST_TYPES.join(", "));
        if let Some(n) = length.or_else(|| hyper::body::Body::size_hint(&body).exact()) {
            request = request.header(header::CONTENT_LENGTH, n);
        }
        let request = request
            .body(body)
            .map_err(|e| format!("cannot form the request: {e}"))?;
        let sent = if https {
            let Some(tls) = &self.tls else {
                return Err(format!(
                    "no CA roots to verify {authority} with (install ca-certificates: {SYSTEM_ROOTS})"
                ));
            };
            let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
                .await
                .map_err(|_| format!("TLS handshake with {authority}: timed out"))?
                .map_err(|e| format!("TLS handshake with {authority}: {e}"))?;
            exchange(TokioIo::new(stream), request).await
        } else {
            exchange(TokioIo::new(tcp), request).await
        };
        sent.map_err(|e| format!("{method} {path}: {e}"))
    }
}

/// Sends `request` on a fresh HTTP/1.1 connection over `io` and waits for the answer's head.
async fn exchange<I>(io: I, request: Request<Body>) -> Result<Response<Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "registry connection ended");
        }
    });
    tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| "no answer in time".to_owned())?
        .map_err(|e| {
            // hyper's error hides its cause (our body's error) one level down.
            match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            }
        })
}

/// The TLS client configuration: the system's roots and `extra`.
fn tls_config(extra: Option<&Path>) -> Result<rustls::ClientConfig, PushError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut add = |path: &Path, required: bool| -> Result<(), PushError> {
        let bad = |message: String| PushError::Roots {
            path: path.to_owned(),
            message,
        };
        let certs = match CertificateDer::pem_file_iter(path) {
            Ok(certs) => certs,
            Err(e) if !required => {
                tracing::debug!(path = %path.display(), error = %e, "no system CA roots");
                return Ok(());
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        let mut n = 0;
        for cert in certs {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            // A bundle may hold certificates this rustls cannot use; the others still count.
            if roots.add(cert).is_ok() {
                n += 1;
            }
        }
        if n == 0 && required {
            return Err(bad("no usable certificate in it".to_owned()));
        }
        Ok(())
    };
    add(Path::new(SYSTEM_ROOTS), extra.is_none())?;
    if let Some(p) = extra {
        add(p, true)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| PushError::Roots {
        path: PathBuf::from(SYSTEM_ROOTS),
        message: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn locations_resolve_against_the_url_asked() {
        let base = uri("https://r.io:5000/v2/team/app/blobs/uploads/");
        for (location, want) in [
            (
                "https://other.io/upload/abc?_state=x",
                "https://other.io/upload/abc?_state=x",
            ),
            (
                "/v2/team/app/blobs/uploads/u-1?_state=s",
                "https://r.io:5000/v2/team/app/blobs/uploads/u-1?_state=s",
            ),
            ("u-2", "https://r.io:5000/v2/team/app/blobs/uploads/u-2"),
            (
                "http://127.0.0.1:5000/v2/a/blobs/uploads/u",
                "http://127.0.0.1:5000/v2/a/blobs/uploads/u",
            ),
        ] {
            assert_eq!(
                resolve_location(&base, location).unwrap(),
                uri(want),
                "{location}"
            );
        }
        for bad in ["", "ftp://r.io/x", "//r.io/x", "https://", "/a b"] {
            assert!(resolve_location(&base, bad).is_err(), "{bad:?} resolved");
        }
    }

    #[test]
    fn the_digest_joins_any_query_the_registry_gave() {
        let d = Digest::of(b"x");
        assert_eq!(
            with_digest(&uri("http://r/v2/a/blobs/uploads/u"), &d).unwrap(),
            uri(&format!("http://r/v2/a/blobs/uploads/u?digest={d}"))
        );
        assert_eq!(
            with_digest(&uri("http://r/v2/a/blobs/uploads/u?_state=abc%3D"), &d).unwrap(),
            uri(&format!(
                "http://r/v2/a/blobs/uploads/u?_state=abc%3D&digest={d}"
            ))
        );
    }

    #[test]
    fn repositories() {
        let r = Repository::for_app("registry.example.com", "hello").unwrap();
        assert_eq!(r.to_string(), "registry.example.com/kiln/hello");
        assert!(!r.is_loopback());
        let r = Repository::for_app("127.0.0.1:5000/team/x", "hello").unwrap();
        assert_eq!((r.host(), r.name()), ("127.0.0.1:5000", "team/x/hello"));
        assert!(r.is_loopback());
        assert!(Repository::parse("[::1]:5000/a").unwrap().is_loopback());
        assert!(Repository::parse("localhost/a").unwrap().is_loopback());
        let d = Digest::of(b"m");
        assert_eq!(
            Repository::parse("localhost:5000/a/b")
                .unwrap()
                .reference(&d),
            format!("localhost:5000/a/b@{d}")
        );
        for bad in [
            "localhost:5000",
            "https://r.io/a",
            "r.io/A",
            "r.io/a:tag",
            "r.io/a@sha256:0",
        ] {
            assert!(Repository::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            Repository::for_app("r.io", "web-").unwrap().to_string(),
            "r.io/kiln/web"
        );
        assert_eq!(app_component("a--b"), "a-b");
        assert_eq!(repository_prefix("r.io"), "r.io/kiln");
        assert_eq!(repository_prefix("r.io:5000/team"), "r.io:5000/team");
        assert_eq!(split_host("[::1]:5000"), ("::1", Some(5000)));
        assert_eq!(split_host("r.io"), ("r.io", None));
    }

    #[test]
    fn media_types_from_the_document() {
        let m = serde_json::json!({"schemaVersion": 2, "config": {}, "layers": []});
        assert_eq!(media_type(&m), Some(OCI_MANIFEST));
        let i = serde_json::json!({"schemaVersion": 2, "manifests": []});
        assert_eq!(media_type(&i), Some(OCI_INDEX));
        let other = serde_json::json!({"mediaType": "text/html"});
        assert_eq!(media_type(&other), None);
    }
}
