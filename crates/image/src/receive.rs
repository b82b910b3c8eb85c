//! Receiving an image blob by blob from a remote client (`kiln apply` against a daemon over
//! SSH): the client asks which blobs the store lacks ([`Store::missing_blobs`]), sends those
//! ([`Store::receive_blob`]), then the manifest ([`Store::receive_image`]).
//!
//! **Invariant:** what a client sends is staged under `uploads/`, each blob checked against
//! its digest as it is written (a mismatch keeps nothing) and bounded in size; it joins
//! `blobs/` only when a manifest naming it arrives and the image passes what an import checks
//! (every layer decompressed within [`ImportLimits`], checked as unpacking would and matched to
//! its `diff_id`). A staged blob no manifest claims within [`UPLOAD_TTL`] is removed. So a
//! hostile client can neither plant a bad layer in the store nor fill the disk: staged bytes
//! together stay under half the store's free space (as an import's layers do).

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::digest::{Digest, HashingReader};
use crate::limits::{ImportLimits, is_compressed};
use crate::oci::{self, Descriptor, Manifest};
use crate::store::{BlobWriter, Store, StoreError, io_err};
use crate::unpack::{self, UnpackError};

/// How long a staged upload waits for the manifest that names it.
pub const UPLOAD_TTL: Duration = Duration::from_secs(3600);

/// The most bytes one upload may have however much disk is free (as a layer of an import).
const MAX_UPLOAD: u64 = 64 << 30;

/// Why a received blob or image was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// What the client sent is wrong: a digest that does not match, a manifest that is not
    /// one, a bad layer. Nothing of it is kept.
    #[error("{0}")]
    Invalid(String),
    /// The blob passes the size the store accepts now.
    #[error("{0}")]
    TooLarge(String),
    /// The manifest names blobs neither the store nor the staged uploads hold.
    #[error("the image {manifest} names blobs the daemon does not have: {}; send them first", list(.missing))]
    Missing {
        /// The manifest.
        manifest: Digest,
        /// The blobs missing.
        missing: Vec<Digest>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn list(d: &[Digest]) -> String {
    d.iter().map(Digest::as_str).collect::<Vec<_>>().join(", ")
}

/// An image received whole.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReceivedImage {
    /// The manifest digest the daemon computed from the bytes it got.
    pub digest: Digest,
    /// Manifest + config + layers, in bytes.
    pub size: u64,
    /// The tag given, if any (`NAME:TAG`).
    pub tag: Option<String>,
    /// Blobs taken from the staged uploads (checked now), as opposed to already stored.
    pub adopted: usize,
}

/// One blob being received: write its bytes, then [`Upload::commit`]. Dropped without a
/// commit, nothing is left behind.
pub struct Upload {
    writer: BlobWriter,
    digest: Digest,
    max: u64,
}

