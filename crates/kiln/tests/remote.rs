//! kiln driven from a "laptop" against a "server" daemon over real SSH: Debian's sshd, started
//! here on a loopback port with its own host key and a client key made by the test; a
//! `kiln serve` on the server's state; the laptop's commands with
//! `KILN_HOST=ssh://root@127.0.0.1:PORT/<server state>`.
//!
//! Build → apply → status → a one-file change → build → apply (less than 5% of the image's
//! bytes sent, printed) → rollback → logs → history → verify, the server's digest equal to the
//! laptop's; contexts; and the one-line errors for a refused connection, a host key that does
//! not match, a missing ssh and no daemon on the host.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, free_port, kiln, runc_prerequisites};
use serde_json::Value;

const SSHD: &str = "/usr/sbin/sshd";

/// Root, runc, and OpenSSH's server and client: false with a note when missing, a panic under
/// `CI=true`.
fn ssh_prerequisites() -> bool {
    if !runc_prerequisites() {
        return false;
    }
    let have = |bin: &str| std::process::Command::new(bin).arg("-V").output().is_ok();
    let sshd = Path::new(SSHD).exists();
    let ssh = have("ssh");
    let keygen = Path::new("/usr/bin/ssh-keygen").exists();
    if sshd && ssh && keygen {
        return true;
    }
    let why = format!(
        "sshd={sshd} ssh={ssh} ssh-keygen={keygen} (apt-get install openssh-server openssh-client)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the SSH test's prerequisites are missing: {why}");
    }
    eprintln!("note: skipping the remote (SSH) test ({why})");
    false
}

/// A child `sshd -D -e` on 127.0.0.1:port, accepting the test's key for root.
struct Sshd {
    child: Child,
    port: u16,
    dir: PathBuf,
}

fn keygen(path: &Path) {
    let ok = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test", "-f"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen failed");
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        std::fs::create_dir_all(dir).unwrap();
        keygen(&dir.join("host_ed25519"));
        keygen(&dir.join("id_ed25519"));
        std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys")).unwrap();
        // sshd's privilege separation directory (Debian makes it in its init script).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile none\nLogLevel INFO\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("ssh_config"),
            format!(
                "Host *\n  IdentityFile {d}/id_ed25519\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile {d}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  \
                 StrictHostKeyChecking accept-new\n  LogLevel ERROR\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        let child = std::process::Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sshd {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    /// `ssh -F <the test's client config>`, as KILN_SSH_COMMAND.
    fn ssh_command(&self) -> String {
        format!("ssh -F {}", self.dir.join("ssh_config").display())
    }

    /// How many SSH sessions sshd has accepted so far.
    fn sessions(&self) -> usize {
        std::fs::read_to_string(self.dir.join("sshd.log"))
            .unwrap_or_default()
            .matches("Accepted publickey")
            .count()
    }

    fn url(&self, state: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, state.display())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default();
            eprintln!("--- sshd log ---\n{log}--- end of sshd log ---");
        }
    }
}

/// The laptop's `kiln`: its own state, contexts under `config`, ssh through the test's config.
fn laptop(state: &Path, config: &Path, sshd: &Sshd) -> assert_cmd::Command {
    let mut cmd = kiln(state);
    cmd.env("KILN_REMOTE_BIN", assert_cmd::cargo::cargo_bin("kiln"))
        .env("KILN_SSH_COMMAND", sshd.ssh_command())
        .env("XDG_CONFIG_HOME", config)
        .env_remove("KILN_HOST")
        .env_remove("KILN_CONTEXT")
        .timeout(Duration::from_secs(180));
    cmd
}

/// The first JSON document on stdout (`apply --json` says when the rollout completes after it).
fn json_of(out: &[u8]) -> Value {
    serde_json::Deserializer::from_slice(out)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("not JSON: {}", String::from_utf8_lossy(out)))
}

