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
