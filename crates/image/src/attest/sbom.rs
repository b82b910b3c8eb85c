//! The SBOM of a build: an SPDX 2.3 JSON document, deterministic in its inputs.
//!
//! The image is the described package (its manifest digest as its version, checksum and
//! `pkg:oci` purl) and `CONTAINS` every regular file of the image, each with SHA1 (SPDX
//! requires it) and BLAKE3 (one of SPDX 2.3's algorithms; the build cache computes it
//! anyway, so the SBOM costs one extra hash per byte, SHA1). The base, when it has an identity, is a package the image is a
//! `DESCENDANT_OF`; the Debian packages a closure's host files came from are packages the
//! image `CONTAINS`, each `CONTAINS` its files. `created` is the build's
//! `SOURCE_DATE_EPOCH` and `documentNamespace` derives from the image digest, so the same
//! inputs give the same bytes. Pure: no I/O.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{BuildRecord, PREDICATE_SBOM, STATEMENT_TYPE};
use crate::digest::SbomHasher;
use crate::oci;

/// Where the documents' namespaces live (a URI prefix, never fetched).
pub const NAMESPACE_PREFIX: &str = "https://kiln.dev/spdx/";

/// An OCI image's package URL: `pkg:oci/NAME@sha256%3A<hex>`.
pub(crate) fn purl_oci(name: &str, digest: &crate::Digest) -> String {
    format!("pkg:oci/{name}@sha256%3A{}", digest.hex())
}

/// A package whose files are not analysed: its id, name, version, SHA-256 and purl when
/// known, and its primary purpose; no license or copyright asserted.
pub(crate) fn package(
    id: &str,
    name: &str,
    version: &str,
    sha256: Option<&crate::Digest>,
    purl: Option<&str>,
    purpose: &str,
) -> Value {
    let mut p = json!({
        "SPDXID": id,
        "name": name,
        "versionInfo": version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": purpose,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    });
    if let Some(d) = sha256 {
        p["checksums"] = json!([{"algorithm": "SHA256", "checksumValue": d.hex()}]);
    }
    if let Some(purl) = purl {
        p["externalRefs"] = json!([{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": purl,
        }]);
    }
    p
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

fn build<'a>(record: &'a BuildRecord, tool: &str) -> Document<'a> {
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
    let mut relationships = vec![Relationship {
        related: image_id.to_owned(),
        kind: "DESCRIBES",
        element: "SPDXRef-DOCUMENT".to_owned(),
    }];
    if let Some(digest) = &record.base.digest {
        packages.push(package(
            "SPDXRef-Base",
            &record.base.name,
            digest.as_str(),
            Some(digest),
            Some(&purl_oci("base", digest)),
            "CONTAINER",
        ));
        relationships.push(Relationship {
            related: "SPDXRef-Base".to_owned(),
            kind: "DESCENDANT_OF",
            element: image_id.to_owned(),
        });
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
        relationships.push(Relationship {
            related: id,
            kind: "CONTAINS",
            element: image_id.to_owned(),
        });
    }
    let mut files = Vec::with_capacity(record.files.len());
    for (i, f) in record.files.iter().enumerate() {
        let id = format!("SPDXRef-File-{i}");
        relationships.push(Relationship {
            related: id.clone(),
            kind: "CONTAINS",
            element: image_id.to_owned(),
        });
        if let Some(p) = f.package {
            relationships.push(Relationship {
                related: id.clone(),
                kind: "CONTAINS",
                element: format!("SPDXRef-Package-deb-{p}"),
            });
        }
        files.push(File {
            id,
            checksums: [
                Checksum {
                    algorithm: "SHA1",
                    value: &f.hashes.sha1,
                },
                Checksum {
                    algorithm: "BLAKE3",
                    value: &f.hashes.blake3,
                },
            ],
            copyright: "NOASSERTION",
            name: format!(".{}", f.path),
            license: "NOASSERTION",
        });
    }
    Document {
        id: "SPDXRef-DOCUMENT",
        creation: Creation {
            created: oci::rfc3339(record.source_date_epoch),
            creators: [format!("Tool: {tool}")],
        },
        data_license: "CC0-1.0",
        describes: [image_id],
        namespace: format!("{NAMESPACE_PREFIX}{name}-sha256-{}", record.image.hex()),
        files,
        name: format!("{name}@{}", record.image),
        packages: packages.into_iter().map(crate::oci::sorted).collect(),
        relationships,
        version: "SPDX-2.3",
    }
}

/// The SPDX 2.3 document for `record`, as a JSON value; `tool` is the creator (`kiln-0.1.0`).
pub fn document(record: &BuildRecord, tool: &str) -> Value {
    serde_json::to_value(build(record, tool)).unwrap_or(Value::Null)
}

// The document's own types, their fields declared in sorted key order so that serde writes
// canonical JSON (sorted keys, compact) straight away: an SBOM lists thousands of files, and
// a round trip through `serde_json::Value` to sort them costs more than the rest together.

#[derive(serde::Serialize)]
struct Checksum<'a> {
    algorithm: &'static str,
    #[serde(rename = "checksumValue")]
    value: &'a str,
}

#[derive(serde::Serialize)]
struct File<'a> {
    #[serde(rename = "SPDXID")]
    id: String,
    checksums: [Checksum<'a>; 2],
    #[serde(rename = "copyrightText")]
    copyright: &'static str,
    #[serde(rename = "fileName")]
    name: String,
    #[serde(rename = "licenseConcluded")]
    license: &'static str,
}

