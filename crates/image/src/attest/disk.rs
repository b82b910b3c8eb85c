//! The provenance and the SBOM of a machine disk (`kiln image export --format raw|qcow2`):
//! what the disk was made from, each input by SHA-256, and what it holds.
//!
//! The provenance is an in-toto Statement v1 with a SLSA v1 predicate whose subject is the
//! disk file (its name and SHA-256). `buildDefinition` names the export's parameters
//! (format, guest address, the spec by digest when one was given) and every input: the
//! image by manifest digest, the kernel (the file given, the kernel image in the unified
//! kernel image, its Debian package when there is one), kiln as the init (the binary given,
//! and the stripped copy that is `/init`), systemd-boot's stub and each module in load
//! order. `internalParameters` holds what the export derived: the kernel command line and
//! the verity root hash, salt and block count. A qcow2 disk names its raw disk's SHA-256
//! as a byproduct.
//!
//! The SBOM is an SPDX 2.3 document describing the disk as a package (its SHA-256) that
//! `CONTAINS` the image, the kernel, kiln and the stub. The image package points at the
//! image's own SBOM (an `externalDocumentRefs` entry, namespace and SHA1, and a
//! `DESCRIBED_BY` relationship) when the store holds one, rather than repeating its files.
//!
//! **Deterministic:** no clock and no invocation id: `created` is the image's own creation
//! time (its build's `SOURCE_DATE_EPOCH`), so two exports of the same inputs give the same
//! bytes. Pure: no I/O.

use serde_json::{Value, json};

use super::{DebPackage, PREDICATE_PROVENANCE, PREDICATE_SBOM, provenance, sbom};
use crate::digest::Digest;

/// The build type of a machine disk's provenance.
pub const BUILD_TYPE: &str = "https://kiln.dev/machine-export/v1";

/// A file the disk was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInput {
    /// Its file name (the stub's full path: it is the host's own file).
    pub name: String,
    /// Its SHA-256.
    pub sha256: Digest,
}

/// The image's own SBOM, as another SPDX document refers to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSbom {
    /// Its `documentNamespace`.
    pub namespace: String,
    /// The SHA1 of the document (the statement's predicate) in canonical JSON, as kiln
    /// writes it.
    pub sha1: String,
}

impl ExternalSbom {
    /// The SBOM `statement` carries, when it is an SPDX statement about `image`.
    pub fn of(statement: &Value, image: &Digest) -> Option<ExternalSbom> {
        if statement["predicateType"] != PREDICATE_SBOM || !super::names_subject(statement, image) {
            return None;
        }
        let document = &statement["predicate"];
        let namespace = document["documentNamespace"].as_str()?.to_owned();
        let bytes = crate::oci::canonical_json(document).ok()?;
        let mut h = crate::digest::SbomHasher::default();
        h.update(&bytes);
        Some(ExternalSbom {
            namespace,
            sha1: h.finish().sha1,
        })
    }
}

/// The spec file the export read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecFile {
    /// As the user named it (its file name when named by an absolute path).
    pub path: String,
    /// Its SHA-256.
    pub digest: Digest,
}

