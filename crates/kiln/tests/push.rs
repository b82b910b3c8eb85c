//! End-to-end tests of pushing kiln's images to a registry the user names (`kiln image push`,
//! the code the swarm provider runs for `[target] registry`), driving the real `kiln` binary
//! against a REAL registry, the CNCF distribution registry Debian packages as
//! `docker-registry`, run by the test on a free loopback port with a storage directory of its
//! own; then the host's Docker Engine pulls the image back by digest and reports kiln's config
//! digest as its ID. A second push of the same image sends nothing (the registry's access log
//! says so), an image that shares its layer sends only its config, a signed image's
//! signature and attestations go along as referrers under the OCI referrers-tag fallback (which
//! `skopeo copy --all` then carries by tag), and hostile registries (a
//! wrong `Docker-Content-Digest`, a 500, a redirect loop, an upload `Location` with a query of
//! its own) give clear errors, never a panic.
//!
//! Needs root, a Docker Engine answering on its socket, `docker-registry`, skopeo, curl (installed by
//! scripts/ci-setup.sh) and the example binary built (`cargo build --release -p hello`); with
//! `CI=true` a missing prerequisite fails the test. Every image the engine pulls is unique to
//! the test (a layer path of its own) and removed by its exact reference afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::distribution::{Distribution, distribution_available, host_address};
use common::*;

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn prerequisites(what: &str, engine_needed: bool) -> bool {
    let registry = distribution_available();
    let engine = !engine_needed || works("docker", &["info", "--format", "{{.ServerVersion}}"]);
    let hello = hello_binary().exists();
    if registry && engine && hello {
        return true;
    }
    let why = format!(
        "docker-registry={registry} docker engine={engine} hello built={hello} \
         (apt-get install docker-registry; cargo build --release -p hello)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the prerequisites of {what} are missing: {why}");
    }
    eprintln!("note: skipping {what} ({why})");
    false
}

/// A spec whose image is this test's own: the example binary under `/<stamp>/`, so its layer
/// is shared with no other image of the engine; `env` goes into the image config only.
fn unique_spec(dir: &Path, stamp: &str, env: &str) -> PathBuf {
    let spec = dir.join(format!("kiln-{env}.toml"));
    std::fs::write(
        &spec,
        format!(
            "name = \"push{stamp}\"\n\n[image]\nentrypoint = [\"/{stamp}/hello\"]\n\
             env = {{ FLAVOUR = \"{env}\" }}\n\n\
             [[image.copy]]\nfrom = {hello:?}\nto = \"/{stamp}/hello\"\nallow_outside = true\n\n\
             [service]\nreplicas = 1\n",
            hello = hello_binary()
        ),
    )
    .unwrap();
    spec
}

fn stamp() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}x{nanos}", std::process::id())
}

/// `kiln build --no-attest`: an image without referrers, so a push sends the image alone.
fn build_bare(state: &Path, spec: &Path) -> String {
    let out = kiln(state)
        .args(["build", "-q", "--no-attest", "-f"])
        .arg(spec)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap().trim().to_owned()
}

