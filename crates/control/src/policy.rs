//! The deploy policy: the proofs an image must carry before the daemon runs a release of it.
//!
//! Two policies apply to every release: the spec's `[policy]` and the daemon's own (`kiln
//! serve --policy`), each with its own trusted keys, so a client can add requirements but
//! never trust a key the daemon does not. Both are checked at apply (a refusal records
//! nothing but a `policy.refused` event) and again before every instance create, against the
//! policies recorded with the release: a later change of the daemon's policy takes effect
//! with the next release and never stops one that runs.
//!
//! What an image carries is read by the binary ([`Attestations::evidence`]); deciding whether
//! it is enough is pure ([`check`]).
//!
//! **Invariant:** with trusted keys, an attestation (test, provenance, SBOM) counts only when
//! one of them signed it; without keys, only the daemon's own store vouches for it.

use std::fmt;

use kiln_runtime::Digest;

use crate::config::{PolicyConfig, ProofName, ReleaseConfig, SourceName};
use crate::gate::Attestations;

/// What an image carries, as checked against one policy's trusted keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// Fingerprints of the trusted keys whose signature over the image's manifest verifies.
    pub signatures: Vec<String>,
    /// A passed test attestation.
    pub tested: Attested,
    /// SLSA provenance.
    pub provenance: Attested,
    /// An SPDX SBOM.
    pub sbom: Attested,
    /// What the provenance that counts says of the source; `None` without one.
    pub source: Option<SourceFacts>,
}

/// Whether an attestation is there, and who signed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Attested {
    /// None at all.
    #[default]
    Absent,
    /// Present, signed by no trusted key.
    Unsigned,
    /// Signed by these trusted keys (fingerprints).
    Signed(Vec<String>),
}

/// What provenance says of the source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFacts {
    /// The git commit built, if the build was in a git work tree.
    pub commit: Option<String>,
    /// Whether the work tree was clean.
    pub clean: bool,
}

/// One proof a policy wants and the image lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// No signature by a trusted key.
    Signature,
    /// The attestation is absent.
    Absent(ProofName),
    /// The attestation is there but no trusted key signed it.
    Unsigned(ProofName),
    /// The source rule is not met; what the provenance says instead.
    Source {
        /// The rule.
        want: SourceName,
        /// What the provenance says, `None` without provenance.
        found: Option<SourceFacts>,
    },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = |p: &ProofName| match p {
            ProofName::Signature => "signature",
            ProofName::Tested => "passed test attestation",
            ProofName::Provenance => "provenance",
            ProofName::Sbom => "SBOM",
        };
        match self {
            Missing::Signature => f.write_str("no signature by a trusted key"),
            Missing::Absent(p) => write!(f, "no {}", what(p)),
            Missing::Unsigned(p) => write!(f, "its {} is not signed by a trusted key", what(p)),
            Missing::Source { want, found: None } => write!(
                f,
                "source must be {} but the image has no provenance that counts",
                want.as_str()
            ),
            Missing::Source {
                want,
                found: Some(s),
            } => match &s.commit {
                None => write!(
                    f,
                    "source must be {}: the provenance names no git commit",
                    want.as_str()
                ),
                Some(c) => write!(
                    f,
                    "source must be {}: commit {c} was built from a work tree with changes",
                    want.as_str()
                ),
            },
        }
    }
}

/// What `policy` finds missing in `evidence`; empty when the image passes.
pub fn check(policy: &PolicyConfig, evidence: &Evidence) -> Vec<Missing> {
    let keyed = !policy.keys.is_empty();
    let mut missing = Vec::new();
    for proof in &policy.require {
        let attested = match proof {
            ProofName::Signature => {
                if evidence.signatures.is_empty() {
                    missing.push(Missing::Signature);
                }
                continue;
            }
            ProofName::Tested => &evidence.tested,
            ProofName::Provenance => &evidence.provenance,
            ProofName::Sbom => &evidence.sbom,
        };
        match attested {
            Attested::Absent => missing.push(Missing::Absent(*proof)),
            Attested::Unsigned if keyed => missing.push(Missing::Unsigned(*proof)),
            Attested::Signed(by) if keyed && by.is_empty() => {
                missing.push(Missing::Unsigned(*proof));
            }
            Attested::Unsigned | Attested::Signed(_) => {}
        }
    }
    let source_ok = match (policy.source, &evidence.source) {
        (SourceName::Any, _) => true,
        (_, None) => false,
        (SourceName::Git, Some(s)) => s.commit.is_some(),
        (SourceName::GitClean, Some(s)) => s.commit.is_some() && s.clean,
    };
    if !source_ok {
        missing.push(Missing::Source {
            want: policy.source,
            found: evidence.source.clone(),
        });
    }
    missing
}

