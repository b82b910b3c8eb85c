#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Bases (oci, docker-archive, rootfs dir and tarball), export and import round trips, and
//! the shared-library closure.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use kiln_image::archive::{self, ExportFormat};
use kiln_spec::{BaseImage, Compression, OciReference};

fn base_image(env: &mut Env) -> kiln_image::BuildOutput {
    let src = env.path().join("base-src");
    write(&src.join("etc/os-release"), b"ID=fixture\n", 0o644);
    write(&src.join("bin/tool"), &bytes(9, 4000), 0o755);
    let mut s = spec(BaseImage::Scratch, vec![copy(&src, "/")], Compression::Gzip);
    s.env.insert("BASE_ONLY".to_owned(), "1".to_owned());
    s.cmd = Some(vec!["--serve".to_owned()]);
    env.build(&s, "base:v1")
}

fn app_src(env: &Env) -> std::path::PathBuf {
    let src = env.path().join("app-src");
    write(&src.join("app"), &bytes(10, 3000), 0o755);
    src
}

fn check_inherits(env: &Env, base: &kiln_image::BuildOutput, out: &kiln_image::BuildOutput) {
    assert_eq!(out.layers.len(), base.layers.len() + 1);
    for (b, o) in base.layers.iter().zip(&out.layers) {
        assert_eq!(b.digest, o.digest, "base layers are reused as-is");
        assert_eq!(b.diff_id, o.diff_id);
    }
    let cfg = env.store.inspect(out.digest.as_str()).unwrap().config;
    let envs: Vec<&str> = cfg["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(envs.contains(&"BASE_ONLY=1"), "{envs:?}");
    assert!(envs.contains(&"MODE=test"));
    assert_eq!(cfg["config"]["Entrypoint"][0], "/app/bin/app");
    assert!(
        cfg["config"].get("Cmd").is_none(),
        "a new entrypoint drops the base's cmd"
    );
    assert_eq!(
        cfg["rootfs"]["diff_ids"].as_array().unwrap().len(),
        out.layers.len()
    );
    assert_eq!(cfg["history"].as_array().unwrap().len(), out.layers.len());
}

#[test]
fn an_oci_layout_base_by_tag_and_by_digest() {
    let mut env = Env::new();
    let base = base_image(&mut env);
    let layout = env.path().join("exported-layout");
    archive::export(&env.store, "base:v1", ExportFormat::Oci, &layout).unwrap();
    let mut other = Env::new();
    let src = app_src(&env);
    for reference in [
        Some(OciReference::Tag("base:v1".to_owned())),
        Some(OciReference::Digest(base.digest.as_str().to_owned())),
        None,
    ] {
        let s = spec(
            BaseImage::Oci {
                path: layout.clone(),
                reference,
            },
            vec![copy(&src, "/app")],
            Compression::Gzip,
        );
        let out = other.build(&s, "app:latest");
        check_inherits(&other, &base, &out);
    }
    let s = spec(
        BaseImage::Oci {
            path: layout,
            reference: Some(OciReference::Tag("nope".to_owned())),
        },
        vec![],
        Compression::Gzip,
    );
    let err = kiln_image::build(
        &s,
        &other.store,
        &mut other.cache,
        &Default::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("no image tagged \"nope\""),
        "{err}"
    );
}

#[test]
fn a_docker_archive_base_and_import() {
    let mut env = Env::new();
    let base = base_image(&mut env);
    let tarball = env.path().join("base.docker.tar");
    archive::export(&env.store, "base:v1", ExportFormat::DockerArchive, &tarball).unwrap();
    let mut other = Env::new();
    let src = app_src(&env);
    let s = spec(
        BaseImage::DockerArchive(tarball.clone()),
        vec![copy(&src, "/app")],
        Compression::Gzip,
    );
    let out = other.build(&s, "app:latest");
    check_inherits(&other, &base, &out);
    // Import tags what the archive names.
    let third = Env::new();
    let imported = archive::import(&third.store, &tarball).unwrap();
    assert_eq!(imported[0].tags, vec!["base:v1".to_owned()]);
    assert_eq!(
        third.store.inspect("base:v1").unwrap().manifest.layers[0].digest,
        base.layers[0].digest
    );
}

#[test]
fn oci_archive_round_trip_keeps_the_digest() {
    let mut env = Env::new();
    let base = base_image(&mut env);
    let tarball = env.path().join("base.oci.tar");
    archive::export(&env.store, "base:v1", ExportFormat::OciArchive, &tarball).unwrap();
    let first = fs::read(&tarball).unwrap();
    let other = Env::new();
    let imported = archive::import(&other.store, &tarball).unwrap();
    assert_eq!(imported[0].manifest.digest, base.digest);
    assert_eq!(other.store.resolve("base:v1").unwrap().digest, base.digest);
    // Exports are deterministic too.
    let again = env.path().join("again.oci.tar");
    archive::export(&env.store, "base:v1", ExportFormat::OciArchive, &again).unwrap();
    assert_eq!(fs::read(&again).unwrap(), first);
    // An OCI layout directory imports as well.
    let layout = env.path().join("layout");
    archive::export(&env.store, "base:v1", ExportFormat::Oci, &layout).unwrap();
    let fourth = Env::new();
    assert_eq!(
        archive::import(&fourth.store, &layout).unwrap()[0]
            .manifest
            .digest,
        base.digest
    );
    // Refuses to overwrite.
    assert!(archive::export(&env.store, "base:v1", ExportFormat::OciArchive, &tarball).is_err());
}

#[test]
fn rootfs_bases_from_a_directory_and_a_tarball_agree() {
    let mut env = Env::new();
    base_image(&mut env);
    let rootfs = env.path().join("rootfs");
    archive::export(&env.store, "base:v1", ExportFormat::Rootfs, &rootfs).unwrap();
    assert_eq!(
        fs::read(rootfs.join("etc/os-release")).unwrap(),
        b"ID=fixture\n"
    );
    // Tar the exported rootfs (with the system tar, as a user would) and use both as bases.
    let tarball = env.path().join("rootfs.tar.gz");
    let st = std::process::Command::new("tar")
        .args([
            "-czf",
            tarball.to_str().unwrap(),
            "-C",
            rootfs.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let src = app_src(&env);
    let mut digests = Vec::new();
    for b in [
        BaseImage::Rootfs(rootfs.clone()),
        BaseImage::Rootfs(tarball),
    ] {
        let mut e = Env::new();
        let out = e.build(
            &spec(b, vec![copy(&src, "/app")], Compression::Gzip),
            "app:latest",
        );
        assert_eq!(out.layers.len(), 2);
        assert_eq!(out.layers[0].source, "base rootfs");
        digests.push(out.digest);
    }
    assert_eq!(
        digests[0], digests[1],
        "a directory and its tarball give one image"
    );
}

#[test]
fn closure_copies_the_loader_and_libraries_of_a_dynamic_binary() {
    let ls = Path::new("/bin/ls");
    if !ls.exists() {
        eprintln!("skipped: no /bin/ls");
        return;
    }
    let mut env = Env::new();
    let mut c = copy(ls, "/bin/ls");
    c.closure = true;
    c.exclude.clear();
    let out = env.build(
        &spec(BaseImage::Scratch, vec![c], Compression::Gzip),
        "ls:latest",
    );
    let dest = env.path().join("rootfs");
    archive::export(&env.store, "ls", ExportFormat::Rootfs, &dest).unwrap();
    assert!(out.layers[0].files > 3);
    // The loader named by PT_INTERP and libc resolve inside the rootfs.
    let interp = dest.join("lib64/ld-linux-x86-64.so.2");
    assert!(fs::symlink_metadata(&interp).is_ok(), "loader path present");
    let found_libc = [
        "lib/x86_64-linux-gnu/libc.so.6",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
    ]
    .iter()
    .any(|p| fs::symlink_metadata(dest.join(p)).is_ok());
    assert!(found_libc);
    // Copying a non-ELF file with closure is a clear error.
    let txt = env.path().join("note.txt");
    fs::write(&txt, b"text").unwrap();
    let mut c = copy(&txt, "/note");
    c.closure = true;
    let s = spec(BaseImage::Scratch, vec![c], Compression::Gzip);
    let err = kiln_image::build(
        &s,
        &env.store,
        &mut env.cache,
        &Default::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("needs an ELF binary"), "{err}");
}