/// The example app's big binary in one layer, a small file in another.
fn write_spec(dir: &Path, port: u16, note: &str) -> PathBuf {
    std::fs::write(dir.join("note.txt"), note).unwrap();
    let spec = dir.join("kiln.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "web"

[image]
entrypoint = ["/hello"]

[[image.copy]]
from = {hello:?}
to = "/hello"
allow_outside = true

[[image.copy]]
from = "note.txt"
to = "/etc/note.txt"

[image.test]
http = "/healthz"

[service]
replicas = 1
writable = ["/tmp"]
stop_grace = "2s"

[service.health]
path = "/healthz"
interval = "100ms"
timeout = "100ms"
start_period = "10s"

[route]
listen = "127.0.0.1:{port}"
drain_timeout = "5s"
sticky = "none"

[deploy]
keep_previous = "10m"
progress_deadline = "1m"
"#,
            hello = common::hello_binary()
        ),
    )
    .unwrap();
    spec
}

/// Builds and tests here (the spec has `[image.test]`: the server's gate wants the
/// attestation, which apply sends along).
fn build(state: &Path, spec: &Path) -> String {
    let out = kiln(state)
        .args(["build", "-q", "-f"])
        .arg(spec)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let digest = String::from_utf8(out).unwrap().trim().to_owned();
    kiln(state)
        .args(["test", "-q", "-f"])
        .arg(spec)
        .arg(&digest)
        .timeout(Duration::from_secs(120))
        .assert()
        .success();
    digest
}

