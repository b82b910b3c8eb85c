//! The deploy policy, enforced by the daemon (real `kiln serve`, real runc instances): an
//! apply of an unsigned or foreign-signed image, or one without the attestations a policy
//! requires, is refused through the CLI and through the raw API alike, with a
//! `policy.refused` event naming the missing proof; a signed one runs. The check is made
//! again before every instance create, so a store whose signature was tampered with gets no
//! new instance; and a stricter daemon policy never stops a release that already runs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "policy-token";

fn key_generate(state: &Path, path: &Path) -> String {
    kiln(state)
        .args(["key", "generate"])
        .arg(path)
        .assert()
        .success();
    let public = format!("{}.pub", path.display());
    std::fs::read_to_string(public).unwrap().trim().to_owned()
}

fn sign(state: &Path, image: &str, key: &Path) {
    kiln(state)
        .args(["sign", image, "--key"])
        .arg(key)
        .assert()
        .success();
}

/// `kiln apply`'s exit code and stderr.
fn try_apply(state: &Path, spec: &Path, image: &str) -> (i32, String) {
    let out = kiln(state)
        .args(["apply", "-f"])
        .arg(spec)
        .args(["--image", image])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn refusals(state: &Path) -> Vec<Value> {
    history(state)
        .into_iter()
        .filter(|e| e["kind"] == "policy.refused")
        .collect()
}

/// A raw API call over TCP with the token: the status and the body.
fn raw_call(port: u16, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (_, text) = out.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(text).unwrap_or(Value::Null))
}

