//! What a build or a test attaches to an image, and the names the attachments go by.
//!
//! The kinds (artifact types, payload media types, annotations, predicate types) are the
//! ones issue 18's shared design fixes, so a signer, a verifier and the daemon's policy read
//! the same attachments. This module defines the documents; the store ([`crate::Store`]
//! `attach`/`referrers`) keeps them.

/// An image signature: an armored SSHSIG (namespace `kiln-image`) over the manifest's bytes.
pub const ARTIFACT_SIGNATURE: &str = "application/vnd.kiln.signature.v1+sshsig";
/// The payload media type of an image signature.
pub const MEDIA_SSHSIG: &str = "application/vnd.kiln.signature.v1+sshsig";
/// An unsigned attestation: an in-toto Statement v1.
pub const ARTIFACT_IN_TOTO: &str = "application/vnd.in-toto+json";
/// A signed attestation: a DSSE envelope whose payload is an in-toto statement.
pub const ARTIFACT_DSSE: &str = "application/vnd.dsse.envelope.v1+json";
/// The annotation naming an attestation's predicate type.
pub const ANNOTATION_PREDICATE_TYPE: &str = "in-toto.io/predicate-type";
/// The annotation naming the fingerprint of the key that signed.
pub const ANNOTATION_KEY: &str = "dev.kiln.key";
/// The in-toto Statement v1 type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// Predicate type of the SBOM (the predicate is an SPDX 2.3 JSON document).
pub const PREDICATE_SBOM: &str = "https://spdx.dev/Document/v2.3";
/// Predicate type of the build provenance.
pub const PREDICATE_PROVENANCE: &str = "https://slsa.dev/provenance/v1";
/// Predicate type of `kiln test`'s result.
pub const PREDICATE_TEST: &str = "https://kiln.dev/attestation/test/v1";

pub mod disk;
pub mod dpkg;
mod layers;
pub mod provenance;
pub mod sbom;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_spec::{BaseImage, ImageSpec};
use sha2::{Digest as _, Sha256};

use crate::base::Base;
use crate::build::{BuildError, BuildOptions};
use crate::cache::BuildCache;
use crate::digest::{Digest, FileHashes};
use crate::store::Store;
use crate::tree::{EntryKind, LayerEntry};

pub use dpkg::DebPackage;

/// What one of the build's own layers holds (the base rootfs or one copy), as planned.
#[derive(Debug)]
pub(crate) struct LayerContents {
    /// `base rootfs` or `copy #N → /to`.
    pub(crate) source: String,
    /// For a copy with `closure = true`: its absolute `from`, so the host files the closure
    /// added (outside it) can be told apart.
    pub(crate) from: Option<PathBuf>,
    /// The entries.
    pub(crate) entries: Vec<LayerEntry>,
}

/// A regular file in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// Its path in the image, absolute (`/app/hello`).
    pub path: String,
    /// Its content's SHA1 and BLAKE3.
    pub hashes: FileHashes,
    /// The host file it was copied from, when a closure brought it in from outside the copy.
    pub host: Option<PathBuf>,
    /// The host file's SHA-256 (the provenance names a host file by it), read again when the
    /// record is made and checked against [`ImageFile::hashes`]; `None` without a host file.
    pub host_sha256: Option<Digest>,
    /// The Debian package the host file belongs to (an index into
    /// [`BuildRecord::packages`]), when dpkg's database names one.
    pub package: Option<usize>,
}

/// One input tree of the build (a copy or the base rootfs) by one digest over its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputTree {
    /// `base rootfs` or `copy #N → /to`.
    pub source: String,
    /// SHA-256 over its sorted entries (kind, mode, path, content BLAKE3 or link target).
    pub digest: Digest,
}

/// The base image by name and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRecord {
    /// `scratch`, or the kind and file name of the base (`oci:debian`); no host directory,
    /// so two checkouts at different paths describe it alike.
    pub name: String,
    /// The manifest digest of an image base, the SHA-256 of a rootfs tarball.
    pub digest: Option<Digest>,
}

/// Everything the SBOM and the provenance say about one build, gathered while it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    /// The image (its manifest digest).
    pub image: Digest,
    /// The tag the build pointed at it.
    pub tag: Option<String>,
    /// `SOURCE_DATE_EPOCH`.
    pub source_date_epoch: u64,
    /// The layers' compression (`gzip`, `zstd`, `none`).
    pub compression: String,
    /// The image's architecture.
    pub architecture: String,
    /// The image's OS.
    pub os: String,
    /// The base.
    pub base: BaseRecord,
    /// Every regular file of the image, sorted by path.
    pub files: Vec<ImageFile>,
    /// The build's input trees, in layer order.
    pub inputs: Vec<InputTree>,
    /// Debian packages the closure's host files came from, sorted by name.
    pub packages: Vec<DebPackage>,
}

