//! The content-addressed image store: a standard OCI image layout at `<state>/images`.
//!
//! It owns `oci-layout`, `index.json` (tags, and the referrers `referrers.rs` lists there),
//! `blobs/sha256/…`, test attestations under
//! `attestations/`, its lock files under `locks/` and temp files under `tmp/`. skopeo,
//! umoci and crane read it directly because the layout is the standard one.
//!
//! **Invariant:** a blob is written once (temp → fsync → rename → fsync dir) and is verified
//! against its digest whenever it is read; a mismatch is [`StoreError::Corrupt`], never data.
//! **Invariant:** `index.json` is only rewritten under `locks/index.lock`, and garbage
//! collection holds `locks/gc.lock` exclusively while every writer holds it shared, so a blob
//! written by a build that has not tagged yet is never collected.
//! This module knows nothing about how images are built or unpacked.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::{Digest, HashingWriter, InvalidDigest};
use crate::oci::{self, Descriptor, Index, Manifest};
use crate::referrers::{fallback_entry, is_image_entry};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A blob's content does not hash to its name.
    #[error("blob {digest} is corrupt: its content hashes to {actual} ({path})")]
    Corrupt {
        /// The name (expected digest).
        digest: Digest,
        /// What the content hashes to.
        actual: Digest,
        /// The blob file.
        path: PathBuf,
    },
    /// A blob that something refers to is not in the store.
    #[error("blob {digest} is missing from the store")]
    MissingBlob {
        /// The missing digest.
        digest: Digest,
    },
    /// No image has this tag or digest.
    #[error("no image {reference:?} in the store")]
    NotFound {
        /// What was asked for.
        reference: String,
    },
    /// A digest prefix names more than one image.
    #[error("{reference:?} is the prefix of {count} images' digests; give more of it")]
    Ambiguous {
        /// The prefix asked for.
        reference: String,
        /// How many images it names.
        count: usize,
    },
    /// A JSON document in the store is malformed.
    #[error("{what} is not valid: {source}")]
    BadJson {
        /// Which document (names the blob or file).
        what: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A tag with characters OCI does not allow.
    #[error("invalid tag {0:?}: use NAME[:TAG] with letters, digits, `.`, `_`, `-`, `/`")]
    InvalidTag(String),
    /// A digest string was malformed.
    #[error(transparent)]
    Digest(#[from] InvalidDigest),
    /// A referrer manifest (or an image's referrers index) is malformed, too large, or
    /// names another image as its subject.
    #[error("referrer {digest} of image {subject} {reason}")]
    BadReferrer {
        /// The referrer manifest (or referrers index).
        digest: Digest,
        /// The image it is listed for.
        subject: Digest,
        /// What is wrong.
        reason: String,
    },
    /// The directory is not an OCI image layout.
    #[error("{path} is not an OCI image layout: {reason}")]
    NotALayout {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// One tagged image, as `kiln images` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageSummary {
    /// `NAME:TAG`.
    pub tag: String,
    /// The manifest digest.
    pub digest: Digest,
    /// Manifest + config + layers, in bytes (compressed).
    pub size: u64,
    /// The config's `created` (RFC 3339), if any.
    pub created: Option<String>,
}

/// Everything about one image, as `kiln image inspect` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageInfo {
    /// The manifest digest.
    pub digest: Digest,
    /// Tags pointing at it.
    pub tags: Vec<String>,
    /// Manifest + config + layers, in bytes.
    pub size: u64,
    /// The manifest.
    pub manifest: Manifest,
    /// The image config.
    pub config: serde_json::Value,
}

/// What garbage collection removed (or would remove, in a dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Blobs removed, with their sizes.
    pub removed: Vec<(Digest, u64)>,
    /// Bytes freed.
    pub freed: u64,
    /// Blobs kept.
    pub kept: usize,
    /// Whether nothing was actually removed.
    pub dry_run: bool,
}

/// An OCI image layout directory used as kiln's image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The fewest hex digits of a digest that name an image (git's rule).
const MIN_PREFIX: usize = 4;

const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

