//! The daemon's side of an image sent by a remote client: the seam to its image store (the
//! binary backs [`ImageStore`] with `kiln_image::Store`, whose `receive.rs` stages and checks
//! what comes in) and the streaming of one blob's body into it.
//!
//! **Invariant:** a blob's body is never held whole in memory: it goes to a blocking writer a
//! chunk at a time, bounded by [`BlobSink::max`]; a body that stalls for
//! [`BLOB_IDLE_TIMEOUT`], comes slower than [`BLOB_MIN_RATE`], breaks, or passes its bound
//! leaves nothing behind. One upload runs
//! at a time ([`UPLOADS`]), so the store's bound on staged bytes holds for all of them
//! together.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use kiln_runtime::Digest;
use serde_json::Value;

/// Why the store refused what a client sent.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Wrong content (digest, manifest, layer): 400.
    #[error("{0}")]
    Invalid(String),
    /// Past the size the store accepts: 413.
    #[error("{0}")]
    TooLarge(String),
    /// The store failed: 500 (the message goes to the daemon's log only).
    #[error("{0}")]
    Internal(String),
}

/// The daemon's image store, as the API's image upload sees it.
pub trait ImageStore: Send + Sync {
    /// Which of `digests` the store lacks (staged uploads count as held).
    fn missing(&self, digests: &[Digest]) -> Vec<Digest>;
    /// Starts receiving blob `digest`; `None` when it is held already.
    fn receive_blob(&self, digest: &Digest) -> Result<Option<Box<dyn BlobSink>>, BlobError>;
    /// Receives a manifest: every blob it names must be held; the image is checked, stored
    /// and, with `tag`, tagged. Answers what the store recorded (its `digest` computed from
    /// the bytes).
    fn receive_image(
        &self,
        digest: &Digest,
        manifest: &[u8],
        tag: Option<&str>,
    ) -> Result<Value, BlobError>;
    /// Records the test attestation the client's `kiln test` wrote for a stored image.
    fn receive_attestation(&self, image: &Digest, attestation: &Value) -> Result<(), BlobError>;
}

/// One blob being received.
pub trait BlobSink: Write + Send {
    /// The most bytes it may have.
    fn max(&self) -> u64;
    /// Stages it under its digest; a different digest keeps nothing.
    fn commit(self: Box<Self>) -> Result<u64, BlobError>;
}

/// How long a blob's body may send nothing before the upload is given up (408).
pub const BLOB_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The slowest a blob's body may come, judged over each [`BLOB_IDLE_TIMEOUT`]: a body that
/// trickles holds the one upload slot, so it is cut off (408) rather than waited for.
pub const BLOB_MIN_RATE: u64 = 1024;

/// How long an upload waits for the one before it to finish (then 409).
pub const UPLOAD_WAIT: Duration = Duration::from_secs(60);

/// One upload at a time, daemon-wide.
pub static UPLOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// What went wrong with an upload, for the API's one mapping to statuses.
#[derive(Debug)]
pub enum UploadError {
    /// The store refused.
    Store(BlobError),
    /// The body stalled.
    Timeout,
    /// The body broke.
    Body(String),
    /// Another upload held the store too long.
    Busy,
}

/// Streams `body` into a new blob `digest` of `store`. `Ok(None)` when the store held it
/// already (the body is not read); else the bytes stored.
pub async fn receive(
    store: Arc<dyn ImageStore>,
    digest: Digest,
    declared: Option<u64>,
    body: Incoming,
) -> Result<Option<u64>, UploadError> {
    let _permit = tokio::time::timeout(UPLOAD_WAIT, UPLOADS.acquire())
        .await
        .map_err(|_| UploadError::Busy)?
        .map_err(|_| UploadError::Busy)?;
    let s = Arc::clone(&store);
    let d = digest.clone();
    let sink = tokio::task::spawn_blocking(move || s.receive_blob(&d))
        .await
        .map_err(|e| UploadError::Store(BlobError::Internal(e.to_string())))?
        .map_err(UploadError::Store)?;
    let Some(mut sink) = sink else {
        return Ok(None);
    };
    if let Some(n) = declared
        && n > sink.max()
    {
        return Err(UploadError::Store(BlobError::TooLarge(format!(
            "blob {digest} has {n} bytes; the daemon accepts at most {} now (half its store's \
             free disk space, at most 64 GiB)",
            sink.max()
        ))));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let aborted = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&aborted);
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, BlobError> {
        while let Some(chunk) = rx.blocking_recv() {
            sink.write_all(&chunk).map_err(|e| {
                if e.kind() == std::io::ErrorKind::FileTooLarge {
                    BlobError::TooLarge(e.to_string())
                } else {
                    BlobError::Internal(format!("cannot write blob: {e}"))
                }
            })?;
        }
        if stop.load(Ordering::Acquire) {
            // Dropped uncommitted: nothing stays.
            return Err(BlobError::Invalid("the upload was cut short".to_owned()));
        }
        sink.commit()
    });
    let mut body = body;
    let mut failed = None;
    let mut window = (tokio::time::Instant::now(), 0u64);
    loop {
        match tokio::time::timeout(BLOB_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => {
                failed = Some(UploadError::Timeout);
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                failed = Some(UploadError::Body(e.to_string()));
                break;
            }
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                window.1 += data.len() as u64;
                let elapsed = window.0.elapsed();
                if elapsed >= BLOB_IDLE_TIMEOUT {
                    if window.1 < BLOB_MIN_RATE * elapsed.as_secs() {
                        failed = Some(UploadError::Timeout);
                        break;
                    }
                    window = (tokio::time::Instant::now(), 0);
                }
                if tx.send(data).await.is_err() {
                    // The writer stopped: its error says why.
                    break;
                }
            }
        }
    }
    if failed.is_some() {
        aborted.store(true, Ordering::Release);
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| UploadError::Store(BlobError::Internal(e.to_string())))?;
    match (failed, written) {
        (Some(f), _) => Err(f),
        (None, Ok(n)) => Ok(Some(n)),
        (None, Err(e)) => Err(UploadError::Store(e)),
    }
}
