//! kiln against a daemon elsewhere: which daemon this command talks to ([`choose`]: `--host`
//! / `KILN_HOST`, then `KILN_CONTEXT`, then the current context, then the local socket),
//! `kiln dial-stdio` (the remote end of an SSH connection), sending an image blob by blob
//! ([`send_image`]), and the daemon's side of receiving one (`StoreImages` as the API's
//! `ImageStore`).
//!
//! The choice is made once per process, before the command runs, and kept in [`TARGET`]:
//! every daemon client of the command (`deploy::client`) then goes to the same daemon, and no
//! command's signature carries it.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::OnceLock;

use anyhow::Context;
use kiln_control::blobs::{BlobError, BlobSink, ImageStore, ReferrerUpload};
use kiln_control::client::{Client, Host, SshTransport};
use kiln_image::{ReceiveError, StoreError};
use kiln_runtime::Digest;
use serde_json::{Value, json};

use super::context;
use super::daemon::socket;
use super::instance::StoreImages;
use crate::output::Output;

/// The daemon this process's commands talk to.
#[derive(Debug, Clone)]
pub enum Target {
    /// The daemon on `<state>/kiln.sock` (no host, no context).
    Local,
    /// A daemon named by `--host`, `KILN_HOST` or a context.
    Remote {
        /// Where it is.
        host: Host,
        /// The kiln binary on the remote (`KILN_REMOTE_BIN`, else the context's).
        remote_bin: Option<String>,
        /// What named it, for messages (`--host`, `context prod`).
        source: String,
        /// Never prompt (`--json`, or stdin is not a terminal).
        batch: bool,
    },
}

static TARGET: OnceLock<Target> = OnceLock::new();

/// Decides which daemon this process talks to: `--host`/`KILN_HOST` > `KILN_CONTEXT` > the
/// current context > the local socket. Call once, before the command runs.
pub fn choose(host: Option<&str>, json: bool) -> anyhow::Result<()> {
    // Nobody answers a prompt in JSON mode or without a terminal.
    let batch = json || !std::io::stdin().is_terminal();
    let env_bin = std::env::var("KILN_REMOTE_BIN")
        .ok()
        .filter(|b| !b.is_empty());
    let target = match host.filter(|h| !h.is_empty()) {
        Some(h) => Target::Remote {
            host: Host::parse(h)?,
            remote_bin: env_bin,
            source: "--host".to_owned(),
            batch,
        },
        None => match context::selected()? {
            None => Target::Local,
            Some((name, ctx)) => Target::Remote {
                host: Host::parse(&ctx.host)
                    .with_context(|| format!("context {name} has an invalid host"))?,
                remote_bin: env_bin.or(ctx.remote_bin),
                source: format!("context {name}"),
                batch,
            },
        },
    };
    let _ = TARGET.set(target);
    Ok(())
}

/// The daemon chosen by [`choose`] (the local one when nothing was chosen).
pub fn target() -> &'static Target {
    TARGET.get().unwrap_or(&Target::Local)
}

/// Whether the daemon is not the one on `--state`'s socket: its store is not this one, so
/// images must be sent to it, and nothing of its state can be read from here.
pub fn is_remote() -> bool {
    matches!(target(), Target::Remote { .. })
}

/// A client of the chosen daemon.
pub fn client(state: &Path) -> Client {
    match target() {
        Target::Local => Client::new(&socket(state)),
        Target::Remote {
            host: Host::Unix(path),
            ..
        } => Client::new(path),
        Target::Remote {
            host: Host::Ssh(ssh),
            remote_bin,
            batch,
            ..
        } => Client::ssh(SshTransport {
            host: ssh.clone(),
            command: ssh_command(),
            remote_bin: remote_bin.clone().unwrap_or_else(|| "kiln".to_owned()),
            batch: *batch,
        }),
    }
}

/// `KILN_SSH_COMMAND` split on whitespace (the ssh program and its first arguments, e.g.
/// `ssh -F ~/.ssh/deploy_config`), else plain `ssh`.
fn ssh_command() -> Vec<String> {
    std::env::var("KILN_SSH_COMMAND")
        .ok()
        .map(|c| c.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| vec!["ssh".to_owned()])
}