impl Upload {
    /// The most bytes this upload may have.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Stages the blob under its digest; a different digest keeps nothing.
    pub fn commit(self) -> Result<u64, ReceiveError> {
        match self.writer.commit(Some(&self.digest)) {
            Ok((_, len)) => Ok(len),
            Err(StoreError::Corrupt { digest, actual, .. }) => Err(ReceiveError::Invalid(format!(
                "the blob sent as {digest} hashes to {actual}; nothing was kept"
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

impl Write for Upload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.writer.len().saturating_add(buf.len() as u64) > self.max {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "blob {} passes {} bytes, what the daemon accepts now (half its store's \
                     free disk space, at most 64 GiB)",
                    self.digest, self.max
                ),
            ));
        }
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl Store {
    /// Which of `digests` neither the store nor the staged uploads hold.
    pub fn missing_blobs(&self, digests: &[Digest]) -> Vec<Digest> {
        let mut out: Vec<Digest> = digests
            .iter()
            .filter(|d| !self.has_blob(d) && !self.upload_path(d).is_file())
            .cloned()
            .collect();
        out.dedup();
        out
    }

    /// Starts receiving the blob `digest`; `None` when the store or the staged uploads
    /// already hold it. Stale staged uploads are removed first.
    pub fn receive_blob(&self, digest: &Digest) -> Result<Option<Upload>, ReceiveError> {
        if self.missing_blobs(std::slice::from_ref(digest)).is_empty() {
            return Ok(None);
        }
        let staged = self.sweep_uploads(SystemTime::now())?;
        let max = upload_budget(self.root(), staged);
        if max == 0 {
            return Err(ReceiveError::TooLarge(format!(
                "the daemon's store has no room for blob {digest}: staged uploads already take \
                 {staged} bytes, half its free disk space"
            )));
        }
        Ok(Some(Upload {
            writer: self.upload_writer()?,
            digest: digest.clone(),
            max,
        }))
    }

    /// Removes staged uploads older than [`UPLOAD_TTL`]; returns the bytes still staged.
    fn sweep_uploads(&self, now: SystemTime) -> Result<u64, StoreError> {
        let dir = self.uploads_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("list", &dir)(e)),
        };
        let mut staged = 0u64;
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            let old = md
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > UPLOAD_TTL);
            if old {
                let _ = fs::remove_file(e.path());
            } else {
                staged = staged.saturating_add(md.len());
            }
        }
        Ok(staged)
    }

    /// Receives the manifest `digest` (its bytes `bytes`): every blob it names must be stored
    /// or staged; staged ones are checked as an import checks them and moved into the store,
    /// stored ones are verified; then the manifest is stored and, with `tag`, tagged.
    pub fn receive_image(
        &self,
        digest: &Digest,
        bytes: &[u8],
        tag: Option<&str>,
    ) -> Result<ReceivedImage, ReceiveError> {
        let limits = ImportLimits::for_disk(self.root());
        if bytes.len() as u64 > limits.json_bytes {
            return Err(ReceiveError::TooLarge(format!(
                "the manifest {digest} has {} bytes; at most {} are accepted",
                bytes.len(),
                limits.json_bytes
            )));
        }
        let actual = Digest::of(bytes);
        if &actual != digest {
            return Err(ReceiveError::Invalid(format!(
                "the manifest sent as {digest} hashes to {actual}"
            )));
        }
        let tag = tag.map(crate::store::normalize_tag).transpose()?;
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| {
            ReceiveError::Invalid(format!(
                "the manifest {digest} is not an image manifest: {e}"
            ))
        })?;
        if manifest.schema_version != 2 {
            return Err(ReceiveError::Invalid(format!(
                "the manifest {digest} has schemaVersion {}, not 2",
                manifest.schema_version
            )));
        }
        // Held from the first check to the tag: a collection in between would find blobs
        // no tag reaches yet.
        let _writer = self.writer_guard()?;
        let named: Vec<&Descriptor> = std::iter::once(&manifest.config)
            .chain(&manifest.layers)
            .collect();
        let missing: Vec<Digest> = named
            .iter()
            .filter(|d| !self.has_blob(&d.digest) && !self.upload_path(&d.digest).is_file())
            .map(|d| d.digest.clone())
            .collect();
        if !missing.is_empty() {
            return Err(ReceiveError::Missing {
                manifest: digest.clone(),
                missing,
            });
        }
        let staged = |d: &Digest| !self.has_blob(d);
        let config =
            self.received_config(&manifest.config, &limits, staged(&manifest.config.digest))?;
        let diff_ids: Vec<Option<Digest>> = config
            .pointer("/rootfs/diff_ids")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|d| d.as_str().and_then(|s| Digest::parse(s).ok()))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != manifest.layers.len() {
            return Err(ReceiveError::Invalid(format!(
                "config {} lists {} diff_ids for the {} layers of {digest}",
                manifest.config.digest,
                diff_ids.len(),
                manifest.layers.len()
            )));
        }
        let mut used = 0u64;
        for (layer, diff_id) in manifest.layers.iter().zip(&diff_ids) {
            if staged(&layer.digest) {
                let Some(diff_id) = diff_id else {
                    return Err(ReceiveError::Invalid(format!(
                        "config {} has a diff_id that is not a digest for layer {}",
                        manifest.config.digest, layer.digest
                    )));
                };
                self.check_staged_layer(layer, diff_id, &limits, &mut used)?;
            } else {
                let size = self.verify_blob(&layer.digest)?;
                check_size(layer, size)?;
            }
        }
        let mut adopted = 0;
        for d in &named {
            if staged(&d.digest) {
                self.adopt_upload(&d.digest)?;
                adopted += 1;
            }
        }
        self.write_blob(bytes)?;
        let desc = Descriptor {
            media_type: manifest
                .media_type
                .clone()
                .unwrap_or_else(|| oci::MEDIA_MANIFEST.to_owned()),
            digest: digest.clone(),
            size: bytes.len() as u64,
            annotations: Default::default(),
            platform: None,
            artifact_type: None,
        };
        if let Some(t) = &tag {
            self.tag(t, &desc)?;
        }
        let size =
            desc.size + manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        Ok(ReceivedImage {
            digest: digest.clone(),
            size,
            tag,
            adopted,
        })
    }

    /// The image config `d` names, from the store or the staged uploads, verified and parsed.
    fn received_config(
        &self,
        d: &Descriptor,
        limits: &ImportLimits,
        staged: bool,
    ) -> Result<serde_json::Value, ReceiveError> {
        let mut r = if staged {
            self.open_upload(&d.digest)?
        } else {
            self.open_blob(&d.digest)?
        };
        let mut bytes = Vec::new();
        let path = PathBuf::from(d.digest.as_str());
        (&mut r)
            .take(limits.json_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| r.map_error(e, &path))?;
        if bytes.len() as u64 > limits.json_bytes {
            return Err(ReceiveError::TooLarge(format!(
                "the config {} passes {} bytes",
                d.digest, limits.json_bytes
            )));
        }
        // To the end, so the digest is checked.
        io::copy(&mut r, &mut io::sink()).map_err(|e| r.map_error(e, &path))?;
        check_size(d, bytes.len() as u64)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ReceiveError::Invalid(format!("the config {} is not JSON: {e}", d.digest)))
    }

    /// Reads a staged layer through once, as an import does: decompressed within the limits,
    /// checked as unpacking would, its content matched to `diff_id`.
    fn check_staged_layer(
        &self,
        layer: &Descriptor,
        diff_id: &Digest,
        limits: &ImportLimits,
        used: &mut u64,
    ) -> Result<(), ReceiveError> {
        let path = self.upload_path(&layer.digest);
        let size = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
        check_size(layer, size)?;
        let mut head = Vec::with_capacity(4);
        self.open_upload(&layer.digest)?
            .take(4)
            .read_to_end(&mut head)
            .map_err(io_err("read", &path))?;
        let compressed = is_compressed(&head).then_some(size);
        let bounds = limits.layer(compressed, *used);
        let bad = |source: UnpackError| {
            let note = match source {
                UnpackError::TooLarge { .. } | UnpackError::StreamTooLong { .. } => {
                    format!(" ({})", limits.explain(compressed, *used))
                }
                _ => String::new(),
            };
            ReceiveError::Invalid(format!("layer {}: {source}{note}", layer.digest))
        };
        let verified = self.open_upload(&layer.digest)?;
        let plain = unpack::decompress(verified)
            .map_err(|source| bad(UnpackError::Malformed { source }))?;
        let mut plain = HashingReader::new(plain);
        unpack::check(&mut plain, &bounds).map_err(bad)?;
        *used = used.saturating_add(plain.len);
        let actual = crate::digest::finish(plain.hasher);
        if &actual != diff_id {
            return Err(ReceiveError::Invalid(format!(
                "layer {} does not match its diff_id {diff_id} (content hashes to {actual})",
                layer.digest
            )));
        }
        Ok(())
    }
}