/// The config and layer digests of a stored image.
fn parts(state: &Path, image: &str) -> (String, Vec<String>) {
    let out = kiln(state)
        .args(["image", "inspect", image, "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let config = v["manifest"]["config"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let layers = v["manifest"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    (config, layers)
}

/// `kiln image push --json`'s report.
fn push(state: &Path, image: &str, repository: &str) -> serde_json::Value {
    let out = kiln(state)
        .args(["image", "push", image, repository, "--json"])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln image push {image} {repository}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A failed `kiln image push`: its exit code and stderr.
fn push_fails(state: &Path, image: &str, repository: &str) -> (Option<i32>, String) {
    let out: Output = kiln(state)
        .args(["image", "push", image, repository])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "kiln panicked: {stderr}");
    (out.status.code(), stderr)
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap()
}

/// An image reference this test pulled into the engine: removed (that reference only) on drop.
struct Pulled(String);

impl Drop for Pulled {
    fn drop(&mut self) {
        let _ = docker(&["rmi", &self.0]);
    }
}

#[test]
fn push_to_a_real_registry_then_the_engine_pulls_it_by_digest() {
    if !prerequisites("the push test", true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let registry = Distribution::start(&dir.path().join("registry"));
    let stamp = stamp();
    let image = build_bare(&state, &unique_spec(dir.path(), &stamp, "a"));
    let (config, layers) = parts(&state, &image);
    let host = registry.addr.to_string();
    let repository = format!("{host}/team/push{stamp}");
    // How the registry logs a request: `http.request.method=PUT … http.request.uri="/v2/…"`.
    let put = "http.request.method=PUT";
    let name = format!("http.request.uri=\"/v2/team/push{stamp}/");

    let first = push(&state, &image, &repository);
    assert_eq!(first["reference"], format!("{repository}@{image}"));
    assert_eq!(first["blobs_sent"], 1 + layers.len(), "{first}");
    assert_eq!(first["blobs_present"], 0, "{first}");
    assert_eq!(first["manifests_sent"], 1, "{first}");
    // The registry's own word: one upload per blob, each a single monolithic PUT by digest.
    let uploads = registry.requests(&[put, &format!("{name}blobs/uploads/"), "digest=sha256"]);
    assert_eq!(uploads, 1 + layers.len(), "{}", registry.log_text());
    assert_eq!(
        registry.requests(&[put, &format!("{name}manifests/{image}")]),
        1
    );

    // The engine pulls it by digest and sees kiln's image.
    let reference = format!("{repository}@{image}");
    let _pulled = Pulled(reference.clone());
    let out = docker(&["pull", &reference]);
    assert!(
        out.status.success(),
        "docker pull {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = docker(&["image", "inspect", &reference, "--format", "{{.Id}}"]);
    assert_eq!(
        String::from_utf8_lossy(&id.stdout).trim(),
        config,
        "the engine's image ID is kiln's config digest"
    );

    // Again: the registry has it, so one HEAD and nothing sent.
    let again = push(&state, &image, &repository);
    assert_eq!(again["manifests_present"], 1, "{again}");
    assert_eq!(again["blobs_sent"], 0, "{again}");
    assert_eq!(again["manifests_sent"], 0, "{again}");
    assert_eq!(
        registry.requests(&[put, &format!("{name}blobs/uploads/")]),
        uploads,
        "a blob was sent again"
    );

    // An image sharing the layer: only its config travels.
    let other = build_bare(&state, &unique_spec(dir.path(), &stamp, "b"));
    let (other_config, other_layers) = parts(&state, &other);
    assert_eq!(
        other_layers, layers,
        "the two images should share their layer"
    );
    assert_ne!(other_config, config);
    let second = push(&state, &other, &repository);
    assert_eq!(second["blobs_sent"], 1, "{second}");
    assert_eq!(second["blobs_present"], layers.len(), "{second}");
    assert_eq!(
        registry.requests(&[put, &format!("{name}blobs/uploads/"), &other_config]),
        1
    );
    for l in &layers {
        assert_eq!(
            registry.requests(&[put, &format!("{name}blobs/uploads/"), l]),
            1,
            "layer {l} was uploaded twice"
        );
    }

    // Human output names what happened.
    kiln(&state)
        .args(["image", "push", &other, &repository])
        .assert()
        .success()
        .stdout(predicates::str::contains("is already there"));
}

/// `curl` a registry path asking for OCI manifests and indexes: the body, or what failed.
fn registry_get(url: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "30", "-H"])
        .arg(
            "Accept: application/vnd.oci.image.index.v1+json, \
             application/vnd.oci.image.manifest.v1+json",
        )
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The stored blob `digest` of the state's image store, read without kiln.
fn stored_blob(state: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::read(state.join("images/blobs/sha256").join(hex)).unwrap()
}

const SIGNATURE: &str = "application/vnd.kiln.signature.v1+sshsig";

#[test]
fn a_push_carries_the_signatures_and_attestations_as_referrers() {
    if !prerequisites("the referrers push test", false) {
        return;
    }
    if !works("skopeo", &["--version"]) || !works("curl", &["--version"]) {
        let why = "skopeo and curl are needed (apt-get install skopeo curl)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {why}"
        );
        eprintln!("note: skipping the referrers push test ({why})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let registry = Distribution::start(&dir.path().join("registry"));
    let stamp = stamp();
    let image = build(&state, &unique_spec(dir.path(), &stamp, "signed"));
    let key = dir.path().join("signing.key");
    kiln(&state)
        .args(["key", "generate"])
        .arg(&key)
        .assert()
        .success();
    kiln(&state)
        .args(["sign", &image, "--key"])
        .arg(&key)
        .assert()
        .success();
    // The referrers kiln holds: the manifests whose subject is the image, read without kiln.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("images/index.json")).unwrap()).unwrap();
    let mut local: Vec<(String, String, String)> = Vec::new(); // (manifest, type, payload)
    for d in index["manifests"].as_array().unwrap() {
        let digest = d["digest"].as_str().unwrap();
        let m: serde_json::Value = serde_json::from_slice(&stored_blob(&state, digest)).unwrap();
        if m["subject"]["digest"].as_str() == Some(image.as_str()) {
            local.push((
                digest.to_owned(),
                m["artifactType"].as_str().unwrap().to_owned(),
                m["layers"][0]["digest"].as_str().unwrap().to_owned(),
            ));
        }
    }
    local.sort();
    assert!(
        local.iter().any(|r| r.1 == SIGNATURE),
        "kiln sign attached no signature: {local:?}"
    );
    assert!(
        local.iter().any(|r| r.1 != SIGNATURE),
        "the image carries no attestation: {local:?}"
    );

    let host = registry.addr.to_string();
    let repository = format!("{host}/team/signed{stamp}");
    let pushed = push(&state, &image, &repository);
    // The image, each referrer and the referrers tag.
    assert_eq!(pushed["manifests_sent"], 2 + local.len(), "{pushed}");

    // The registry (distribution 2.8: no referrers API) lists them under the fallback tag.
    let hex = image.strip_prefix("sha256:").unwrap();
    let base = format!("http://{host}/v2/team/signed{stamp}");
    let tag: serde_json::Value =
        serde_json::from_slice(&registry_get(&format!("{base}/manifests/sha256-{hex}"))).unwrap();
    assert_eq!(tag["mediaType"], "application/vnd.oci.image.index.v1+json");
    let mut listed: Vec<(String, String)> = tag["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_owned(),
                d["artifactType"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    listed.sort();
    let expected: Vec<(String, String)> =
        local.iter().map(|r| (r.0.clone(), r.1.clone())).collect();
    assert_eq!(listed, expected, "{tag}");

    // The signature's manifest and payload come back byte for byte.
    let signature = local.iter().find(|r| r.1 == SIGNATURE).unwrap();
    let manifest = registry_get(&format!("{base}/manifests/{}", signature.0));
    assert_eq!(manifest, stored_blob(&state, &signature.0));
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(m["subject"]["digest"], image.as_str());
    let payload = registry_get(&format!("{base}/blobs/{}", signature.2));
    assert!(!payload.is_empty());
    assert_eq!(payload, stored_blob(&state, &signature.2));

    // Pushed again: everything is there, nothing is sent.
    let again = push(&state, &image, &repository);
    assert_eq!(again["manifests_sent"], 0, "{again}");
    assert_eq!(again["blobs_sent"], 0, "{again}");

    // A tool that knows only tags carries them by the fallback tag.
    let copied = dir.path().join("copied");
    let out = Command::new("skopeo")
        .args(["copy", "--all", "--src-tls-verify=false"])
        .arg(format!("docker://{repository}:sha256-{hex}"))
        .arg(format!("oci:{}:sha256-{hex}", copied.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copied.join("index.json")).unwrap()).unwrap();
    let copied_index = layout["manifests"][0]["digest"].as_str().unwrap();
    let hex_of = |d: &str| d.strip_prefix("sha256:").unwrap().to_owned();
    for r in &local {
        for blob in [&r.0, &r.2] {
            assert!(
                copied.join("blobs/sha256").join(hex_of(blob)).is_file(),
                "skopeo did not carry {blob} (index {copied_index})"
            );
        }
    }
    assert_eq!(
        std::fs::read(copied.join("blobs/sha256").join(hex_of(&signature.2))).unwrap(),
        stored_blob(&state, &signature.2)
    );
}

/// The referrer manifests of `image` in the state's store, sorted, read without kiln.
fn local_referrers(state: &Path, image: &str) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("images/index.json")).unwrap()).unwrap();
    let mut out: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .filter(|d| {
            let m: serde_json::Value = serde_json::from_slice(&stored_blob(state, d)).unwrap();
            m["subject"]["digest"].as_str() == Some(image)
        })
        .collect();
    out.sort();
    out
}

/// The manifests the registry's referrers tag of `image` lists, sorted.
fn tag_lists(base: &str, image: &str) -> Vec<String> {
    let hex = image.strip_prefix("sha256:").unwrap();
    let tag: serde_json::Value =
        serde_json::from_slice(&registry_get(&format!("{base}/manifests/sha256-{hex}"))).unwrap();
    let mut out: Vec<String> = tag["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

#[test]
fn a_push_keeps_the_referrers_another_host_pushed() {
    if !prerequisites("the referrers merge test", false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Distribution::start(&dir.path().join("registry"));
    let stamp = stamp();
    // Host A builds the image; host B gets it (with its attestations) by archive.
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let image = build(&a, &unique_spec(dir.path(), &stamp, "merged"));
    let archive = dir.path().join("image.tar");
    kiln(&a)
        .args(["image", "export", &image, "--format", "oci-archive", "-o"])
        .arg(&archive)
        .assert()
        .success();
    kiln(&b)
        .args(["image", "import"])
        .arg(&archive)
        .assert()
        .success();
    assert_eq!(local_referrers(&b, &image), local_referrers(&a, &image));
    // Each signs it with a key of its own.
    for (state, name) in [(&a, "a.key"), (&b, "b.key")] {
        let key = dir.path().join(name);
        kiln(state)
            .args(["key", "generate"])
            .arg(&key)
            .assert()
            .success();
        kiln(state)
            .args(["sign", &image, "--key"])
            .arg(&key)
            .assert()
            .success();
    }
    let (of_a, of_b) = (local_referrers(&a, &image), local_referrers(&b, &image));
    assert_ne!(of_a, of_b);
    let mut union: Vec<String> = of_a.iter().chain(&of_b).cloned().collect();
    union.sort();
    union.dedup();

    let repository = format!("{}/team/merged{stamp}", registry.addr);
    let base = format!("http://{}/v2/team/merged{stamp}", registry.addr);
    push(&b, &image, &repository);
    assert_eq!(tag_lists(&base, &image), of_b);
    // A's push adds its signature to the tag and keeps B's.
    let from_a = push(&a, &image, &repository);
    assert!(from_a["manifests_sent"].as_u64().unwrap() >= 2, "{from_a}");
    assert_eq!(tag_lists(&base, &image), union);
    // B again: the tag lists all of B's already, so nothing is sent and A's stay.
    let again = push(&b, &image, &repository);
    assert_eq!(again["manifests_sent"], 0, "{again}");
    assert_eq!(tag_lists(&base, &image), union);
}

#[test]
fn bad_repositories_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["https://r.io/a", "r.io", "r.io/App", "r.io/a:latest"] {
        kiln(dir.path())
            .args(["image", "push", "sha256:0", bad])
            .assert()
            .code(2)
            .stderr(predicates::str::contains("is not a repository to push to"));
    }
}

/// What a hostile registry answers to one request line (`METHOD PATH`).
type Script = Arc<dyn Fn(&str, &str) -> String + Send + Sync>;

/// A fake registry on a free loopback port answering each request as `script` says, one
/// request per connection; records the request lines it saw.
fn hostile(script: Script) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            // Drain the body (a blob upload) before answering.
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let mut words = line.split_whitespace();
            let (method, path) = (
                words.next().unwrap_or("").to_owned(),
                words.next().unwrap_or("").to_owned(),
            );
            log.lock().unwrap().push(format!("{method} {path}"));
            let answer = script(&method, &path);
            let mut conn = reader.into_inner();
            let _ = conn.write_all(answer.as_bytes());
        }
    });
    (addr, seen)
}

fn answer(status: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut s = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s
}

#[test]
fn hostile_registries_give_clear_errors() {
    if !prerequisites("the hostile registry test", false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let image = build(&state, &unique_spec(dir.path(), &stamp(), "h"));
    let (config, _) = parts(&state, &image);
    let zero = format!("sha256:{}", "0".repeat(64));

    // A registry that claims every blob and answers the manifest with another digest.
    let wrong = zero.clone();
    let (addr, _) = hostile(Arc::new(move |method, path| match method {
        "HEAD" if path.contains("/manifests/") => answer("404 Not Found", &[], ""),
        "HEAD" => answer("200 OK", &[], ""),
        "PUT" => answer(
            "201 Created",
            &[("Docker-Content-Digest", wrong.as_str())],
            "",
        ),
        _ => answer("400 Bad Request", &[], ""),
    }));
    let (code, stderr) = push_fails(&state, &image, &format!("{addr}/a"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("registry {addr}"))
            && stderr.contains(&format!("put manifest {image}"))
            && stderr.contains(&zero)
            && stderr.contains("Docker-Content-Digest"),
        "{stderr}"
    );

    // A 500 on the upload of a blob, after a Location that carries a query of its own.
    let (addr, seen) = hostile(Arc::new(|method, path| match method {
        "HEAD" => answer("404 Not Found", &[], ""),
        "POST" => answer(
            "202 Accepted",
            &[("Location", "/upload/u1?_state=abc%3D")],
            "",
        ),
        "PUT" if path.starts_with("/upload/") => answer(
            "500 Internal Server Error",
            &[("Content-Type", "application/json")],
            r#"{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}"#,
        ),
        _ => answer("400 Bad Request", &[], ""),
    }));
    let (code, stderr) = push_fails(&state, &image, &format!("{addr}/a"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("registry {addr}"))
            && stderr.contains("upload blob sha256:")
            && stderr.contains("HTTP 500")
            && stderr.contains("UNKNOWN: disk on fire"),
        "{stderr}"
    );
    let seen = seen.lock().unwrap().clone();
    let put = seen.iter().find(|l| l.starts_with("PUT ")).unwrap();
    assert!(
        put.starts_with("PUT /upload/u1?_state=abc%3D&digest=sha256:"),
        "{seen:?}"
    );
    // The config goes first and is the blob named.
    assert!(stderr.contains(&config), "{stderr}");

    // A redirect loop.
    let (addr, seen) = hostile(Arc::new(|_, path| {
        answer("307 Temporary Redirect", &[("Location", path)], "")
    }));
    let (code, stderr) = push_fails(&state, &image, &format!("{addr}/a"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("registry {addr}"))
            && stderr.contains(&format!("check manifest {image}"))
            && stderr.contains("redirects"),
        "{stderr}"
    );
    assert_eq!(seen.lock().unwrap().len(), 6, "one request and 5 redirects");

    // A registry that wants credentials (its first answer, to a HEAD, has no body): kiln
    // says it sends none.
    let (addr, _) = hostile(Arc::new(|_, _| {
        answer(
            "401 Unauthorized",
            &[("WWW-Authenticate", "Basic realm=\"r\"")],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        )
    }));
    let (code, stderr) = push_fails(&state, &image, &format!("{addr}/a"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("registry {addr}"))
            && stderr.contains("HTTP 401")
            && stderr.contains("kiln sends no credentials"),
        "{stderr}"
    );

    // A registry that cannot be reached is named.
    let (code, stderr) = push_fails(&state, &image, "https-only.invalid/a");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("registry https-only.invalid"), "{stderr}");
}

#[test]
fn off_loopback_the_push_speaks_tls_and_trusts_only_known_cas() {
    if !prerequisites("the TLS push test", false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let image = build_bare(&state, &unique_spec(dir.path(), &stamp(), "t"));

    // A CA of the test's own, and the registry's certificate for this host's address.
    let (registry, ca_pem) = Distribution::start_tls(&dir.path().join("registry"), host_address());
    let addr = registry.addr;
    let repository = format!("{addr}/tls/app");

    // Not trusted by the system's roots: refused, naming the registry.
    let (code, stderr) = push_fails(&state, &image, &repository);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("registry {addr}")) && stderr.contains("TLS handshake"),
        "{stderr}"
    );
    assert_eq!(
        registry.requests(&["http.request.method="]),
        0,
        "a request reached the registry without a trusted certificate"
    );

    // Trusted through --ca: pushed over TLS.
    let out = kiln(&state)
        .args(["image", "push", &image, &repository, "--json", "--ca"])
        .arg(&ca_pem)
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pushed["manifests_sent"], 1, "{pushed}");
    assert!(registry.requests(&["http.request.method=PUT", "/v2/tls/app/manifests/"]) == 1);

    // Trusted through <state>/push/ca.crt, where the swarm provider looks too.
    std::fs::create_dir_all(state.join("push")).unwrap();
    std::fs::copy(&ca_pem, state.join("push/ca.crt")).unwrap();
    let again = push(&state, &image, &format!("{addr}/tls/again"));
    assert_eq!(again["manifests_sent"], 1, "{again}");

    // --insecure sends plain HTTP, which a TLS server does not take.
    let out = kiln(&state)
        .args([
            "image",
            "push",
            &image,
            &format!("{addr}/tls/plain"),
            "--insecure",
        ])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("HTTP 400") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// The image every pod of `kiln export kubernetes` runs, for a spec whose `[target]` is
