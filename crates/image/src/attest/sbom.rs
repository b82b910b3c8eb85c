//! The SBOM of a build: an SPDX 2.3 JSON document, deterministic in its inputs.
//!
//! The image is the described package (its manifest digest as its version, checksum and
//! `pkg:oci` purl) and `CONTAINS` every regular file of the image, each with SHA1 (SPDX
//! requires it) and SHA-256. The base, when it has an identity, is a package the image is a
//! `DESCENDANT_OF`; the Debian packages a closure's host files came from are packages the
//! image `CONTAINS`, each `CONTAINS` its files. `created` is the build's
//! `SOURCE_DATE_EPOCH` and `documentNamespace` derives from the image digest, so the same
//! inputs give the same bytes. Pure: no I/O.

use serde_json::{Value, json};

use super::{BuildRecord, PREDICATE_SBOM, STATEMENT_TYPE};
use crate::digest::SbomHasher;
use crate::oci;

/// Where the documents' namespaces live (a URI prefix, never fetched).
pub const NAMESPACE_PREFIX: &str = "https://kiln.dev/spdx/";

fn purl_oci(name: &str, digest: &crate::Digest) -> String {
    format!("pkg:oci/{name}@sha256%3A{}", digest.hex())
}

fn checksums(h: &crate::digest::FileHashes) -> Value {
    json!([
        {"algorithm": "SHA1", "checksumValue": h.sha1},
        {"algorithm": "SHA256", "checksumValue": h.sha256.hex()},
    ])
}

/// SPDX's package verification code: SHA1 over the sorted SHA1s of the package's files.
fn verification_code<'a>(files: impl Iterator<Item = &'a super::ImageFile>) -> String {
    let mut sha1s: Vec<&str> = files.map(|f| f.hashes.sha1.as_str()).collect();
    sha1s.sort_unstable();
    let mut h = SbomHasher::default();
    for s in sha1s {
        h.update(s.as_bytes());
    }
    h.finish().sha1
}

/// The SPDX 2.3 document for `record`; `tool` is the creator (`kiln-0.1.0`).
pub fn document(record: &BuildRecord, tool: &str) -> Value {
    let name = record.name();
    let image_id = "SPDXRef-Image";
    let mut packages = vec![json!({
        "SPDXID": image_id,
        "name": name,
        "versionInfo": record.image.as_str(),
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": true,
        "packageVerificationCode": {
            "packageVerificationCodeValue": verification_code(record.files.iter()),
        },
        "checksums": [{"algorithm": "SHA256", "checksumValue": record.image.hex()}],
        "externalRefs": [{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": purl_oci(&name, &record.image),
        }],
        "primaryPackagePurpose": "CONTAINER",
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    if let Some(digest) = &record.base.digest {
        packages.push(json!({
            "SPDXID": "SPDXRef-Base",
            "name": record.base.name,
            "versionInfo": digest.as_str(),
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "checksums": [{"algorithm": "SHA256", "checksumValue": digest.hex()}],
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl_oci("base", digest),
            }],
            "primaryPackagePurpose": "CONTAINER",
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
        }));
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "DESCENDANT_OF",
            "relatedSpdxElement": "SPDXRef-Base",
        }));
    }
    for (i, p) in record.packages.iter().enumerate() {
        let id = format!("SPDXRef-Package-deb-{i}");
        // Its files in the image were read and hashed, so it CONTAINS them, analysed.
        let code = verification_code(record.files.iter().filter(|f| f.package == Some(i)));
        packages.push(json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": true,
            "packageVerificationCode": {"packageVerificationCodeValue": code},
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": p.purl(),
            }],
            "primaryPackagePurpose": "LIBRARY",
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
        }));
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    let mut files = Vec::with_capacity(record.files.len());
    for (i, f) in record.files.iter().enumerate() {
        let id = format!("SPDXRef-File-{i}");
        files.push(json!({
            "SPDXID": id,
            "fileName": format!(".{}", f.path),
            "checksums": checksums(&f.hashes),
            "licenseConcluded": "NOASSERTION",
            "copyrightText": "NOASSERTION",
        }));
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
        if let Some(p) = f.package {
            relationships.push(json!({
                "spdxElementId": format!("SPDXRef-Package-deb-{p}"),
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": id,
            }));
        }
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{name}@{}", record.image),
        "documentNamespace": format!("{NAMESPACE_PREFIX}{name}-sha256-{}", record.image.hex()),
        "creationInfo": {
            "created": oci::rfc3339(record.source_date_epoch),
            "creators": [format!("Tool: {tool}")],
        },
        "documentDescribes": [image_id],
        "packages": packages,
        "files": files,
        "relationships": relationships,
    })
}

/// The in-toto statement carrying the SBOM of `record` as its predicate.
pub fn statement(record: &BuildRecord, tool: &str) -> Value {
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": record.name(), "digest": {"sha256": record.image.hex()}}],
        "predicateType": PREDICATE_SBOM,
        "predicate": document(record, tool),
    })
}
