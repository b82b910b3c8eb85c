//! What an image carries: its signatures and attestations, read from the store's referrers
//! and checked against trusted keys. The daemon's deploy policy reads it as
//! [`Evidence`] (`kiln_control::policy`); `kiln verify IMAGE` prints it.
//!
//! Nothing here trusts a referrer for being attached: a signature counts only when it
//! verifies over the image manifest's exact bytes with a trusted key, and an attestation
//! only when its statement's subject is this image and its predicate type is the one its
//! annotation claims.

use kiln_control::policy::{Attested, Evidence, SourceFacts};
use kiln_image::Store;
use kiln_image::attest::{
    ARTIFACT_DSSE, ARTIFACT_IN_TOTO, ARTIFACT_SIGNATURE, PREDICATE_PROVENANCE, PREDICATE_SBOM,
    PREDICATE_TEST, STATEMENT_TYPE, names_subject,
};
use kiln_runtime::Digest;
use kiln_sign::PublicKey;
use serde::Serialize;
use serde_json::Value;

/// One image signature attached to the image.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureFound {
    /// The referrer manifest carrying it.
    pub referrer: String,
    /// The fingerprint of the trusted key it verifies with, if any.
    pub verified_by: Option<String>,
    /// Why it does not count, when it does not.
    pub problem: Option<String>,
}

/// One in-toto attestation attached to the image.
#[derive(Debug, Clone, Serialize)]
pub struct AttestationFound {
    /// The referrer manifest carrying it.
    pub referrer: String,
    /// Its predicate type.
    pub predicate_type: String,
    /// Whether it came in a DSSE envelope.
    pub enveloped: bool,
    /// Fingerprints of the trusted keys whose signature on it verifies.
    pub signed_by: Vec<String>,
    /// Why it does not count, when it does not.
    pub problem: Option<String>,
    /// When it is about a machine disk exported from the image (`kiln image export
    /// --format raw|qcow2`) rather than the image: the disk's name and digest. It is the
    /// disk's evidence, never the image's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The statement, when it could be read.
    #[serde(skip)]
    pub statement: Option<Value>,
}

/// Everything attached to one image.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Carried {
    /// Image signatures.
    pub signatures: Vec<SignatureFound>,
    /// In-toto attestations (test, provenance, SBOM, others).
    pub attestations: Vec<AttestationFound>,
    /// The store's own test record (`kiln test`), when there is one: whether it passed.
    pub test_record: Option<bool>,
}

/// Parses trusted key lines (OpenSSH `ssh-ed25519`).
pub fn parse_keys(lines: &[String]) -> Result<Vec<PublicKey>, String> {
    lines
        .iter()
        .map(|l| {
            PublicKey::parse_openssh(l).map_err(|e| {
                let shown: String = l.chars().take(60).collect();
                format!("trusted key {shown:?}: {e}")
            })
        })
        .collect()
}

/// Reads what `image` carries in `store`, checked against `trusted`.
pub fn read(store: &Store, image: &Digest, trusted: &[PublicKey]) -> Result<Carried, String> {
    let manifest = store
        .read_blob(image)
        .map_err(|e| format!("cannot read image {image}: {e}"))?;
    let referrers = store
        .referrers(image)
        .map_err(|e| format!("cannot read what image {image} carries: {e}"))?;
    let mut carried = Carried {
        test_record: store
            .read_attestation(image)
            .map_err(|e| format!("cannot read the test record of {image}: {e}"))?
            .map(|a| a["result"].as_str() == Some("passed")),
        ..Carried::default()
    };
    for r in referrers {
        let payload = match store.read_blob(&r.payload) {
            Ok(p) => p,
            Err(e) => {
                let problem = Some(format!("its payload cannot be read: {e}"));
                if r.artifact_type == ARTIFACT_SIGNATURE {
                    carried.signatures.push(SignatureFound {
                        referrer: r.manifest.to_string(),
                        verified_by: None,
                        problem,
                    });
                }
                continue;
            }
        };
        match r.artifact_type.as_str() {
            ARTIFACT_SIGNATURE => {
                let checked = std::str::from_utf8(&payload)
                    .map_err(|_| "the signature is not text".to_owned())
                    .and_then(|armored| {
                        kiln_sign::sshsig::verify(
                            armored,
                            kiln_sign::sshsig::NAMESPACE_IMAGE,
                            &manifest,
                            trusted,
                        )
                        .map_err(|e| e.to_string())
                    });
                carried.signatures.push(SignatureFound {
                    referrer: r.manifest.to_string(),
                    verified_by: checked.as_ref().ok().map(PublicKey::fingerprint),
                    problem: checked.err(),
                });
            }
            ARTIFACT_IN_TOTO => {
                carried.attestations.push(attestation(
                    image,
                    r.manifest.to_string(),
                    &payload,
                    Vec::new(),
                    false,
                ));
            }
            ARTIFACT_DSSE => {
                let found = match kiln_sign::dsse::Envelope::from_json(&payload) {
                    Ok(env) if env.payload_type == ARTIFACT_IN_TOTO => {
                        let by = env
                            .verified_by(trusted)
                            .iter()
                            .map(PublicKey::fingerprint)
                            .collect();
                        attestation(image, r.manifest.to_string(), &env.payload, by, true)
                    }
                    Ok(env) => broken(
                        r.manifest.to_string(),
                        format!("the envelope's payload type is {:?}", env.payload_type),
                    ),
                    Err(e) => broken(r.manifest.to_string(), e.to_string()),
                };
                carried.attestations.push(found);
            }
            // Other artifacts (a team's own) are not kiln's to judge.
            _ => {}
        }
    }
    Ok(carried)
}

