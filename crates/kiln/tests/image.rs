//! End-to-end tests of the image commands (`build`, `images`, `image inspect|export|import`,
//! `gc`): they run the real `kiln` binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use assert_cmd::Command;
use predicates::prelude::*;

fn kiln(state: &Path) -> Command {
    let mut cmd = Command::cargo_bin("kiln").unwrap();
    cmd.env_remove("KILN_STATE")
        .env_remove("SOURCE_DATE_EPOCH")
        .env("NO_COLOR", "1")
        .arg("--state")
        .arg(state);
    cmd
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The example's binary when built (scripts/test.sh builds it), else a stand-in file: the
/// reproducibility property does not depend on what the bytes are.
fn payload() -> Vec<u8> {
    let hello = root().join("target/x86_64-unknown-linux-gnu/release/hello");
    fs::read(hello).unwrap_or_else(|_| b"#!/bin/sh\necho hello\n".repeat(1000))
}

/// A checkout of a small app: kiln.toml, the binary and a static directory. `loose` makes
/// it look like a checkout made with umask 002 at another time by another user.
fn checkout(dir: &Path, loose: bool) -> PathBuf {
    let (f, x) = if loose {
        (0o664, 0o775)
    } else {
        (0o644, 0o755)
    };
    fs::create_dir_all(dir.join("static/css")).unwrap();
    fs::write(dir.join("hello"), payload()).unwrap();
    fs::set_permissions(dir.join("hello"), fs::Permissions::from_mode(x)).unwrap();
    for (p, body) in [
        ("static/index.html", "<h1>hi</h1>\n"),
        ("static/css/site.css", "h1{}\n"),
    ] {
        fs::write(dir.join(p), body).unwrap();
        fs::set_permissions(dir.join(p), fs::Permissions::from_mode(f)).unwrap();
    }
    fs::write(
        dir.join("kiln.toml"),
        r#"name = "hello"

[image]
base = "scratch"
entrypoint = ["/hello"]
env = { HELLO_VERSION = "v1" }

[[image.copy]]
from = "hello"
to = "/hello"

[[image.copy]]
from = "static"
to = "/srv/static"

[service]
port = 8080

[route]
listen = "127.0.0.1:18097"
"#,
    )
    .unwrap();
    let when = SystemTime::now() - Duration::from_secs(if loose { 86_400 } else { 60 });
    for p in ["hello", "static/index.html", "static/css/site.css"] {
        fs::File::options()
            .write(true)
            .open(dir.join(p))
            .unwrap()
            .set_modified(when)
            .unwrap();
    }
    if loose && is_root() {
        for p in [
            "hello",
            "static",
            "static/index.html",
            "static/css",
            "static/css/site.css",
        ] {
            std::os::unix::fs::lchown(dir.join(p), Some(4242), Some(4242)).unwrap();
        }
    }
    dir.join("kiln.toml")
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn build(state: &Path, spec: &Path) -> String {
    let out = kiln(state)
        .args(["build", "-f"])
        .arg(spec)
        .assert()
        .success();
    String::from_utf8(out.get_output().stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn two_checkouts_build_to_one_digest_and_the_store_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let a = checkout(&dir.path().join("a"), false);
    let b = checkout(&dir.path().join("b"), true);
    let (sa, sb) = (dir.path().join("state-a"), dir.path().join("state-b"));
    let da = build(&sa, &a);
    let db = build(&sb, &b);
    assert!(da.starts_with("sha256:") && da.len() == 71, "{da}");
    assert_eq!(
        da, db,
        "same inputs, different mtimes/owners/umask: one digest"
    );

    // --json: digest, size, layers; a rebuild is all cache hits.
    let out = kiln(&sa)
        .args(["--json", "build", "-f"])
        .arg(&a)
        .assert()
        .success();
    let v: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(v["digest"], da.as_str());
    assert!(v["size"].as_u64().unwrap() > 0);
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    assert!(
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["cache_hit"] == true)
    );

    // images, inspect.
    kiln(&sa)
        .arg("images")
        .assert()
        .success()
        .stdout(predicate::str::contains("hello:latest").and(predicate::str::contains(&da[7..19])));
    let out = kiln(&sa)
        .args(["--json", "image", "inspect", "hello"])
        .assert()
        .success();
    let info: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(info["digest"], da.as_str());
    assert_eq!(info["config"]["config"]["Entrypoint"][0], "/hello");

    // export → import into another store keeps the digest, for each archive format.
    for format in ["oci", "oci-archive", "docker-archive"] {
        let target = dir.path().join(format!("export-{format}"));
        kiln(&sa)
            .args(["image", "export", "hello", "--format", format, "-o"])
            .arg(&target)
            .assert()
            .success();
        let other = dir.path().join(format!("state-{format}"));
        let out = kiln(&other)
            .arg("image")
            .arg("import")
            .arg(&target)
            .assert()
            .success();
        let said = String::from_utf8(out.get_output().stdout.clone()).unwrap();
        if format == "docker-archive" {
            // docker-archive carries the config and layers, not the manifest: same layers.
            let out = kiln(&other)
                .args(["--json", "image", "inspect", "hello"])
                .assert()
                .success();
            let got: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
            assert_eq!(got["manifest"]["layers"], info["manifest"]["layers"]);
            assert_eq!(got["manifest"]["config"], info["manifest"]["config"]);
        } else {
            assert!(said.contains(&da), "{format}: {said}");
        }
    }
    let rootfs = dir.path().join("rootfs");
    kiln(&sa)
        .args(["image", "export", "hello", "--format", "rootfs", "-o"])
        .arg(&rootfs)
        .assert()
        .success();
    assert_eq!(fs::read(rootfs.join("hello")).unwrap(), payload());
    assert_eq!(
        fs::read_to_string(rootfs.join("srv/static/index.html")).unwrap(),
        "<h1>hi</h1>\n"
    );

    // gc: a changed build untags the old image; dry run lists it, gc removes it.
    fs::write(dir.path().join("a/static/index.html"), "<h1>v2</h1>\n").unwrap();
    let d2 = build(&sa, &a);
    assert_ne!(d2, da);
    kiln(&sa)
        .args(["gc", "--dry-run"])
        .assert()
        .success()
        .stdout(predicate::str::contains("would remove").and(predicate::str::contains(&da)));
    // Retained (a release to roll back to): kept. (What goes is only the superseded
    // referrers indexes each attachment leaves behind.)
    kiln(&sa)
        .args(["gc", "--retain", &da])
        .assert()
        .success()
        .stdout(predicate::str::contains(&da).not());
    kiln(&sa).args(["image", "inspect", &da]).assert().success();
    kiln(&sa).arg("gc").assert().success();
    kiln(&sa)
        .args(["image", "inspect", &da])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no image"));
    kiln(&sa)
        .args(["image", "inspect", "hello"])
        .assert()
        .success()
        .stdout(predicate::str::contains(&d2));
}

#[test]
fn usage_and_failures_have_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    kiln(&state)
        .args(["image", "export", "x", "--format", "tarball", "-o", "out"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("tarball"));
    kiln(&state)
        .args(["image", "inspect", "nope:latest"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no image \"nope:latest\""));
    kiln(&state)
        .args(["image", "import"])
        .arg(dir.path())
        .assert()
        .code(1)
        .stderr(predicate::str::contains("not an OCI image layout"));
    kiln(&state)
        .args(["build", "-f"])
        .arg(dir.path().join("missing.toml"))
        .assert()
        .code(1);
}