/// A refusal: whose policy, and what it found missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `spec` or `daemon`.
    pub policy: &'static str,
    /// The image refused.
    pub image: Digest,
    /// What is missing, as sentences.
    pub missing: Vec<String>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "image {} is refused by the {} policy: {}",
            self.image,
            self.policy,
            self.missing.join("; ")
        )
    }
}

/// Checks `image` against both policies of `config` (the spec's, then the daemon's); the
/// first that refuses it. Reads the store: call it off the runtime's threads.
pub fn enforce(
    image: &Digest,
    config: &ReleaseConfig,
    attestations: Option<&dyn Attestations>,
) -> Result<(), Refusal> {
    for (name, policy) in [("spec", &config.policy), ("daemon", &config.daemon_policy)] {
        if policy.require.is_empty() && policy.source.is_any() {
            continue;
        }
        let evidence = match attestations {
            Some(a) => a.evidence(image, &policy.keys),
            None => Err("this daemon cannot read what images carry".to_owned()),
        };
        let missing: Vec<String> = match evidence {
            Ok(e) => check(policy, &e).iter().map(ToString::to_string).collect(),
            Err(e) => vec![e],
        };
        if !missing.is_empty() {
            return Err(Refusal {
                policy: name,
                image: image.clone(),
                missing,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(require: &[ProofName], keys: usize, source: SourceName) -> PolicyConfig {
        PolicyConfig {
            keys: (0..keys)
                .map(|i| format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5{i}"))
                .collect(),
            require: require.to_vec(),
            source,
        }
    }

    fn check_text(p: &PolicyConfig, e: &Evidence) -> Vec<String> {
        check(p, e).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn an_empty_policy_passes_anything() {
        assert!(check(&PolicyConfig::default(), &Evidence::default()).is_empty());
    }

    #[test]
    fn each_missing_proof_is_named_in_the_order_required() {
        use ProofName::*;
        let p = policy(&[Sbom, Signature, Tested, Provenance], 1, SourceName::Any);
        assert_eq!(
            check_text(&p, &Evidence::default()),
            [
                "no SBOM",
                "no signature by a trusted key",
                "no passed test attestation",
                "no provenance"
            ]
        );
    }

    #[test]
    fn with_keys_an_unsigned_attestation_does_not_count_and_without_keys_it_does() {
        use ProofName::*;
        let e = Evidence {
            tested: Attested::Unsigned,
            provenance: Attested::Signed(vec!["SHA256:k".into()]),
            sbom: Attested::Signed(Vec::new()),
            ..Evidence::default()
        };
        let keyed = policy(&[Tested, Provenance, Sbom], 1, SourceName::Any);
        assert_eq!(
            check_text(&keyed, &e),
            [
                "its passed test attestation is not signed by a trusted key",
                "its SBOM is not signed by a trusted key"
            ]
        );
        let unkeyed = policy(&[Tested, Provenance, Sbom], 0, SourceName::Any);
        assert!(check(&unkeyed, &e).is_empty());
    }

    #[test]
    fn a_signature_by_a_trusted_key_passes() {
        let p = policy(&[ProofName::Signature], 1, SourceName::Any);
        let e = Evidence {
            signatures: vec!["SHA256:k".into()],
            ..Evidence::default()
        };
        assert!(check(&p, &e).is_empty());
    }

    #[test]
    fn the_source_rule_reads_the_provenance() {
        let clean = SourceFacts {
            commit: Some("abc".into()),
            clean: true,
        };
        let dirty = SourceFacts {
            clean: false,
            ..clean.clone()
        };
        let none = SourceFacts {
            commit: None,
            clean: false,
        };
        let with = |s: Option<SourceFacts>| Evidence {
            source: s,
            ..Evidence::default()
        };
        let git = policy(&[], 0, SourceName::Git);
        let git_clean = policy(&[], 0, SourceName::GitClean);
        assert!(check(&git, &with(Some(dirty.clone()))).is_empty());
        assert!(check(&git_clean, &with(Some(clean))).is_empty());
        assert_eq!(
            check_text(&git_clean, &with(Some(dirty))),
            ["source must be git-clean: commit abc was built from a work tree with changes"]
        );
        assert_eq!(
            check_text(&git, &with(Some(none))),
            ["source must be git: the provenance names no git commit"]
        );
        assert_eq!(
            check_text(&git, &with(None)),
            ["source must be git but the image has no provenance that counts"]
        );
    }
}
