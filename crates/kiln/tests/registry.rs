//! End-to-end tests of kiln's registry (`kiln serve --registry-listen`), driving the real
//! `kiln` binary and the host's real Docker Engine: the engine pulls a kiln image by digest
//! over loopback (plain HTTP) and reports kiln's config digest as the image ID; off loopback
//! the registry speaks TLS with a CA kiln made, which curl and the engine trust once given
//! it and nothing else does; hostile requests get the distribution spec's errors; a corrupt
//! blob is never delivered whole. Prints a pull through the registry against `docker load`
//! of the same image's docker-archive, measured in the same run.
//!
//! Needs root, a Docker Engine answering on its socket, curl, `ip` and the example binary
//! built (`cargo build --release -p hello`); with `CI=true` a missing prerequisite fails the
//! test. Every image a test pulls or loads is unique to it (a layer path of its own) and
//! removed by its exact reference afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

fn prerequisites() -> bool {
    let works = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let engine = works("docker", &["info", "--format", "{{.ServerVersion}}"]);
    let curl = works("curl", &["--version"]);
    let ip = works("ip", &["-V"]);
    let hello = hello_binary().exists();
    if is_root() && engine && curl && ip && hello {
        return true;
    }
    let why = format!(
        "root={} docker engine={engine} curl={curl} ip={ip} hello built={hello} \
         (cargo build --release -p hello)",
        is_root()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the registry test's prerequisites are missing: {why}");
    }
    eprintln!("note: skipping registry test ({why})");
    false
}

