//! End-to-end tests of the spec commands: they run the real `kiln` binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

fn kiln() -> Command {
    let mut cmd = Command::cargo_bin("kiln").unwrap();
    cmd.env_remove("KILN_STATE").env("NO_COLOR", "1");
    cmd
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("crates/spec/tests/fixtures").join(name)
}

#[test]
fn example_spec_is_valid() {
    // The example copies the release build of `hello`; scripts/test.sh builds it first.
    kiln()
        .args(["validate", "-f"])
        .arg(root().join("examples/hello/kiln.toml"))
        .assert()
        .success()
        .stdout(predicate::str::contains("ok (app hello"));
}

#[test]
fn three_mistakes_are_reported_together_with_positions() {
    let file = fixture("invalid/three-mistakes.toml");
    let assert = kiln().arg("validate").arg("-f").arg(&file).assert().code(1);
    let stderr = String::from_utf8(assert.get_output().stderr.clone()).unwrap();
    for (place, what) in [
        (
            ":8:8]",
            "service.port: must be between 1 and 65535, got 70000",
        ),
        (":10:1]", "unknown key `writeable` in [service]"),
        (":20:10]", "canary steps must end at weight 100"),
    ] {
        assert!(stderr.contains(place), "missing {place} in:\n{stderr}");
        assert!(stderr.contains(what), "missing {what} in:\n{stderr}");
    }
    assert!(stderr.contains("did you mean `writable`?"), "{stderr}");
    assert!(stderr.contains("has 3 problems"), "{stderr}");
    // A source snippet with a marker, not just a message.
    assert!(stderr.contains("port = 70000"), "{stderr}");
}

#[test]
fn three_mistakes_as_json() {
    let file = fixture("invalid/three-mistakes.toml");
    let out = kiln()
        .args(["validate", "--json", "-f"])
        .arg(&file)
        .assert()
        .code(1)
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["valid"], false);
    let got: Vec<(u64, u64, String)> = v["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["line"].as_u64().unwrap(),
                d["column"].as_u64().unwrap(),
                d["key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (8, 8, "service.port".to_owned()),
            (10, 1, "service.writeable".to_owned()),
            (20, 10, "deploy.steps[1].weight".to_owned()),
        ]
    );
}

#[test]
fn valid_json_output() {
    let out = kiln()
        .args(["--json", "validate", "-f"])
        .arg(fixture("valid/full.toml"))
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["app"], "full-app");
    assert_eq!(v["strategy"], "canary");
}

#[test]
fn missing_spec_file_fails_with_its_name() {
    kiln()
        .args(["validate", "-f", "/nonexistent/kiln.toml"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "cannot read /nonexistent/kiln.toml",
        ));
}

#[test]
fn binary_garbage_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kiln.toml");
    std::fs::write(&file, b"name = \"a\"\n\xff\xfe\x00garbage").unwrap();
    kiln()
        .arg("validate")
        .arg("-f")
        .arg(&file)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("not valid UTF-8"));
}

#[test]
fn usage_errors_exit_2() {
    kiln().arg("frobnicate").assert().code(2);
    kiln().args(["validate", "--no-such-flag"]).assert().code(2);
    kiln()
        .args(["--color", "purple", "schema"])
        .assert()
        .code(2);
    kiln().assert().code(2);
}

#[test]
fn version_and_help() {
    kiln()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("kiln "));
    kiln()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("validate").and(predicate::str::contains("--state")));
}

#[test]
fn schema_is_json_schema_for_kiln_toml() {
    let out = kiln()
        .arg("schema")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["title"], "kiln.toml");
    assert_eq!(v["additionalProperties"], false);
    assert_eq!(
        v["properties"]["service"]["properties"]["port"]["maximum"],
        65535
    );

    // The printed schema (not only the library's) validates the example and rejects the bad spec.
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.add_resource("kiln.json", v).unwrap();
    let idx = compiler.compile("kiln.json", &mut schemas).unwrap();
    let as_json = |p: &Path| -> serde_json::Value {
        let t: toml::Table = toml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        serde_json::to_value(t).unwrap()
    };
    schemas
        .validate(&as_json(&root().join("examples/hello/kiln.toml")), idx)
        .unwrap();
    assert!(
        schemas
            .validate(&as_json(&fixture("invalid/three-mistakes.toml")), idx)
            .is_err()
    );
}

#[test]
fn schema_markdown_matches_docs() {
    let out = kiln()
        .args(["schema", "--markdown"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let docs = std::fs::read_to_string(root().join("docs/config.md")).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), docs);
}

#[test]
fn init_writes_a_valid_spec_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let app_dir = dir.path().join("My App_2");
    std::fs::create_dir(&app_dir).unwrap();
    kiln()
        .current_dir(&app_dir)
        .arg("init")
        .assert()
        .success()
        .stdout(predicate::str::contains("for app my-app-2"));
    let file = app_dir.join("kiln.toml");
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains("name = \"my-app-2\""));
    kiln()
        .current_dir(&app_dir)
        .arg("validate")
        .assert()
        .success();

    std::fs::write(&file, "# mine\n").unwrap();
    kiln()
        .current_dir(&app_dir)
        .arg("init")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already exists"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "# mine\n");

    kiln()
        .current_dir(&app_dir)
        .args(["init", "-f", "other.toml", "--name", "Bad Name"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("invalid app name"));
    assert!(!app_dir.join("other.toml").exists());
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        kiln()
            .args(["completions", shell])
            .assert()
            .success()
            .stdout(predicate::str::contains("validate"));
    }
}

#[test]
fn color_follows_flags_and_no_color() {
    let bad = fixture("invalid/three-mistakes.toml");
    let esc = predicate::str::contains("\x1b[");
    kiln()
        .args(["--color", "always", "validate", "-f"])
        .arg(&bad)
        .assert()
        .code(1)
        .stderr(esc.clone());
    // Not a terminal, and NO_COLOR is set by kiln(): no escapes.
    kiln()
        .args(["validate", "-f"])
        .arg(&bad)
        .assert()
        .code(1)
        .stderr(esc.not());
}