/// Everything the provenance and the SBOM of one disk say, gathered by the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    /// The disk file's name (no directory).
    pub file_name: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// The disk file's SHA-256.
    pub sha256: Digest,
    /// The raw disk's SHA-256 (the same as [`DiskRecord::sha256`] for a raw disk).
    pub raw_sha256: Digest,
    /// The image (its manifest digest).
    pub image: Digest,
    /// The image's name for documents (its tag's name, else `image`).
    pub image_name: String,
    /// The image's own SBOM, when the store has one.
    pub image_sbom: Option<ExternalSbom>,
    /// The SBOM's `created` (RFC 3339): the image's creation time.
    pub created: String,
    /// `kiln.ip`.
    pub ip: String,
    /// The spec whose service settings the disk's app got, when one was given.
    pub spec: Option<SpecFile>,
    /// The file `--kernel` named.
    pub kernel: DiskInput,
    /// The kernel's release.
    pub kernel_release: String,
    /// The kernel's Debian package: the `.deb` given, or the package dpkg says installed
    /// the `vmlinuz` file.
    pub kernel_package: Option<DebPackage>,
    /// The kernel image in the unified kernel image.
    pub vmlinuz: DiskInput,
    /// The init as given (the `kiln` binary).
    pub init: DiskInput,
    /// The stripped init, `/init` in the initramfs.
    pub init_stripped: Digest,
    /// systemd-boot's EFI stub.
    pub stub: DiskInput,
    /// The stub's Debian package, when dpkg names one.
    pub stub_package: Option<DebPackage>,
    /// The modules in the initramfs, in load order.
    pub modules: Vec<DiskInput>,
    /// The verity root hash, hex.
    pub root_hash: String,
    /// The verity salt, hex.
    pub salt: String,
    /// The root filesystem's 4 KiB blocks.
    pub data_blocks: u64,
    /// The kernel command line in the unified kernel image.
    pub cmdline: String,
    /// The raw disk's size in bytes.
    pub disk_size: u64,
    /// The SHA-256 (hex) of the certificate whose key signed the unified kernel image for
    /// Secure Boot, when it is signed.
    pub secure_boot_certificate: Option<String>,
    /// kiln's version.
    pub kiln_version: String,
}

fn dependency(name: &str, input: &DiskInput) -> Value {
    json!({"name": name, "digest": {"sha256": input.sha256.hex()}})
}

/// The SLSA v1 predicate of the disk.
pub fn provenance_predicate(r: &DiskRecord) -> Value {
    let mut external = json!({"format": r.format, "ip": r.ip});
    if let Some(spec) = &r.spec {
        external["spec"] = json!({"path": spec.path, "digest": {"sha256": spec.digest.hex()}});
    }
    let mut deps = vec![json!({
        "name": "image",
        "uri": sbom::purl_oci(&r.image_name, &r.image),
        "digest": {"sha256": r.image.hex()},
    })];
    let mut kernel = dependency(&format!("kernel:{}", r.kernel.name), &r.kernel);
    kernel["annotations"] = json!({"release": r.kernel_release});
    if let Some(p) = &r.kernel_package {
        kernel["annotations"]["debianPackage"] = json!(p.purl());
    }
    if r.vmlinuz != r.kernel {
        kernel["annotations"]["vmlinuz"] =
            json!({"name": r.vmlinuz.name, "sha256": r.vmlinuz.sha256.hex()});
    }
    deps.push(kernel);
    let mut init = dependency(&format!("init:{}", r.init.name), &r.init);
    // What the disk holds is the binary stripped (`objcopy --strip-all`): both are named,
    // the one given (what `sha256sum $(command -v kiln)` prints) as the digest.
    init["annotations"] = json!({"path": "/init", "strippedSha256": r.init_stripped.hex()});
    deps.push(init);
    let mut stub = json!({
        "name": "stub",
        "uri": format!("file://{}", r.stub.name),
        "digest": {"sha256": r.stub.sha256.hex()},
    });
    if let Some(p) = &r.stub_package {
        stub["annotations"] = json!({"debianPackage": p.purl()});
    }
    deps.push(stub);
    for m in &r.modules {
        deps.push(dependency(&format!("module:{}", m.name), m));
    }
    let mut byproducts = Vec::new();
    if r.raw_sha256 != r.sha256 {
        byproducts.push(json!({
            "name": "raw disk",
            "digest": {"sha256": r.raw_sha256.hex()},
            "annotations": {"size": r.disk_size},
        }));
    }
    let mut run = json!({
        "builder": {"id": provenance::BUILDER_ID, "version": {"kiln": r.kiln_version}},
    });
    if !byproducts.is_empty() {
        run["byproducts"] = json!(byproducts);
    }
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": external,
            "internalParameters": {
                "cmdline": r.cmdline,
                "kernelRelease": r.kernel_release,
                "diskSize": r.disk_size,
                "verity": {
                    "rootHash": r.root_hash,
                    "salt": r.salt,
                    "dataBlocks": r.data_blocks,
                },
                "secureBoot": r.secure_boot_certificate.as_ref().map(|c| json!({
                    "signed": true,
                    "certificateSha256": c,
                })).unwrap_or_else(|| json!({"signed": false})),
            },
            "resolvedDependencies": deps,
        },
        "runDetails": run,
    })
}