fn broken(referrer: String, problem: String) -> AttestationFound {
    AttestationFound {
        referrer,
        predicate_type: String::new(),
        enveloped: true,
        signed_by: Vec::new(),
        problem: Some(problem),
        disk: None,
        statement: None,
    }
}

/// An in-toto statement about `image`, checked for its type and subject.
fn attestation(
    image: &Digest,
    referrer: String,
    payload: &[u8],
    signed_by: Vec<String>,
    enveloped: bool,
) -> AttestationFound {
    let statement: Option<Value> = serde_json::from_slice(payload).ok();
    let predicate_type = statement
        .as_ref()
        .and_then(|s| s["predicateType"].as_str())
        .unwrap_or_default()
        .to_owned();
    let mut disk = None;
    let problem = match &statement {
        None => Some("the statement is not JSON".to_owned()),
        Some(s) if s["_type"].as_str() != Some(STATEMENT_TYPE) => {
            Some(format!("not an in-toto statement ({STATEMENT_TYPE})"))
        }
        Some(s) if !names_subject(s, image) => {
            if kiln_image::attest::disk::made_from(s).as_ref() == Some(image) {
                disk = Some(format!(
                    "{} sha256:{}",
                    s["subject"][0]["name"].as_str().unwrap_or_default(),
                    s["subject"][0]["digest"]["sha256"]
                        .as_str()
                        .unwrap_or_default()
                ));
                None
            } else {
                Some(format!("the statement's subject is not {image}"))
            }
        }
        Some(_) => None,
    };
    AttestationFound {
        referrer,
        predicate_type,
        enveloped,
        signed_by,
        problem,
        disk,
        statement,
    }
}

/// Whether a test statement's predicate says the image passed.
fn test_passed(statement: &Value) -> bool {
    statement["predicate"]["result"].as_str() == Some("passed")
}

impl Carried {
    /// The attestations of `predicate_type` that count: well-formed, about this image (a
    /// disk's are about the disk).
    fn valid(&self, predicate_type: &str) -> impl Iterator<Item = &AttestationFound> {
        self.attestations.iter().filter(move |a| {
            a.problem.is_none() && a.disk.is_none() && a.predicate_type == predicate_type
        })
    }

    /// How `predicate_type` is attested: signed by trusted keys, present unsigned, or not.
    fn attested(
        &self,
        predicate_type: &str,
        accept: impl Fn(&AttestationFound) -> bool,
    ) -> Attested {
        let mut signers: Vec<String> = Vec::new();
        let mut any = false;
        for a in self.valid(predicate_type).filter(|a| accept(a)) {
            any = true;
            for s in &a.signed_by {
                if !signers.contains(s) {
                    signers.push(s.clone());
                }
            }
        }
        match (any, signers.is_empty()) {
            (false, _) => Attested::Absent,
            (true, true) => Attested::Unsigned,
            (true, false) => Attested::Signed(signers),
        }
    }

