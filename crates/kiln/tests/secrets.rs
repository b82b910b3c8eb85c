//! End-to-end tests of secrets (issue 15, part 1), driving the real `kiln` binary on real runc
//! and a real Docker Engine: a secret given by file and by command reaches the app at
//! `/run/secrets/NAME` (and in its environment where the spec asks); its value is nowhere on
//! disk under the state directory, nor in `status`, `history`, `plan` or an API answer; a
//! changed source is a change `plan` reports and `apply` rolls out; a daemon SIGKILLed and
//! started again replaces a killed instance with its secrets, read again.
//!
//! The app is busybox `httpd` with a CGI script that prints what the instance sees.
//!
//! Needs root, runc, `/bin/busybox`, the CNI plugins and, for the docker test, a Docker
//! Engine; with `CI=true` a missing prerequisite fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, kiln, serial};

const BUSYBOX: &str = "/bin/busybox";
/// The values: long and unlikely, so finding one anywhere means it leaked.
const FILE_VALUE: &str = "file-s3cr3t-6f1d8a0c27e4";
const FILE_VALUE_2: &str = "file-s3cr3t-rotated-93b5e1";
const COMMAND_VALUE: &str = "cmd-s3cr3t-0a7c44d91b2f";
const ENV_VALUE: &str = "env-plain-token-5e2b9c1d";

fn prerequisites() -> bool {
    common::busybox_prerequisites("secrets")
}

fn docker_prerequisites() -> bool {
    common::docker_busybox_prerequisites("secrets")
}

/// The busybox rootfs, the secret sources, and `{name}.toml` for app `name`.
fn project(dir: &Path, name: &str, port: u16, target: &str, expose: bool) -> PathBuf {
    let root = dir.join("rootfs");
    if !root.exists() {
        for d in ["bin", "www/cgi-bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        std::fs::write(root.join("www/healthz"), "ok\n").unwrap();
        let script = root.join("www/cgi-bin/secrets");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'Content-Type: text/plain'\necho\n\
             echo \"db=$(/bin/busybox cat /run/secrets/DB_PASSWORD)\"\n\
             echo \"token=$(/bin/busybox cat /run/secrets/TOKEN)\"\n\
             echo \"env=${DB_PASSWORD:-unset}\"\n\
             echo \"mode=$(/bin/busybox stat -c '%a %u' /run/secrets/DB_PASSWORD)\"\n\
             echo \"uid=$(/bin/busybox id -u)\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("db.txt"), format!("{FILE_VALUE}\n")).unwrap();
        std::fs::write(dir.join("token.txt"), COMMAND_VALUE).unwrap();
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"name = "{name}"

[image]
base = "rootfs:rootfs"
entrypoint = ["/bin/busybox", "sh", "-c"]
cmd = ["exec /bin/busybox httpd -f -p $PORT -h /www"]

[service]
writable = ["/tmp"]
stop_grace = "1s"
env = {{ API_TOKEN = "{ENV_VALUE}", GREETING = "hi" }}

[service.secrets]
DB_PASSWORD = {{ file = "db.txt", expose_env = {expose} }}
TOKEN = {{ command = ["/bin/cat", "token.txt"] }}

[service.health]
path = "/healthz"
interval = "200ms"
timeout = "200ms"

[route]
listen = "127.0.0.1:{port}"
drain_timeout = "1s"

[target]
provider = "{target}"
"#
        ),
    )
    .unwrap();
    path
}

