#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Referrers in the store: attach is idempotent and listed in index.json and in the
//! referrers-tag index; gc keeps the referrers of kept images and collects the others;
//! export/import carry them; a hostile referrer is an error naming it, never attached to
//! another image and never a panic.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use common::*;
use kiln_image::archive::{self, ExportFormat};
use kiln_image::{Digest, Store, StoreError, attest};
use kiln_spec::{BaseImage, Compression};

fn built(env: &mut Env, seed: u64, tag: &str) -> Digest {
    let src = env.path().join(format!("src-{seed}"));
    write(&src.join("file"), &bytes(seed, 5000), 0o644);
    env.build(
        &spec(
            BaseImage::Scratch,
            vec![copy(&src, "/app")],
            Compression::Gzip,
        ),
        tag,
    )
    .digest
}

fn statement(store: &Store, subject: &Digest, body: &str) -> Digest {
    let annotations = BTreeMap::from([(
        attest::ANNOTATION_PREDICATE_TYPE.to_owned(),
        attest::PREDICATE_TEST.to_owned(),
    )]);
    store
        .attach(
            subject,
            attest::ARTIFACT_IN_TOTO,
            attest::ARTIFACT_IN_TOTO,
            body.as_bytes(),
            annotations,
        )
        .unwrap()
}

fn index(store: &Store) -> serde_json::Value {
    serde_json::from_slice(&fs::read(store.root().join("index.json")).unwrap()).unwrap()
}