/// A spec whose image is this test's own: the example binary under a directory named
/// `stamp`, so neither its layer nor its config is shared with another image of the engine.
fn unique_spec(dir: &Path, stamp: &str) -> PathBuf {
    let spec = dir.join("kiln.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"reg{stamp}\"\n\n[image]\nentrypoint = [\"/{stamp}/hello\"]\n\n\
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

/// The manifest and config digests and the first layer's digest of a stored image.
fn digests(state: &Path, image: &str) -> (String, String, String) {
    let out = kiln(state)
        .args(["image", "inspect", image, "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    (
        v["digest"].as_str().unwrap().to_owned(),
        v["manifest"]["config"]["digest"]
            .as_str()
            .unwrap()
            .to_owned(),
        v["manifest"]["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

fn run(program: &str, args: &[&str]) -> Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap()
}

fn docker_ok(args: &[&str]) -> String {
    let out = run("docker", args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An image reference this test put into the engine: removed (that reference only) on drop.
struct Pulled(String);

impl Drop for Pulled {
    fn drop(&mut self) {
        let _ = run("docker", &["rmi", &self.0]);
    }
}

/// Pulls `reference` and checks the engine's word on it: image ID = kiln's config digest,
/// and RepoDigests holding kiln's manifest digest. Returns how long the pull took.
fn pull_and_check(reference: &str, manifest: &str, config: &str) -> Duration {
    let start = Instant::now();
    let out = run("docker", &["pull", reference]);
    let took = start.elapsed();
    let _pulled = Pulled(reference.to_owned());
    assert!(
        out.status.success(),
        "docker pull {reference}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let id = docker_ok(&["image", "inspect", reference, "--format", "{{.Id}}"]);
    assert_eq!(
        id.trim(),
        config,
        "the engine's image ID is kiln's config digest"
    );
    let digests = docker_ok(&[
        "image",
        "inspect",
        reference,
        "--format",
        "{{join .RepoDigests \" \"}}",
    ]);
    let (repository, _) = reference.split_once('@').unwrap();
    assert!(
        digests
            .split_whitespace()
            .any(|d| d == format!("{repository}@{manifest}")),
        "RepoDigests {digests:?} lack {repository}@{manifest}"
    );
    took
}

/// One HTTP/1.1 request on a connection of its own, as a client that does not care for the
/// spec would send it.
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)));
        v["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Reply {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    // A cut-off transfer ends in a reset: keep what came.
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    Reply {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

fn sha256_of(bytes: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", hex.split_whitespace().next().unwrap())
}

#[test]
fn the_engine_pulls_kiln_images_by_digest_over_loopback() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let stamp = stamp();
    let spec = unique_spec(dir.path(), &stamp);
    let image = build(&state, &spec);
    let (manifest, config, _) = digests(&state, &image);
    assert_eq!(image, manifest);

    let addr = format!("127.0.0.1:{}", free_port());
    let _daemon = Daemon::start_with(&state, &["--registry-listen", &addr]);
    let reference = format!("{addr}/kiln/reg{stamp}@{manifest}");
    let pulled = pull_and_check(&reference, &manifest, &config);

    // The same image into the same engine through its archive, for comparison.
    let archive = dir.path().join("image.tar");
    let start = Instant::now();
    kiln(&state)
        .args([
            "image",
            "export",
            &manifest,
            "--format",
            "docker-archive",
            "-o",
        ])
        .arg(&archive)
        .assert()
        .success();
    let exported = start.elapsed();
    let start = Instant::now();
    let out = docker_ok(&["load", "-i", archive.to_str().unwrap()]);
    let loaded = start.elapsed();
    let names: Vec<Pulled> = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Loaded image: ")
                .or_else(|| l.strip_prefix("Loaded image ID: "))
        })
        .map(|n| Pulled(n.trim().to_owned()))
        .collect();
    assert!(!names.is_empty(), "docker load said: {out}");
    let id = docker_ok(&["image", "inspect", &names[0].0, "--format", "{{.Id}}"]);
    assert_eq!(id.trim(), config);
    eprintln!(
        "measured: docker pull through kiln's registry {:.1} ms; kiln image export \
         (docker-archive) {:.1} ms + docker load {:.1} ms ({} bytes)",
        pulled.as_secs_f64() * 1e3,
        exported.as_secs_f64() * 1e3,
        loaded.as_secs_f64() * 1e3,
        std::fs::metadata(&archive).unwrap().len()
    );
}

/// A global IPv4 address of this host (not loopback), for the TLS run.
fn host_address() -> IpAddr {
    let out = run("ip", &["-4", "-o", "addr", "show", "scope", "global"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("this host has no global IPv4 address: {text}"))
}

/// `/etc/docker/certs.d/<host>/`, made for this test and removed after it.
struct EngineTrust(PathBuf);

impl Drop for EngineTrust {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn curl(args: &[&str]) -> Output {
    run("curl", &[&["-sS", "--max-time", "30"], args].concat())
}

#[test]
fn off_loopback_the_registry_speaks_tls_with_a_ca_only_kiln_made() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let stamp = stamp();
    let image = build(&state, &unique_spec(dir.path(), &stamp));
    let (manifest, config, layer) = digests(&state, &image);
    let ip = host_address();
    let port = std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::new(ip, port);
    let mut daemon = Daemon::start_with(&state, &["--registry-listen", &addr.to_string()]);

    // Made on first use: the key the daemon's alone.
    let ca = state.join("registry/ca.crt");
    let key = state.join("registry/ca.key");
    let ca_pem = std::fs::read(&ca).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let log = std::fs::read_to_string(state.with_extension("log")).unwrap();
    assert!(
        log.contains(&ca.display().to_string()),
        "the daemon's log names the CA: {log}"
    );
    let doctor = kiln(&state).arg("doctor").output().unwrap();
    assert!(
        String::from_utf8_lossy(&doctor.stdout).contains(&ca.display().to_string()),
        "kiln doctor names the CA: {}",
        String::from_utf8_lossy(&doctor.stdout)
    );

    let base = format!("https://{addr}/v2/");
    let cacert = ca.to_str().unwrap();
    let trusted = curl(&["-i", "--cacert", cacert, &base]);
    assert!(
        trusted.status.success(),
        "curl --cacert: {}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let head = String::from_utf8_lossy(&trusted.stdout).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("docker-distribution-api-version: registry/2.0"));

    let blob = dir.path().join("blob");
    let fetched = curl(&[
        "--cacert",
        cacert,
        "-o",
        blob.to_str().unwrap(),
        &format!("https://{addr}/v2/kiln/reg{stamp}/blobs/{layer}"),
    ]);
    assert!(fetched.status.success());
    assert_eq!(sha256_of(&std::fs::read(&blob).unwrap()), layer);

    // Without kiln's CA (the system's roots only), the server is not trusted.
    let untrusted = curl(&[&base]);
    assert_eq!(
        untrusted.status.code(),
        Some(60),
        "curl without the CA must refuse the certificate: {}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    // Nor over plain HTTP.
    let plain = curl(&[&format!("http://{addr}/v2/")]);
    assert!(!plain.status.success() || !String::from_utf8_lossy(&plain.stdout).contains("{}"));

    // The engine, given the CA where a node would have it, pulls by digest over TLS.
    let trust = EngineTrust(PathBuf::from(format!("/etc/docker/certs.d/{addr}")));
    std::fs::create_dir_all(&trust.0).unwrap();
    std::fs::write(trust.0.join("ca.crt"), &ca_pem).unwrap();
    pull_and_check(
        &format!("{addr}/kiln/reg{stamp}@{manifest}"),
        &manifest,
        &config,
    );

    // A restart keeps the CA (a new server certificate, signed by the same CA).
    daemon.kill();
    daemon.spawn();
    assert_eq!(std::fs::read(&ca).unwrap(), ca_pem);
    let again = curl(&["--cacert", cacert, &base]);
    assert!(
        again.status.success(),
        "after a restart: {}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn hostile_requests_get_the_specs_errors_and_never_a_corrupt_blob() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let stamp = stamp();
    let image = build(&state, &unique_spec(dir.path(), &stamp));
    let (manifest, config, layer) = digests(&state, &image);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _daemon = Daemon::start_with(&state, &["--registry-listen", &addr.to_string()]);
    let layer_bytes = std::fs::read(
        state
            .join("images/blobs/sha256")
            .join(layer.strip_prefix("sha256:").unwrap()),
    )
    .unwrap();
    let repo = format!("/v2/kiln/reg{stamp}");
    let unknown = format!("sha256:{}", "0".repeat(64));

    // What is served.
    let r = request(addr, "GET", &format!("{repo}/manifests/{manifest}"), "");
    assert_eq!(r.status, 200);
    assert_eq!(sha256_of(&r.body), manifest, "the manifest's exact bytes");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    assert_eq!(r.header("docker-content-digest"), Some(manifest.clone()));
    let r = request(addr, "HEAD", &format!("{repo}/blobs/{layer}"), "");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(layer_bytes.len().to_string())
    );
    assert!(r.body.is_empty());
    let r = request(
        addr,
        "GET",
        &format!("{repo}/blobs/{layer}"),
        "Range: bytes=10-19\r\n",
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, layer_bytes[10..20]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 10-19/{}", layer_bytes.len()))
    );
    let r = request(
        addr,
        "GET",
        &format!("{repo}/blobs/{config}"),
        "Range: bytes=99999999-\r\n",
    );
    assert_eq!((r.status, r.code()), (416, "RANGE_INVALID".to_owned()));

    // What is refused, with the status and code the spec gives it.
    let long = "a".repeat(300);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "GET",
            format!("{repo}/blobs/{unknown}"),
            404,
            "BLOB_UNKNOWN",
        ),
        (
            "GET",
            format!("{repo}/manifests/{unknown}"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("HEAD", format!("{repo}/manifests/{unknown}"), 404, ""),
        // A blob that is not a manifest is not served as one.
        (
            "GET",
            format!("{repo}/manifests/{layer}"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            format!("{repo}/manifests/{config}"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            format!("{repo}/manifests/latest"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            format!("{repo}/blobs/sha256:xyz"),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("{repo}/blobs/md5:{}", "0".repeat(32)),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("{repo}/blobs/..%2F..%2F..%2Fetc%2Fpasswd"),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("{repo}/blobs/sha256:..%2f..%2fetc%2fpasswd"),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/../../../../etc/passwd".to_owned(),
            404,
            "UNSUPPORTED",
        ),
        (
            "GET",
            format!("/v2/kiln/..%2F..%2F/blobs/{layer}"),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            format!("/v2/kiln/../blobs/{layer}"),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            format!("/v2/kiln/{long}/blobs/{layer}"),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/alpine/manifests/{manifest}"),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET",
            format!("/v2/reg{stamp}/blobs/{layer}"),
            404,
            "NAME_UNKNOWN",
        ),
        ("GET", format!("{repo}/tags/list"), 404, "UNSUPPORTED"),
        ("GET", "/v2/_catalog".to_owned(), 404, "UNSUPPORTED"),
        ("POST", format!("{repo}/blobs/uploads/"), 405, "UNSUPPORTED"),
        (
            "PUT",
            format!("{repo}/manifests/latest"),
            405,
            "UNSUPPORTED",
        ),
        (
            "PUT",
            format!("{repo}/blobs/uploads/x?digest={layer}"),
            405,
            "UNSUPPORTED",
        ),
        (
            "PATCH",
            format!("{repo}/blobs/uploads/x"),
            405,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            format!("{repo}/manifests/{manifest}"),
            405,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            format!("{repo}/blobs/{layer}"),
            405,
            "UNSUPPORTED",
        ),
    ];
    for (method, path, status, code) in &cases {
        let r = request(addr, method, path, "");
        assert_eq!(r.status, *status, "{method} {path}: {}", r.head);
        if !code.is_empty() {
            assert_eq!(r.code(), *code, "{method} {path}");
            assert_eq!(
                r.header("content-type").as_deref(),
                Some("application/json")
            );
        }
    }
    // Nothing was deleted.
    assert_eq!(
        request(addr, "GET", &format!("{repo}/manifests/{manifest}"), "").status,
        200
    );

    // A head too large is refused; the registry still answers afterwards.
    let huge = format!("{repo}/blobs/{}", "a".repeat(64 << 10));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = write!(s, "GET {huge} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );

    // A client that never finishes its head is cut off (no deadline here but the read's).
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut rest = Vec::new();
    let ended = slow.read_to_end(&mut rest);
    assert!(
        ended.is_ok() || rest.starts_with(b"HTTP/1.1 408"),
        "the server closed the slow connection: {ended:?}"
    );
    assert_eq!(request(addr, "GET", "/v2/", "").status, 200);

    // A corrupt layer: never delivered whole, and a range of it not at all.
    let path = state
        .join("images/blobs/sha256")
        .join(layer.strip_prefix("sha256:").unwrap());
    let mut bytes = layer_bytes.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let r = request(addr, "GET", &format!("{repo}/blobs/{layer}"), "");
    assert_eq!(r.status, 200);
    assert!(
        r.body.len() < layer_bytes.len(),
        "a corrupt blob was delivered whole ({} bytes)",
        r.body.len()
    );
    let r = request(
        addr,
        "GET",
        &format!("{repo}/blobs/{layer}"),
        "Range: bytes=0-9\r\n",
    );
    assert_eq!((r.status, r.code()), (500, "UNKNOWN".to_owned()));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        !text.contains(path.to_str().unwrap()),
        "no internals: {text}"
    );
}

#[test]
fn the_referrers_api_lists_the_signatures_kiln_sign_attached() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let stamp = stamp();
    let image = build(&state, &unique_spec(dir.path(), &stamp));
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
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _daemon = Daemon::start_with(&state, &["--registry-listen", &addr.to_string()]);
    let repo = format!("/v2/kiln/reg{stamp}");
    const SIGNATURE: &str = "application/vnd.kiln.signature.v1+sshsig";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";

    // The referrers API lists the signature, with its artifact type and annotations.
    let r = request(addr, "GET", &format!("{repo}/referrers/{image}"), "");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type").as_deref(), Some(INDEX));
    assert_eq!(r.header("oci-filters-applied"), None);
    let all: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(all["schemaVersion"], 2);
    assert_eq!(all["mediaType"], INDEX);
    let listed = all["manifests"].as_array().unwrap();
    let signatures: Vec<&serde_json::Value> = listed
        .iter()
        .filter(|d| d["artifactType"] == SIGNATURE)
        .collect();
    assert_eq!(signatures.len(), 1, "{all}");
    let signature = signatures[0]["digest"].as_str().unwrap().to_owned();
    assert!(
        signatures[0]["annotations"]["dev.kiln.key"].is_string(),
        "{all}"
    );
    // What it lists is the store's: the manifest names the image as its subject.
    let r = request(addr, "GET", &format!("{repo}/manifests/{signature}"), "");
    assert_eq!(r.status, 200);
    assert_eq!(sha256_of(&r.body), signature);
    let m: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(m["subject"]["digest"], image.as_str());
    assert_eq!(m["artifactType"], SIGNATURE);

    // Filtered by artifact type (percent-encoded, as a client sends it).
    let encoded = SIGNATURE.replace('/', "%2F").replace('+', "%2B");
    let r = request(
        addr,
        "GET",
        &format!("{repo}/referrers/{image}?artifactType={encoded}"),
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    let only: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(only["manifests"].as_array().unwrap().len(), 1, "{only}");
    assert_eq!(only["manifests"][0]["digest"], signature.as_str());
    let r = request(
        addr,
        "GET",
        &format!("{repo}/referrers/{image}?artifactType=application%2Fnone"),
        "",
    );
    assert_eq!(r.status, 200);
    let none: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(none["manifests"], serde_json::json!([]), "{none}");

    // The referrers tag serves the index the store keeps, by its own digest.
    let hex = image.strip_prefix("sha256:").unwrap();
    let r = request(addr, "GET", &format!("{repo}/manifests/sha256-{hex}"), "");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type").as_deref(), Some(INDEX));
    assert_eq!(r.header("docker-content-digest"), Some(sha256_of(&r.body)));
    let tagged: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(tagged["manifests"], all["manifests"]);

    // An image with no referrers: an empty index; its tag is unknown.
    let unknown = format!("sha256:{}", "0".repeat(64));
    let r = request(addr, "GET", &format!("{repo}/referrers/{unknown}"), "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some(INDEX));
    let empty: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(empty["manifests"], serde_json::json!([]), "{empty}");
    let r = request(
        addr,
        "GET",
        &format!("{repo}/manifests/sha256-{}", "0".repeat(64)),
        "",
    );
    assert_eq!((r.status, r.code()), (404, "MANIFEST_UNKNOWN".to_owned()));

    // A malformed digest: 400 in the registry's error format.
    let r = request(addr, "GET", &format!("{repo}/referrers/sha256:abc"), "");
    assert_eq!((r.status, r.code()), (400, "DIGEST_INVALID".to_owned()));
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );

    // curl, a client that follows the spec, reads the same.
    let out = curl(&[
        "-fsS",
        &format!("http://{addr}{repo}/referrers/{image}?artifactType={encoded}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        only
    );
}

#[test]
fn registry_flags_that_cannot_work_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    for (args, why) in [
        (&["--registry-listen", "0.0.0.0:5000"][..], "unspecified"),
        (&["--registry-listen", "[::]:5000"][..], "unspecified"),
        (&["--registry-listen", "localhost"][..], "IP:PORT"),
        (&["--registry-insecure"][..], "--registry-listen"),
    ] {
        let out = kiln(&state).arg("serve").args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    assert!(!state.join("kiln.sock").exists(), "no daemon started");
}

#[test]
fn insecure_serves_plain_http_off_loopback_and_says_so() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ip = host_address();
    let port = std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::new(ip, port);
    let _daemon = Daemon::start_with(
        &state,
        &[
            "--registry-listen",
            &addr.to_string(),
            "--registry-insecure",
        ],
    );
    let r = request(addr, "GET", "/v2/", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    assert!(!state.join("registry/ca.key").exists(), "no CA without TLS");
    let log = std::fs::read_to_string(state.with_extension("log")).unwrap();
    assert!(
        log.contains("plain HTTP on a non-loopback address"),
        "{log}"
    );
}