impl Store {
    /// Opens the store at `root`, creating an empty layout if there is none.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        let store = Store { root };
        for dir in [store.blobs_dir(), store.tmp_dir(), store.locks_dir()] {
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            kiln_durable::write(&layout, LAYOUT).map_err(io_err("write", &layout))?;
        }
        let index = store.index_path();
        if !index.exists() {
            let _lock = store.lock_index()?;
            if !index.exists() {
                let bytes = canonical(&Index::empty(), "index.json")?;
                kiln_durable::write(&index, &bytes).map_err(io_err("write", &index))?;
            }
        }
        Ok(store)
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
    fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }
    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }
    fn attestations_dir(&self) -> PathBuf {
        self.root.join("attestations")
    }

    /// Where the blob named `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// Whether the blob exists (not verified).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The size of a stored blob (not verified).
    pub fn blob_size(&self, digest: &Digest) -> Result<u64, StoreError> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::MissingBlob {
                digest: digest.clone(),
            }),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Stores `bytes` and returns their digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes)
            .map_err(io_err("write", &self.tmp_dir()))?;
        w.commit(Some(&digest)).map(|(d, _)| d)
    }

    /// Stores what `reader` yields; when `expected` is given, a different digest is an error
    /// and nothing is stored.
    pub fn write_blob_from(
        &self,
        reader: &mut dyn Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), StoreError> {
        let mut w = self.blob_writer()?;
        io::copy(reader, &mut w).map_err(io_err("copy into", &self.tmp_dir()))?;
        w.commit(expected)
    }

    /// A writer for a new blob; nothing is visible until [`BlobWriter::commit`].
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let dir = self.tmp_dir();
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&dir)
            .map_err(io_err("create temp file in", &dir))?;
        Ok(BlobWriter {
            inner: HashingWriter::new(io::BufWriter::with_capacity(1 << 20, tmp)),
            blobs: self.blobs_dir(),
        })
    }

    /// Reads a whole blob, verified.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob {
                    digest: digest.clone(),
                });
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(StoreError::Corrupt {
                digest: digest.clone(),
                actual,
                path,
            });
        }
        Ok(bytes)
    }

    /// Opens a blob for streaming; the reader fails at the end of the data if the content
    /// does not match `digest` (the error names the blob).
    pub fn open_blob(&self, digest: &Digest) -> Result<VerifiedReader, StoreError> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob {
                    digest: digest.clone(),
                });
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        Ok(VerifiedReader {
            inner: io::BufReader::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            expected: digest.clone(),
            path,
            done: false,
        })
    }

    /// Hashes a stored blob and checks it against its name; returns its size.
    pub fn verify_blob(&self, digest: &Digest) -> Result<u64, StoreError> {
        let mut r = self.open_blob(digest)?;
        let path = self.blob_path(digest);
        io::copy(&mut r, &mut io::sink()).map_err(|e| r.map_error(e, &path))
    }

    /// Reads and parses a manifest blob.
    pub fn manifest(&self, digest: &Digest) -> Result<Manifest, StoreError> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
            what: format!("manifest {digest}"),
            source,
        })
    }

    /// Reads and parses an image config blob.
    pub fn config(&self, digest: &Digest) -> Result<serde_json::Value, StoreError> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
            what: format!("image config {digest}"),
            source,
        })
    }

    /// The parsed `index.json`.
    pub fn index(&self) -> Result<Index, StoreError> {
        let path = self.index_path();
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
            what: path.display().to_string(),
            source,
        })
    }

    pub(crate) fn lock_index(&self) -> Result<LockGuard, StoreError> {
        LockGuard::exclusive(&self.locks_dir().join("index.lock"))
    }

    /// Held (shared) by anything that writes blobs, from the first blob until its tag is in
    /// `index.json`; [`Store::gc`] takes it exclusively.
    pub fn writer_guard(&self) -> Result<LockGuard, StoreError> {
        LockGuard::shared(&self.locks_dir().join("gc.lock"))
    }

    /// Points `tag` at `manifest` (which must be stored), replacing what it pointed at.
    pub fn tag(&self, tag: &str, manifest: &Descriptor) -> Result<(), StoreError> {
        let tag = normalize_tag(tag)?;
        if !self.has_blob(&manifest.digest) {
            return Err(StoreError::MissingBlob {
                digest: manifest.digest.clone(),
            });
        }
        let _lock = self.lock_index()?;
        let mut index = self.index()?;
        let unchanged = index.manifests.iter().any(|d| {
            d.digest == manifest.digest && d.annotations.get(oci::ANNOTATION_REF_NAME) == Some(&tag)
        });
        if unchanged {
            // A no-change rebuild writes (and fsyncs) nothing.
            return Ok(());
        }
        index
            .manifests
            .retain(|d| d.annotations.get(oci::ANNOTATION_REF_NAME) != Some(&tag));
        let mut desc = manifest.clone();
        desc.annotations = BTreeMap::from([(oci::ANNOTATION_REF_NAME.to_owned(), tag)]);
        index.manifests.push(desc);
        self.write_index(&index)
    }

    /// Removes `tag`; returns whether it existed. Blobs stay until [`Store::gc`].
    pub fn untag(&self, tag: &str) -> Result<bool, StoreError> {
        let tag = normalize_tag(tag)?;
        let _lock = self.lock_index()?;
        let mut index = self.index()?;
        let before = index.manifests.len();
        index
            .manifests
            .retain(|d| d.annotations.get(oci::ANNOTATION_REF_NAME) != Some(&tag));
        let removed = index.manifests.len() != before;
        if removed {
            self.write_index(&index)?;
        }
        Ok(removed)
    }

    /// Writes `index.json` with its entries in one order: tagged ones by tag, then the
    /// untagged ones (referrers) by digest.
    pub(crate) fn write_index(&self, index: &Index) -> Result<(), StoreError> {
        let mut index = index.clone();
        index.manifests.sort_by(|a, b| {
            let (ta, tb) = (
                a.annotations.get(oci::ANNOTATION_REF_NAME),
                b.annotations.get(oci::ANNOTATION_REF_NAME),
            );
            (ta.is_none(), ta, &a.digest).cmp(&(tb.is_none(), tb, &b.digest))
        });
        let path = self.index_path();
        let bytes = canonical(&index, "index.json")?;
        kiln_durable::write(&path, &bytes).map_err(io_err("write", &path))
    }

    /// Finds an image by tag (`NAME` means `NAME:latest`) or by manifest digest (a full
    /// `sha256:…`, or a unique prefix of at least 4 hex digits with or without `sha256:`).
    pub fn resolve(&self, reference: &str) -> Result<Descriptor, StoreError> {
        let index = self.index()?;
        let not_found = || StoreError::NotFound {
            reference: reference.to_owned(),
        };
        // Referrers and referrers indexes are listed too, but are not images.
        let images: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|d| is_image_entry(d))
            .collect();
        if let Ok(digest) = Digest::parse(reference) {
            if let Some(d) = images.iter().find(|d| d.digest == digest) {
                return Ok(untagged(d));
            }
            // An untagged manifest still in the store (e.g. retained for rollback).
            if self.has_blob(&digest) {
                let size = self.blob_size(&digest)?;
                let m = self.manifest(&digest)?;
                if m.subject.is_some() || m.artifact_type.is_some() {
                    return Err(not_found());
                }
                return Ok(Descriptor {
                    media_type: oci::MEDIA_MANIFEST.to_owned(),
                    digest,
                    size,
                    annotations: BTreeMap::new(),
                    platform: None,
                    artifact_type: None,
                });
            }
            return Err(not_found());
        }
        if let Ok(tag) = normalize_tag(reference)
            && let Some(d) = images
                .iter()
                .find(|d| d.annotations.get(oci::ANNOTATION_REF_NAME) == Some(&tag))
        {
            return Ok(untagged(d));
        }
        // As git: four hex digits or more name the one image whose digest starts so.
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= MIN_PREFIX && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hex = hex.to_ascii_lowercase();
            let hits: BTreeMap<&Digest, &Descriptor> = images
                .iter()
                .filter(|d| d.digest.hex().starts_with(&hex))
                .map(|d| (&d.digest, *d))
                .collect();
            match hits.values().next() {
                Some(d) if hits.len() == 1 => return Ok(untagged(d)),
                Some(_) => {
                    return Err(StoreError::Ambiguous {
                        reference: reference.to_owned(),
                        count: hits.len(),
                    });
                }
                None => {}
            }
        }
        Err(not_found())
    }

    /// Tagged images, sorted by tag.
    pub fn images(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let index = self.index()?;
        let mut out = Vec::new();
        for d in index.manifests.iter().filter(|d| is_image_entry(d)) {
            let Some(tag) = d.annotations.get(oci::ANNOTATION_REF_NAME) else {
                continue;
            };
            let manifest = self.manifest(&d.digest)?;
            let config = self.config(&manifest.config.digest)?;
            out.push(ImageSummary {
                tag: tag.clone(),
                digest: d.digest.clone(),
                size: total_size(d.size, &manifest),
                created: config
                    .get("created")
                    .and_then(|c| c.as_str())
                    .map(str::to_owned),
            });
        }
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        Ok(out)
    }

    /// Manifest, config, tags and size of one image.
    pub fn inspect(&self, reference: &str) -> Result<ImageInfo, StoreError> {
        let desc = self.resolve(reference)?;
        let manifest = self.manifest(&desc.digest)?;
        let config = self.config(&manifest.config.digest)?;
        let tags = self
            .index()?
            .manifests
            .iter()
            .filter(|d| d.digest == desc.digest)
            .filter_map(|d| d.annotations.get(oci::ANNOTATION_REF_NAME).cloned())
            .collect();
        Ok(ImageInfo {
            size: total_size(desc.size, &manifest),
            digest: desc.digest,
            tags,
            manifest,
            config,
        })
    }

    /// Removes every blob that no tag and no `retained` manifest digest reaches. `retained`
    /// is the caller's roots (releases kept for rollback): they are never removed, tagged or
    /// not. A root whose manifest is corrupt stops the collection with an error rather than
    /// risk removing what it refers to.
    pub fn gc(&self, retained: &BTreeSet<Digest>, dry_run: bool) -> Result<GcReport, StoreError> {
        let _gc = LockGuard::exclusive(&self.locks_dir().join("gc.lock"))?;
        let _index_lock = self.lock_index()?;
        let mut index = self.index()?;
        // Images are the roots; a referrer lives while its subject does (and so on, for a
        // signature on an attestation), reached through the subject's referrers index.
        let fallbacks: BTreeMap<Digest, Descriptor> = index
            .manifests
            .iter()
            .filter_map(|d| fallback_entry(d).map(|s| (s, d.clone())))
            .collect();
        let mut live: BTreeSet<Digest> = BTreeSet::new();
        let mut work: Vec<Digest> = index
            .manifests
            .iter()
            .filter(|d| is_image_entry(d))
            .map(|d| d.digest.clone())
            .chain(retained.iter().cloned())
            .collect();
        let mut seen: BTreeSet<Digest> = BTreeSet::new();
        while let Some(root) = work.pop() {
            if !seen.insert(root.clone()) || !self.has_blob(&root) {
                continue;
            }
            let manifest = self.manifest(&root)?;
            if let Some(fb) = fallbacks.get(&root)
                && let Some(referrers) = self.fallback_index(&index, &root)?
            {
                live.insert(fb.digest.clone());
                for child in referrers.manifests {
                    // Checked: a manifest listed for this image must name it.
                    self.read_referrer(&root, &child.digest)?;
                    work.push(child.digest);
                }
            }
            live.insert(root);
            live.insert(manifest.config.digest);
            live.extend(manifest.layers.into_iter().map(|l| l.digest));
        }
        // Referrers of collected images leave index.json with them.
        let before = index.manifests.len();
        index.manifests.retain(|d| {
            is_image_entry(d)
                || live.contains(&d.digest)
                || (fallback_entry(d).is_none() && d.artifact_type.is_none())
        });
        if !dry_run && index.manifests.len() != before {
            self.write_index(&index)?;
        }
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        let dir = self.blobs_dir();
        let mut names: Vec<String> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue; // not a blob name: not ours to judge
            };
            if live.contains(&digest) {
                report.kept += 1;
                continue;
            }
            let size = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                let att = self.attestation_path(&digest);
                if att.exists() {
                    fs::remove_file(&att).map_err(io_err("remove", &att))?;
                }
            }
            report.freed += size;
            report.removed.push((digest, size));
        }
        if !dry_run {
            kiln_durable::sync_dir(&dir).map_err(io_err("sync", &dir))?;
            // No writer holds the gc lock now, so any temp file left is from a crash.
            let tmp = self.tmp_dir();
            if let Ok(entries) = fs::read_dir(&tmp) {
                for e in entries.flatten() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(report)
    }

    fn attestation_path(&self, manifest: &Digest) -> PathBuf {
        self.attestations_dir()
            .join(format!("sha256-{}.json", manifest.hex()))
    }

    /// Records a test attestation for an image (durably; replaces an earlier one).
    pub fn write_attestation(
        &self,
        manifest: &Digest,
        attestation: &serde_json::Value,
    ) -> Result<PathBuf, StoreError> {
        let dir = self.attestations_dir();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let path = self.attestation_path(manifest);
        let bytes = canonical(attestation, "attestation")?;
        kiln_durable::write(&path, &bytes).map_err(io_err("write", &path))?;
        Ok(path)
    }

    /// The test attestation recorded for an image, if any.
    pub fn read_attestation(
        &self,
        manifest: &Digest,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let path = self.attestation_path(manifest);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::BadJson {
                        what: path.display().to_string(),
                        source,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }
}

/// Staged uploads (`uploads/`): blobs a remote client sent, kept apart from `blobs/` until a
/// manifest naming them passes its checks (`receive.rs`), so nothing a client sends is part of
/// the store before it is checked. Garbage collection never reads this directory.
impl Store {
    pub(crate) fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }

    /// Where a staged upload named `digest` lives (whether or not it exists).
    pub(crate) fn upload_path(&self, digest: &Digest) -> PathBuf {
        self.uploads_dir().join(digest.hex())
    }

    /// A writer for a staged upload: [`BlobWriter::commit`] with the expected digest puts it
    /// under `uploads/`, never under `blobs/`.
    pub(crate) fn upload_writer(&self) -> Result<BlobWriter, StoreError> {
        let dir = self.uploads_dir();
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let mut w = self.blob_writer()?;
        w.blobs = dir;
        Ok(w)
    }

    /// Opens a staged upload for streaming, verified against its name as blobs are.
    pub(crate) fn open_upload(&self, digest: &Digest) -> Result<VerifiedReader, StoreError> {
        let path = self.upload_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob {
                    digest: digest.clone(),
                });
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        Ok(VerifiedReader {
            inner: io::BufReader::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            expected: digest.clone(),
            path,
            done: false,
        })
    }

    /// Moves a checked staged upload into `blobs/` (a rename on one file system; the blob
    /// was fsynced when staged). A blob already there wins: the staged copy is dropped.
    pub(crate) fn adopt_upload(&self, digest: &Digest) -> Result<(), StoreError> {
        let from = self.upload_path(digest);
        let to = self.blob_path(digest);
        if to.exists() {
            let _ = fs::remove_file(&from);
            return Ok(());
        }
        fs::rename(&from, &to).map_err(io_err("rename into", &to))?;
        let blobs = self.blobs_dir();
        kiln_durable::sync_dir(&blobs).map_err(io_err("sync", &blobs))
    }
}

