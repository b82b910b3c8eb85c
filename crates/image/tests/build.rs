#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The builder end to end: reproducibility, the golden digests, incremental rebuilds, and
//! what a layer holds.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use kiln_image::{BuildOptions, UnpackOptions, WhiteoutMode};
use kiln_spec::{BaseImage, Compression};

fn touch_all(root: &Path, t: SystemTime) {
    for e in walk(root) {
        if !fs::symlink_metadata(&e).unwrap().file_type().is_symlink() {
            fs::File::options()
                .write(true)
                .open(&e)
                .ok()
                .map(|f| f.set_modified(t));
            if e.is_dir() {
                let f = fs::File::open(&e).unwrap();
                let _ = f.set_modified(t);
            }
        }
    }
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

#[test]
fn two_checkouts_with_different_mtimes_owners_and_umask_give_one_digest() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    fixture_tree(a.path(), false);
    fixture_tree(b.path(), true);
    touch_all(
        a.path(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000),
    );
    touch_all(
        b.path(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    );
    if rustix::process::geteuid().is_root() {
        for e in walk(b.path()) {
            std::os::unix::fs::lchown(&e, Some(1234), Some(5678)).unwrap();
        }
    }
    for compression in [Compression::Gzip, Compression::Zstd] {
        let mut env_a = Env::new();
        let mut env_b = Env::new();
        let out_a = env_a.build_with(
            &spec(
                BaseImage::Scratch,
                vec![copy(a.path(), "/app")],
                compression,
            ),
            "fixture:latest",
            1,
        );
        // A different thread count and working directory must not matter either.
        let cwd = std::env::current_dir().unwrap();
        std::env::set_current_dir(b.path()).unwrap();
        let out_b = env_b.build_with(
            &spec(
                BaseImage::Scratch,
                vec![copy(b.path(), "/app")],
                compression,
            ),
            "fixture:latest",
            2,
        );
        std::env::set_current_dir(cwd).unwrap();
        assert_eq!(out_a.digest, out_b.digest, "{compression:?}");
        assert_eq!(out_a.layers, out_b.layers);
    }
}

/// Pins the bytes: a dependency bump or a code change that alters any byte of a layer, the
/// config or the manifest fails here. If the change is intended, update the digests and say
/// why in the commit (every image digest users have changes with it).
#[test]
fn golden_digests_of_the_fixture() {
    let src = tempfile::tempdir().unwrap();
    fixture_tree(src.path(), false);
    let mut env = Env::new();
    let gzip = env.build(
        &spec(
            BaseImage::Scratch,
            vec![copy(src.path(), "/app")],
            Compression::Gzip,
        ),
        "fixture:gzip",
    );
    let zstd = env.build(
        &spec(
            BaseImage::Scratch,
            vec![copy(src.path(), "/app")],
            Compression::Zstd,
        ),
        "fixture:zstd",
    );
    let got = format!("gzip {}\nzstd {}\n", gzip.digest, zstd.digest);
    let want = include_str!("golden/fixture.digests");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/fixture.digests"),
            &got,
        )
        .unwrap();
    } else {
        assert_eq!(
            got, want,
            "image bytes changed; rerun with UPDATE_GOLDEN=1 if intended"
        );
    }
}

#[test]
fn rebuild_reuses_the_cache_and_one_file_change_recompresses_one_unit() {
    let src = tempfile::tempdir().unwrap();
    fixture_tree(src.path(), false);
    // Make the files look old, so the stat cache is not "racily clean".
    touch_all(src.path(), SystemTime::now() - Duration::from_secs(60));
    let s = spec(
        BaseImage::Scratch,
        vec![copy(src.path(), "/app")],
        Compression::Gzip,
    );
    let mut env = Env::new();
    let first = env.build(&s, "fixture:latest");
    assert!(!first.layers[0].cache_hit);
    let second = env.build(&s, "fixture:latest");
    assert_eq!(first.digest, second.digest);
    assert!(second.layers[0].cache_hit, "{:?}", second.layers[0]);
    assert_eq!(second.layers[0].units_compressed, 0);

    write(&src.path().join("data/text.log"), b"changed\n", 0o644);
    let third = env.build(&s, "fixture:latest");
    assert_ne!(third.digest, first.digest);
    assert_eq!(third.layers[0].units_compressed, 1, "{:?}", third.layers[0]);
    assert!(third.layers[0].units > 1);

    // The incremental result is byte-for-byte what a clean build gives.
    let mut clean = Env::new();
    assert_eq!(clean.build(&s, "fixture:latest").digest, third.digest);
}

