//! End-to-end tests of `kiln run`, `kiln test` and `kiln doctor` on real runc: they drive
//! the real `kiln` binary. They need root and runc (and `/bin/busybox` from busybox-static
//! for the read-only checks): without them they are skipped with a note, except in CI
//! (`CI=true`), where missing prerequisites fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;

mod common;

use common::{kiln, mounts_under, root, runc_prerequisites};

/// Whether the real-runc tests can run here (root, runc, the example's release build, and
/// `/bin/busybox` for the read-only checks); panics in CI when they cannot.
fn prerequisites() -> bool {
    if !runc_prerequisites() {
        return false;
    }
    if Path::new("/bin/busybox").exists() {
        return true;
    }
    let why = "/bin/busybox is missing (apt-get install busybox-static)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the real-runc prerequisites are missing: {why}");
    }
    eprintln!("note: skipping real-runc test ({why})");
    false
}

fn build(state: &Path, spec: &Path) {
    common::build(state, spec);
}

/// A busybox image from a `rootfs:` base: an httpd serving `/www`, a writable `/tmp`, and
/// `test_command` as its `[image.test]`.
fn busybox_spec(dir: &Path, test_command: &str) -> PathBuf {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("www")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::fs::write(rootfs.join("www/healthz"), "ok\n").unwrap();
    let spec = dir.join("kiln.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "bb"

[image]
base = "rootfs:rootfs"
entrypoint = ["/bin/busybox", "sh", "-c"]
cmd = ["exec /bin/busybox httpd -f -p $PORT -h /www"]

[image.test]
command = ["/bin/busybox", "sh", "-c", {test_command:?}]
timeout = "20s"

[service]
writable = ["/tmp"]
stop_grace = "1s"

[service.health]
path = "/healthz"
interval = "200ms"
"#
        ),
    )
    .unwrap();
    spec
}

fn instance_dirs(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("instances"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A `kiln run` in the background, with its stderr lines on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn start(state: &Path, cwd: &Path, args: &[&str]) -> Running {
        let mut child = std::process::Command::cargo_bin("kiln")
            .unwrap()
            .env_remove("KILN_STATE")
            .env("NO_COLOR", "1")
            .current_dir(cwd)
            .arg("--state")
            .arg(state)
            .arg("run")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// Waits (at most 20 s) for a stderr line containing `needle`.
    fn line_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "no line with {needle:?} from kiln run; got:\n{}",
            seen.join("\n")
        );
    }

    /// Waits for `kiln run` to exit.
    fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Running {
    /// A failing test must not leave `kiln run` and its instance behind: SIGINT makes kiln
    /// stop and destroy the instance.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("INT");
            let _ = self.child.wait();
        }
    }
}

/// `http://127.0.0.1:PORT` from kiln run's "listening on" line.
fn listen_url(line: &str) -> String {
    let start = line.find("http://").unwrap();
    line[start..].split_whitespace().next().unwrap().to_owned()
}

fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let hostport = url.trim_start_matches("http://");
    let (addr, path) = match hostport.find('/') {
        Some(i) => (&hostport[..i], &hostport[i..]),
        None => (hostport, "/"),
    };
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[test]
fn run_answers_on_its_port_and_sigint_destroys_it() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    build(&state, &root().join("examples/hello/kiln.toml"));
    let mut run = Running::start(&state, dir.path(), &["hello", "-e", "HELLO_VERSION=e2e"]);
    let url = listen_url(&run.line_with("listening on"));
    run.line_with("is healthy");
    assert_eq!(
        http_get(&format!("{url}/")),
        (200, "hello from e2e\n".to_owned())
    );
    assert_eq!(instance_dirs(&state).len(), 1);

    run.signal("INT");
    let status = run.wait();
    assert!(status.success(), "kiln run exited with {status}");
    assert!(instance_dirs(&state).is_empty());
    assert_eq!(mounts_under(&state), Vec::<String>::new());
    assert!(std::net::TcpStream::connect(url.trim_start_matches("http://")).is_err());
}

#[test]
fn test_passes_for_the_example_and_records_an_attestation() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = root().join("examples/hello/kiln.toml");
    build(&state, &spec);
    let out = kiln(&state)
        .args(["--json", "test", "-f"])
        .arg(&spec)
        .assert()
        .success();
    let attestation: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(attestation["result"], "passed");
    assert_eq!(attestation["tests"][0]["kind"], "http");
    assert_eq!(attestation["tests"][0]["status"], 200);
    assert!(attestation["kiln_version"].is_string());
    let digest = attestation["image"].as_str().unwrap();
    let stored = state.join(format!(
        "images/attestations/sha256-{}.json",
        digest.trim_start_matches("sha256:")
    ));
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored).unwrap()).unwrap();
    assert_eq!(stored, attestation);
    // `kiln image inspect` shows it, as text and as data.
    kiln(&state)
        .args(["image", "inspect", digest])
        .assert()
        .success()
        .stdout(predicates::str::contains("tested:  passed"));
    let inspected = kiln(&state)
        .args(["image", "inspect", digest, "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let inspected: serde_json::Value = serde_json::from_slice(&inspected).unwrap();
    assert_eq!(inspected["attestation"], attestation);
    assert!(instance_dirs(&state).is_empty());
    assert_eq!(mounts_under(&state), Vec::<String>::new());
}

#[test]
fn test_fails_with_the_output_of_a_failing_command() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = busybox_spec(dir.path(), "echo checking the widget; exit 1");
    build(&state, &spec);
    let out = kiln(&state)
        .args(["test", "-f"])
        .arg(&spec)
        .assert()
        .code(1);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("exited with code 1"), "{stderr}");
    assert!(stderr.contains("checking the widget"), "{stderr}");
    assert!(stderr.contains("failed its tests"), "{stderr}");
    assert!(instance_dirs(&state).is_empty());
}