fn untagged(d: &Descriptor) -> Descriptor {
    Descriptor {
        annotations: BTreeMap::new(),
        platform: None,
        artifact_type: None,
        ..d.clone()
    }
}

fn total_size(manifest_size: u64, m: &Manifest) -> u64 {
    manifest_size + m.config.size + m.layers.iter().map(|l| l.size).sum::<u64>()
}

pub(crate) fn canonical<T: serde::Serialize>(v: &T, what: &str) -> Result<Vec<u8>, StoreError> {
    oci::canonical_json(v).map_err(|source| StoreError::BadJson {
        what: what.to_owned(),
        source,
    })
}

/// `NAME` → `NAME:latest`; checks the characters (the OCI ref.name grammar, loosely).
pub fn normalize_tag(tag: &str) -> Result<String, StoreError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
    let (name, version) = match tag.rsplit_once(':') {
        Some((n, v)) => (n, v),
        None => (tag, "latest"),
    };
    let valid = !name.is_empty()
        && !version.is_empty()
        && name.chars().all(ok_char)
        && version.chars().all(|c| ok_char(c) && c != '/')
        && !name.starts_with(['.', '-', '/']);
    if valid {
        Ok(format!("{name}:{version}"))
    } else {
        Err(StoreError::InvalidTag(tag.to_owned()))
    }
}