/// Where dpkg keeps its database on a Debian host.
pub const DPKG_ADMIN_DIR: &str = "/var/lib/dpkg";

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn base_name(base: &BaseImage) -> String {
    match base {
        BaseImage::Scratch => "scratch".to_owned(),
        BaseImage::Oci { path, .. } => format!("oci:{}", file_name(path)),
        BaseImage::DockerArchive(p) => format!("docker-archive:{}", file_name(p)),
        BaseImage::Rootfs(p) => format!("rootfs:{}", file_name(p)),
    }
}

impl BuildRecord {
    /// Gathers the record from a build's planned layers and the hashes it computed.
    pub(crate) fn gather(
        spec: &ImageSpec,
        store: &Store,
        cache: &BuildCache,
        opts: &BuildOptions,
        base: &Base,
        contents: &[LayerContents],
        hashes: &dyn Fn(&Path) -> Option<FileHashes>,
    ) -> Result<BuildRecord, BuildError> {
        let mut files: BTreeMap<String, ImageFile> = BTreeMap::new();
        for (path, h) in layers::base_files(store, cache, &base.reports)? {
            files.insert(
                path.clone(),
                ImageFile {
                    path,
                    hashes: h,
                    host: None,
                    host_sha256: None,
                    package: None,
                },
            );
        }
        let mut inputs = Vec::new();
        for lc in contents {
            let mut tree = Sha256::new();
            let mut here: BTreeMap<&str, FileHashes> = BTreeMap::new();
            for e in &lc.entries {
                let path = format!("/{}", e.path);
                let (line, file) = match &e.kind {
                    EntryKind::Dir => (format!("D {:o} {path}\n", e.mode), None),
                    EntryKind::Symlink { target } => (
                        format!("L {:o} {path} {}\n", e.mode, crate::digest::hex(target)),
                        None,
                    ),
                    EntryKind::File { source, stat, .. } => {
                        // An empty file has no content for the build to read.
                        let empty = (stat.size == 0).then(|| crate::digest::file_hashes(b""));
                        let h = hashes(source)
                            .or(empty)
                            .ok_or_else(|| BuildError::Internal {
                                reason: format!(
                                    "the SBOM hashes of {} were not computed",
                                    source.display()
                                ),
                            })?;
                        let host = lc
                            .from
                            .as_ref()
                            .filter(|from| {
                                !source.starts_with(from) && *source == Path::new("/").join(&e.path)
                            })
                            .map(|_| source.clone());
                        here.insert(&e.path, h.clone());
                        (
                            format!("F {:o} {path} blake3:{}\n", e.mode, h.blake3),
                            Some((h, host)),
                        )
                    }
                    EntryKind::Hardlink { target } => {
                        let h = here.get(target.as_str()).cloned().ok_or_else(|| {
                            BuildError::Internal {
                                reason: format!("hardlink {path} to {target} precedes it"),
                            }
                        })?;
                        (
                            format!("H {:o} {path} blake3:{}\n", e.mode, h.blake3),
                            Some((h, None)),
                        )
                    }
                };
                tree.update(line.as_bytes());
                if let Some((h, host)) = file {
                    let host_sha256 = match &host {
                        Some(p) => Some(host_sha256(p, &h)?),
                        None => None,
                    };
                    files.insert(
                        path.clone(),
                        ImageFile {
                            path,
                            hashes: h,
                            host,
                            host_sha256,
                            package: None,
                        },
                    );
                }
            }
            inputs.push(InputTree {
                source: lc.source.clone(),
                digest: crate::digest::finish(tree),
            });
        }
        let mut files: Vec<ImageFile> = files.into_values().collect();
        let host: Vec<PathBuf> = files.iter().filter_map(|f| f.host.clone()).collect();
        let mut packages = Vec::new();
        if !host.is_empty() {
            let owners =
                dpkg::owners(&opts.dpkg_admin_dir, &host).map_err(|source| BuildError::Io {
                    op: "read the dpkg database in",
                    path: opts.dpkg_admin_dir.clone(),
                    source,
                })?;
            let mut names: Vec<DebPackage> = owners.values().cloned().collect();
            names.sort();
            names.dedup();
            for f in &mut files {
                if let Some(pkg) = f.host.as_ref().and_then(|h| owners.get(h)) {
                    f.package = names.iter().position(|p| p == pkg);
                }
            }
            packages = names;
        }
        Ok(BuildRecord {
            image: Digest::of(b""),
            tag: None,
            source_date_epoch: opts.source_date_epoch,
            compression: format!("{:?}", spec.compression).to_ascii_lowercase(),
            architecture: opts.architecture.clone(),
            os: opts.os.clone(),
            base: BaseRecord {
                name: base_name(&spec.base),
                digest: base.identity.clone(),
            },
            files,
            inputs,
            packages,
        })
    }

