//! Signing commands: `kiln key generate`, `kiln sign IMAGE`, and the signing step of
//! `kiln build --sign`.
//!
//! Thin over `kiln-sign` (keys and signature formats) and `kiln-image`'s referrers (where a
//! signature is kept): an image signature is an SSHSIG (namespace `kiln-image`) over the
//! image manifest's exact bytes; each unsigned in-toto attestation the image carries gets a
//! DSSE copy of the same statement, signed. Both are attached to the image as OCI referrers.
//! ed25519 is deterministic and attaching is idempotent, so signing twice with one key adds
//! nothing the second time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_image::attest::{
    ANNOTATION_KEY, ANNOTATION_PREDICATE_TYPE, ARTIFACT_DSSE, ARTIFACT_IN_TOTO, ARTIFACT_SIGNATURE,
    MEDIA_SSHSIG,
};
use kiln_image::{Digest, Store};
use kiln_sign::{SigningKey, dsse, sshsig};
use serde_json::json;

use crate::output::Output;

/// `kiln key …`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

/// The `kiln key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Make a new ed25519 signing key: PATH (OpenSSH format, mode 0600) and PATH.pub; never
    /// overwrites either
    Generate(GenerateArgs),
}

/// `kiln key generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Where to write the private key (the public key goes to PATH.pub)
    #[arg(default_value = "kiln-signing.key", value_name = "PATH")]
    pub path: PathBuf,
    /// The comment in both files (ssh-keygen's -C)
    #[arg(long, default_value = "kiln", value_name = "TEXT")]
    pub comment: String,
}

/// `kiln sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// A tag (NAME or NAME:TAG) or a manifest digest
    pub reference: String,
    /// The ed25519 private key (OpenSSH format, unencrypted), e.g. from `kiln key generate` or
    /// `ssh-keygen -t ed25519 -N ''`
    #[arg(long, env = "KILN_SIGNING_KEY", value_name = "PATH")]
    pub key: PathBuf,
}

/// `kiln build --sign [--key PATH]`, flattened into `kiln build`'s arguments.
#[derive(Debug, Args)]
pub struct BuildSignArgs {
    /// Sign the built image and its attestations, as `kiln sign` does (needs --key)
    #[arg(long, requires = "key")]
    pub sign: bool,
    /// The signing key for --sign (OpenSSH ed25519 private key, unencrypted)
    #[arg(long, env = "KILN_SIGNING_KEY", value_name = "PATH")]
    pub key: Option<PathBuf>,
}

/// One referrer `kiln sign` made (or found already there).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attached {
    /// `signature` (SSHSIG over the manifest) or `attestation` (a DSSE envelope).
    pub kind: &'static str,
    /// The referrer's artifact type.
    pub artifact_type: String,
    /// The referrer manifest's digest.
    pub manifest: Digest,
    /// The payload blob's digest.
    pub payload: Digest,
    /// For an attestation: its in-toto predicate type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicate_type: Option<String>,
    /// False when the same bytes were already attached (signed before with this key).
    pub new: bool,
}