/// The in-toto statement carrying the disk's provenance.
pub fn provenance_statement(r: &DiskRecord) -> Value {
    super::statement(
        &r.file_name,
        &r.sha256,
        PREDICATE_PROVENANCE,
        provenance_predicate(r),
    )
}

/// A name fit for a URI path segment: what is not `[A-Za-z0-9._-]` becomes `-`.
fn uri_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The last component of a path.
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A package made of one input file: named by its Debian package when there is one (and
/// its purl), else by `fallback` (name, version); its SHA-256 and file name either way.
fn file_package(
    id: &str,
    package: Option<&DebPackage>,
    fallback: (&str, &str),
    input: &DiskInput,
    purpose: &str,
) -> Value {
    let mut p = match package {
        Some(p) => sbom::package(
            id,
            &p.name,
            &p.version,
            Some(&input.sha256),
            Some(&p.purl()),
            purpose,
        ),
        None => sbom::package(
            id,
            fallback.0,
            fallback.1,
            Some(&input.sha256),
            None,
            purpose,
        ),
    };
    p["packageFileName"] = json!(file_name(&input.name));
    p
}

/// The SPDX 2.3 document of the disk.
pub fn sbom_document(r: &DiskRecord, tool: &str) -> Value {
    let disk_id = "SPDXRef-Disk";
    let mut disk = sbom::package(
        disk_id,
        &r.file_name,
        r.sha256.as_str(),
        Some(&r.sha256),
        None,
        "OPERATING-SYSTEM",
    );
    disk["packageFileName"] = json!(r.file_name);
    if r.raw_sha256 != r.sha256 {
        disk["comment"] = json!(format!(
            "a {} file; the raw disk inside it is {}",
            r.format, r.raw_sha256
        ));
    }
    let image = sbom::package(
        "SPDXRef-Image",
        &r.image_name,
        r.image.as_str(),
        Some(&r.image),
        Some(&sbom::purl_oci(&r.image_name, &r.image)),
        "CONTAINER",
    );
    let kernel = file_package(
        "SPDXRef-Kernel",
        r.kernel_package.as_ref(),
        (&format!("linux-{}", r.kernel_release), &r.kernel_release),
        &r.kernel,
        "OPERATING-SYSTEM",
    );
    let mut init = file_package(
        "SPDXRef-Init",
        None,
        ("kiln", &r.kiln_version),
        &r.init,
        "APPLICATION",
    );
    init["comment"] = json!(format!(
        "the machine's init; /init in the initramfs is this binary stripped, {}",
        r.init_stripped
    ));
    let stub = file_package(
        "SPDXRef-Stub",
        r.stub_package.as_ref(),
        (file_name(&r.stub.name), "NOASSERTION"),
        &r.stub,
        "APPLICATION",
    );
    let rel = |a: &str, kind: &str, b: &str| json!({"spdxElementId": a, "relationshipType": kind, "relatedSpdxElement": b});
    let mut relationships = vec![rel("SPDXRef-DOCUMENT", "DESCRIBES", disk_id)];
    for part in [
        "SPDXRef-Image",
        "SPDXRef-Kernel",
        "SPDXRef-Init",
        "SPDXRef-Stub",
    ] {
        relationships.push(rel(disk_id, "CONTAINS", part));
    }
    let name = uri_safe(&r.file_name);
    let mut doc = json!({
        "SPDXID": "SPDXRef-DOCUMENT",
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "name": format!("{}@{}", r.file_name, r.sha256),
        "documentNamespace": format!("{}disk/{name}-sha256-{}", sbom::NAMESPACE_PREFIX, r.sha256.hex()),
        "creationInfo": {"created": r.created, "creators": [format!("Tool: {tool}")]},
        "documentDescribes": [disk_id],
        "packages": [disk, image, kernel, init, stub],
    });
    if let Some(ext) = &r.image_sbom {
        doc["externalDocumentRefs"] = json!([{
            "externalDocumentId": "DocumentRef-image",
            "spdxDocument": ext.namespace,
            "checksum": {"algorithm": "SHA1", "checksumValue": ext.sha1},
        }]);
        relationships.push(rel(
            "SPDXRef-Image",
            "DESCRIBED_BY",
            "DocumentRef-image:SPDXRef-DOCUMENT",
        ));
    }
    doc["relationships"] = json!(relationships);
    doc
}

/// The in-toto statement carrying the disk's SBOM; `tool` is the creator (`kiln-0.1.0`).
pub fn sbom_statement(r: &DiskRecord, tool: &str) -> Value {
    super::statement(
        &r.file_name,
        &r.sha256,
        PREDICATE_SBOM,
        sbom_document(r, tool),
    )
}

/// The image a disk statement says the disk was made from: the `image` dependency of a
/// disk provenance, the image package of a disk SBOM. `None` for any other statement.
pub fn made_from(statement: &Value) -> Option<Digest> {
    let p = &statement["predicate"];
    let hex = if p["buildDefinition"]["buildType"] == BUILD_TYPE {
        p["buildDefinition"]["resolvedDependencies"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == "image")?["digest"]["sha256"]
            .as_str()?
    } else if p["documentDescribes"][0] == "SPDXRef-Disk" {
        p["packages"]
            .as_array()?
            .iter()
            .find(|pk| pk["SPDXID"] == "SPDXRef-Image")?["checksums"][0]["checksumValue"]
            .as_str()?
    } else {
        return None;
    };
    Digest::parse(&format!("sha256:{hex}")).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod tests {
    use super::*;
    use crate::attest::STATEMENT_TYPE;

    fn input(name: &str) -> DiskInput {
        DiskInput {
            name: name.to_owned(),
            sha256: Digest::of(name.as_bytes()),
        }
    }

    /// A qcow2 export of a `.deb` kernel, with a spec and the image's own SBOM.
    pub(crate) fn fixture() -> DiskRecord {
        let linux = DebPackage {
            name: "linux-image-6.1.0-57-amd64".to_owned(),
            version: "6.1.158-1".to_owned(),
            architecture: "amd64".to_owned(),
        };
        DiskRecord {
            file_name: "web.qcow2".to_owned(),
            format: "qcow2".to_owned(),
            sha256: Digest::of(b"qcow2"),
            raw_sha256: Digest::of(b"raw"),
            image: Digest::of(b"image"),
            image_name: "web".to_owned(),
            image_sbom: Some(ExternalSbom {
                namespace: "https://kiln.dev/spdx/web-sha256-ab".to_owned(),
                sha1: "a".repeat(40),
            }),
            created: "2023-11-14T22:13:20Z".to_owned(),
            ip: "10.0.2.15/24,10.0.2.2".to_owned(),
            spec: Some(SpecFile {
                path: "kiln.toml".to_owned(),
                digest: Digest::of(b"spec"),
            }),
            kernel: input("linux-image-6.1.0-57-amd64_6.1.158-1_amd64.deb"),
            kernel_release: "6.1.0-57-amd64".to_owned(),
            kernel_package: Some(linux),
            vmlinuz: input("vmlinuz-6.1.0-57-amd64"),
            init: input("kiln"),
            init_stripped: Digest::of(b"stripped"),
            stub: input("/usr/lib/systemd/boot/efi/linuxx64.efi.stub"),
            stub_package: None,
            modules: vec![input("virtio.ko"), input("dm-verity.ko")],
            root_hash: "c".repeat(64),
            salt: "d".repeat(64),
            data_blocks: 1234,
            cmdline: "console=ttyS0 kiln.verity=cc".to_owned(),
            disk_size: 80 << 20,
            secure_boot_certificate: Some("e".repeat(64)),
            kiln_version: "0.1.0".to_owned(),
        }
    }

    fn dep<'a>(p: &'a Value, name: &str) -> &'a Value {
        p["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no dependency {name} in {p}"))
    }

    #[test]
    fn the_provenance_names_the_disk_and_every_input_by_digest() {
        let r = fixture();
        let s = provenance_statement(&r);
        assert_eq!(s["_type"], STATEMENT_TYPE);
        assert_eq!(s["predicateType"], PREDICATE_PROVENANCE);
        assert_eq!(s["subject"][0]["name"], "web.qcow2");
        assert_eq!(s["subject"][0]["digest"]["sha256"], r.sha256.hex());
        let p = &s["predicate"];
        assert_eq!(p["buildDefinition"]["buildType"], BUILD_TYPE);
        let ext = &p["buildDefinition"]["externalParameters"];
        assert_eq!(ext["format"], "qcow2");
        assert_eq!(ext["ip"], "10.0.2.15/24,10.0.2.2");
        assert_eq!(ext["spec"]["digest"]["sha256"], Digest::of(b"spec").hex());
        assert_eq!(dep(p, "image")["digest"]["sha256"], r.image.hex());
        let kernel = dep(p, "kernel:linux-image-6.1.0-57-amd64_6.1.158-1_amd64.deb");
        assert_eq!(
            kernel["annotations"]["debianPackage"],
            "pkg:deb/debian/linux-image-6.1.0-57-amd64@6.1.158-1?arch=amd64"
        );
        assert_eq!(
            kernel["annotations"]["vmlinuz"]["sha256"],
            r.vmlinuz.sha256.hex()
        );
        let init = dep(p, "init:kiln");
        assert_eq!(init["digest"]["sha256"], r.init.sha256.hex());
        assert_eq!(init["annotations"]["strippedSha256"], r.init_stripped.hex());
        assert_eq!(
            dep(p, "stub")["uri"],
            "file:///usr/lib/systemd/boot/efi/linuxx64.efi.stub"
        );
        let modules: Vec<&str> = p["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["name"].as_str()?.strip_prefix("module:"))
            .collect();
        assert_eq!(modules, ["virtio.ko", "dm-verity.ko"]);
        let internal = &p["buildDefinition"]["internalParameters"];
        assert_eq!(internal["verity"]["rootHash"], r.root_hash);
        assert_eq!(
            internal["secureBoot"],
            json!({"signed": true, "certificateSha256": "e".repeat(64)})
        );
        assert_eq!(internal["cmdline"], r.cmdline);
        // The qcow2's raw disk, by its own digest.
        assert_eq!(
            p["runDetails"]["byproducts"][0]["digest"]["sha256"],
            r.raw_sha256.hex()
        );
        // Nothing of the run's time or id: two exports say the same.
        assert!(p["runDetails"].get("metadata").is_none());
        assert_eq!(made_from(&s), Some(r.image.clone()));
    }

    #[test]
    fn a_raw_disk_from_a_vmlinuz_without_a_spec_says_less() {
        let mut r = fixture();
        r.format = "raw".to_owned();
        r.raw_sha256 = r.sha256.clone();
        r.spec = None;
        r.kernel = input("vmlinuz-6.1.0-57-amd64");
        r.vmlinuz = r.kernel.clone();
        r.kernel_package = None;
        r.image_sbom = None;
        let p = provenance_predicate(&r);
        assert!(
            p["buildDefinition"]["externalParameters"]
                .get("spec")
                .is_none()
        );
        assert!(p["runDetails"].get("byproducts").is_none());
        let kernel = dep(&p, "kernel:vmlinuz-6.1.0-57-amd64");
        assert_eq!(kernel["annotations"], json!({"release": "6.1.0-57-amd64"}));
        let d = sbom_document(&r, "kiln-0.1.0");
        assert!(d.get("externalDocumentRefs").is_none());
        assert!(d["packages"][0].get("comment").is_none());
        assert_eq!(d["packages"][2]["name"], "linux-6.1.0-57-amd64");
        assert!(d["packages"][2].get("externalRefs").is_none());
    }

    #[test]
    fn the_sbom_describes_the_disk_containing_image_kernel_init_and_stub() {
        let r = fixture();
        let s = sbom_statement(&r, "kiln-0.1.0");
        assert_eq!(s["predicateType"], PREDICATE_SBOM);
        assert_eq!(s["subject"][0]["digest"]["sha256"], r.sha256.hex());
        let d = &s["predicate"];
        assert_eq!(d["spdxVersion"], "SPDX-2.3");
        assert_eq!(d["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(
            d["documentNamespace"],
            format!(
                "https://kiln.dev/spdx/disk/web.qcow2-sha256-{}",
                r.sha256.hex()
            )
        );
        let packages = d["packages"].as_array().unwrap();
        let ids: Vec<&str> = packages
            .iter()
            .map(|p| p["SPDXID"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "SPDXRef-Disk",
                "SPDXRef-Image",
                "SPDXRef-Kernel",
                "SPDXRef-Init",
                "SPDXRef-Stub"
            ]
        );
        assert_eq!(packages[0]["checksums"][0]["algorithm"], "SHA256");
        assert_eq!(packages[0]["checksums"][0]["checksumValue"], r.sha256.hex());
        assert!(
            packages[0]["comment"]
                .as_str()
                .unwrap()
                .contains(r.raw_sha256.as_str())
        );
        assert_eq!(
            packages[2]["externalRefs"][0]["referenceLocator"],
            "pkg:deb/debian/linux-image-6.1.0-57-amd64@6.1.158-1?arch=amd64"
        );
        assert_eq!(packages[3]["name"], "kiln");
        assert_eq!(
            d["externalDocumentRefs"][0]["spdxDocument"],
            "https://kiln.dev/spdx/web-sha256-ab"
        );
        let rel = |a: &str, t: &str, b: &str| {
            d["relationships"].as_array().unwrap().iter().any(|x| {
                x["spdxElementId"] == a
                    && x["relationshipType"] == t
                    && x["relatedSpdxElement"] == b
            })
        };
        assert!(rel("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Disk"));
        for part in [
            "SPDXRef-Image",
            "SPDXRef-Kernel",
            "SPDXRef-Init",
            "SPDXRef-Stub",
        ] {
            assert!(rel("SPDXRef-Disk", "CONTAINS", part), "{part}");
        }
        assert!(rel(
            "SPDXRef-Image",
            "DESCRIBED_BY",
            "DocumentRef-image:SPDXRef-DOCUMENT"
        ));
        assert_eq!(made_from(&s), Some(r.image.clone()));
    }

    #[test]
    fn the_same_record_gives_the_same_bytes() {
        let bytes = |r: &DiskRecord| {
            (
                crate::oci::canonical_json(&provenance_statement(r)).unwrap(),
                crate::oci::canonical_json(&sbom_statement(r, "kiln-0.1.0")).unwrap(),
            )
        };
        assert_eq!(bytes(&fixture()), bytes(&fixture()));
        let mut other = fixture();
        other.sha256 = Digest::of(b"another disk");
        let (a, b) = (bytes(&fixture()), bytes(&other));
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
    }

    #[test]
    fn the_image_sbom_is_found_by_its_subject_and_hashed_as_a_document() {
        let image = crate::attest::tests::fixture();
        let statement = sbom::statement(&image, "kiln-0.1.0");
        let ext = ExternalSbom::of(&statement, &image.image).unwrap();
        assert_eq!(
            ext.namespace,
            statement["predicate"]["documentNamespace"]
                .as_str()
                .unwrap()
        );
        let doc = crate::oci::canonical_json(&statement["predicate"]).unwrap();
        assert_eq!(ext.sha1, crate::digest::file_hashes(&doc).sha1);
        // A disk's SBOM attached to the same image is not the image's.
        let disk = sbom_statement(&fixture(), "kiln-0.1.0");
        assert_eq!(ExternalSbom::of(&disk, &image.image), None);
        assert_eq!(made_from(&statement), None);
    }
}
