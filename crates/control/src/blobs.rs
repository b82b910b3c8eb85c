//! The daemon's side of an image sent by a remote client: the seam to its image store (the
//! binary backs [`ImageStore`] with `kiln_image::Store`, whose `receive.rs` stages and checks
//! what comes in) and the streaming of one blob's body into it.
//!
//! **Invariant:** a blob's body is never held whole in memory: it goes to the store's writer a
//! chunk at a time (on a blocking thread), bounded by [`BlobSink::max`]; a body that stalls for
//! [`BLOB_IDLE_TIMEOUT`], comes slower than [`BLOB_MIN_RATE`], breaks, or passes its bound
//! leaves nothing behind. One upload runs
//! at a time ([`UPLOADS`]), so the store's bound on staged bytes holds for all of them
//! together.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use kiln_runtime::Digest;
use serde_json::Value;

/// Why the store refused what a client sent.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Wrong content (digest, manifest, layer): 400.
    #[error("{0}")]
    Invalid(String),
    /// Not from this client: 403.
    #[error("{0}")]
    Forbidden(String),
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
    /// Attaches what a client's store holds about a stored image (a signature, an in-toto
    /// attestation) to it; `local`: the client is a user of this host (unix socket or SSH),
    /// who alone may hand over what no signature vouches for. Answers the referrer recorded.
    fn receive_referrer(
        &self,
        subject: &Digest,
        referrer: &ReferrerUpload,
        local: bool,
    ) -> Result<Value, BlobError>;
}

