//! OCI 1.1 referrers in the store: signatures and attestations attached to an image.
//!
//! An attachment to image `S` is an image manifest with an `artifactType`, the empty config
//! (`{}`), one layer (the payload) and `subject` = `S`. Its descriptor goes into `index.json`
//! untagged, with its `artifactType`; and the OCI referrers-tag fallback is kept current: the
//! tag `sha256-<hex of S>` names an image index of `S`'s referrers, so a tool without
//! referrers support (`skopeo copy --all oci:A:sha256-…`) carries them by that tag.
//!
//! The fallback index is what [`Store::referrers`] reads, so a bad referrer only ever
//! concerns the one image whose index lists it; and every referrer read is checked to name
//! that image as its subject, so a manifest listed for one image never attaches to another.
//!
//! **Invariant:** the referrers' entries in `index.json` change only under the index lock,
//! and a referrer lives exactly as long as its subject (`Store::gc`).

use std::collections::BTreeMap;

use crate::digest::Digest;
use crate::oci::{self, Descriptor, Index, Manifest};
use crate::store::{Store, StoreError, canonical};

/// The most bytes a referrer manifest (or a referrers index) may have: OCI registries'
/// usual manifest bound. A larger one is refused unread.
pub const MAX_REFERRER_MANIFEST: u64 = 4 << 20;

/// The most referrers one image may carry: its referrers index stays far below
/// [`MAX_REFERRER_MANIFEST`], and each policy check reads them all.
pub const MAX_REFERRERS: usize = 128;

/// One manifest attached to an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Referrer {
    /// The referrer manifest's digest.
    pub manifest: Digest,
    /// Its `artifactType`.
    pub artifact_type: String,
    /// The payload blob (read it with [`Store::read_blob`]).
    pub payload: Digest,
    /// The payload's media type.
    pub payload_media_type: String,
    /// The manifest's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The referrers-tag fallback's tag for `subject`: `sha256-<hex>`.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// The subject a fallback tag names, if `tag` is one.
pub(crate) fn fallback_subject(tag: &str) -> Option<Digest> {
    let hex = tag.strip_prefix("sha256-")?;
    Digest::parse(&format!("sha256:{hex}")).ok()
}

/// Whether an `index.json` entry is an image (not a referrer, not a referrers index).
pub(crate) fn is_image_entry(d: &Descriptor) -> bool {
    d.artifact_type.is_none() && d.media_type != oci::MEDIA_INDEX
}

/// Whether an `index.json` entry is the referrers-tag fallback of some image.
pub(crate) fn fallback_entry(d: &Descriptor) -> Option<Digest> {
    if d.media_type != oci::MEDIA_INDEX {
        return None;
    }
    d.annotations
        .get(oci::ANNOTATION_REF_NAME)
        .and_then(|t| fallback_subject(t))
}

/// Checks a referrer manifest's bytes: JSON, an artifact type, one payload layer, and
/// `subject` naming `subject`. The error names the manifest and the image.
pub(crate) fn parse_referrer(
    subject: &Digest,
    digest: &Digest,
    bytes: &[u8],
) -> Result<(Manifest, Referrer), StoreError> {
    let bad = |reason: String| StoreError::BadReferrer {
        digest: digest.clone(),
        subject: subject.clone(),
        reason,
    };
    if bytes.len() as u64 > MAX_REFERRER_MANIFEST {
        return Err(bad(format!(
            "is {} bytes, more than the {MAX_REFERRER_MANIFEST} a referrer manifest may have",
            bytes.len()
        )));
    }
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("is not a valid manifest: {e}")))?;
    match &manifest.subject {
        Some(s) if &s.digest == subject => {}
        Some(s) => return Err(bad(format!("names subject {}, not this image", s.digest))),
        None => return Err(bad("has no subject".to_owned())),
    }
    let Some(artifact_type) = manifest.artifact_type.clone() else {
        return Err(bad("has no artifactType".to_owned()));
    };
    let [layer] = manifest.layers.as_slice() else {
        return Err(bad(format!(
            "has {} layers; a referrer has exactly one payload",
            manifest.layers.len()
        )));
    };
    let referrer = Referrer {
        manifest: digest.clone(),
        artifact_type,
        payload: layer.digest.clone(),
        payload_media_type: layer.media_type.clone(),
        annotations: manifest.annotations.clone(),
    };
    Ok((manifest, referrer))
}

