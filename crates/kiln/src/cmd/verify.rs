//! `kiln verify`: the ledger's chain, or with IMAGE what an image carries (signatures,
//! attestations) and whether it passes a deploy policy.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use kiln_control::PolicyConfig;
use kiln_control::policy::{Attested, check};
use serde_json::json;

use crate::carried;
use crate::output::Output;

/// `kiln verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// An image (NAME[:TAG] or sha256:…) in this state's store: show what it carries and
    /// check it against the spec's [policy] and --policy. Without it, verify the ledger
    #[arg(conflicts_with_all = ["ledger_export", "ledger_key"])]
    pub image: Option<String>,

    /// A trusted public key (an OpenSSH ssh-ed25519 line's file) to check signatures with,
    /// besides the policies' own keys; repeatable
    #[arg(long = "key", value_name = "FILE", requires = "image")]
    pub keys: Vec<PathBuf>,

    /// A policy file as `kiln serve --policy` takes ([policy] keys, require, source)
    #[arg(long, value_name = "FILE", requires = "image")]
    pub policy: Option<PathBuf>,

    /// The spec whose [policy] applies [default: ./kiln.toml when there is one]
    #[arg(long, short = 'f', value_name = "FILE", requires = "image")]
    pub file: Option<PathBuf>,

    #[command(flatten)]
    pub ledger: super::deploy::LedgerVerifyArgs,
}

pub fn verify(args: &VerifyArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    match &args.image {
        None => super::deploy::verify(&args.ledger, state, out),
        Some(image) => verify_image(args, image, state, out),
    }
}

fn verify_image(
    args: &VerifyArgs,
    reference: &str,
    state: &Path,
    out: &Output,
) -> anyhow::Result<ExitCode> {
    let store = super::image::store(state)?;
    let image = store
        .resolve(reference)
        .with_context(|| format!("no image {reference} in the store"))?
        .digest;
    let mut policies: Vec<(String, PolicyConfig)> = Vec::new();
    let spec_path = match &args.file {
        Some(f) => Some(f.clone()),
        None => Some(PathBuf::from("kiln.toml")).filter(|p| p.exists()),
    };
    if let Some(path) = spec_path {
        let spec = kiln_spec::Spec::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        policies.push((
            format!("spec {}", path.display()),
            PolicyConfig::from(&spec.policy),
        ));
    }
    if let Some(path) = &args.policy {
        policies.push((
            format!("policy {}", path.display()),
            super::daemon::load_policy(Some(path))?,
        ));
    }
    let mut extra = Vec::new();
    for path in &args.keys {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        extra.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    // What the image carries, checked against every key any source trusts.
    let mut all_keys = extra.clone();
    for (_, p) in &policies {
        all_keys.extend(p.keys.iter().cloned());
    }
    let trusted = carried::parse_keys(&all_keys).map_err(anyhow::Error::msg)?;
    let shown = carried::read(&store, &image, &trusted).map_err(anyhow::Error::msg)?;
    // Each policy judges with its own keys only.
    let mut verdicts = Vec::new();
    for (name, policy) in &policies {
        let keys = carried::parse_keys(&policy.keys).map_err(anyhow::Error::msg)?;
        let own = carried::read(&store, &image, &keys).map_err(anyhow::Error::msg)?;
        let missing: Vec<String> = check(policy, &own.evidence(!keys.is_empty()))
            .iter()
            .map(ToString::to_string)
            .collect();
        verdicts.push((name.clone(), missing));
    }
    // Without a policy, `--key` alone asks for a signature by one of those keys.
    if policies.is_empty() && !extra.is_empty() {
        let keys = carried::parse_keys(&extra).map_err(anyhow::Error::msg)?;
        let signed = carried::read(&store, &image, &keys)
            .map_err(anyhow::Error::msg)?
            .evidence(true)
            .signatures;
        let missing = if signed.is_empty() {
            vec!["no signature by a key given with --key".to_owned()]
        } else {
            Vec::new()
        };
        verdicts.push(("--key".to_owned(), missing));
    }
    let passes = verdicts.iter().all(|(_, m)| m.is_empty());
    if out.json {
        out.data(&json!({
            "image": image.to_string(),
            "signatures": shown.signatures,
            "attestations": shown.attestations,
            "test_record": shown.test_record,
            "policies": verdicts.iter().map(|(n, m)| json!({"policy": n, "missing": m, "passes": m.is_empty()})).collect::<Vec<_>>(),
            "passes": passes,
        }))?;
    } else {
        out.say(&format!("image {image}"));
        if shown.signatures.is_empty() {
            out.say("  signatures: none");
        }
        for s in &shown.signatures {
            match (&s.verified_by, &s.problem) {
                (Some(fp), _) => out.say(&format!("  signature: ok, by trusted key {fp}")),
                (None, Some(p)) => out.say(&format!("  signature: does not count: {p}")),
                (None, None) => out.say("  signature: does not count"),
            }
        }
        let evidence = shown.evidence(!trusted.is_empty());
        for (name, attested) in [
            ("test", &evidence.tested),
            ("provenance", &evidence.provenance),
            ("sbom", &evidence.sbom),
        ] {
            let line = match attested {
                Attested::Absent => "none".to_owned(),
                Attested::Unsigned => "present, not signed by a trusted key".to_owned(),
                Attested::Signed(by) => format!("signed by {}", by.join(", ")),
            };
            out.say(&format!("  {name}: {line}"));
        }
        for a in &shown.attestations {
            if let Some(disk) = &a.disk {
                let signed = if a.signed_by.is_empty() {
                    String::new()
                } else {
                    format!(", signed by {}", a.signed_by.join(", "))
                };
                out.say(&format!(
                    "  attestation {}: {} of disk {disk}, exported from this image{signed}",
                    a.referrer, a.predicate_type
                ));
            }
        }
        for a in shown.attestations.iter().filter(|a| a.problem.is_some()) {
            out.say(&format!(
                "  attestation {} does not count: {}",
                a.referrer,
                a.problem.as_deref().unwrap_or_default()
            ));
        }
        match evidence.source.as_ref().map(|s| (&s.commit, s.clean)) {
            Some((Some(commit), true)) => out.say(&format!("  source: git {commit}, clean")),
            Some((Some(commit), false)) => {
                out.say(&format!("  source: git {commit}, with uncommitted changes"));
            }
            Some((None, _)) => out.say("  source: not a git work tree"),
            None => {}
        }
        if verdicts.is_empty() {
            out.say("no policy checked: give -f kiln.toml, --policy FILE or --key FILE");
        }
        for (name, missing) in &verdicts {
            if missing.is_empty() {
                out.say(&format!("{name}: passes"));
            } else {
                out.say(&format!("{name}: refused: {}", missing.join("; ")));
            }
        }
    }
    Ok(if passes {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