/// `kiln dial-stdio`: joins this state's daemon socket to stdin and stdout until the daemon
/// closes the connection (ssh runs it on the remote; see `kiln_control::client`). At EOF on
/// stdin the socket's write side is shut, and the answers still coming are copied out.
pub fn dial_stdio(state: &Path) -> anyhow::Result<ExitCode> {
    use std::os::fd::AsFd;
    let sock = socket(state);
    let stream = std::os::unix::net::UnixStream::connect(&sock).map_err(|_| {
        anyhow::anyhow!(
            "no kiln daemon is running on {}: start one with `kiln serve`",
            sock.display()
        )
    })?;
    // Unbuffered copies of fds 0 and 1: std's stdout buffers by line, which would hold back
    // the end of an answer.
    let mut stdin = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut stdout = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let mut to_daemon = stream.try_clone()?;
    let mut from_daemon = stream;
    std::thread::Builder::new()
        .name("dial-stdin".to_owned())
        .spawn(move || {
            let _ = pump(&mut stdin, &mut to_daemon);
            let _ = to_daemon.shutdown(std::net::Shutdown::Write);
        })?;
    // The daemon's side ending (it answered the last request and closed, or went away) ends
    // the command; a reader that went away (ssh gone) too.
    let _ = pump(&mut from_daemon, &mut stdout);
    let _ = stdout.flush();
    Ok(ExitCode::SUCCESS)
}

/// Copies `from` to `to` until EOF with plain reads and writes. Not `std::io::copy`: between
/// a pipe (sshd gives the remote command pipes) and a socket it uses `splice`, which was seen
/// to end the copy early mid-body, cutting the request.
fn pump(from: &mut impl std::io::Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

/// What [`send_image`] sent.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Transfer {
    /// Blobs sent (manifest, config, layers).
    pub sent_blobs: usize,
    /// Blobs of the image.
    pub total_blobs: usize,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Bytes of the image.
    pub total_bytes: u64,
    /// Whether the test attestation was sent.
    pub attestation: bool,
    /// Signatures and attestations sent with the image (its referrers here).
    pub referrers: usize,
    /// The manifest digest the daemon computed (equal to the local one).
    pub digest: String,
}

impl Transfer {
    /// One line for a person.
    pub fn line(&self) -> String {
        let mut with = Vec::new();
        if self.attestation {
            with.push("the test attestation".to_owned());
        }
        if self.referrers > 0 {
            with.push(format!(
                "{} signature(s) and attestation(s)",
                self.referrers
            ));
        }
        format!(
            "sent {} of {} blobs ({} of {}){}",
            self.sent_blobs,
            self.total_blobs,
            human(self.sent_bytes),
            human(self.total_bytes),
            if with.is_empty() {
                String::new()
            } else {
                format!(" and {}", with.join(" and "))
            }
        )
    }
}