#[test]
fn the_daemon_runs_only_what_its_policy_and_the_specs_allow() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();

    let ops_key = dir.path().join("ops.key");
    let ops_pub = key_generate(&state, &ops_key);
    let other_key = dir.path().join("other.key");
    key_generate(&state, &other_key);

    // A malformed daemon policy stops `kiln serve` before it starts, naming the problem.
    let bad = dir.path().join("bad-policy.toml");
    std::fs::write(&bad, "[policy]\nrequire = [\"signed\"]\n").unwrap();
    let out = kiln(&state)
        .args(["serve", "--policy"])
        .arg(&bad)
        .timeout(Duration::from_secs(30))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown proof \"signed\""), "{err}");

    let daemon_policy = dir.path().join("policy.toml");
    std::fs::write(
        &daemon_policy,
        format!("[policy]\nkeys = [\"{ops_pub}\"]\nrequire = [\"signature\"]\n"),
    )
    .unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let api_port = free_port();
    let api = format!("127.0.0.1:{api_port}");
    let policy_arg = daemon_policy.to_str().unwrap();
    let mut daemon = Daemon::start_with(
        &state,
        &[
            "--policy",
            policy_arg,
            "--api-listen",
            &api,
            "--token-file",
            token.to_str().unwrap(),
        ],
    );

    let port = free_port();
    let spec = write_spec_with(
        &project,
        port,
        "HELLO_VERSION = \"v1\"",
        1,
        "[deploy]\nprogress_deadline = \"1m\"\n\n[policy]\nrequire = [\"provenance\", \"sbom\"]\n",
    );
    let image = build(&state, &spec);

    // Unsigned: refused by the daemon's policy; nothing is recorded but the refusal.
    let (code, err) = try_apply(&state, &spec, &image);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no signature by a trusted key"), "{err}");
    assert!(err.contains("daemon policy"), "{err}");
    let refused = refusals(&state);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["data"]["policy"], "daemon");
    assert_eq!(refused[0]["data"]["release"], Value::Null);
    assert_eq!(refused[0]["data"]["image"], image.as_str());
    assert_eq!(
        refused[0]["data"]["missing"],
        json!(["no signature by a trusted key"])
    );
    kiln(&state).args(["status", "web"]).assert().failure();

    // The raw API is refused alike, whatever the client claims.
    let spec_parsed = kiln_spec::Spec::load(&spec).unwrap();
    let mut config =
        serde_json::to_value(kiln_control::ReleaseConfig::from_spec(&spec_parsed)).unwrap();
    // A client cannot send its own daemon policy in place of the daemon's.
    config["daemon_policy"] = json!({});
    let (code, answer) = raw_call(
        api_port,
        "POST",
        "/v1/apps/web/releases",
        &json!({"image": image, "config": config, "spec_digest": "sha256:x",
                "source_commit": null, "actor": "raw-api"}),
    );
    assert_eq!(code, 403, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("no signature by a trusted key"),
        "{answer}"
    );
    assert_eq!(refusals(&state).len(), 2);

    // Over TCP, what no signature vouches for cannot be handed to the daemon.
    let store = kiln_image::Store::open(state.join("images")).unwrap();
    let digest = kiln_image::Digest::parse(&image).unwrap();
    let unsigned = store
        .referrers(&digest)
        .unwrap()
        .into_iter()
        .find(|r| r.artifact_type == kiln_image::attest::ARTIFACT_IN_TOTO)
        .unwrap();
    let upload = json!({
        "artifact_type": unsigned.artifact_type,
        "payload_media_type": unsigned.payload_media_type,
        "payload": String::from_utf8(store.read_blob(&unsigned.payload).unwrap()).unwrap(),
        "annotations": unsigned.annotations,
    });
    let path = format!("/v1/images/{image}/referrers");
    let (code, answer) = raw_call(api_port, "PUT", &path, &upload);
    assert_eq!(code, 403, "{answer}");
    // Nor in an envelope, signed by no key (or by the client's own): a policy without keys
    // would count it on the store's word (regression, review of issue 18).
    let statement = store.read_blob(&unsigned.payload).unwrap();
    let envelope = kiln_sign::dsse::Envelope {
        payload_type: "application/vnd.in-toto+json".to_owned(),
        payload: statement,
        signatures: Vec::new(),
    };
    let upload = json!({
        "artifact_type": kiln_image::attest::ARTIFACT_DSSE,
        "payload_media_type": kiln_image::attest::ARTIFACT_DSSE,
        "payload": String::from_utf8(envelope.to_json()).unwrap(),
        "annotations": unsigned.annotations,
    });
    let (code, answer) = raw_call(api_port, "PUT", &path, &upload);
    assert_eq!(code, 403, "{answer}");

    // Signed by a key the daemon does not trust: still refused.
    sign(&state, &image, &other_key);
    let (code, err) = try_apply(&state, &spec, &image);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no signature by a trusted key"), "{err}");
    kiln(&state)
        .args(["verify", &image, "--policy", policy_arg, "-f"])
        .arg(&spec)
        .assert()
        .code(1)
        .stdout(predicates::str::contains("no signature by a trusted key"));

    // Signed by the trusted key: it passes both policies and runs.
    sign(&state, &image, &ops_key);
    let shown = kiln(&state)
        .args(["verify", &image, "--policy", policy_arg, "-f"])
        .arg(&spec)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let shown = String::from_utf8(shown).unwrap();
    assert!(
        shown.contains("signature: ok, by trusted key SHA256:"),
        "{shown}"
    );
    assert!(shown.contains("provenance: signed by SHA256:"), "{shown}");
    assert!(shown.contains("sbom: signed by SHA256:"), "{shown}");
    apply(&state, &spec, &image);
    wait_until(&state, Duration::from_secs(60), |s| routed(s).len() == 1);
    let served = raw_get(format!("127.0.0.1:{port}").parse().unwrap(), "kiln", "/");
    assert!(served.contains("v1"), "{served}");

    // A stricter daemon policy (a key nobody used) takes effect with the next release: the
    // running one keeps running and is scaled as before.
    daemon.kill();
    let third_key = dir.path().join("third.key");
    key_generate(&state, &third_key);
    std::fs::write(
        &daemon_policy,
        "[policy]\nkeys = [\"third.key.pub\"]\nrequire = [\"signature\", \"tested\"]\n",
    )
    .unwrap();
    daemon.spawn();
    kiln(&state).args(["scale", "web", "2"]).assert().success();
    wait_until(&state, Duration::from_secs(60), |s| routed(s).len() == 2);
    let (code, err) = try_apply(&state, &spec, &image);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no signature by a trusted key; no passed test attestation"),
        "{err}"
    );

    // The store's signature tampered with: the next create of the running release is
    // refused, with the release named, and no instance is made.
    daemon.kill();
    std::fs::write(
        &daemon_policy,
        format!("[policy]\nkeys = [\"{ops_pub}\"]\nrequire = [\"signature\"]\n"),
    )
    .unwrap();
    for r in store.referrers(&digest).unwrap() {
        if r.artifact_type == kiln_image::attest::ARTIFACT_SIGNATURE {
            std::fs::write(store.blob_path(&r.payload), b"tampered").unwrap();
        }
    }
    daemon.spawn();
    kiln(&state).args(["scale", "web", "3"]).assert().success();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !refusals(&state)
        .iter()
        .any(|e| e["data"]["release"] == 1 && e["data"]["actor"] == "reconciler")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no create was refused: {:#?}",
            history(&state)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let instances = status(&state)["instances"].as_array().unwrap().len();
    assert_eq!(instances, 2, "no instance was made for the refused create");
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "kiln test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "kiln test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `kiln verify IMAGE -f SPEC`: its exit code and stdout.
fn verify_image(state: &Path, image: &str, spec: &Path) -> (i32, String) {
    let out = kiln(state)
        .args(["verify", image, "-f"])
        .arg(spec)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_source_rule_reads_the_git_work_tree_the_build_saw() {
    if std::process::Command::new("git")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(std::env::var_os("CI").is_none(), "git is missing under CI");
        eprintln!("note: skipped, no git");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let spec = write_spec_with(
        &project,
        free_port(),
        "HELLO_VERSION = \"v1\"",
        1,
        "[policy]\nsource = \"git-clean\"\n",
    );

    // Not a git work tree: the provenance names no commit.
    let state = dir.path().join("state-plain");
    let image = build(&state, &spec);
    let (code, shown) = verify_image(&state, &image, &spec);
    assert_eq!(code, 1, "{shown}");
    assert!(shown.contains("source: not a git work tree"), "{shown}");
    assert!(
        shown.contains("source must be git-clean: the provenance names no git commit"),
        "{shown}"
    );

    // A clean commit passes.
    git(&project, &["init", "-q", "-b", "main"]);
    git(&project, &["add", "-A"]);
    git(&project, &["commit", "-q", "-m", "v1"]);
    let commit = git(&project, &["rev-parse", "HEAD"]);
    let state = dir.path().join("state-clean");
    let image = build(&state, &spec);
    let (code, shown) = verify_image(&state, &image, &spec);
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains(&format!("source: git {commit}, clean")),
        "{shown}"
    );

    // An untracked file makes the same commit's build dirty, and the policy says so.
    std::fs::write(project.join("notes.txt"), "todo\n").unwrap();
    let state = dir.path().join("state-dirty");
    let image = build(&state, &spec);
    let (code, shown) = verify_image(&state, &image, &spec);
    assert_eq!(code, 1, "{shown}");
    assert!(
        shown.contains(&format!(
            "source must be git-clean: commit {commit} was built from a work tree with changes"
        )),
        "{shown}"
    );

    // The same image built again from the clean tree gains a clean provenance beside it.
    std::fs::remove_file(project.join("notes.txt")).unwrap();
    assert_eq!(
        build(&state, &spec),
        image,
        "the image does not depend on the notes"
    );
    let (code, shown) = verify_image(&state, &image, &spec);
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains(&format!("source: git {commit}, clean")),
        "{shown}"
    );
}