impl Store {
    /// Attaches `payload` to the image `subject` as a referrer of `artifact_type` and
    /// returns the referrer manifest's digest. Idempotent: the same arguments give the same
    /// manifest bytes, attached once.
    pub fn attach(
        &self,
        subject: &Digest,
        artifact_type: &str,
        payload_media_type: &str,
        payload: &[u8],
        annotations: BTreeMap<String, String>,
    ) -> Result<Digest, StoreError> {
        let _writer = self.writer_guard()?;
        let subject_manifest = self.manifest(subject)?;
        let subject_desc = Descriptor::new(
            subject_manifest
                .media_type
                .unwrap_or_else(|| oci::MEDIA_MANIFEST.to_owned()),
            subject.clone(),
            self.blob_size(subject)?,
        );
        let payload_digest = self.write_blob(payload)?;
        let empty = self.write_blob(oci::EMPTY_JSON)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(oci::MEDIA_MANIFEST.to_owned()),
            config: Descriptor::new(oci::MEDIA_EMPTY, empty, oci::EMPTY_JSON.len() as u64),
            layers: vec![Descriptor::new(
                payload_media_type,
                payload_digest,
                payload.len() as u64,
            )],
            annotations,
            artifact_type: Some(artifact_type.to_owned()),
            subject: Some(subject_desc),
        };
        let bytes = canonical(&manifest, "referrer manifest")?;
        let digest = self.write_blob(&bytes)?;
        let mut desc = Descriptor::new(oci::MEDIA_MANIFEST, digest.clone(), bytes.len() as u64);
        desc.artifact_type = Some(artifact_type.to_owned());
        self.add_referrer(subject, desc, manifest.annotations)?;
        Ok(digest)
    }

    /// Lists `desc` (a stored referrer manifest of `subject`) in `index.json` and in
    /// `subject`'s referrers-tag index.
    pub(crate) fn add_referrer(
        &self,
        subject: &Digest,
        desc: Descriptor,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let _lock = self.lock_index()?;
        let mut index = self.index()?;
        let mut changed = false;
        if !index
            .manifests
            .iter()
            .any(|d| d.digest == desc.digest && d.artifact_type.is_some())
        {
            index.manifests.push(desc.clone());
            changed = true;
        }
        let tag = fallback_tag(subject);
        let mut fallback = match self.fallback_index(&index, subject)? {
            Some(i) => i,
            None => Index::empty(),
        };
        if !fallback.manifests.iter().any(|d| d.digest == desc.digest) {
            if fallback.manifests.len() >= MAX_REFERRERS {
                return Err(StoreError::BadReferrer {
                    digest: desc.digest,
                    subject: subject.clone(),
                    reason: format!(
                        "is refused: the image already carries {MAX_REFERRERS} referrers, the most \
                         kiln keeps for one image"
                    ),
                });
            }
            let mut child = desc;
            child.annotations = annotations;
            fallback.manifests.push(child);
            fallback.manifests.sort_by(|a, b| a.digest.cmp(&b.digest));
            let bytes = canonical(&fallback, "referrers index")?;
            let digest = self.write_blob(&bytes)?;
            index
                .manifests
                .retain(|d| fallback_entry(d).as_ref() != Some(subject));
            let mut entry = Descriptor::new(oci::MEDIA_INDEX, digest, bytes.len() as u64);
            entry.annotations = BTreeMap::from([(oci::ANNOTATION_REF_NAME.to_owned(), tag)]);
            index.manifests.push(entry);
            changed = true;
        }
        if changed {
            self.write_index(&index)?;
        }
        Ok(())
    }

    /// The referrers-tag index of `subject` that `index` lists, if any.
    pub(crate) fn fallback_index(
        &self,
        index: &Index,
        subject: &Digest,
    ) -> Result<Option<Index>, StoreError> {
        let Some(entry) = index
            .manifests
            .iter()
            .find(|d| fallback_entry(d).as_ref() == Some(subject))
        else {
            return Ok(None);
        };
        let size = self.blob_size(&entry.digest)?;
        if size > MAX_REFERRER_MANIFEST {
            return Err(StoreError::BadReferrer {
                digest: entry.digest.clone(),
                subject: subject.clone(),
                reason: format!(
                    "(its referrers index) is {size} bytes, more than {MAX_REFERRER_MANIFEST}"
                ),
            });
        }
        let bytes = self.read_blob(&entry.digest)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::BadReferrer {
                digest: entry.digest.clone(),
                subject: subject.clone(),
                reason: format!("(its referrers index) is not a valid image index: {e}"),
            })
    }

    /// Reads and checks one referrer manifest of `subject`.
    pub(crate) fn read_referrer(
        &self,
        subject: &Digest,
        digest: &Digest,
    ) -> Result<(Manifest, Referrer), StoreError> {
        let size = self.blob_size(digest)?;
        if size > MAX_REFERRER_MANIFEST {
            return Err(StoreError::BadReferrer {
                digest: digest.clone(),
                subject: subject.clone(),
                reason: format!(
                    "is {size} bytes, more than the {MAX_REFERRER_MANIFEST} a referrer manifest may have"
                ),
            });
        }
        let bytes = self.read_blob(digest)?;
        parse_referrer(subject, digest, &bytes)
    }

    /// The digest of `subject`'s referrers-tag index (the image index the tag
    /// `sha256-<hex>` names), after checking every referrer it lists; `None` when the image
    /// carries none. What a registry push sends as that tag, and what kiln's registry
    /// endpoint serves for it.
    pub fn referrers_index(&self, subject: &Digest) -> Result<Option<Digest>, StoreError> {
        let index = self.index()?;
        let Some(entry) = index
            .manifests
            .iter()
            .find(|d| fallback_entry(d).as_ref() == Some(subject))
        else {
            return Ok(None);
        };
        let digest = entry.digest.clone();
        self.referrers(subject)?;
        Ok(Some(digest))
    }

    /// The referrers attached to `subject`, sorted by manifest digest. Each one is checked
    /// (size, JSON, subject); a bad one is an error naming it.
    pub fn referrers(&self, subject: &Digest) -> Result<Vec<Referrer>, StoreError> {
        let index = self.index()?;
        let Some(fallback) = self.fallback_index(&index, subject)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(fallback.manifests.len());
        for child in &fallback.manifests {
            let (_, r) = self.read_referrer(subject, &child.digest)?;
            out.push(r);
        }
        out.sort_by(|a, b| a.manifest.cmp(&b.manifest));
        Ok(out)
    }

    /// The referrers of `subject` whose artifact type is `artifact_type` and, for in-toto
    /// attestations, whose predicate type annotation is `predicate_type` (when given).
    pub fn referrers_of_kind(
        &self,
        subject: &Digest,
        artifact_type: &str,
        predicate_type: Option<&str>,
    ) -> Result<Vec<Referrer>, StoreError> {
        Ok(self
            .referrers(subject)?
            .into_iter()
            .filter(|r| r.artifact_type == artifact_type)
            .filter(|r| {
                predicate_type.is_none_or(|p| {
                    r.annotations
                        .get(crate::attest::ANNOTATION_PREDICATE_TYPE)
                        .map(String::as_str)
                        == Some(p)
                })
            })
            .collect())
    }
}