fn human(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// Sends the image `digest` of the local store to the chosen daemon: asks which blobs its
/// store lacks, streams those (config and layers first), then the manifest (tagged `tag`),
/// and with `attestation` the test attestation `kiln test` recorded here. Checks that the
/// daemon's digest is the local one.
pub async fn send_image(
    c: &Client,
    state: &Path,
    digest: &str,
    tag: &str,
    attestation: bool,
) -> anyhow::Result<Transfer> {
    let store = super::image::store(state)?;
    let digest =
        Digest::parse(digest).with_context(|| format!("{digest:?} is not an image digest"))?;
    if !store.has_blob(&digest) {
        // `apply --image` may name an image only the daemon has (built or sent earlier).
        let answer = c
            .post("/v1/blobs/missing", &json!({ "digests": [&digest] }))
            .await?;
        anyhow::ensure!(
            answer["missing"].as_array().is_some_and(Vec::is_empty),
            "image {digest} is neither in the local store ({}) nor on {}",
            state.join("images").display(),
            c.describe()
        );
        return Ok(Transfer {
            digest: digest.to_string(),
            ..Transfer::default()
        });
    }
    let manifest_bytes = store
        .read_blob(&digest)
        .with_context(|| format!("cannot read image {digest} from the local store"))?;
    let manifest = store.manifest(&digest)?;
    let mut blobs: Vec<(Digest, u64)> =
        vec![(manifest.config.digest.clone(), manifest.config.size)];
    blobs.extend(manifest.layers.iter().map(|l| (l.digest.clone(), l.size)));
    let all: Vec<&Digest> = std::iter::once(&digest)
        .chain(blobs.iter().map(|(d, _)| d))
        .collect();
    let answer = c
        .post("/v1/blobs/missing", &json!({ "digests": all }))
        .await?;
    let missing: Vec<Digest> = serde_json::from_value(answer["missing"].clone())
        .context("the daemon's list of missing blobs is not a list of digests")?;
    let mut t = Transfer {
        total_blobs: all.len(),
        total_bytes: manifest_bytes.len() as u64 + blobs.iter().map(|(_, s)| s).sum::<u64>(),
        ..Transfer::default()
    };
    for (d, size) in blobs.iter().filter(|(d, _)| missing.contains(d)) {
        let reader = store
            .open_blob(d)
            .with_context(|| format!("cannot read blob {d} from the local store"))?;
        c.put_stream(
            &format!("/v1/blobs/{d}"),
            "application/octet-stream",
            *size,
            Box::new(reader),
        )
        .await
        .with_context(|| format!("cannot send blob {d}"))?;
        t.sent_blobs += 1;
        t.sent_bytes += size;
    }
    let media = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| kiln_image::oci::MEDIA_MANIFEST.to_owned());
    let received = if missing.contains(&digest) {
        let n = manifest_bytes.len() as u64;
        let v = c
            .put_bytes(
                &format!("/v1/images/{digest}?tag={tag}"),
                &media,
                manifest_bytes,
            )
            .await
            .with_context(|| format!("cannot send the manifest of {digest}"))?;
        t.sent_blobs += 1;
        t.sent_bytes += n;
        v["digest"].as_str().unwrap_or_default().to_owned()
    } else {
        digest.to_string()
    };
    // Content addressing makes this so; a daemon that says otherwise is not to be applied to.
    anyhow::ensure!(
        received == digest.as_str(),
        "the daemon stored the image as {received:?}, not {digest}"
    );
    t.digest = received;
    if attestation {
        let a = store
            .read_attestation(&digest)?
            .with_context(|| format!("image {digest} has no test attestation here"))?;
        c.put(&format!("/v1/images/{digest}/attestation"), &a)
            .await
            .with_context(|| format!("cannot send the test attestation of {digest}"))?;
        t.attestation = true;
    }
    // What the image carries goes with it: a daemon's policy judges the image by them.
    for r in store
        .referrers(&digest)
        .with_context(|| format!("cannot read what image {digest} carries"))?
    {
        let payload = store.read_blob(&r.payload)?;
        let Ok(payload) = String::from_utf8(payload) else {
            anyhow::bail!(
                "referrer {} of {digest} is not text: kiln sends signatures and attestations only",
                r.manifest
            );
        };
        let upload = kiln_control::blobs::ReferrerUpload {
            artifact_type: r.artifact_type.clone(),
            payload_media_type: r.payload_media_type.clone(),
            payload,
            annotations: r.annotations.clone(),
        };
        let answer = c
            .put(
                &format!("/v1/images/{digest}/referrers"),
                &serde_json::to_value(&upload)?,
            )
            .await
            .with_context(|| format!("cannot send referrer {} of {digest}", r.manifest))?;
        // The daemon makes the same manifest from the same content.
        anyhow::ensure!(
            answer["referrer"] == r.manifest.as_str(),
            "the daemon recorded referrer {} of {digest} as {}",
            r.manifest,
            answer["referrer"]
        );
        t.referrers += 1;
    }
    Ok(t)
}

/// Says what a transfer sent (`--json` carries it in the data instead).
pub fn report(t: &Transfer, out: &Output) {
    if !out.json {
        out.say(&format!("==> {}", t.line()));
    }
}

impl ImageStore for StoreImages {
    fn missing(&self, digests: &[Digest]) -> Vec<Digest> {
        self.store().missing_blobs(digests)
    }

    fn receive_blob(&self, digest: &Digest) -> Result<Option<Box<dyn BlobSink>>, BlobError> {
        match self.store().receive_blob(digest) {
            Ok(Some(u)) => Ok(Some(Box::new(Sink(u)))),
            Ok(None) => Ok(None),
            Err(e) => Err(blob_error(e)),
        }
    }

    fn receive_image(
        &self,
        digest: &Digest,
        manifest: &[u8],
        tag: Option<&str>,
    ) -> Result<Value, BlobError> {
        let got = self
            .store()
            .receive_image(digest, manifest, tag)
            .map_err(blob_error)?;
        serde_json::to_value(&got).map_err(|e| BlobError::Internal(e.to_string()))
    }

