#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The store: corruption is detected on read, gc keeps what tags and retained releases
//! reach, attestations round-trip, and concurrent builds tag safely.

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::*;
use kiln_image::{Digest, Store, StoreError};
use kiln_spec::{BaseImage, Compression};

fn built(env: &mut Env, seed: u64, tag: &str) -> kiln_image::BuildOutput {
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
}

#[test]
fn a_corrupted_blob_is_detected_on_read_and_named() {
    let mut env = Env::new();
    let out = built(&mut env, 1, "one:latest");
    let layer = &out.layers[0].digest;
    let path = env.store.blob_path(layer);
    let mut data = fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&path, &data).unwrap();
    let err = env.store.verify_blob(layer).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { digest, .. } if digest == layer),
        "{err}"
    );
    assert!(err.to_string().contains(layer.as_str()));
    let err = env.store.read_blob(layer).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }));
    // Streaming readers fail at the end, too, and exports refuse to carry it.
    let dest = env.path().join("out.tar");
    let err = kiln_image::archive::export(
        &env.store,
        "one",
        kiln_image::archive::ExportFormat::DockerArchive,
        &dest,
    )
    .unwrap_err();
    assert!(err.to_string().contains(layer.as_str()), "{err}");
    assert!(!dest.exists());
    // Unpacking it (as the runtime does, layer by layer) fails naming the blob, even though
    // tar itself stops reading at its end marker.
    let root = env.path().join("unpacked");
    fs::create_dir_all(&root).unwrap();
    let err = kiln_image::unpack_blob(&env.store, layer, &root, &Default::default()).unwrap_err();
    assert!(
        err.to_string().contains(layer.as_str())
            || matches!(err, kiln_image::UnpackError::Malformed { .. }),
        "{err}"
    );
    // A corrupted manifest is caught before it is parsed.
    let mpath = env.store.blob_path(&out.digest);
    fs::write(&mpath, b"{}").unwrap();
    let err = env.store.inspect("one").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

#[test]
fn gc_removes_only_what_no_tag_or_retained_release_reaches() {
    let mut env = Env::new();
    let a = built(&mut env, 1, "app:latest");
    let b = built(&mut env, 2, "app:latest"); // moves the tag: a is now untagged
    let c = built(&mut env, 3, "other:latest");
    let blobs_of = |o: &kiln_image::BuildOutput| {
        let mut v = vec![o.digest.clone(), o.config.clone()];
        v.extend(o.layers.iter().map(|l| l.digest.clone()));
        v
    };
    // Dry run: reports a's blobs, removes nothing.
    let dry = env.store.gc(&BTreeSet::new(), true).unwrap();
    let removed: BTreeSet<Digest> = dry.removed.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(removed, blobs_of(&a).into_iter().collect());
    assert!(blobs_of(&a).iter().all(|d| env.store.has_blob(d)));
    // With a retained as a release to roll back to: nothing goes.
    let retained = BTreeSet::from([a.digest.clone()]);
    let kept = env.store.gc(&retained, false).unwrap();
    assert!(kept.removed.is_empty());
    assert!(
        blobs_of(&a)
            .iter()
            .all(|d| env.store.verify_blob(d).is_ok())
    );
    assert_eq!(
        env.store.inspect(a.digest.as_str()).unwrap().digest,
        a.digest
    );
    // Without: a goes, b and c stay intact.
    let done = env.store.gc(&BTreeSet::new(), false).unwrap();
    assert_eq!(done.removed.len(), 3);
    assert!(blobs_of(&a).iter().all(|d| !env.store.has_blob(d)));
    for o in [&b, &c] {
        for d in blobs_of(o) {
            env.store.verify_blob(&d).unwrap();
        }
    }
    let tags: Vec<String> = env
        .store
        .images()
        .unwrap()
        .into_iter()
        .map(|i| i.tag)
        .collect();
    assert_eq!(
        tags,
        vec!["app:latest".to_owned(), "other:latest".to_owned()]
    );
}

#[test]
fn attestations_round_trip_by_manifest_digest() {
    let mut env = Env::new();
    let out = built(&mut env, 1, "app:latest");
    assert_eq!(env.store.read_attestation(&out.digest).unwrap(), None);
    let att =
        serde_json::json!({"passed": true, "command": ["/app/file"], "at": "2026-01-01T00:00:00Z"});
    let path = env.store.write_attestation(&out.digest, &att).unwrap();
    assert!(path.ends_with(format!("attestations/sha256-{}.json", out.digest.hex())));
    assert_eq!(env.store.read_attestation(&out.digest).unwrap(), Some(att));
}

#[test]
fn the_store_is_a_standard_oci_layout() {
    let mut env = Env::new();
    let out = built(&mut env, 1, "hello:latest");
    let root = env.store.root();
    let layout: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["manifests"][0]["digest"], out.digest.as_str());
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "hello:latest"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&env.store.read_blob(&out.digest).unwrap()).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    // Tags resolve with and without :latest, and by digest prefix: four hex digits are
    // enough, as the help promises (they said "no image" when six were needed).
    let upper = out.digest.hex()[..4].to_ascii_uppercase();
    for r in [
        "hello",
        "hello:latest",
        out.digest.as_str(),
        &out.digest.hex()[..12],
        &out.digest.hex()[..4],
        &format!("sha256:{}", &out.digest.hex()[..4]),
        &upper,
    ] {
        assert_eq!(env.store.resolve(r).unwrap().digest, out.digest, "{r}");
    }
    assert!(matches!(
        env.store.resolve("nope"),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn concurrent_builds_into_one_store_all_land() {
    let env = Env::new();
    let root = env.path();
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let root = root.clone();
            s.spawn(move || {
                let store = Store::open(root.join("images")).unwrap();
                let mut cache =
                    kiln_image::BuildCache::open(root.join(format!("cache-{i}"))).unwrap();
                let src = root.join(format!("c-{i}"));
                write(&src.join("f"), &bytes(i, 3000), 0o644);
                let opts = kiln_image::BuildOptions {
                    tag: Some(format!("app{i}:latest")),
                    ..Default::default()
                };
                let s = spec(
                    BaseImage::Scratch,
                    vec![copy(&src, "/x")],
                    Compression::Gzip,
                );
                kiln_image::build(&s, &store, &mut cache, &opts, &mut |_| {}).unwrap();
            });
        }
    });
    let images = env.store.images().unwrap();
    assert_eq!(images.len(), 4, "{images:?}");
    // gc alongside finds nothing to remove: everything is tagged.
    assert!(
        env.store
            .gc(&BTreeSet::new(), false)
            .unwrap()
            .removed
            .is_empty()
    );
}
