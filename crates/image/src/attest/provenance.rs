//! The build's provenance: an in-toto Statement v1 with a SLSA v1 predicate.
//!
//! `buildDefinition` says what was built from what: the spec file (path as given, and its
//! digest), the build's reproducibility parameters, and every input by digest (the base,
//! each host file of a closure, each input tree, the source commit when there is one).
//! `runDetails` says who built it and when: kiln's version, and the only fields that differ
//! between two builds of the same inputs — `invocationId`, `startedOn`, `finishedOn`.
//! Pure: the caller passes in the times, the id and the source.

use serde_json::{Value, json};

use super::{BuildRecord, PREDICATE_PROVENANCE};
use crate::digest::Digest;

/// kiln's build type URI.
pub const BUILD_TYPE: &str = "https://kiln.dev/build/v1";
/// kiln's builder id.
pub const BUILDER_ID: &str = "https://kiln.dev/builder/kiln";
/// The compressors whose versions the workspace pins, because another version would give
/// other bytes (Cargo.toml's `flate2` and `zstd`; a unit test keeps the two in step).
pub const PINNED_COMPRESSORS: &[(&str, &str)] =
    &[("flate2", "=1.1.11 (rust_backend)"), ("zstd", "=0.13.5")];

/// The source tree the spec came from, as a git work tree describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Where it came from (a remote URL, or the work tree's path when there is none).
    pub uri: String,
    /// The commit checked out (40 hex digits).
    pub commit: String,
    /// Whether the work tree matched the commit (no uncommitted change).
    pub clean: bool,
}

/// What the build's caller knows of its invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The spec file as the user named it.
    pub spec_path: String,
    /// The spec file's SHA-256.
    pub spec_digest: Digest,
    /// The source commit, when the spec is in a git work tree.
    pub source: Option<Source>,
    /// kiln's version.
    pub kiln_version: String,
    /// A fresh id for this invocation.
    pub invocation_id: String,
    /// When the build started (RFC 3339).
    pub started_on: String,
    /// When it finished (RFC 3339).
    pub finished_on: String,
}

/// The SLSA v1 predicate.
pub fn predicate(record: &BuildRecord, inv: &Invocation) -> Value {
    let mut deps = Vec::new();
    if let Some(d) = &record.base.digest {
        deps.push(
            json!({"name": format!("base:{}", record.base.name), "digest": {"sha256": d.hex()}}),
        );
    }
    for f in &record.files {
        if let (Some(host), Some(sha256)) = (&f.host, &f.host_sha256) {
            let mut rd = json!({
                "uri": format!("file://{}", host.display()),
                "digest": {"sha256": sha256.hex(), "sha1": f.hashes.sha1, "blake3": f.hashes.blake3},
            });
            if let Some(p) = f.package.and_then(|i| record.packages.get(i)) {
                rd["annotations"] = json!({"debianPackage": p.purl()});
            }
            deps.push(rd);
        }
    }
    for t in &record.inputs {
        deps.push(json!({"name": t.source, "digest": {"sha256": t.digest.hex()}}));
    }
    if let Some(s) = &inv.source {
        deps.push(json!({
            "uri": format!("git+{}", s.uri),
            "digest": {"gitCommit": s.commit},
            "annotations": {"clean": s.clean},
        }));
    }
    let reproducibility: serde_json::Map<String, Value> = [
        (
            "sourceDateEpoch".to_owned(),
            json!(record.source_date_epoch),
        ),
        ("compression".to_owned(), json!(record.compression)),
    ]
    .into_iter()
    .chain(
        PINNED_COMPRESSORS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v))),
    )
    .collect();
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "spec": {"path": inv.spec_path, "digest": {"sha256": inv.spec_digest.hex()}},
            },
            "internalParameters": {
                "sourceDateEpoch": record.source_date_epoch,
                "compression": record.compression,
                "architecture": record.architecture,
                "os": record.os,
            },
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {"id": BUILDER_ID, "version": {"kiln": inv.kiln_version}},
            "metadata": {
                "invocationId": inv.invocation_id,
                "startedOn": inv.started_on,
                "finishedOn": inv.finished_on,
            },
            "byproducts": [{"name": "reproducibility", "annotations": reproducibility}],
        },
    })
}

/// The in-toto statement carrying the provenance of `record`.
pub fn statement(record: &BuildRecord, inv: &Invocation) -> Value {
    super::statement(
        &record.name(),
        &record.image,
        PREDICATE_PROVENANCE,
        predicate(record, inv),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::attest::STATEMENT_TYPE;
    use crate::attest::tests::fixture;

    fn invocation(source: Option<Source>) -> Invocation {
        Invocation {
            spec_path: "kiln.toml".to_owned(),
            spec_digest: Digest::of(b"spec"),
            source,
            kiln_version: "0.1.0".to_owned(),
            invocation_id: "id-1".to_owned(),
            started_on: "2026-01-01T00:00:00Z".to_owned(),
            finished_on: "2026-01-01T00:00:01Z".to_owned(),
        }
    }

    #[test]
    fn every_input_is_a_resolved_dependency_by_digest() {
        let r = fixture();
        let source = Source {
            uri: "https://example.invalid/team/web.git".to_owned(),
            commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            clean: true,
        };
        let s = statement(&r, &invocation(Some(source)));
        assert_eq!(s["_type"], STATEMENT_TYPE);
        assert_eq!(s["predicateType"], PREDICATE_PROVENANCE);
        let p = &s["predicate"];
        assert_eq!(p["buildDefinition"]["buildType"], BUILD_TYPE);
        assert_eq!(
            p["buildDefinition"]["externalParameters"]["spec"]["digest"]["sha256"],
            Digest::of(b"spec").hex()
        );
        let deps = p["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap();
        let base = Digest::of(b"base");
        assert_eq!(deps[0]["digest"]["sha256"], base.hex());
        assert_eq!(deps[1]["uri"], "file:///usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(
            deps[1]["annotations"]["debianPackage"],
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=amd64"
        );
        assert_eq!(deps[2]["name"], "copy #1 → /app");
        assert_eq!(
            deps[3]["digest"]["gitCommit"],
            "0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(deps.len(), 4);
        let run = &p["runDetails"];
        assert_eq!(run["builder"]["version"]["kiln"], "0.1.0");
        assert_eq!(run["metadata"]["invocationId"], "id-1");
        assert_eq!(
            run["byproducts"][0]["annotations"]["sourceDateEpoch"],
            1_700_000_000
        );
    }

    #[test]
    fn two_invocations_differ_only_in_the_declared_build_time_fields() {
        let r = fixture();
        let a = statement(&r, &invocation(None));
        let mut other = invocation(None);
        other.invocation_id = "id-2".to_owned();
        other.started_on = "2027-01-01T00:00:00Z".to_owned();
        other.finished_on = "2027-01-01T00:00:09Z".to_owned();
        let mut b = statement(&r, &other);
        assert_ne!(a, b);
        b["predicate"]["runDetails"]["metadata"] = a["predicate"]["runDetails"]["metadata"].clone();
        assert_eq!(a, b);
    }

    /// The pins the provenance states are the ones the workspace compiles with.
    #[test]
    fn the_stated_compressor_pins_match_the_workspace() {
        let manifest = include_str!("../../../../Cargo.toml");
        for (name, pin) in PINNED_COMPRESSORS {
            let version = pin.split_whitespace().next().unwrap();
            let line = manifest
                .lines()
                .find(|l| l.starts_with(&format!("{name} = ")))
                .unwrap();
            assert!(line.contains(&format!("\"{version}\"")), "{line} vs {pin}");
        }
    }
}