#[test]
fn attach_is_idempotent_and_listed_both_ways() {
    let mut env = Env::new();
    let image = built(&mut env, 1, "one:latest");
    let a = statement(&env.store, &image, r#"{"a":1}"#);
    let again = statement(&env.store, &image, r#"{"a":1}"#);
    assert_eq!(a, again);
    let b = statement(&env.store, &image, r#"{"b":2}"#);
    let list = env.store.referrers(&image).unwrap();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(
        list.iter().map(|r| r.manifest.clone()).collect::<Vec<_>>(),
        want
    );
    assert_eq!(list[0].artifact_type, attest::ARTIFACT_IN_TOTO);
    let payload = env.store.read_blob(&list[0].payload).unwrap();
    assert!(payload == br#"{"a":1}"# || payload == br#"{"b":2}"#);

    // index.json: the image tagged, both referrers untagged with their artifactType, and
    // the fallback tag naming an image index of both.
    let idx = index(&env.store);
    let entries = idx["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{idx}");
    let tag = format!("sha256-{}", image.hex());
    let fb = entries
        .iter()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str())
        .unwrap();
    assert_eq!(fb["mediaType"], "application/vnd.oci.image.index.v1+json");
    let fb_doc: serde_json::Value = serde_json::from_slice(
        &env.store
            .read_blob(&Digest::parse(fb["digest"].as_str().unwrap()).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(fb_doc["manifests"].as_array().unwrap().len(), 2);
    for r in [&a, &b] {
        let e = entries.iter().find(|e| e["digest"] == r.as_str()).unwrap();
        assert_eq!(e["artifactType"], attest::ARTIFACT_IN_TOTO);
        assert!(e.get("annotations").is_none());
        let m: serde_json::Value =
            serde_json::from_slice(&env.store.read_blob(r).unwrap()).unwrap();
        assert_eq!(m["subject"]["digest"], image.as_str());
        assert_eq!(
            m["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        assert_eq!(m["config"]["size"], 2);
    }
    // A referrer is not an image: neither `images` nor a digest resolves to it.
    assert_eq!(env.store.images().unwrap().len(), 1);
    assert!(matches!(
        env.store.resolve(a.as_str()),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(env.store.resolve(image.as_str()).unwrap().digest, image);
}

#[test]
fn gc_keeps_the_referrers_of_kept_images_and_collects_the_others() {
    let mut env = Env::new();
    let keep = built(&mut env, 1, "keep:latest");
    let gone = built(&mut env, 2, "gone:latest");
    let kept_ref = statement(&env.store, &keep, r#"{"keep":true}"#);
    let gone_ref = statement(&env.store, &gone, r#"{"gone":true}"#);
    let gone_payload = env.store.referrers(&gone).unwrap()[0].payload.clone();
    assert!(env.store.untag("gone:latest").unwrap());
    let report = env.store.gc(&BTreeSet::new(), false).unwrap();
    let removed: BTreeSet<Digest> = report.removed.iter().map(|(d, _)| d.clone()).collect();
    assert!(removed.contains(&gone_ref) && removed.contains(&gone_payload));
    assert!(!removed.contains(&kept_ref));
    assert_eq!(env.store.referrers(&keep).unwrap().len(), 1);
    let idx = index(&env.store);
    let text = idx.to_string();
    assert!(
        !text.contains(gone_ref.hex()) && !text.contains(gone.hex()),
        "{idx}"
    );
    assert!(text.contains(kept_ref.hex()));
    // Retained (untagged) images keep theirs too.
    let retained = built(&mut env, 3, "r:latest");
    let r_ref = statement(&env.store, &retained, r#"{"r":1}"#);
    env.store.untag("r:latest").unwrap();
    let report = env
        .store
        .gc(&BTreeSet::from([retained.clone()]), false)
        .unwrap();
    assert!(!report.removed.iter().any(|(d, _)| d == &r_ref));
    assert_eq!(env.store.referrers(&retained).unwrap().len(), 1);
}

/// Rewrites `image`'s referrers index to list `manifest` (a hostile store or layout).
fn list_in_fallback(store: &Store, image: &Digest, manifest: &[u8]) -> Digest {
    let d = store.write_blob(manifest).unwrap();
    let fallback = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": d.as_str(), "size": manifest.len(),
                       "artifactType": attest::ARTIFACT_IN_TOTO}]
    });
    let fb = store
        .write_blob(&serde_json::to_vec(&fallback).unwrap())
        .unwrap();
    let mut idx = index(store);
    let tag = format!("sha256-{}", image.hex());
    let entries = idx["manifests"].as_array_mut().unwrap();
    entries.retain(|e| e["annotations"]["org.opencontainers.image.ref.name"] != tag.as_str());
    entries.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": fb.as_str(), "size": serde_json::to_vec(&fallback).unwrap().len(),
        "annotations": {"org.opencontainers.image.ref.name": tag}
    }));
    fs::write(store.root().join("index.json"), idx.to_string()).unwrap();
    d
}

#[test]
fn a_hostile_referrer_is_an_error_naming_it_and_never_attaches_elsewhere() {
    let mut env = Env::new();
    let one = built(&mut env, 1, "one:latest");
    let two = built(&mut env, 2, "two:latest");
    let of_two = statement(&env.store, &two, r#"{"two":1}"#);
    let bytes = env.store.read_blob(&of_two).unwrap();

    // Listed for image one, but its subject is image two.
    let d = list_in_fallback(&env.store, &one, &bytes);
    let err = env.store.referrers(&one).unwrap_err().to_string();
    assert!(
        err.contains(d.as_str()) && err.contains(&format!("names subject {two}")),
        "{err}"
    );
    // …and gc refuses rather than guess.
    assert!(env.store.gc(&BTreeSet::new(), true).is_err());
    // Image two's own referrers are untouched.
    assert_eq!(env.store.referrers(&two).unwrap().len(), 1);

    // Bad JSON.
    let d = list_in_fallback(&env.store, &one, b"{not json");
    let err = env.store.referrers(&one).unwrap_err().to_string();
    assert!(
        err.contains(d.as_str()) && err.contains("not a valid manifest"),
        "{err}"
    );

    // Huge.
    let mut huge = b"{\"x\":\"".to_vec();
    huge.resize(5 << 20, b'a');
    huge.extend_from_slice(b"\"}");
    let d = list_in_fallback(&env.store, &one, &huge);
    let err = env.store.referrers(&one).unwrap_err().to_string();
    assert!(err.contains(d.as_str()) && err.contains("bytes"), "{err}");
}

#[test]
fn export_and_import_carry_referrers() {
    let mut env = Env::new();
    let image = built(&mut env, 1, "one:latest");
    let a = statement(&env.store, &image, r#"{"a":1}"#);
    // A referrer of the referrer (as a signature on an attestation is).
    let sig = env
        .store
        .attach(
            &a,
            attest::ARTIFACT_SIGNATURE,
            attest::MEDIA_SSHSIG,
            b"-----BEGIN SSH SIGNATURE-----",
            BTreeMap::new(),
        )
        .unwrap();
    for format in [ExportFormat::Oci, ExportFormat::OciArchive] {
        let out = env.path().join(format!("export-{format:?}"));
        archive::export(&env.store, "one:latest", format, &out).unwrap();
        let second = Store::open(env.path().join(format!("second-{format:?}"))).unwrap();
        archive::import(&second, &out).unwrap();
        let list = second.referrers(&image).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].manifest, a);
        assert_eq!(second.read_blob(&list[0].payload).unwrap(), br#"{"a":1}"#);
        assert_eq!(second.referrers(&a).unwrap()[0].manifest, sig);
        assert_eq!(second.images().unwrap().len(), 1);
    }
}

#[test]
fn import_refuses_a_layout_referrer_naming_another_image() {
    let mut env = Env::new();
    let image = built(&mut env, 1, "one:latest");
    let other = built(&mut env, 2, "two:latest");
    let of_other = statement(&env.store, &other, r#"{"x":1}"#);
    let out = env.path().join("layout");
    archive::export(&env.store, "one:latest", ExportFormat::Oci, &out).unwrap();
    let layout = Store::open(&out).unwrap();
    let bytes = env.store.read_blob(&of_other).unwrap();
    let payload = env
        .store
        .read_blob(&env.store.referrers(&other).unwrap()[0].payload)
        .unwrap();
    layout.write_blob(&payload).unwrap();
    list_in_fallback(&layout, &image, &bytes);
    let second = Store::open(env.path().join("second")).unwrap();
    let err = archive::import(&second, &out).unwrap_err().to_string();
    assert!(
        err.contains(of_other.as_str()) && err.contains("names subject"),
        "{err}"
    );
    assert!(second.referrers(&other).unwrap().is_empty());
}