/// `target` (plus `args`).
fn exported_image(dir: &Path, target: &str, args: &[&str]) -> String {
    let spec = dir.join("kiln.toml");
    std::fs::write(
        &spec,
        format!("name = \"web\"\n\n[image]\n\n[service]\n\n[target]\n{target}"),
    )
    .unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let out = kiln(&dir.join("state"))
        .args(["--json", "export", "kubernetes", "--image", &digest, "-f"])
        .arg(&spec)
        .args(args)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let images: Vec<String> = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["spec"]["template"]["spec"]["containers"][0]["image"].as_str())
        .map(str::to_owned)
        .collect();
    assert_eq!(images.len(), 1, "{v}");
    let image = images[0].clone();
    let (repository, found) = image.split_once('@').unwrap();
    assert_eq!(found, digest);
    repository.to_owned()
}

#[test]
fn kubernetes_export_pulls_from_where_target_registry_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let swarm = "provider = \"swarm\"\n";
    assert_eq!(
        exported_image(
            dir.path(),
            &format!("{swarm}registry = \"registry.example.com:5000/team\"\n"),
            &[]
        ),
        "registry.example.com:5000/team/web"
    );
    assert_eq!(
        exported_image(
            dir.path(),
            &format!("{swarm}registry = \"registry.example.com\"\n"),
            &[]
        ),
        "registry.example.com/kiln/web"
    );
    // The flag still wins.
    assert_eq!(
        exported_image(
            dir.path(),
            &format!("{swarm}registry = \"registry.example.com\"\n"),
            &["--registry", "other.example/x"]
        ),
        "other.example/x/web"
    );
}

#[test]
fn target_registry_is_validated_with_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("kiln.toml");
    std::fs::write(
        &spec,
        "name = \"web\"\n\n[image]\n\n[service]\n\n[target]\nprovider = \"swarm\"\n\
         registry = \"registry.example.com/Team\"\n",
    )
    .unwrap();
    kiln(dir.path())
        .args(["validate", "-f"])
        .arg(&spec)
        .assert()
        .code(1)
        .stderr(predicates::str::contains("invalid path component \"Team\""))
        .stderr(predicates::str::contains("kiln.toml:9:12"));
}