#[test]
fn ctrl_c_during_a_test_destroys_its_instance() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = busybox_spec(dir.path(), "sleep 60");
    build(&state, &spec);
    let test = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .arg("--state")
        .arg(&state)
        .args(["test", "-f"])
        .arg(&spec)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while instance_dirs(&state).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no test instance");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &test.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = test.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(said.contains("the test instance is destroyed"), "{said}");
    assert!(instance_dirs(&state).is_empty());
    assert_eq!(mounts_under(&state), Vec::<String>::new());
}

#[test]
fn the_root_is_read_only_and_writable_paths_are_writable() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The test command passes only if / and /bin refuse writes and /tmp takes them.
    let spec = busybox_spec(
        dir.path(),
        "set -e; \
         if touch /x 2>/dev/null; then echo 'wrote /'; exit 1; fi; \
         if touch /bin/y 2>/dev/null; then echo 'wrote /bin'; exit 1; fi; \
         touch /bin/busybox 2>&1 | grep -q 'Read-only file system'; \
         echo ok > /tmp/z; test \"$(cat /tmp/z)\" = ok",
    );
    build(&state, &spec);
    kiln(&state)
        .args(["test", "-f"])
        .arg(&spec)
        .assert()
        .success();
}

#[test]
fn drift_is_reported_and_a_killed_kiln_s_instance_is_adopted() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = busybox_spec(dir.path(), "true");
    build(&state, &spec);
    // kiln run from the spec's directory uses its [service] (health on /healthz).
    let mut run = Running::start(&state, dir.path(), &["bb"]);
    let url = listen_url(&run.line_with("listening on"));
    run.line_with("is healthy");
    let ids = instance_dirs(&state);
    assert_eq!(ids.len(), 1);
    let id = ids[0].clone();
    let instance = state.join("instances").join(&id);

    // A file created from the host in the instance's upper dir is drift.
    let t0 = Instant::now();
    std::fs::write(instance.join("upper/evil"), "x").unwrap();
    let line = run.line_with("drift on instance");
    println!("drift line after {:?}: {line}", t0.elapsed());
    assert!(line.contains("/evil"), "{line}");
    std::fs::remove_file(instance.join("upper/evil")).unwrap();

    // SIGKILL kiln: the instance keeps running...
    run.signal("KILL");
    run.wait();
    assert_eq!(http_get(&format!("{url}/healthz")).0, 200);

    // ...and a new kiln process lists and adopts it, then destroys it without a trace.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use kiln_runtime::{DirImageSource, InstanceState, LocalConfig, LocalProvider, Provider};
        let provider = LocalProvider::new(
            LocalConfig::new(&state, "runc"),
            std::sync::Arc::new(DirImageSource::new()),
        )
        .unwrap();
        let listed = provider.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id.as_str(), id);
        assert_eq!(listed[0].state, InstanceState::Running);
        let pid = listed[0].pid.unwrap();
        provider.destroy(&listed[0].id).await.unwrap();
        assert!(provider.list().await.unwrap().is_empty());
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty()
                || stat
                    .rsplit(')')
                    .next()
                    .unwrap()
                    .trim_start()
                    .starts_with('Z'),
            "process {pid} still runs: {stat}"
        );
    });
    assert!(instance_dirs(&state).is_empty());
    assert_eq!(mounts_under(&state), Vec::<String>::new());
    assert!(std::net::TcpStream::connect(url.trim_start_matches("http://")).is_err());
}

#[test]
fn doctor_reports_every_check_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln(dir.path())
        .args(["--json", "doctor", "--runtime", "kiln-no-such-runtime"])
        .args(["--docker-host", "unix:///nonexistent/docker.sock"])
        .assert()
        .code(1);
    let report: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "runtime",
            "overlayfs",
            "cgroups",
            "seccomp",
            "network",
            "privileges",
            "state-dir",
            "state",
            "inotify",
            "docker"
        ]
    );
    assert_eq!(report["checks"][0]["status"], "fail");
    assert!(
        report["checks"][0]["fix"]
            .as_str()
            .unwrap()
            .contains("apt-get install -y runc")
    );
    // No engine is a warning, not a failure: only provider = "docker" needs one.
    let docker = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "docker")
        .unwrap();
    assert_eq!(docker["status"], "warn");
    assert!(
        docker["detail"]
            .as_str()
            .unwrap()
            .contains("unix:///nonexistent/docker.sock")
    );
}