pub fn key(args: &KeyArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let KeyCommand::Generate(args) = &args.command;
    let key = SigningKey::generate();
    key.write(&args.path, &args.comment)
        .context("cannot write the signing key")?;
    let public = key.public().with_comment(&args.comment);
    let mut pub_path = args.path.clone().into_os_string();
    pub_path.push(".pub");
    if out.json {
        out.data(&json!({
            "path": args.path,
            "public_path": PathBuf::from(pub_path),
            "public_key": public.to_openssh(),
            "fingerprint": public.fingerprint(),
        }))?;
    } else {
        out.print(&format!("{}\n", public.to_openssh()));
        out.say(&format!(
            "fingerprint {} (private key {}, public key {})",
            public.fingerprint(),
            args.path.display(),
            PathBuf::from(pub_path).display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn sign(args: &SignArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let key = load_key(&args.key)?;
    let store = super::image::store(state)?;
    let image = store.resolve(&args.reference)?.digest;
    let attached =
        sign_image(&store, &image, &key).with_context(|| format!("cannot sign {image}"))?;
    report(&image, &key, &attached, out)?;
    Ok(ExitCode::SUCCESS)
}

/// The key `kiln build --sign` will sign with, loaded before the build so a bad key fails
/// at once rather than after a long build; `None` without `--sign`.
pub fn build_signer(args: &BuildSignArgs) -> anyhow::Result<Option<SigningKey>> {
    if !args.sign {
        return Ok(None);
    }
    // clap's `requires` makes --sign without a key a usage error; this is the same rule.
    let path = args
        .key
        .as_deref()
        .context("--sign needs --key PATH or KILN_SIGNING_KEY")?;
    load_key(path).map(Some)
}

/// The signing step of `kiln build --sign`, once the image (and its attestations) are in
/// the store.
pub fn sign_built(
    key: Option<&SigningKey>,
    image: &Digest,
    state: &Path,
    out: &Output,
) -> anyhow::Result<()> {
    let Some(key) = key else {
        return Ok(());
    };
    let store = super::image::store(state)?;
    let attached =
        sign_image(&store, image, key).with_context(|| format!("cannot sign {image}"))?;
    // `kiln build` prints the digest (or its JSON document) on stdout; the signing summary
    // goes to stderr with the build's progress, so stdout keeps its one result.
    if !out.quiet {
        for line in summary(image, key, &attached) {
            eprintln!("{line}");
        }
    }
    Ok(())
}

fn load_key(path: &Path) -> anyhow::Result<SigningKey> {
    SigningKey::load(path).context("cannot load the signing key")
}

/// Signs `image` in `store` with `key`: an SSHSIG over the manifest's bytes, and a DSSE copy
/// of each unsigned in-toto attestation attached to it. Returns what was attached, in that
/// order; an item already there (same bytes) is reported with `new: false`.
pub fn sign_image(
    store: &Store,
    image: &Digest,
    key: &SigningKey,
) -> anyhow::Result<Vec<Attached>> {
    let fingerprint = key.public().fingerprint();
    let before = store.referrers(image)?;
    let existing: std::collections::BTreeSet<Digest> =
        before.iter().map(|r| r.manifest.clone()).collect();
    let mut attached = Vec::new();

    let manifest = store.read_blob(image)?;
    let signature = sshsig::sign(key, sshsig::NAMESPACE_IMAGE, &manifest)?;
    let annotations = BTreeMap::from([(ANNOTATION_KEY.to_owned(), fingerprint.clone())]);
    let referrer = store.attach(
        image,
        ARTIFACT_SIGNATURE,
        MEDIA_SSHSIG,
        signature.as_bytes(),
        annotations,
    )?;
    attached.push(Attached {
        kind: "signature",
        artifact_type: ARTIFACT_SIGNATURE.to_owned(),
        new: !existing.contains(&referrer),
        manifest: referrer,
        payload: Digest::of(signature.as_bytes()),
        predicate_type: None,
    });

    for statement in before
        .iter()
        .filter(|r| r.artifact_type == ARTIFACT_IN_TOTO)
    {
        let payload = store.read_blob(&statement.payload)?;
        let predicate_type = statement
            .annotations
            .get(ANNOTATION_PREDICATE_TYPE)
            .cloned();
        // The key vouches only for statements about this image (or a disk exported from
        // it) that say what their annotation says they are: one imported with the image
        // about another, or dressed as another kind, is left unsigned.
        let parsed: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        let about_image = kiln_image::attest::names_subject(&parsed, image)
            || kiln_image::attest::disk::made_from(&parsed).as_ref() == Some(image);
        let typed = parsed["_type"].as_str() == Some(kiln_image::attest::STATEMENT_TYPE)
            && parsed["predicateType"].as_str() == predicate_type.as_deref();
        if !(about_image && typed) {
            tracing::warn!(
                referrer = %statement.manifest,
                "not signed: the attestation is not an in-toto statement about this image of the kind its annotation says"
            );
            continue;
        }
        let envelope = dsse::Envelope::try_sign(ARTIFACT_IN_TOTO, payload, key)?.to_json();
        let referrer = attach_envelope(store, image, key, &envelope, predicate_type.as_deref())
            .with_context(|| {
                format!(
                    "cannot attach the signed copy of attestation {}",
                    statement.manifest
                )
            })?;
        attached.push(Attached {
            kind: "attestation",
            artifact_type: ARTIFACT_DSSE.to_owned(),
            new: !existing.contains(&referrer),
            manifest: referrer,
            payload: Digest::of(&envelope),
            predicate_type,
        });
    }
    Ok(attached)
}

/// Attaches `envelope` (a DSSE envelope `key` signed) to `image`, annotated with the key's
/// fingerprint and the statement's predicate type; returns the referrer's digest. ed25519
/// is deterministic, so the same statement and key attach the same referrer.
pub fn attach_envelope(
    store: &Store,
    image: &Digest,
    key: &SigningKey,
    envelope: &[u8],
    predicate_type: Option<&str>,
) -> Result<Digest, kiln_image::StoreError> {
    let mut annotations = BTreeMap::from([(ANNOTATION_KEY.to_owned(), key.public().fingerprint())]);
    if let Some(p) = predicate_type {
        annotations.insert(ANNOTATION_PREDICATE_TYPE.to_owned(), p.to_owned());
    }
    store.attach(image, ARTIFACT_DSSE, ARTIFACT_DSSE, envelope, annotations)
}

fn summary(image: &Digest, key: &SigningKey, attached: &[Attached]) -> Vec<String> {
    let mut lines = vec![format!(
        "signed {image} with {}",
        key.public().fingerprint()
    )];
    for a in attached {
        let what = match &a.predicate_type {
            Some(p) => format!("{} ({p})", a.kind),
            None => a.kind.to_owned(),
        };
        let state = if a.new { "attached" } else { "already there" };
        lines.push(format!("  {what}: {} {state}", a.manifest));
    }
    lines
}

fn report(
    image: &Digest,
    key: &SigningKey,
    attached: &[Attached],
    out: &Output,
) -> anyhow::Result<()> {
    if out.json {
        out.data(&json!({
            "image": image,
            "key": key.public().fingerprint(),
            "attached": attached,
        }))?;
    } else {
        for line in summary(image, key, attached) {
            out.say(&line);
        }
    }
    Ok(())
}