fn get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// What the instance sees, once it answers `db=<want>`.
fn seen(port: u16, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = get(port, "/cgi-bin/secrets");
        if resp.contains(&format!("db={want}")) {
            return resp;
        }
        assert!(
            Instant::now() < deadline,
            "the app never saw db={want}: {resp}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET path` over the daemon's unix socket: the whole response.
fn api(state: &Path, path: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(state.join("kiln.sock")).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Every file on the state directory's own file system (not the tmpfs, overlay or namespace
/// mounted below it) that holds `needle`.
fn on_disk(state: &Path, needle: &str) -> Vec<PathBuf> {
    let dev = std::fs::metadata(state).unwrap().dev();
    let mut found = Vec::new();
    let mut stack = vec![state.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != dev {
            continue;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        } else if md.is_file()
            && let Ok(bytes) = std::fs::read(&p)
            && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        {
            found.push(p);
        }
    }
    found
}

fn run_kiln(state: &Path, args: &[&str]) -> std::process::Output {
    kiln(state)
        .args(args)
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap()
}

/// Asserts none of the values is in `what` (named `label`).
#[track_caller]
fn clean(label: &str, what: &str) {
    for v in [FILE_VALUE, FILE_VALUE_2, COMMAND_VALUE, ENV_VALUE] {
        assert!(!what.contains(v), "{label} shows {v}:\n{what}");
    }
}

/// The routed instance of `app` and its process, once there is one.
fn routed_instance(state: &Path, app: &str) -> (String, u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let out = run_kiln(state, &["status", app, "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let routed = s[0]["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["routed"] == true)
            .and_then(|i| i["id"].as_str());
        if let Some(id) = routed {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "no routed instance: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // The instance's init process, from runc's own state.
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(state.join("runc"))
        .args(["state", &id])
        .output()
        .unwrap();
    let pid = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .map(|v| v["pid"].as_u64().unwrap_or(0) as u32)
        .unwrap_or(0);
    (id, pid)
}

#[test]
fn secrets_reach_the_app_and_nothing_else_on_runc() {
    if !prerequisites() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = common::free_port();
    let spec = project(dir.path(), "vault", port, "local", true);
    let mut daemon = Daemon::start(&state);
    let image = common::build(&state, &spec);
    common::apply(&state, &spec, &image);

    // The app reads both secrets as files of its own user, 0400; the exposed one is in its
    // environment too.
    let resp = seen(port, FILE_VALUE);
    assert!(resp.contains(&format!("token={COMMAND_VALUE}")), "{resp}");
    assert!(resp.contains(&format!("env={FILE_VALUE}")), "{resp}");
    assert!(resp.contains("mode=400 65534"), "{resp}");
    assert!(resp.contains("uid=65534"), "{resp}");

    // Nowhere on disk, nor in what kiln shows.
    for v in [FILE_VALUE, COMMAND_VALUE] {
        assert_eq!(on_disk(&state, v), Vec::<PathBuf>::new(), "{v} on disk");
    }
    let status = run_kiln(&state, &["status", "vault", "--json"]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    clean("kiln status --json", &status);
    assert!(
        status.contains("redacted:"),
        "API_TOKEN is redacted: {status}"
    );
    assert!(status.contains("\"GREETING\": \"hi\""), "{status}");
    assert!(
        status.contains("hmac-sha256:"),
        "the fingerprint is shown: {status}"
    );
    let history = run_kiln(&state, &["history", "vault", "--json"]);
    clean("kiln history", &String::from_utf8_lossy(&history.stdout));
    for path in ["/v1/apps/vault", "/v1/apps/vault/releases", "/v1/events"] {
        clean(path, &api(&state, path));
    }
    let plan = run_kiln(
        &state,
        &["plan", "-f", spec.to_str().unwrap(), "--detailed-exitcode"],
    );
    let said = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert_eq!(plan.status.code(), Some(0), "no change yet: {said}");
    clean("kiln plan", &said);

    // A rotated value: plan says so (exit 2) without showing it; apply rolls it out.
    std::fs::write(dir.path().join("db.txt"), FILE_VALUE_2).unwrap();
    let plan = run_kiln(
        &state,
        &["plan", "-f", spec.to_str().unwrap(), "--detailed-exitcode"],
    );
    let said = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert_eq!(plan.status.code(), Some(2), "{said}");
    assert!(
        said.contains("secret DB_PASSWORD changed (the value is not shown)"),
        "{said}"
    );
    clean("kiln plan", &said);
    common::apply(&state, &spec, &image);
    let resp = seen(port, FILE_VALUE_2);
    assert!(resp.contains(&format!("env={FILE_VALUE_2}")), "{resp}");
    assert_eq!(
        on_disk(&state, FILE_VALUE_2),
        Vec::<PathBuf>::new(),
        "the rotated value on disk"
    );

    // The daemon is SIGKILLed, then the instance: the new daemon replaces it, reading the
    // secrets again (it kept none on disk) and checking them against the release's
    // fingerprints.
    let (id, pid) = routed_instance(&state, "vault");
    assert!(pid > 0, "{id} has no process");
    daemon.kill();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    daemon.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (now, _) = routed_instance(&state, "vault");
        if now != id && get(port, "/cgi-bin/secrets").contains(&format!("db={FILE_VALUE_2}")) {
            break;
        }
        assert!(Instant::now() < deadline, "{id} was not replaced");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A source whose value changed while no apply said so is refused, not served: the
    // release keeps the value it was applied with.
    daemon.kill();
    std::fs::write(dir.path().join("db.txt"), "not-applied").unwrap();
    daemon.spawn();
    let (id, pid) = routed_instance(&state, "vault");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let said = loop {
        let out = run_kiln(&state, &["history", "vault"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(l) = text.lines().find(|l| l.contains("instance.create_failed")) {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "{id}: no failed create:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        said.contains("secret DB_PASSWORD") && said.contains("changed since the release"),
        "{said}"
    );
    assert!(!said.contains("not-applied"), "{said}");
}

#[test]
fn secrets_on_docker_are_read_only_files() {
    if !docker_prerequisites() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = common::free_port();
    let spec = project(dir.path(), "dvault", port, "docker", false);
    let _daemon = Daemon::start(&state);
    let image = common::build(&state, &spec);
    common::apply(&state, &spec, &image);
    let resp = seen(port, FILE_VALUE);
    assert!(resp.contains(&format!("token={COMMAND_VALUE}")), "{resp}");
    assert!(resp.contains("env=unset"), "{resp}");
    assert!(resp.contains("mode=400 65534"), "{resp}");
    for v in [FILE_VALUE, COMMAND_VALUE] {
        assert_eq!(on_disk(&state, v), Vec::<PathBuf>::new(), "{v} on disk");
    }
    // The engine's view of the container holds no value (its env, its config).
    let out = run_kiln(&state, &["status", "dvault", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = s[0]["instances"][0]["id"].as_str().unwrap().to_owned();
    let inspect = std::process::Command::new("docker")
        .args(["inspect", &id])
        .output()
        .unwrap();
    let inspect = String::from_utf8_lossy(&inspect.stdout).into_owned();
    assert!(inspect.contains("/run/secrets"), "{inspect}");
    for v in [FILE_VALUE, COMMAND_VALUE] {
        assert!(!inspect.contains(v), "docker inspect shows {v}");
    }
    clean("kiln status", &String::from_utf8_lossy(&out.stdout));
    // The secrets' mount point, made by the engine in the writable layer, is not drift: the
    // instance outlives the engine rescans (every 5 s) and the checks after its start.
    let deadline = Instant::now() + Duration::from_secs(7);
    while Instant::now() < deadline {
        let out = run_kiln(&state, &["history", "dvault"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!text.contains("drift.detected"), "{text}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // The environment is not a place for a secret there: refused, naming it.
    let exposed = project(dir.path(), "dexposed", common::free_port(), "docker", true);
    let out = run_kiln(
        &state,
        &[
            "apply",
            "-f",
            exposed.to_str().unwrap(),
            "--image",
            &image,
            "--no-wait",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run_kiln(&state, &["history", "dexposed"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("expose_env") {
            assert!(text.contains("secret DB_PASSWORD"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no refusal:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