#[derive(serde::Serialize)]
struct Relationship {
    #[serde(rename = "relatedSpdxElement")]
    related: String,
    #[serde(rename = "relationshipType")]
    kind: &'static str,
    #[serde(rename = "spdxElementId")]
    element: String,
}

#[derive(serde::Serialize)]
struct Creation {
    created: String,
    creators: [String; 1],
}

#[derive(serde::Serialize)]
struct Document<'a> {
    #[serde(rename = "SPDXID")]
    id: &'static str,
    #[serde(rename = "creationInfo")]
    creation: Creation,
    #[serde(rename = "dataLicense")]
    data_license: &'static str,
    #[serde(rename = "documentDescribes")]
    describes: [&'static str; 1],
    #[serde(rename = "documentNamespace")]
    namespace: String,
    files: Vec<File<'a>>,
    name: String,
    packages: Vec<Value>,
    relationships: Vec<Relationship>,
    #[serde(rename = "spdxVersion")]
    version: &'static str,
}

#[derive(serde::Serialize)]
struct Subject<'a> {
    digest: BTreeMap<&'static str, &'a str>,
    name: String,
}

#[derive(serde::Serialize)]
struct Statement<'a> {
    #[serde(rename = "_type")]
    kind: &'static str,
    predicate: Document<'a>,
    #[serde(rename = "predicateType")]
    predicate_type: &'static str,
    subject: [Subject<'a>; 1],
}

/// The in-toto statement carrying the SBOM of `record`, as canonical JSON bytes (what
/// [`crate::oci::canonical_json`] would write for [`statement`]).
pub fn statement_bytes(record: &BuildRecord, tool: &str) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Statement {
        kind: STATEMENT_TYPE,
        predicate: build(record, tool),
        predicate_type: PREDICATE_SBOM,
        subject: [Subject {
            digest: BTreeMap::from([("sha256", record.image.hex())]),
            name: record.name(),
        }],
    })
}

/// The in-toto statement carrying the SBOM of `record` as its predicate.
pub fn statement(record: &BuildRecord, tool: &str) -> Value {
    super::statement(
        &record.name(),
        &record.image,
        PREDICATE_SBOM,
        document(record, tool),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::attest::tests::fixture;

    #[test]
    fn the_document_lists_every_file_the_base_and_the_packages() {
        let r = fixture();
        let d = document(&r, "kiln-0.1.0");
        assert_eq!(d["spdxVersion"], "SPDX-2.3");
        assert_eq!(d["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(
            d["documentNamespace"],
            format!("{NAMESPACE_PREFIX}web-sha256-{}", r.image.hex())
        );
        let files = d["files"].as_array().unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(files[0]["fileName"], "./app/main");
        assert_eq!(files[0]["checksums"][0]["algorithm"], "SHA1");
        assert_eq!(
            files[0]["checksums"][0]["checksumValue"],
            // sha1("main")
            "b28b7af69320201d1cf206ebf28373980add1451"
        );
        assert_eq!(files[0]["checksums"][1]["algorithm"], "BLAKE3");
        assert_eq!(
            files[0]["checksums"][1]["checksumValue"],
            crate::digest::blake3_hex(blake3::Hasher::new().update(b"main"))
        );
        let packages = d["packages"].as_array().unwrap();
        let names: Vec<&str> = packages
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web", "oci:debian", "libc6"]);
        assert_eq!(
            packages[0]["externalRefs"][0]["referenceLocator"],
            format!("pkg:oci/web@sha256%3A{}", r.image.hex())
        );
        assert_eq!(
            packages[2]["externalRefs"][0]["referenceLocator"],
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=amd64"
        );
        let rel = |a: &str, t: &str, b: &str| {
            d["relationships"].as_array().unwrap().iter().any(|x| {
                x["spdxElementId"] == a
                    && x["relationshipType"] == t
                    && x["relatedSpdxElement"] == b
            })
        };
        assert!(rel("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Image"));
        assert!(rel("SPDXRef-Image", "DESCENDANT_OF", "SPDXRef-Base"));
        assert!(rel("SPDXRef-Image", "CONTAINS", "SPDXRef-Package-deb-0"));
        // The libc file (index 2 in path order) belongs to libc6.
        assert!(rel("SPDXRef-Package-deb-0", "CONTAINS", "SPDXRef-File-2"));
        assert!(!rel("SPDXRef-Package-deb-0", "CONTAINS", "SPDXRef-File-0"));
        for i in 0..3 {
            assert!(rel(
                "SPDXRef-Image",
                "CONTAINS",
                &format!("SPDXRef-File-{i}")
            ));
        }
    }

    #[test]
    fn the_same_record_gives_the_same_bytes() {
        let a = statement_bytes(&fixture(), "kiln-0.1.0").unwrap();
        let b = statement_bytes(&fixture(), "kiln-0.1.0").unwrap();
        assert_eq!(a, b);
        // Written canonical as is: sorted keys, compact.
        let canonical = crate::oci::canonical_json(&statement(&fixture(), "kiln-0.1.0")).unwrap();
        assert_eq!(a, canonical);
        let s: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(s["predicateType"], PREDICATE_SBOM);
        assert_eq!(s["subject"][0]["digest"]["sha256"], fixture().image.hex());
    }
}