    /// The image's name for documents: its tag's name, else `image`.
    pub fn name(&self) -> String {
        self.tag
            .as_deref()
            .and_then(|t| t.rsplit_once(':').map(|(n, _)| n.to_owned()))
            .unwrap_or_else(|| "image".to_owned())
    }
}

/// Attaches `statement` (an in-toto Statement v1) to `subject` as an unsigned attestation,
/// annotated with its predicate type; returns the referrer manifest's digest.
pub fn attach_statement(
    store: &Store,
    subject: &Digest,
    statement: &serde_json::Value,
) -> Result<Digest, crate::StoreError> {
    let predicate_type = statement
        .get("predicateType")
        .and_then(|p| p.as_str())
        .unwrap_or_default()
        .to_owned();
    let bytes = crate::store::canonical(statement, "in-toto statement")?;
    attach_statement_bytes(store, subject, &predicate_type, &bytes)
}

/// [`attach_statement`] for a statement already serialized (canonical JSON).
pub fn attach_statement_bytes(
    store: &Store,
    subject: &Digest,
    predicate_type: &str,
    bytes: &[u8],
) -> Result<Digest, crate::StoreError> {
    store.attach(
        subject,
        ARTIFACT_IN_TOTO,
        ARTIFACT_IN_TOTO,
        bytes,
        BTreeMap::from([(
            ANNOTATION_PREDICATE_TYPE.to_owned(),
            predicate_type.to_owned(),
        )]),
    )
}

/// Attaches the SBOM and the provenance of a build to its image; returns their referrer
/// manifests' digests (SBOM first). The SBOM's bytes depend only on the inputs, so a rebuild
/// attaches the same one; an image that already has a provenance statement keeps it (it
/// says how the image was first made here) rather than gaining one per rebuild.
pub fn attach_build(
    store: &Store,
    record: &BuildRecord,
    invocation: &provenance::Invocation,
) -> Result<[Digest; 2], crate::StoreError> {
    let tool = format!("kiln-{}", invocation.kiln_version);
    let bytes =
        sbom::statement_bytes(record, &tool).map_err(|source| crate::StoreError::BadJson {
            what: format!("the SBOM of {}", record.image),
            source,
        })?;
    let sbom = attach_statement_bytes(store, &record.image, PREDICATE_SBOM, &bytes)?;
    // One provenance per source: a rebuild of the same image from the same commit (or from
    // no repository) adds nothing, but one from another commit, or from a clean work tree
    // after a dirty one, is a new fact about the image and is kept beside the first.
    let existing =
        store.referrers_of_kind(&record.image, ARTIFACT_IN_TOTO, Some(PREDICATE_PROVENANCE))?;
    let mut same = None;
    for r in &existing {
        let statement: serde_json::Value =
            serde_json::from_slice(&store.read_blob(&r.payload)?).unwrap_or_default();
        // A disk exported from the image carries its own provenance here too: not this one.
        if !names_subject(&statement, &record.image) {
            continue;
        }
        if git_source(&statement)
            == invocation
                .source
                .as_ref()
                .map(|s| (s.commit.as_str(), s.clean))
        {
            same = Some(r.manifest.clone());
            break;
        }
    }
    let prov = match same {
        Some(manifest) => manifest,
        None => attach_statement(
            store,
            &record.image,
            &provenance::statement(record, invocation),
        )?,
    };
    Ok([sbom, prov])
}

/// An in-toto Statement v1 about one subject, by name and SHA-256.
pub(crate) fn statement(
    name: &str,
    sha256: &Digest,
    predicate_type: &str,
    predicate: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": sha256.hex()}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    })
}

/// Whether `statement`'s subjects include `digest` (by SHA-256).
pub fn names_subject(statement: &serde_json::Value, digest: &Digest) -> bool {
    statement["subject"].as_array().is_some_and(|subjects| {
        subjects
            .iter()
            .any(|s| s["digest"]["sha256"].as_str() == Some(digest.hex()))
    })
}