/// A blob being written; dropped without [`BlobWriter::commit`] it leaves nothing behind.
pub struct BlobWriter {
    inner: HashingWriter<io::BufWriter<tempfile::NamedTempFile>>,
    blobs: PathBuf,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter {
    /// Appends `src` without hashing it: the caller vouches for its content and then
    /// [`BlobWriter::resume`]s the hasher from the state recorded after those same bytes.
    pub(crate) fn write_unhashed<R: Read>(&mut self, src: &mut R) -> io::Result<u64> {
        self.inner.inner.flush()?;
        // File to file: std uses copy_file_range, so the bytes never enter this process.
        let n = io::copy(src, self.inner.inner.get_mut().as_file_mut())?;
        self.inner.len += n;
        Ok(n)
    }

    /// A second handle on the file being written, to fsync what has reached it early.
    pub(crate) fn file_handle(&self) -> io::Result<File> {
        self.inner.inner.get_ref().as_file().try_clone()
    }

    /// Replaces the hasher with `state`, which must describe exactly the bytes written.
    pub(crate) fn resume(&mut self, state: Sha256) {
        self.inner.hasher = state;
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Makes the blob durable under its digest. With `expected`, a different digest is
    /// [`StoreError::Corrupt`] and nothing is stored.
    pub fn commit(self, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError> {
        let HashingWriter { inner, hasher, len } = self.inner;
        let digest = crate::digest::finish(hasher);
        let tmp = inner
            .into_inner()
            .map_err(|e| io_err("write", &self.blobs)(e.into_error()))?;
        if let Some(expected) = expected
            && expected != &digest
        {
            return Err(StoreError::Corrupt {
                digest: expected.clone(),
                actual: digest,
                path: tmp.path().to_path_buf(),
            });
        }
        let path = self.blobs.join(digest.hex());
        if path.exists() {
            return Ok((digest, len));
        }
        tmp.as_file()
            .sync_all()
            .map_err(io_err("sync", tmp.path()))?;
        match tmp.persist_noclobber(&path) {
            Ok(_) => {}
            // Another writer stored the same content first: blobs are written once.
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => return Ok((digest, len)),
            Err(e) => return Err(io_err("rename into", &path)(e.error)),
        }
        kiln_durable::sync_dir(&self.blobs).map_err(io_err("sync", &self.blobs))?;
        Ok((digest, len))
    }
}

/// Streams a blob and fails at its end if the content does not match the digest.
pub struct VerifiedReader {
    inner: io::BufReader<File>,
    hasher: Sha256,
    expected: Digest,
    path: PathBuf,
    done: bool,
}

impl VerifiedReader {
    /// Turns an I/O error from this reader into a store error (keeping corruption typed).
    pub fn map_error(&self, e: io::Error, path: &Path) -> StoreError {
        match e.get_ref().and_then(|i| i.downcast_ref::<CorruptBlob>()) {
            Some(c) => StoreError::Corrupt {
                digest: c.expected.clone(),
                actual: c.actual.clone(),
                path: c.path.clone(),
            },
            None => io_err("read", path)(e),
        }
    }
}

/// The payload of the I/O error a [`VerifiedReader`] returns on a digest mismatch.
#[derive(Debug, thiserror::Error)]
#[error("blob {expected} is corrupt: its content hashes to {actual} ({})", path.display())]
pub struct CorruptBlob {
    /// The blob's name.
    pub expected: Digest,
    /// What its content hashes to.
    pub actual: Digest,
    /// The blob file.
    pub path: PathBuf,
}

impl Read for VerifiedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.done {
            self.done = true;
            let actual = crate::digest::finish(std::mem::take(&mut self.hasher));
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    CorruptBlob {
                        expected: self.expected.clone(),
                        actual,
                        path: self.path.clone(),
                    },
                ));
            }
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// An advisory `flock` held until dropped.
#[derive(Debug)]
pub struct LockGuard {
    file: File,
}

impl LockGuard {
    fn open(path: &Path) -> Result<File, StoreError> {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err("open lock", path))
    }

    fn exclusive(path: &Path) -> Result<LockGuard, StoreError> {
        let file = Self::open(path)?;
        file.lock().map_err(io_err("lock", path))?;
        Ok(LockGuard { file })
    }

    fn shared(path: &Path) -> Result<LockGuard, StoreError> {
        let file = Self::open(path)?;
        file.lock_shared().map_err(io_err("lock", path))?;
        Ok(LockGuard { file })
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}
