#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! What a build gathers for its SBOM and provenance: every regular file of the image (empty
//! ones and hardlinks included) with the right hashes, a base image's files after its
//! whiteouts, the base's identity, and one digest per input tree.

mod common;

use std::collections::BTreeMap;

use common::*;
use kiln_image::oci::{self, Descriptor, Index, Manifest};
use kiln_image::{Digest, Store, file_hashes};
use kiln_spec::{BaseImage, Compression};

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, body) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *body).unwrap();
    }
    b.into_inner().unwrap()
}

/// An OCI layout with one image of two uncompressed layers: the second deletes `/a`
/// (`.wh.a`), hides everything `d/` held (`.wh..wh..opq`) and adds `d/z`.
fn base_layout(dir: &std::path::Path) -> Digest {
    let store = Store::open(dir).unwrap();
    let l1 = tar_of(&[("a", b"a"), ("d/x", b"x"), ("d/y", b"y"), ("keep", b"k")]);
    let l2 = tar_of(&[(".wh.a", b""), ("d/.wh..wh..opq", b""), ("d/z", b"z")]);
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for l in [&l1, &l2] {
        let d = store.write_blob(l).unwrap();
        diff_ids.push(d.as_str().to_owned());
        layers.push(Descriptor::new(oci::MEDIA_LAYER_TAR, d, l.len() as u64));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = oci::canonical_json(&config).unwrap();
    let cd = store.write_blob(&config).unwrap();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_MANIFEST.to_owned()),
        config: Descriptor::new(oci::MEDIA_CONFIG, cd, config.len() as u64),
        layers,
        annotations: BTreeMap::new(),
        artifact_type: None,
        subject: None,
    };
    let bytes = oci::canonical_json(&manifest).unwrap();
    let md = store.write_blob(&bytes).unwrap();
    store
        .tag(
            "base:latest",
            &Descriptor::new(oci::MEDIA_MANIFEST, md.clone(), bytes.len() as u64),
        )
        .unwrap();
    let _: Index = store.index().unwrap();
    md
}

#[test]
fn the_record_lists_every_file_after_the_base_whiteouts() {
    let mut env = Env::new();
    let layout = env.path().join("layout");
    let base = base_layout(&layout);
    let src = env.path().join("src");
    write(&src.join("main"), b"main", 0o755);
    write(&src.join("empty"), b"", 0o644);
    std::fs::hard_link(src.join("main"), src.join("again")).unwrap();
    let out = env.build(
        &spec(
            BaseImage::Oci {
                path: layout.clone(),
                reference: None,
            },
            vec![copy(&src, "/app")],
            Compression::Gzip,
        ),
        "web:latest",
    );
    let record = out.record.unwrap();
    assert_eq!(record.image, out.digest);
    assert_eq!(record.base.digest, Some(base));
    assert_eq!(record.base.name, "oci:layout");
    let files: Vec<(&str, &kiln_image::FileHashes)> = record
        .files
        .iter()
        .map(|f| (f.path.as_str(), &f.hashes))
        .collect();
    let want = [
        ("/app/again", file_hashes(b"main")),
        ("/app/empty", file_hashes(b"")),
        ("/app/main", file_hashes(b"main")),
        ("/d/z", file_hashes(b"z")),
        ("/keep", file_hashes(b"k")),
    ];
    assert_eq!(files, want.iter().map(|(p, h)| (*p, h)).collect::<Vec<_>>());
    assert_eq!(record.inputs.len(), 1);
    assert!(record.packages.is_empty());

    // A second build of the same inputs (the cache now vouches for every file) gathers the
    // same record; a changed file changes its input tree's digest.
    let again = env
        .build(
            &spec(
                BaseImage::Oci {
                    path: layout.clone(),
                    reference: None,
                },
                vec![copy(&src, "/app")],
                Compression::Gzip,
            ),
            "web:latest",
        )
        .record
        .unwrap();
    assert_eq!(again, record);
    write(&src.join("empty"), b"now full", 0o644);
    let changed = env
        .build(
            &spec(
                BaseImage::Oci {
                    path: layout,
                    reference: None,
                },
                vec![copy(&src, "/app")],
                Compression::Gzip,
            ),
            "web:latest",
        )
        .record
        .unwrap();
    assert_ne!(changed.inputs[0].digest, record.inputs[0].digest);
}

/// Regression: a disk exported from an image attaches its provenance to the image, under
/// the same predicate type; the image's own build, looking for a provenance of the same
/// source to reuse, took the disk's for its own and attached none.
#[test]
fn a_disks_provenance_is_never_taken_for_the_images_own() {
    use kiln_image::attest::{self, PREDICATE_PROVENANCE, STATEMENT_TYPE, provenance};
    let mut env = Env::new();
    let src = env.path().join("src");
    write(&src.join("main"), b"main", 0o755);
    let spec = spec(
        BaseImage::Scratch,
        vec![copy(&src, "/app")],
        Compression::Gzip,
    );
    let out = env.build(&spec, "web:latest");
    let record = out.record.unwrap();
    let disk = serde_json::json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": "web.raw", "digest": {"sha256": "d".repeat(64)}}],
        "predicateType": PREDICATE_PROVENANCE,
        "predicate": {"buildDefinition": {
            "buildType": attest::disk::BUILD_TYPE,
            "resolvedDependencies": [{"name": "image", "digest": {"sha256": out.digest.hex()}}],
        }},
    });
    let disk_referrer = attest::attach_statement(&env.store, &out.digest, &disk).unwrap();
    let invocation = provenance::Invocation {
        spec_path: "kiln.toml".to_owned(),
        spec_digest: Digest::of(b"spec"),
        source: None,
        kiln_version: "0.1.0".to_owned(),
        invocation_id: "id".to_owned(),
        started_on: "2026-01-01T00:00:00Z".to_owned(),
        finished_on: "2026-01-01T00:00:01Z".to_owned(),
    };
    let [_, prov] = attest::attach_build(&env.store, &record, &invocation).unwrap();
    assert_ne!(prov, disk_referrer);
    let statement: serde_json::Value = serde_json::from_slice(
        &env.store
            .read_blob(
                &env.store
                    .referrers(&out.digest)
                    .unwrap()
                    .into_iter()
                    .find(|r| r.manifest == prov)
                    .unwrap()
                    .payload,
            )
            .unwrap(),
    )
    .unwrap();
    assert!(
        attest::names_subject(&statement, &out.digest),
        "{statement}"
    );
}