/// The image's own SBOM in `store` (an attached SPDX statement whose subject is the
/// image, the first by referrer digest), as another document refers to it.
pub fn image_sbom(
    store: &Store,
    image: &Digest,
) -> Result<Option<disk::ExternalSbom>, crate::StoreError> {
    for r in store.referrers_of_kind(image, ARTIFACT_IN_TOTO, Some(PREDICATE_SBOM))? {
        let statement: serde_json::Value =
            serde_json::from_slice(&store.read_blob(&r.payload)?).unwrap_or_default();
        if let Some(found) = disk::ExternalSbom::of(&statement, image) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The git commit and cleanliness a provenance statement records, if any.
fn git_source(statement: &serde_json::Value) -> Option<(&str, bool)> {
    statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()?
        .iter()
        .find(|d| d["uri"].as_str().is_some_and(|u| u.starts_with("git+")))
        .and_then(|d| {
            let commit = d["digest"]["gitCommit"].as_str()?;
            Some((commit, d["annotations"]["clean"].as_bool() == Some(true)))
        })
}

/// The in-toto statement of a `kiln test` run on `subject` (predicate type
/// [`PREDICATE_TEST`]): `result` (`passed` or `failed`), the `checks` as run (a failing
/// one with its output), when and how long, and kiln's version.
pub fn test_statement(
    subject: &Digest,
    name: &str,
    result: TestOutcome,
    checks: serde_json::Value,
    kiln_version: &str,
    started_on: &str,
    duration_ms: u64,
) -> serde_json::Value {
    statement(
        name,
        subject,
        PREDICATE_TEST,
        serde_json::json!({
            "result": result.as_str(),
            "checks": checks,
            "kilnVersion": kiln_version,
            "startedOn": started_on,
            "durationMs": duration_ms,
        }),
    )
}

/// How a test run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestOutcome {
    /// Every check passed.
    Passed,
    /// A check failed.
    Failed,
}

impl TestOutcome {
    /// `passed` or `failed`, as the attestations write it.
    pub fn as_str(self) -> &'static str {
        match self {
            TestOutcome::Passed => "passed",
            TestOutcome::Failed => "failed",
        }
    }
}

/// A closure's host file's SHA-256, for the provenance: the file is read again (closures are
/// a few libraries, so this costs little) and its BLAKE3 must match the one the build
/// hashed, or the file changed while the image was being built.
fn host_sha256(path: &Path, built: &FileHashes) -> Result<Digest, BuildError> {
    let mut f = std::fs::File::open(path).map_err(BuildError::io("open", path))?;
    let mut sha256 = Sha256::new();
    let mut blake = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).map_err(BuildError::io("read", path))?;
        if n == 0 {
            break;
        }
        sha256.update(&buf[..n]);
        blake.update(&buf[..n]);
    }
    if crate::digest::blake3_hex(&blake) != built.blake3 {
        return Err(BuildError::ChangedDuringBuild {
            path: path.to_owned(),
        });
    }
    Ok(crate::digest::finish(sha256))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use super::*;

    /// A record as a build with an image base and a closure would gather it.
    pub(crate) fn fixture() -> BuildRecord {
        let file = |path: &str, host: Option<&str>, package: Option<usize>| ImageFile {
            path: path.to_owned(),
            hashes: crate::digest::file_hashes(path.rsplit('/').next().unwrap().as_bytes()),
            host: host.map(PathBuf::from),
            host_sha256: host.map(|h| Digest::of(h.as_bytes())),
            package,
        };
        BuildRecord {
            image: Digest::of(b"image"),
            tag: Some("web:latest".to_owned()),
            source_date_epoch: 1_700_000_000,
            compression: "gzip".to_owned(),
            architecture: "amd64".to_owned(),
            os: "linux".to_owned(),
            base: BaseRecord {
                name: "oci:debian".to_owned(),
                digest: Some(Digest::of(b"base")),
            },
            files: vec![
                file("/app/main", None, None),
                file("/etc/os-release", None, None),
                file(
                    "/usr/lib/x86_64-linux-gnu/libc.so.6",
                    Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                    Some(0),
                ),
            ],
            inputs: vec![InputTree {
                source: "copy #1 → /app".to_owned(),
                digest: Digest::of(b"tree"),
            }],
            packages: vec![DebPackage {
                name: "libc6".to_owned(),
                version: "2.36-9+deb12u10".to_owned(),
                architecture: "amd64".to_owned(),
            }],
        }
    }

    #[test]
    fn the_test_statement_says_passed_or_failed() {
        let s = test_statement(
            &Digest::of(b"image"),
            "web",
            TestOutcome::Failed,
            serde_json::json!([{"kind": "command", "passed": false, "output": "boom"}]),
            "0.1.0",
            "2026-01-01T00:00:00Z",
            12,
        );
        assert_eq!(s["predicateType"], PREDICATE_TEST);
        assert_eq!(s["predicate"]["result"], "failed");
        assert_eq!(s["predicate"]["checks"][0]["output"], "boom");
        assert_eq!(
            s["subject"][0]["digest"]["sha256"],
            Digest::of(b"image").hex()
        );
    }
}