/// A descriptor's size must be the blob's.
fn check_size(d: &Descriptor, actual: u64) -> Result<(), ReceiveError> {
    if d.size == actual {
        Ok(())
    } else {
        Err(ReceiveError::Invalid(format!(
            "the manifest says blob {} has {} bytes; it has {actual}",
            d.digest, d.size
        )))
    }
}

/// The most bytes one more upload may take: staged uploads together stay under half of what
/// the disk would have free without them (so the bound does not shrink toward the whole disk
/// as they grow), and one upload under [`MAX_UPLOAD`].
fn upload_budget(root: &std::path::Path, staged: u64) -> u64 {
    let free = rustix::fs::statvfs(root)
        .map(|st| st.f_bavail.saturating_mul(st.f_frsize))
        .unwrap_or(0);
    (free.saturating_add(staged) / 2)
        .saturating_sub(staged)
        .min(MAX_UPLOAD)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn upload(store: &Store, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        let mut u = store.receive_blob(&d).unwrap().unwrap();
        u.write_all(bytes).unwrap();
        u.commit().unwrap();
        d
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let claimed = Digest::of(b"what was promised");
        let mut u = store.receive_blob(&claimed).unwrap().unwrap();
        u.write_all(b"something else").unwrap();
        let e = u.commit().unwrap_err().to_string();
        assert!(e.contains("hashes to"), "{e}");
        assert_eq!(
            store.missing_blobs(std::slice::from_ref(&claimed)),
            vec![claimed]
        );
        assert_eq!(fs::read_dir(store.uploads_dir()).unwrap().count(), 0);
    }

    #[test]
    fn an_upload_past_its_bound_fails_as_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let mut u = store.receive_blob(&Digest::of(b"x")).unwrap().unwrap();
        u.max = 4;
        let e = u.write_all(b"12345").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
    }

    #[test]
    fn a_manifest_naming_blobs_it_did_not_send_is_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = Digest::of(config);
        let ghost = Digest::of(b"never sent");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::MEDIA_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ghost, "size": 10}],
        }))
        .unwrap();
        upload(&store, config);
        let d = Digest::of(&manifest);
        match store.receive_image(&d, &manifest, None) {
            Err(ReceiveError::Missing { missing, .. }) => assert_eq!(missing, vec![ghost]),
            other => panic!("{other:?}"),
        }
        assert!(!store.has_blob(&d));
        assert!(
            !store.has_blob(&config_digest),
            "the staged config stays staged"
        );
    }

    #[test]
    fn a_layer_with_a_path_out_of_its_root_is_refused_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        // A tar whose one entry climbs out of the root.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        {
            let name = &mut h.as_old_mut().name;
            name[..10].copy_from_slice(b"../escaped");
        }
        h.set_cksum();
        b.append(&h, &b"hi"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let layer_digest = upload(&store, &layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))
        .unwrap();
        let config_digest = upload(&store, &config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
        }))
        .unwrap();
        let d = Digest::of(&manifest);
        let e = store
            .receive_image(&d, &manifest, Some("evil"))
            .unwrap_err();
        assert!(matches!(e, ReceiveError::Invalid(_)), "{e}");
        assert!(e.to_string().contains(layer_digest.as_str()), "{e}");
        assert!(!store.has_blob(&layer_digest) && !store.has_blob(&d));
        assert!(store.resolve("evil").is_err());
    }

    #[test]
    fn a_checked_image_joins_the_store_and_is_tagged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("hello.txt").unwrap();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"hi"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let layer_digest = upload(&store, &layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))
        .unwrap();
        let config_digest = upload(&store, &config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
        }))
        .unwrap();
        let d = Digest::of(&manifest);
        // A wrong digest for the manifest bytes keeps nothing.
        let wrong = Digest::of(b"other");
        assert!(matches!(
            store.receive_image(&wrong, &manifest, None),
            Err(ReceiveError::Invalid(_))
        ));
        let got = store.receive_image(&d, &manifest, Some("web")).unwrap();
        assert_eq!(got.digest, d);
        assert_eq!(got.adopted, 2);
        assert_eq!(store.resolve("web").unwrap().digest, d);
        assert!(
            store
                .missing_blobs(&[d, layer_digest, config_digest])
                .is_empty()
        );
        assert_eq!(fs::read_dir(store.uploads_dir()).unwrap().count(), 0);
    }
}