#[test]
fn a_laptop_deploys_to_a_server_over_ssh_sending_only_what_changed() {
    if !ssh_prerequisites() {
        return;
    }
    let _serial = common::serial();
    let tmp = tempfile::tempdir().unwrap();
    let server = tmp.path().join("server");
    let state = tmp.path().join("laptop");
    let config = tmp.path().join("config");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let sshd = Sshd::start(&tmp.path().join("ssh"));
    let _daemon = Daemon::start(&server);
    let host = sshd.url(&server);
    let port = free_port();
    let spec = write_spec(&work, port, "one\n");

    // Build here, apply there: everything travels the first time.
    let first = build(&state, &spec);
    let out = laptop(&state, &config, &sshd)
        .env("KILN_HOST", &host)
        .args(["apply", "--json", "-f"])
        .arg(&spec)
        .assert()
        .success()
        .get_output()
        .clone();
    let applied = json_of(&out.stdout);
    let t = &applied["transfer"];
    eprintln!("first apply: {t}");
    assert_eq!(t["digest"], first.as_str());
    assert_eq!(t["sent_blobs"], t["total_blobs"], "{t}");
    assert_eq!(t["sent_blobs"], 4, "manifest, config and two layers: {t}");
    assert_eq!(t["attestation"], true, "{t}");

    let status = laptop(&state, &config, &sshd)
        .env("KILN_HOST", &host)
        .args(["status", "web", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let status = json_of(&status)[0].clone();
    assert_eq!(status["live"], 1, "{status:#}");
    assert_eq!(status["image"], first.as_str(), "{status:#}");
    // The server's own socket, named explicitly, is the same daemon.
    let via_unix = json_of(
        &kiln(&state)
            .arg("--host")
            .arg(format!("unix://{}", server.join("kiln.sock").display()))
            .args(["status", "web", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    assert_eq!(via_unix[0]["image"], first.as_str());

    // One file changes: its layer, the config and the manifest travel, not the binary.
    std::fs::write(work.join("note.txt"), "two\n").unwrap();
    let second = build(&state, &spec);
    assert_ne!(first, second);
    let sessions = sshd.sessions();
    let out = laptop(&state, &config, &sshd)
        .env("KILN_HOST", &host)
        .args(["apply", "-f"])
        .arg(&spec)
        .assert()
        .success()
        .get_output()
        .clone();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let line = said
        .lines()
        .find(|l| l.contains("sent "))
        .unwrap_or_else(|| panic!("apply did not say what it sent:\n{said}"));
    assert!(line.contains("sent 3 of 4 blobs"), "{line}");
    // Every request of the apply (the blobs, the release, the rollout's progress) went over
    // one SSH connection.
    assert_eq!(
        sshd.sessions() - sessions,
        1,
        "one SSH session for the whole apply"
    );
    let server_store = kiln(&server)
        .args(["image", "inspect", &second, "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let inspected = json_of(&server_store);
    assert_eq!(
        inspected["digest"],
        second.as_str(),
        "the server's digest is the laptop's"
    );
    let local = json_of(
        &kiln(&state)
            .args(["image", "inspect", &second, "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    let total = local["size"].as_u64().unwrap();
    let layers = local["manifest"]["layers"].as_array().unwrap();
    let changed = layers.last().unwrap()["size"].as_u64().unwrap();
    let manifest_and_config = total
        - layers
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum::<u64>();
    let sent = changed + manifest_and_config;
    let percent = sent as f64 * 100.0 / total as f64;
    println!(
        "second apply after a one-file change: {line}; {sent} of {total} bytes = {percent:.3}% of the image"
    );
    assert!(sent * 100 < total * 5, "sent {sent} of {total} bytes");
    assert!(line.contains("sent 3 of 4 blobs"), "{line}");

    let status = json_of(
        &laptop(&state, &config, &sshd)
            .env("KILN_HOST", &host)
            .args(["status", "web", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    )[0]
    .clone();
    assert_eq!(status["image"], second.as_str(), "{status:#}");
    assert_eq!(status["live"], 2, "{status:#}");

    // Rollback, logs, history and verify, all through SSH.
    laptop(&state, &config, &sshd)
        .env("KILN_HOST", &host)
        .args(["rollback", "web"])
        .assert()
        .success();
    let status = json_of(
        &laptop(&state, &config, &sshd)
            .env("KILN_HOST", &host)
            .args(["status", "web", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    )[0]
    .clone();
    assert_eq!(status["live"], 1, "{status:#}");
    let logs = laptop(&state, &config, &sshd)
        .env("KILN_HOST", &host)
        .args(["logs", "web"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let logs = String::from_utf8_lossy(&logs);
    assert!(logs.contains("listening on"), "{logs}");
    let history = json_of(
        &laptop(&state, &config, &sshd)
            .env("KILN_HOST", &host)
            .args(["history", "web", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"release.created"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k.starts_with("rollback")), "{kinds:?}");
    let verify = json_of(
        &laptop(&state, &config, &sshd)
            .env("KILN_HOST", &host)
            .args(["verify", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    assert_eq!(verify["ok"], true, "{verify}");
    // The laptop's own state never got a ledger: everything above was the server's.
    assert!(!state.join("ledger.db").exists());

    // A context names the server; `use` makes it the default for every command.
    laptop(&state, &config, &sshd)
        .args([
            "context",
            "create",
            "srv",
            "--host",
            &host,
            "--description",
            "the test server",
        ])
        .assert()
        .success();
    let file = config.join("kiln/contexts.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    laptop(&state, &config, &sshd)
        .args(["context", "use", "srv"])
        .assert()
        .success();
    let ls = json_of(
        &laptop(&state, &config, &sshd)
            .args(["context", "ls", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    let current: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["current"] == true)
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(current, ["srv"], "{ls:#}");
    let via_context = json_of(
        &laptop(&state, &config, &sshd)
            .args(["status", "web", "--json"])
            .assert()
            .success()
            .get_output()
            .stdout,
    );
    assert_eq!(via_context[0]["live"], 1);
    // KILN_CONTEXT=default and --host both win over the current context.
    let local = laptop(&state, &config, &sshd)
        .env("KILN_CONTEXT", "default")
        .args(["status", "web"])
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    assert!(
        String::from_utf8_lossy(&local).contains("no kiln daemon is running on"),
        "{}",
        String::from_utf8_lossy(&local)
    );
    laptop(&state, &config, &sshd)
        .args(["context", "rm", "srv"])
        .assert()
        .failure();
    laptop(&state, &config, &sshd)
        .args(["context", "use", "default"])
        .assert()
        .success();
    laptop(&state, &config, &sshd)
        .args(["context", "rm", "srv"])
        .assert()
        .success();

    // `apply --image` of an image only the server has (a laptop with an empty store, a spec
    // without [image.test]): nothing is sent, the release is recorded.
    let untested = work.join("untested.toml");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &untested,
        text.replace("[image.test]\nhttp = \"/healthz\"\n", ""),
    )
    .unwrap();
    let bare = tmp.path().join("bare");
    let out = laptop(&bare, &config, &sshd)
        .env("KILN_HOST", &host)
        .args(["apply", "--json", "--no-wait", "--image", &second, "-f"])
        .arg(&untested)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let applied = json_of(&out);
    assert_eq!(applied["transfer"]["sent_blobs"], 0, "{applied}");
    assert_eq!(applied["image"], second.as_str(), "{applied}");
    let nowhere = format!("sha256:{}", "0".repeat(64));
    let out = laptop(&bare, &config, &sshd)
        .env("KILN_HOST", &host)
        .args(["apply", "--image", &nowhere, "-f"])
        .arg(&untested)
        .assert()
        .code(1)
        .get_output()
        .stderr
        .clone();
    assert!(
        String::from_utf8_lossy(&out).contains("neither in the local store"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    kiln(&server).args(["down", "web"]).assert().success();
}

/// Runs a laptop command expected to fail; returns its stderr, checked to be one line naming
/// `host` and holding `why`, with exit code 1.
fn fails_naming(mut cmd: assert_cmd::Command, host: &str, why: &str) {
    let out = cmd
        .args(["status", "--json"])
        .assert()
        .code(1)
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains(host), "names {host}: {err}");
    assert!(lines[0].contains(why), "says {why:?}: {err}");
}

#[test]
fn unreachable_hosts_fail_with_one_line_naming_them() {
    if !ssh_prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("laptop");
    let config = tmp.path().join("config");
    let sshd = Sshd::start(&tmp.path().join("ssh"));
    let nothing = tmp.path().join("no-daemon");
    std::fs::create_dir_all(&nothing).unwrap();

    // sshd answers, the remote kiln finds no daemon on that state.
    let host = sshd.url(&nothing);
    let mut cmd = laptop(&state, &config, &sshd);
    cmd.env("KILN_HOST", &host);
    fails_naming(cmd, &host, "no kiln daemon is running");

    // Nothing listens on the port.
    let closed = format!("ssh://root@127.0.0.1:{}/srv", free_port());
    let mut cmd = laptop(&state, &config, &sshd);
    cmd.env("KILN_HOST", &closed);
    fails_naming(cmd, &closed, "Connection refused");

    // No ssh client at all.
    let mut cmd = laptop(&state, &config, &sshd);
    cmd.env("KILN_HOST", &host)
        .env("KILN_SSH_COMMAND", "/nonexistent/ssh");
    fails_naming(cmd, &host, "cannot run");

    // The host's key is not the one known for it.
    let other = tmp.path().join("other_host");
    keygen(&other);
    let key = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let key: Vec<&str> = key.split_whitespace().take(2).collect();
    let known = tmp.path().join("known_hosts_wrong");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {} {}\n", sshd.port, key[0], key[1]),
    )
    .unwrap();
    let mut cmd = laptop(&state, &config, &sshd);
    cmd.env("KILN_HOST", &host).env(
        "KILN_SSH_COMMAND",
        format!(
            "{} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
            sshd.ssh_command(),
            known.display()
        ),
    );
    fails_naming(cmd, &host, "Host key verification failed");

    // The remote binary is not there.
    let mut cmd = laptop(&state, &config, &sshd);
    cmd.env("KILN_HOST", &host)
        .env("KILN_REMOTE_BIN", "/nonexistent/kiln");
    fails_naming(cmd, &host, "no kiln binary");
}

/// One raw HTTP/1.1 request on `stream`, the connection closed after it: the status and body.
fn raw_request(
    mut stream: impl std::io::Read + std::io::Write,
    head: &str,
    body: &[u8],
) -> (u16, String) {
    stream
        .write_all(format!("{head}Host: kiln\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    // The daemon may answer (and close) before reading a body it refuses.
    let _ = stream.write_all(body);
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn put(sock: &Path, path: &str, extra: &str, body: &[u8]) -> (u16, String) {
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    raw_request(
        s,
        &format!(
            "PUT {path} HTTP/1.1\r\nContent-Length: {}\r\n{extra}",
            body.len()
        ),
        body,
    )
}

/// Checks `value` against `#/components/schemas/{name}` of docs/openapi.json.
fn conforms(name: &str, value: &Value) {
    let path = common::root().join("docs/openapi.json");
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["$id"] = serde_json::json!("https://kiln.invalid/openapi.json");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("https://kiln.invalid/openapi.json", doc)
        .unwrap();
    let idx = compiler
        .compile(
            &format!("https://kiln.invalid/openapi.json#/components/schemas/{name}"),
            &mut schemas,
        )
        .unwrap();
    if let Err(e) = schemas.validate(value, idx) {
        panic!("answer does not match schema {name}: {e:#}\n{value:#}");
    }
}

fn sha256(bytes: &[u8]) -> String {
    kiln_runtime::Digest::of(bytes).to_string()
}

/// What a hostile client of the upload endpoints gets: refusals naming the problem, and
/// nothing of what it sent in the store.
#[test]
fn hostile_uploads_are_refused_and_nothing_is_kept() {
    if !runc_prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = tmp.path().join("server");
    let token = tmp.path().join("token");
    std::fs::write(&token, "hostile-test-token\n").unwrap();
    let api_port = free_port();
    let _daemon = Daemon::start_with(
        &server,
        &[
            "--api-listen",
            &format!("127.0.0.1:{api_port}"),
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    let sock = server.join("kiln.sock");
    let blobs = server.join("images/blobs/sha256");
    let uploads = server.join("images/uploads");
    let held = |d: &str| blobs.join(d.trim_start_matches("sha256:")).exists();
    let staged = || std::fs::read_dir(&uploads).map(|d| d.count()).unwrap_or(0);

    // Content that does not hash to the digest it is sent as.
    let claimed = sha256(b"what was promised");
    let (status, body) = put(
        &sock,
        &format!("/v1/blobs/{claimed}"),
        "",
        b"something else",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("hashes to"), "{body}");
    assert!(!held(&claimed));
    assert_eq!(staged(), 0);

    // Paths and junk in place of a digest.
    for bad in ["..%2F..%2Fetc%2Fpasswd", "sha256:..", "md5:abc"] {
        let (status, body) = put(&sock, &format!("/v1/blobs/{bad}"), "", b"x");
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("digest"), "{bad}: {body}");
    }

    // A body that says it is larger than the disk could hold is refused before it is read.
    let huge = sha256(b"huge");
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let (status, body) = raw_request(
        s,
        &format!("PUT /v1/blobs/{huge} HTTP/1.1\r\nContent-Length: 1000000000000000\r\n"),
        b"",
    );
    assert_eq!(status, 413, "{body}");
    assert_eq!(staged(), 0);

    // A manifest naming a layer it never sent.
    let config = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#;
    let config_digest = sha256(config);
    let (status, body) = put(&sock, &format!("/v1/blobs/{config_digest}"), "", config);
    assert_eq!(status, 200, "{body}");
    let ghost = sha256(b"never sent");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ghost, "size": 10}],
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    let (status, body) = put(
        &sock,
        &format!("/v1/images/{manifest_digest}?tag=evil"),
        "",
        &manifest,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(&ghost), "names the missing blob: {body}");
    assert!(!held(&manifest_digest) && !held(&config_digest));

    // A layer that climbs out of its root: staged, refused with its manifest, never stored.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.as_old_mut().name[..10].copy_from_slice(b"../escaped");
    h.set_cksum();
    b.append(&h, &b"hi"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let layer_digest = sha256(&layer);
    let (status, body) = put(&sock, &format!("/v1/blobs/{layer_digest}"), "", &layer);
    assert_eq!(status, 200, "{body}");
    let config = serde_json::to_vec(
        &serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [layer_digest]}}),
    )
    .unwrap();
    let config_digest = sha256(&config);
    put(&sock, &format!("/v1/blobs/{config_digest}"), "", &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = sha256(&manifest);
    let (status, body) = put(
        &sock,
        &format!("/v1/images/{manifest_digest}?tag=evil"),
        "",
        &manifest,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(&layer_digest), "{body}");
    assert!(!held(&layer_digest) && !held(&manifest_digest));
    kiln(&server)
        .args(["image", "inspect", "evil"])
        .assert()
        .failure();

    // A manifest whose bytes are not its digest.
    let (status, body) = put(&sock, &format!("/v1/images/{claimed}"), "", &manifest);
    assert_eq!(status, 400, "{body}");

    // What an honest client sends is kept, and answered as documented.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("hello.txt").unwrap();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"hi"[..]).unwrap();
    let good_layer = b.into_inner().unwrap();
    let good_layer_digest = sha256(&good_layer);
    let good_config = serde_json::to_vec(
        &serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [good_layer_digest]}}),
    )
    .unwrap();
    let good_config_digest = sha256(&good_config);
    let good = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": good_config_digest, "size": good_config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": good_layer_digest, "size": good_layer.len()}],
    }))
    .unwrap();
    let good_digest = sha256(&good);
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let ask = serde_json::to_vec(
        &serde_json::json!({"digests": [good_digest, good_config_digest, good_layer_digest]}),
    )
    .unwrap();
    let (status, body) = raw_request(
        s,
        &format!(
            "POST /v1/blobs/missing HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            ask.len()
        ),
        &ask,
    );
    assert_eq!(status, 200, "{body}");
    let missing: Value = serde_json::from_str(&body).unwrap();
    conforms("MissingBlobs", &missing);
    assert_eq!(missing["missing"].as_array().unwrap().len(), 3, "{missing}");
    for (d, bytes) in [
        (&good_layer_digest, &good_layer),
        (&good_config_digest, &good_config),
    ] {
        let (status, body) = put(&sock, &format!("/v1/blobs/{d}"), "", bytes);
        assert_eq!(status, 200, "{body}");
        conforms("BlobStored", &serde_json::from_str(&body).unwrap());
    }
    let (status, body) = put(
        &sock,
        &format!("/v1/images/{good_digest}?tag=good"),
        "",
        &good,
    );
    assert_eq!(status, 200, "{body}");
    let received: Value = serde_json::from_str(&body).unwrap();
    conforms("ImageReceived", &received);
    assert_eq!(received["digest"], good_digest.as_str());
    assert!(held(&good_layer_digest) && held(&good_digest));
    assert_eq!(
        staged(),
        3,
        "the refused images' configs and layer stay staged, never stored"
    );
    // An attestation of another image is refused; this image's is recorded.
    let wrong = format!(r#"{{"type":"kiln.test/v1","image":"{claimed}","result":"passed"}}"#);
    let (status, body) = put(
        &sock,
        &format!("/v1/images/{good_digest}/attestation"),
        "Content-Type: application/json\r\n",
        wrong.as_bytes(),
    );
    assert_eq!(status, 400, "{body}");
    let right = format!(r#"{{"type":"kiln.test/v1","image":"{good_digest}","result":"passed"}}"#);
    let (status, body) = put(
        &sock,
        &format!("/v1/images/{good_digest}/attestation"),
        "Content-Type: application/json\r\n",
        right.as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    conforms("AttestationRecorded", &serde_json::from_str(&body).unwrap());

    // With the TCP token, blobs may come but a test attestation may not: it would let an
    // untested image past the gate.
    let tcp = std::net::TcpStream::connect(("127.0.0.1", api_port)).unwrap();
    let attestation =
        format!(r#"{{"type":"kiln.test/v1","image":"{manifest_digest}","result":"passed"}}"#);
    let (status, body) = raw_request(
        tcp,
        &format!(
            "PUT /v1/images/{manifest_digest}/attestation HTTP/1.1\r\nAuthorization: Bearer hostile-test-token\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            attestation.len()
        ),
        attestation.as_bytes(),
    );
    assert_eq!(status, 403, "{body}");
    let attested = std::fs::read_dir(server.join("images/attestations"))
        .unwrap()
        .count();
    assert_eq!(attested, 1, "only the unix socket's attestation");
}

/// Contexts without any daemon: stored privately, listed, chosen by precedence, and every
/// bad name or host refused with what is wrong (exit 1). Needs neither root nor sshd.
#[test]
fn contexts_are_named_listed_and_chosen_by_precedence() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config");
    let state = tmp.path().join("state");
    let ctx = |args: &[&str]| {
        let mut cmd = kiln(&state);
        cmd.env("XDG_CONFIG_HOME", &config)
            .env_remove("KILN_HOST")
            .env_remove("KILN_CONTEXT")
            .args(args);
        cmd
    };
    let err = |mut cmd: assert_cmd::Command| {
        String::from_utf8(cmd.assert().code(1).get_output().stderr.clone()).unwrap()
    };
    assert!(err(ctx(&["context", "create", "a", "--host", "tcp://x"])).contains("unknown scheme"));
    assert!(
        err(ctx(&["context", "create", "a/b", "--host", "ssh://h"]))
            .contains("invalid context name")
    );
    assert!(err(ctx(&["context", "create", "default", "--host", "ssh://h"])).contains("default"));
    assert!(err(ctx(&["context", "use", "nope"])).contains("no context named nope"));
    ctx(&[
        "context",
        "create",
        "prod",
        "--host",
        "ssh://deploy@prod.example:2222/var/lib/kiln",
    ])
    .assert()
    .success();
    assert!(err(ctx(&["context", "create", "prod", "--host", "ssh://h"])).contains("exists"));
    ctx(&["context", "use", "prod"]).assert().success();
    let show = |mut cmd: assert_cmd::Command| -> Value {
        json_of(&cmd.assert().success().get_output().stdout.clone())
    };
    let s = show(ctx(&["context", "show", "--json"]));
    assert_eq!(s["name"], "prod", "{s}");
    assert_eq!(
        s["host"], "ssh://deploy@prod.example:2222/var/lib/kiln",
        "{s}"
    );
    // KILN_CONTEXT beats the current context; --host (KILN_HOST) beats both.
    let mut cmd = ctx(&["context", "show", "--json"]);
    cmd.env("KILN_CONTEXT", "default");
    assert_eq!(show(cmd)["name"], "default");
    let mut cmd = ctx(&["context", "show", "--json"]);
    cmd.env("KILN_CONTEXT", "default")
        .env("KILN_HOST", "ssh://other:22");
    let s = show(cmd);
    assert_eq!(
        (s["name"].as_str(), s["host"].as_str()),
        (Some("(--host)"), Some("ssh://other:22"))
    );
    // A malformed host is a usage error (2); an unknown context a failure (1).
    let out = ctx(&["--host", "tcp://x", "status"])
        .assert()
        .code(2)
        .get_output()
        .clone();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme"));
    let mut cmd = ctx(&["status"]);
    cmd.env("KILN_CONTEXT", "missing");
    assert!(err(cmd).contains("\"missing\""));
    let ls = show(ctx(&["context", "ls", "--json"]));
    let names: Vec<(&str, bool)> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["current"] == true))
        .collect();
    assert_eq!(names, [("default", false), ("prod", true)]);
    use std::os::unix::fs::PermissionsExt;
    let file = config.join("kiln/contexts.json");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(err(ctx(&["context", "rm", "prod"])).contains("current"));
    ctx(&["context", "use", "default"]).assert().success();
    ctx(&["context", "rm", "prod"]).assert().success();
    assert_eq!(
        show(ctx(&["context", "ls", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // None of this touched the state directory.
    assert!(!state.exists());
}