/// One referrer of an image, as a client sends it with the image: the store's referrer
/// manifest is made again from these, so the same content gives the same manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferrerUpload {
    /// Its `artifactType`.
    pub artifact_type: String,
    /// The payload's media type.
    pub payload_media_type: String,
    /// The payload, text (an armored signature, an in-toto statement, a DSSE envelope).
    pub payload: String,
    /// The referrer manifest's annotations.
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
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
pub async fn receive<B>(
    store: Arc<dyn ImageStore>,
    digest: Digest,
    declared: Option<u64>,
    body: B,
) -> Result<Option<u64>, UploadError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
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
    let mut body = body;
    let mut window = (tokio::time::Instant::now(), 0u64);
    loop {
        let data = match tokio::time::timeout(BLOB_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return Err(UploadError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(UploadError::Body(e.to_string())),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        window.1 += data.len() as u64;
        let elapsed = window.0.elapsed();
        if elapsed >= BLOB_IDLE_TIMEOUT {
            if window.1 < BLOB_MIN_RATE * elapsed.as_secs() {
                return Err(UploadError::Timeout);
            }
            window = (tokio::time::Instant::now(), 0);
        }
        // Each chunk on a blocking thread of its own; between chunks none is held, and a
        // sink dropped on any early return (uncommitted) leaves nothing behind.
        sink = tokio::task::spawn_blocking(move || {
            sink.write_all(&data).map(|()| sink).map_err(|e| {
                if e.kind() == std::io::ErrorKind::FileTooLarge {
                    BlobError::TooLarge(e.to_string())
                } else {
                    BlobError::Internal(format!("cannot write blob: {e}"))
                }
            })
        })
        .await
        .map_err(|e| UploadError::Store(BlobError::Internal(e.to_string())))?
        .map_err(UploadError::Store)?;
    }
    let n = tokio::task::spawn_blocking(move || sink.commit())
        .await
        .map_err(|e| UploadError::Store(BlobError::Internal(e.to_string())))?
        .map_err(UploadError::Store)?;
    Ok(Some(n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::sync::Mutex;

    use hyper::body::Frame;

    use super::*;

    /// A store that keeps blobs in memory, checking digests and a bound as the real one does.
    #[derive(Default)]
    struct Memory {
        kept: Mutex<Vec<(Digest, Vec<u8>)>>,
    }

    struct MemorySink {
        store: Arc<Memory>,
        digest: Digest,
        bytes: Vec<u8>,
    }

    const MAX: u64 = 1 << 20;

    impl Write for MemorySink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.bytes.len() as u64 + buf.len() as u64 > MAX {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::FileTooLarge,
                    "too large",
                ));
            }
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl BlobSink for MemorySink {
        fn max(&self) -> u64 {
            MAX
        }
        fn commit(self: Box<Self>) -> Result<u64, BlobError> {
            if Digest::of(&self.bytes) != self.digest {
                return Err(BlobError::Invalid("wrong digest".to_owned()));
            }
            let n = self.bytes.len() as u64;
            self.store
                .kept
                .lock()
                .unwrap()
                .push((self.digest, self.bytes));
            Ok(n)
        }
    }

    struct Shared(Arc<Memory>);

    impl ImageStore for Shared {
        fn missing(&self, digests: &[Digest]) -> Vec<Digest> {
            let kept = self.0.kept.lock().unwrap();
            digests
                .iter()
                .filter(|d| !kept.iter().any(|(k, _)| k == *d))
                .cloned()
                .collect()
        }
        fn receive_blob(&self, digest: &Digest) -> Result<Option<Box<dyn BlobSink>>, BlobError> {
            Ok(Some(Box::new(MemorySink {
                store: Arc::clone(&self.0),
                digest: digest.clone(),
                bytes: Vec::new(),
            })))
        }
        fn receive_image(&self, _: &Digest, _: &[u8], _: Option<&str>) -> Result<Value, BlobError> {
            Err(BlobError::Internal("not here".to_owned()))
        }
        fn receive_referrer(
            &self,
            _: &Digest,
            _: &ReferrerUpload,
            _: bool,
        ) -> Result<Value, BlobError> {
            unreachable!()
        }
        fn receive_attestation(&self, _: &Digest, _: &Value) -> Result<(), BlobError> {
            Err(BlobError::Internal("not here".to_owned()))
        }
    }

    /// A body whose chunks the test sends when it likes.
    struct ChanBody(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

    impl hyper::body::Body for ChanBody {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx)
        }
    }

    fn body() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
        ChanBody,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (tx, ChanBody(rx))
    }

    /// One function, so the uploads (which take turns, daemon-wide) never wait on another
    /// test's.
    #[tokio::test(start_paused = true)]
    async fn uploads_keep_only_whole_matching_bodies_that_keep_coming() {
        let memory = Arc::new(Memory::default());
        let store: Arc<dyn ImageStore> = Arc::new(Shared(Arc::clone(&memory)));
        let data = Bytes::from_static(b"layer bytes");
        let digest = Digest::of(&data);

        // Whole and matching: kept.
        let (tx, b) = body();
        tx.send(Ok(Frame::data(data.clone()))).await.unwrap();
        drop(tx);
        let n = receive(Arc::clone(&store), digest.clone(), Some(11), b)
            .await
            .unwrap();
        assert_eq!(n, Some(11));

        // Not matching its digest: refused, nothing kept.
        let other = Digest::of(b"promised");
        let (tx, b) = body();
        tx.send(Ok(Frame::data(data.clone()))).await.unwrap();
        drop(tx);
        let e = receive(Arc::clone(&store), other.clone(), None, b)
            .await
            .unwrap_err();
        assert!(
            matches!(e, UploadError::Store(BlobError::Invalid(_))),
            "{e:?}"
        );

        // Declared larger than the bound: refused before a byte is read.
        let (_tx, b) = body();
        let e = receive(Arc::clone(&store), other.clone(), Some(MAX + 1), b)
            .await
            .unwrap_err();
        assert!(
            matches!(e, UploadError::Store(BlobError::TooLarge(_))),
            "{e:?}"
        );

        // Larger than the bound as it comes: refused.
        let (tx, b) = body();
        let feed = tokio::spawn(async move {
            for _ in 0..5 {
                if tx
                    .send(Ok(Frame::data(Bytes::from(vec![0u8; 300 << 10]))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let e = receive(Arc::clone(&store), other.clone(), None, b)
            .await
            .unwrap_err();
        assert!(
            matches!(e, UploadError::Store(BlobError::TooLarge(_))),
            "{e:?}"
        );
        feed.abort();

        // A body that stops: cut off after the idle timeout, nothing kept.
        let (tx, b) = body();
        tx.send(Ok(Frame::data(data.slice(..4)))).await.unwrap();
        let e = receive(Arc::clone(&store), digest.clone(), None, b)
            .await
            .unwrap_err();
        assert!(matches!(e, UploadError::Timeout), "{e:?}");
        drop(tx);

        // A body that trickles (a byte every 20 s, never idle for 30): cut off too.
        let (tx, b) = body();
        let feed = tokio::spawn(async move {
            loop {
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        });
        let e = receive(Arc::clone(&store), other.clone(), None, b)
            .await
            .unwrap_err();
        assert!(matches!(e, UploadError::Timeout), "{e:?}");
        feed.abort();

        // A body that breaks: refused.
        let (tx, b) = body();
        tx.send(Err(std::io::Error::other("reset"))).await.unwrap();
        let e = receive(Arc::clone(&store), other.clone(), None, b)
            .await
            .unwrap_err();
        assert!(matches!(e, UploadError::Body(_)), "{e:?}");

        let kept = memory.kept.lock().unwrap();
        assert_eq!(kept.len(), 1, "only the whole, matching body");
        assert_eq!(kept[0].0, digest);
    }
}
