//! The build's provenance: an in-toto Statement v1 with a SLSA v1 predicate.
//!
//! `buildDefinition` says what was built from what: the spec file (path as given, and its
//! digest), the build's reproducibility parameters, and every input by digest (the base,
//! each host file of a closure, each input tree, the source commit when there is one).
//! `runDetails` says who built it and when: kiln's version, and the only fields that differ
//! between two builds of the same inputs — `invocationId`, `startedOn`, `finishedOn`.
//! Pure: the caller passes in the times, the id and the source.

use serde_json::{Value, json};

use super::{BuildRecord, PREDICATE_PROVENANCE, STATEMENT_TYPE};
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
        if let Some(host) = &f.host {
            let mut rd = json!({
                "uri": format!("file://{}", host.display()),
                "digest": {"sha256": f.hashes.sha256.hex(), "sha1": f.hashes.sha1},
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
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": record.name(), "digest": {"sha256": record.image.hex()}}],
        "predicateType": PREDICATE_PROVENANCE,
        "predicate": predicate(record, inv),
    })
}