    /// What the policy reads: with `keyed`, only signed attestations say anything of the
    /// source.
    pub fn evidence(&self, keyed: bool) -> Evidence {
        let mut signatures: Vec<String> = Vec::new();
        for s in &self.signatures {
            if let Some(fp) = &s.verified_by
                && !signatures.contains(fp)
            {
                signatures.push(fp.clone());
            }
        }
        let passed = |a: &AttestationFound| a.statement.as_ref().is_some_and(test_passed);
        let mut tested = self.attested(PREDICATE_TEST, passed);
        match (&tested, self.test_record) {
            (Attested::Absent, Some(true)) => tested = Attested::Unsigned,
            // The store's record is the last `kiln test` here: a failure since a pass that
            // nobody signed takes it back (a signed pass stands on its signer's word).
            (Attested::Unsigned, Some(false)) => tested = Attested::Absent,
            _ => {}
        }
        let source = self
            .valid(PREDICATE_PROVENANCE)
            .filter(|a| !keyed || !a.signed_by.is_empty())
            .filter_map(|a| a.statement.as_ref())
            .map(source_facts)
            // The best a counted provenance says: a clean commit over a dirty one.
            .max_by_key(|s| (s.commit.is_some(), s.clean));
        Evidence {
            signatures,
            tested,
            provenance: self.attested(PREDICATE_PROVENANCE, |_| true),
            sbom: self.attested(PREDICATE_SBOM, |_| true),
            source,
        }
    }
}

/// What a SLSA provenance statement says of its source: the `git+` dependency kiln's build
/// records, with its commit and whether the work tree was clean.
fn source_facts(statement: &Value) -> SourceFacts {
    let deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"].as_array();
    let git = deps.into_iter().flatten().find(|d| {
        d["uri"].as_str().is_some_and(|u| u.starts_with("git+"))
            && d["digest"]["gitCommit"].is_string()
    });
    match git {
        Some(d) => SourceFacts {
            commit: d["digest"]["gitCommit"].as_str().map(str::to_owned),
            clean: d["annotations"]["clean"].as_bool() == Some(true),
        },
        None => SourceFacts::default(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_source_is_the_git_dependency_of_the_provenance() {
        let p = json!({"predicate": {"buildDefinition": {"resolvedDependencies": [
            {"uri": "file:///usr/lib/libc.so.6", "digest": {"sha256": "00"}},
            {"uri": "git+file:///src/app", "digest": {"gitCommit": "abc"}, "annotations": {"clean": true}},
        ]}}});
        assert_eq!(
            source_facts(&p),
            SourceFacts {
                commit: Some("abc".into()),
                clean: true
            }
        );
        assert_eq!(source_facts(&json!({})), SourceFacts::default());
    }

    #[test]
    fn an_attestation_about_another_image_does_not_count() {
        let image = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let other = json!({"_type": STATEMENT_TYPE, "predicateType": PREDICATE_SBOM,
            "subject": [{"name": "x", "digest": {"sha256": "b".repeat(64)}}]});
        let a = attestation(
            &image,
            "r".into(),
            other.to_string().as_bytes(),
            vec![],
            false,
        );
        assert!(a.problem.unwrap().contains("subject"));
        let carried = Carried {
            attestations: vec![attestation(
                &image,
                "r".into(),
                other.to_string().as_bytes(),
                vec![],
                false,
            )],
            ..Carried::default()
        };
        assert_eq!(carried.evidence(false).sbom, Attested::Absent);
    }

    /// A disk exported from the image carries its provenance on the image: it is shown as
    /// the disk's, not counted as the image's and not reported as a problem.
    #[test]
    fn a_disk_provenance_is_the_disks_not_the_images() {
        let image = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let disk = json!({"_type": STATEMENT_TYPE, "predicateType": PREDICATE_PROVENANCE,
        "subject": [{"name": "web.raw", "digest": {"sha256": "d".repeat(64)}}],
        "predicate": {"buildDefinition": {
            "buildType": kiln_image::attest::disk::BUILD_TYPE,
            "resolvedDependencies": [{"name": "image", "digest": {"sha256": "a".repeat(64)}}],
        }}});
        let a = attestation(
            &image,
            "r".into(),
            disk.to_string().as_bytes(),
            vec![],
            false,
        );
        assert_eq!(a.problem, None);
        assert_eq!(a.disk, Some(format!("web.raw sha256:{}", "d".repeat(64))));
        let carried = Carried {
            attestations: vec![a],
            ..Carried::default()
        };
        assert_eq!(carried.evidence(false).provenance, Attested::Absent);
        // Made from another image: a problem, as any statement about something else.
        let other = Digest::parse(&format!("sha256:{}", "b".repeat(64))).unwrap();
        let a = attestation(
            &other,
            "r".into(),
            disk.to_string().as_bytes(),
            vec![],
            false,
        );
        assert!(a.problem.unwrap().contains("subject"));
    }
}