/// Rebuilds resume hashing at the first changed unit; whatever the position of the change,
/// the result must be byte-for-byte a clean build's.
#[test]
fn resumed_rebuilds_equal_clean_builds_wherever_the_change_is() {
    let src = tempfile::tempdir().unwrap();
    for i in 0..120u64 {
        write(
            &src.path().join(format!("d{:02}/f{i:03}", i % 12)),
            &bytes(i, 300 + (i as usize * 37) % 4000),
            0o644,
        );
    }
    write(&src.path().join("d05/big"), &bytes(999, 900_000), 0o644);
    touch_all(src.path(), SystemTime::now() - Duration::from_secs(60));
    for compression in [Compression::Gzip, Compression::Zstd] {
        let s = spec(
            BaseImage::Scratch,
            vec![copy(src.path(), "/app")],
            compression,
        );
        let mut env = Env::new();
        env.build(&s, "fixture:latest");
        for (step, victim) in ["d00/f000", "d06/f042", "d05/big", "d11/f119", "d03/f003"]
            .iter()
            .enumerate()
        {
            let p = src.path().join(victim);
            let mut data = fs::read(&p).unwrap();
            data.extend_from_slice(format!("change {step}").as_bytes());
            fs::write(&p, &data).unwrap();
            let incremental = env.build(&s, "fixture:latest");
            assert!(
                incremental.layers[0].units_compressed <= 2,
                "{victim}: {:?}",
                incremental.layers[0]
            );
            let clean = Env::new().build(&s, "fixture:latest");
            assert_eq!(
                incremental.digest, clean.digest,
                "{compression:?} after changing {victim}"
            );
            assert_eq!(
                incremental.layers,
                clean
                    .layers
                    .iter()
                    .map(|l| kiln_image::LayerReport {
                        units_compressed: incremental.layers[0].units_compressed,
                        cache_hit: incremental.layers[0].cache_hit,
                        ..l.clone()
                    })
                    .collect::<Vec<_>>()
            );
            env.store
                .verify_blob(&incremental.layers[0].digest)
                .unwrap();
        }
        // The previous blob collected: the layer is rebuilt from the cached units, still right.
        env.store.untag("fixture:latest").unwrap();
        env.store.gc(&Default::default(), false).unwrap();
        let again = env.build(&s, "fixture:latest");
        assert_eq!(again.digest, Env::new().build(&s, "fixture:latest").digest);
        env.store.verify_blob(&again.layers[0].digest).unwrap();
    }
}

#[test]
fn a_layer_holds_sorted_normalised_entries() {
    let src = tempfile::tempdir().unwrap();
    fixture_tree(src.path(), true);
    fs::set_permissions(
        src.path().join("bin/app"),
        fs::Permissions::from_mode(0o4775),
    )
    .unwrap();
    let mut c = copy(src.path(), "/app");
    c.owner = kiln_spec::Owner {
        uid: 1000,
        gid: 100,
    };
    let mut env = Env::new();
    let out = env.build(
        &spec(BaseImage::Scratch, vec![c], Compression::Gzip),
        "fixture:latest",
    );
    assert_eq!(out.layers.len(), 1);
    let blob = env.store.open_blob(&out.layers[0].digest).unwrap();
    let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    let mut names = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        assert_eq!(h.mtime().unwrap(), 0, "{name}");
        assert!(h.username_bytes().is_none_or(|u| u.is_empty()), "{name}");
        let mode = h.mode().unwrap();
        match name.as_str() {
            "app" => assert_eq!(
                (h.uid().unwrap(), h.gid().unwrap(), mode),
                (1000, 100, 0o755)
            ),
            "app/bin/app" => assert_eq!(mode, 0o4755, "setuid kept, group write dropped"),
            "app/secret/key" => assert_eq!(mode, 0o600),
            // README.hardlink sorts first, so it carries the data and README.txt links to it.
            "app/README.hardlink" => {
                let mut s = String::new();
                e.read_to_string(&mut s).unwrap();
                assert_eq!(s, "hello, kiln\n");
            }
            "app/README.txt" => {
                assert_eq!(h.entry_type(), tar::EntryType::Link);
                assert_eq!(
                    e.link_name().unwrap().unwrap().to_str(),
                    Some("app/README.hardlink")
                );
            }
            "app/app-link" => assert_eq!(e.link_name().unwrap().unwrap().to_str(), Some("bin/app")),
            "app/abs-link" => {
                assert_eq!(
                    e.link_name().unwrap().unwrap().to_str(),
                    Some("/etc/hostname")
                )
            }
            _ => {}
        }
        names.push(name);
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(
        names
            .iter()
            .any(|n| n.ends_with("past-one-hundred-bytes.txt"))
    );
    assert!(
        !names.iter().any(|n| n.ends_with("skip.tmp")),
        "exclude applies"
    );
    let config = env
        .store
        .config(&env.store.manifest(&out.digest).unwrap().config.digest)
        .unwrap();
    assert_eq!(config["created"], "1970-01-01T00:00:00Z");
    assert_eq!(config["config"]["Env"][0], "MODE=test");
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        out.layers[0].diff_id.as_str()
    );

    // And it unpacks back to the same content.
    let dest = tempfile::tempdir().unwrap();
    let r = kiln_image::decompress(env.store.open_blob(&out.layers[0].digest).unwrap()).unwrap();
    let opts = UnpackOptions {
        whiteouts: WhiteoutMode::Apply,
        preserve_owners: false,
        ..UnpackOptions::default()
    };
    kiln_image::unpack(r, dest.path(), &opts).unwrap();
    assert_eq!(
        fs::read(dest.path().join("app/data/big.bin")).unwrap(),
        bytes(2, 600_000)
    );
    let a = fs::metadata(dest.path().join("app/README.txt")).unwrap();
    let b = fs::metadata(dest.path().join("app/README.hardlink")).unwrap();
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn source_date_epoch_sets_created_and_clamps_mtimes() {
    let src = tempfile::tempdir().unwrap();
    fixture_tree(src.path(), false);
    touch_all(
        src.path(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
    );
    let mut env = Env::new();
    let opts = BuildOptions {
        source_date_epoch: 1_700_000_000,
        tag: Some("fixture:latest".to_owned()),
        ..BuildOptions::default()
    };
    let s = spec(
        BaseImage::Scratch,
        vec![copy(src.path(), "/app")],
        Compression::Gzip,
    );
    let out = kiln_image::build(&s, &env.store, &mut env.cache, &opts, &mut |_| {}).unwrap();
    let info = env.store.inspect("fixture").unwrap();
    assert_eq!(info.digest, out.digest);
    assert_eq!(info.config["created"], "2023-11-14T22:13:20Z");
    let blob = env.store.open_blob(&out.layers[0].digest).unwrap();
    let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        if e.header().entry_type() == tar::EntryType::Regular {
            assert_eq!(
                e.header().mtime().unwrap(),
                1_000,
                "older than the epoch: kept"
            );
        }
    }
}
