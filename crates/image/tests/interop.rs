#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The store and exports against the real tools: skopeo and umoci read the store, and a
//! docker-archive export loads with `docker load` and runs with `docker run`.
//!
//! Off CI a missing tool skips its test (with a note); with `CI=true` a missing tool or a
//! stopped dockerd fails it. CI installs `skopeo umoci docker.io` and starts `dockerd`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use kiln_image::archive::{self, ExportFormat};
use kiln_spec::{BaseImage, Compression};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tool` can be used; in CI its absence is a failure, not a skip.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(!in_ci(), "CI must install {tool}");
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

fn docker() -> Option<String> {
    // Debian's docker.io client matches its dockerd; prefer it over a newer client.
    let bin = if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    };
    if !have(bin) {
        return None;
    }
    let up = Command::new(bin)
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    if !up.is_ok_and(|o| o.status.success()) {
        assert!(!in_ci(), "CI must start dockerd");
        eprintln!("skipped: dockerd is not running");
        return None;
    }
    Some(bin.to_owned())
}

/// An image that runs on scratch: /bin/echo with its shared-library closure.
fn echo_image(env: &mut Env, tag: &str, compression: Compression) -> kiln_image::BuildOutput {
    let mut c = copy(Path::new("/bin/echo"), "/echo");
    c.closure = true;
    c.exclude.clear();
    let mut s = spec(BaseImage::Scratch, vec![c], compression);
    s.entrypoint = Some(vec!["/echo".to_owned(), "hello from kiln".to_owned()]);
    s.workdir = None;
    env.build(&s, tag)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn skopeo_reads_the_store() {
    if !have("skopeo") {
        return;
    }
    let mut env = Env::new();
    let out = echo_image(&mut env, "hello:latest", Compression::Gzip);
    let root = env.store.root().display().to_string();
    let json = run(Command::new("skopeo").args(["inspect", &format!("oci:{root}:hello:latest")]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["Digest"], out.digest.as_str());
    assert_eq!(v["Layers"][0], out.layers[0].digest.as_str());
    // skopeo can copy it out, and kiln imports the copy back with the same digest.
    let copy_dir = env.path().join("skopeo-copy");
    run(Command::new("skopeo").args([
        "copy",
        &format!("oci:{root}:hello:latest"),
        &format!("oci:{}:copied", copy_dir.display()),
    ]));
    let other = Env::new();
    let imported = archive::import(&other.store, &copy_dir).unwrap();
    assert_eq!(imported[0].manifest.digest, out.digest);
}

#[test]
fn umoci_unpacks_the_store() {
    if !have("umoci") {
        return;
    }
    for compression in [Compression::Gzip, Compression::Zstd] {
        let mut env = Env::new();
        echo_image(&mut env, "hello:latest", compression);
        let bundle = env.path().join("bundle");
        let image = format!("{}:hello:latest", env.store.root().display());
        let mut cmd = Command::new("umoci");
        cmd.args(["unpack", "--image", &image, bundle.to_str().unwrap()]);
        if !rustix::process::geteuid().is_root() {
            cmd.arg("--rootless");
        }
        let out = cmd.output().unwrap();
        if compression == Compression::Zstd && !out.status.success() {
            // Older umoci builds do not read zstd layers; gzip is the interop format.
            eprintln!("note: this umoci does not read zstd layers");
            continue;
        }
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(bundle.join("rootfs/echo").is_file());
        assert!(bundle.join("config.json").is_file());
    }
}

#[test]
fn docker_loads_and_runs_a_docker_archive_export() {
    let Some(docker) = docker() else { return };
    let mut env = Env::new();
    let out = echo_image(&mut env, "kiln-interop-test:latest", Compression::Gzip);
    let tarball = env.path().join("image.tar");
    archive::export(
        &env.store,
        "kiln-interop-test",
        ExportFormat::DockerArchive,
        &tarball,
    )
    .unwrap();
    let loaded = run(Command::new(&docker).args(["load", "-i", tarball.to_str().unwrap()]));
    assert!(loaded.contains("kiln-interop-test:latest"), "{loaded}");
    let said = run(Command::new(&docker).args(["run", "--rm", "kiln-interop-test:latest"]));
    assert_eq!(said.trim(), "hello from kiln");
    // Docker's image id is the config digest: the same bytes kiln wrote.
    let id = run(Command::new(&docker).args([
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        "kiln-interop-test:latest",
    ]));
    assert_eq!(id.trim(), out.config.as_str());

    // What `docker save` writes (uncompressed layers here) imports, and serves as a base.
    let saved = env.path().join("saved.tar");
    run(Command::new(&docker).args([
        "save",
        "-o",
        saved.to_str().unwrap(),
        "kiln-interop-test:latest",
    ]));
    let mut other = Env::new();
    let imported = archive::import(&other.store, &saved).unwrap();
    assert_eq!(
        imported[0].tags,
        vec!["kiln-interop-test:latest".to_owned()]
    );
    let info = other.store.inspect("kiln-interop-test").unwrap();
    assert_eq!(
        info.config["rootfs"]["diff_ids"][0],
        out.layers[0].diff_id.as_str()
    );
    let app = env.path().join("app");
    write(&app.join("note"), b"on top of a docker base\n", 0o644);
    let mut s = spec(
        BaseImage::DockerArchive(saved),
        vec![copy(&app, "/srv")],
        Compression::Gzip,
    );
    s.entrypoint = None;
    s.workdir = None;
    let layered = other.build(&s, "layered:latest");
    assert_eq!(layered.layers.len(), 2);
    let cfg = other.store.inspect("layered").unwrap().config;
    assert_eq!(
        cfg["config"]["Entrypoint"][1], "hello from kiln",
        "inherited from the base"
    );
    let _ = Command::new(&docker)
        .args(["rmi", "-f", "kiln-interop-test:latest"])
        .output();
}