    fn receive_referrer(
        &self,
        subject: &Digest,
        r: &ReferrerUpload,
        local: bool,
    ) -> Result<Value, BlobError> {
        use kiln_image::attest::{
            ARTIFACT_DSSE, ARTIFACT_IN_TOTO, ARTIFACT_SIGNATURE, STATEMENT_TYPE,
        };
        /// Annotations a referrer may carry: kiln's own have two.
        const MAX_ANNOTATIONS: usize = 8;
        let payload_ok = match r.artifact_type.as_str() {
            ARTIFACT_SIGNATURE => r
                .payload
                .trim_start()
                .starts_with("-----BEGIN SSH SIGNATURE-----"),
            // An attestation counts without a trusted signature under a policy with no keys,
            // which trusts the store: only a user of this host may add to it (an envelope
            // signed by any key, or by none, is as unsigned to such a policy).
            ARTIFACT_DSSE | ARTIFACT_IN_TOTO if !local => {
                return Err(BlobError::Forbidden(
                    "attestations are accepted over the daemon's unix socket (or SSH) only, not \
                     with the TCP token; image signatures are accepted from any client"
                        .to_owned(),
                ));
            }
            ARTIFACT_DSSE => kiln_sign::dsse::Envelope::from_json(r.payload.as_bytes()).is_ok(),
            ARTIFACT_IN_TOTO => serde_json::from_str::<Value>(&r.payload)
                .is_ok_and(|s| s["_type"] == STATEMENT_TYPE),
            other => {
                return Err(BlobError::Invalid(format!(
                    "artifact type {other:?} is not one kiln keeps (its signatures and in-toto \
                     attestations)"
                )));
            }
        };
        if !payload_ok {
            return Err(BlobError::Invalid(format!(
                "the payload is not a {} as its artifact type says",
                r.artifact_type
            )));
        }
        let too_long = r
            .annotations
            .iter()
            .any(|(k, v)| k.len() > 128 || v.len() > 512);
        if r.annotations.len() > MAX_ANNOTATIONS || too_long {
            return Err(BlobError::Invalid(format!(
                "at most {MAX_ANNOTATIONS} annotations, names up to 128 bytes, values up to 512"
            )));
        }
        if !self.store().has_blob(subject) {
            return Err(BlobError::Invalid(format!(
                "image {subject} is not in the daemon's store: send it first"
            )));
        }
        let manifest = self
            .store()
            .attach(
                subject,
                &r.artifact_type,
                &r.payload_media_type,
                r.payload.as_bytes(),
                r.annotations.clone(),
            )
            .map_err(|e| BlobError::Invalid(e.to_string()))?;
        Ok(json!({ "referrer": manifest.to_string() }))
    }

    fn receive_attestation(&self, image: &Digest, attestation: &Value) -> Result<(), BlobError> {
        if attestation["type"] != "kiln.test/v1" || attestation["image"] != image.as_str() {
            return Err(BlobError::Invalid(format!(
                "not a kiln.test/v1 attestation of image {image} (its `type` and `image` say \
                 otherwise)"
            )));
        }
        if !self.store().has_blob(image) {
            return Err(BlobError::Invalid(format!(
                "image {image} is not in the daemon's store: send it first"
            )));
        }
        self.store()
            .write_attestation(image, attestation)
            .map(|_| ())
            .map_err(|e| BlobError::Internal(e.to_string()))
    }
}

/// The store's staged upload as the API's sink.
struct Sink(kiln_image::Upload);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl BlobSink for Sink {
    fn max(&self) -> u64 {
        self.0.max()
    }
    fn commit(self: Box<Self>) -> Result<u64, BlobError> {
        self.0.commit().map_err(blob_error)
    }
}

fn blob_error(e: ReceiveError) -> BlobError {
    match e {
        ReceiveError::Invalid(_)
        | ReceiveError::Missing { .. }
        | ReceiveError::Store(StoreError::InvalidTag(_) | StoreError::Digest(_)) => {
            BlobError::Invalid(e.to_string())
        }
        ReceiveError::TooLarge(_) => BlobError::TooLarge(e.to_string()),
        ReceiveError::Store(_) => BlobError::Internal(e.to_string()),
    }
}
