//! Shared by the end-to-end tests that need root and real runc.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod distribution;
pub mod swarm;
pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use assert_cmd::Command;

pub mod wrk;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn hello_binary() -> PathBuf {
    root().join("target/x86_64-unknown-linux-gnu/release/hello")
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether the real-runc tests can run here; panics in CI (`CI=true`) when they cannot.
pub fn runc_prerequisites() -> bool {
    let root_user = is_root();
    let runc = std::process::Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let hello = hello_binary().exists();
    // Sealed instances get the host's seccomp allowlist, or do not start.
    let seccomp = Path::new("/usr/share/containers/seccomp.json").exists();
    if root_user && runc && hello && seccomp {
        return true;
    }
    let why = format!(
        "root={root_user} runc={runc} hello built={hello} (cargo build --release -p hello) \
         seccomp profile={seccomp} (apt-get install golang-github-containers-common)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the real-runc prerequisites are missing: {why}");
    }
    eprintln!("note: skipping real-runc test ({why})");
    false
}

/// Where the tests' busybox images take their binary from (busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

/// [`runc_prerequisites`] and `/bin/busybox`, for the tests of `what` that build busybox
/// images: false with a note when missing, a panic under `CI=true`.
pub fn busybox_prerequisites(what: &str) -> bool {
    if !runc_prerequisites() {
        return false;
    }
    if Path::new(BUSYBOX).exists() {
        return true;
    }
    let why = "/bin/busybox is missing (apt-get install busybox-static)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the {what} prerequisites are missing: {why}");
    }
    eprintln!("note: skipping {what} test ({why})");
    false
}

/// [`busybox_prerequisites`] and a Docker Engine that answers.
pub fn docker_busybox_prerequisites(what: &str) -> bool {
    if !busybox_prerequisites(what) {
        return false;
    }
    let engine = std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if engine {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but no Docker Engine answers ({what})");
    }
    eprintln!("note: skipping the docker {what} test (no Docker Engine)");
    false
}

/// One `GET path` with `Host: host` to `addr`, the connection closed after it: the whole
/// response, or what went wrong as text (so a wait can retry and a failure can show it).
pub fn raw_get(addr: std::net::SocketAddr, host: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if let Err(e) = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    ) {
        return e.to_string();
    }
    let mut out = String::new();
    match s.read_to_string(&mut out) {
        Ok(_) => out,
        Err(e) => format!("{out}{e}"),
    }
}

/// The `kiln` binary with `--state state`.
pub fn kiln(state: &Path) -> Command {
    let mut cmd = Command::cargo_bin("kiln").unwrap();
    cmd.env_remove("KILN_STATE")
        .env("NO_COLOR", "1")
        .arg("--state")
        .arg(state);
    cmd
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The router process serving `state`, as it wrote itself down.
pub fn router_pid(state: &Path) -> u32 {
    std::fs::read_to_string(state.join("router.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// A `kiln serve` child process on a state directory; dropping it kills the daemon and
/// removes every instance it left (runc containers, mounts).
pub struct Daemon {
    pub state: PathBuf,
    pub child: Option<Child>,
    /// Flags after `serve`, kept for restarts.
    pub args: Vec<String>,
}

impl Daemon {
    pub fn start(state: &Path) -> Daemon {
        Daemon::start_with(state, &[])
    }

    /// `kiln serve ARGS…`.
    pub fn start_with(state: &Path, args: &[&str]) -> Daemon {
        let mut d = Daemon {
            state: state.to_owned(),
            child: None,
            args: args.iter().map(|&a| a.to_owned()).collect(),
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
            .arg("--state")
            .arg(&self.state)
            .arg("serve")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(self.log())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.state.join("kiln.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemons' stderr, appended across restarts, shown when a test fails.
    fn log(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.with_extension("log"))
            .unwrap()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(Some(status)) = c.try_wait() {
                eprintln!("note: the kiln daemon had already exited: {status}");
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default();
            eprintln!("--- daemon log ---\n{log}--- end of daemon log ---");
            if std::env::var_os("KILN_TEST_HISTORY").is_some() {
                self.spawn();
                let out = kiln(&self.state).arg("history").output().unwrap();
                eprintln!("--- history ---\n{}", String::from_utf8_lossy(&out.stdout));
                self.kill();
            }
        }
        // Docker instances: one record per container, named after it.
        if let Ok(entries) = std::fs::read_dir(self.state.join("docker")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".json") {
                    let _ = std::process::Command::new("docker")
                        .args(["rm", "-f", "-v", id])
                        .output();
                }
            }
        }
        // Local instances: what a later kiln would do with them, a destroy each (network
        // namespaces, addresses and the host's rules included); then whatever is left.
        destroy_local_instances(&self.state);
        let root = self.state.join("runc");
        if let Ok(out) = std::process::Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = std::process::Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "-f", id])
                    .output();
            }
        }
        let mut mounts = mounts_under(&self.state);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = std::process::Command::new("umount")
                .args(["-l", &m])
                .output();
        }
    }
}

/// Destroys every local instance on record in `state` through the local provider.
pub fn destroy_local_instances(state: &Path) {
    use kiln_runtime::{DirImageSource, LocalConfig, LocalProvider, Provider};
    if !state.join("instances").exists() {
        return;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let Ok(provider) = LocalProvider::new(
            LocalConfig::new(state, "runc"),
            Arc::new(DirImageSource::new()),
        ) else {
            return;
        };
        for o in provider.list().await.unwrap_or_default() {
            let _ = provider.destroy(&o.id).await;
        }
    });
}

/// A spec for the example app listening on `port`, version `version` (a [service] env, so
/// versions share one image), with `replicas` instances and a rolling update.
pub fn write_spec(dir: &Path, port: u16, version: &str, replicas: u32) -> PathBuf {
    write_spec_with(
        dir,
        port,
        &format!("HELLO_VERSION = \"{version}\""),
        replicas,
        "[deploy]\nkeep_previous = \"10m\"\nprogress_deadline = \"1m\"\n",
    )
}

/// A spec for the example app: `env` is the inside of `[service] env = { … }`, `deploy` the
/// whole `[deploy]` section (and its sub-tables).
pub fn write_spec_with(dir: &Path, port: u16, env: &str, replicas: u32, deploy: &str) -> PathBuf {
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

[service]
replicas = {replicas}
writable = ["/tmp"]
stop_grace = "2s"
env = {{ {env} }}

[service.health]
path = "/healthz"
interval = "100ms"
timeout = "100ms"
start_period = "10s"

[route]
listen = "127.0.0.1:{port}"
drain_timeout = "5s"
sticky = "none"

{deploy}
"#,
            hello = hello_binary()
        ),
    )
    .unwrap();
    spec
}

pub fn build(state: &Path, spec: &Path) -> String {
    let out = kiln(state)
        .args(["build", "-q", "-f"])
        .arg(spec)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap().trim().to_owned()
}

pub fn apply(state: &Path, spec: &Path, image: &str) {
    kiln(state)
        .args(["apply", "-f"])
        .arg(spec)
        .args(["--image", image])
        .timeout(Duration::from_secs(120))
        .assert()
        .success();
}

pub fn status(state: &Path) -> serde_json::Value {
    let out = kiln(state)
        .args(["status", "web", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    serde_json::from_slice::<serde_json::Value>(&out).unwrap()[0].clone()
}

/// Polls `kiln status` until `ok` holds or `limit` passes; returns how long it took.
pub fn wait_until(
    state: &Path,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        // A daemon that was just restarted may not answer for a moment; one that never
        // answers fails below with what it said.
        let out = kiln(state)
            .args(["status", "web", "--json"])
            .output()
            .unwrap();
        if !out.status.success() {
            assert!(
                start.elapsed() < limit,
                "kiln status kept failing for {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let s = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone();
        if ok(&s) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "condition not reached within {limit:?}: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn routed(s: &serde_json::Value) -> Vec<String> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["routed"] == true && i["health"] == "healthy")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Clients sending `GET /` over keep-alive connections until stopped, counting failures
/// (a non-200 answer or a request that got no answer) and the distinct bodies of the 200s.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    bodies: Bodies,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Each distinct body of a 200 answer, with how many times it came.
pub type Bodies = Arc<std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, u64>>>;

impl Load {
    pub fn start(port: u16, connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let bodies = Bodies::default();
        let (s, o, f) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let b = Arc::clone(&bodies);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for _ in 0..connections {
                    let (s, o, f) = (Arc::clone(&s), Arc::clone(&o), Arc::clone(&f));
                    let b = Arc::clone(&b);
                    tasks.push(tokio::spawn(async move { client(port, s, o, f, b).await }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Load {
            stop,
            ok,
            failed,
            bodies,
            thread: Some(thread),
        }
    }

    /// The distinct bodies of the 200 answers so far, with their counts.
    pub fn bodies(&self) -> std::collections::BTreeMap<Vec<u8>, u64> {
        self.bodies.lock().unwrap().clone()
    }

    /// (ok, failed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }

    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

pub async fn client(
    port: u16,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    bodies: Bodies,
) {
    use http_body_util::{BodyExt, Empty};
    let mut sender = None;
    while !stop.load(Ordering::SeqCst) {
        if sender.is_none() {
            let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                failed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let (s, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s = sender.as_mut().unwrap();
        if s.ready().await.is_err() {
            // The router closed an idle connection between requests: nothing was sent.
            sender = None;
            continue;
        }
        let req = hyper::Request::get("/")
            .header("host", "web")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        match s.send_request(req).await {
            Ok(resp) if resp.status() == 200 => match resp.into_body().collect().await {
                Ok(body) => {
                    let body = body.to_bytes();
                    let mut seen = bodies.lock().unwrap();
                    match seen.get_mut(body.as_ref()) {
                        Some(n) => *n += 1,
                        None => {
                            seen.insert(body.to_vec(), 1);
                        }
                    }
                    drop(seen);
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    eprintln!("load: body: {e}");
                    failed.fetch_add(1, Ordering::SeqCst);
                    sender = None;
                }
            },
            Ok(resp) => {
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if failed.fetch_add(1, Ordering::SeqCst) < 3
                    && std::env::var_os("KILN_TEST_LOAD_DEBUG").is_some()
                {
                    eprintln!("load: HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            Err(e) => {
                eprintln!("load: {e}");
                failed.fetch_add(1, Ordering::SeqCst);
                sender = None;
            }
        }
    }
}

/// Runs the heavy end-to-end tests of one test binary one at a time: each starts a daemon,
/// instances and a load generator, and on a 2-core machine two at once only measure the
/// machine.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One raw HTTP/1.1 GET over TCP; returns the status line and body.
pub fn tcp_get(port: u16, path: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: kiln\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `kiln history web --json`, oldest first.
pub fn history(state: &Path) -> Vec<serde_json::Value> {
    let out = kiln(state)
        .args(["history", "web", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    match serde_json::from_slice::<serde_json::Value>(&out).unwrap() {
        serde_json::Value::Array(events) => events,
        other => panic!("kiln history --json printed {other}"),
    }
}

/// The events of `web` about `instance`, other than its creation.
pub fn events_about(state: &Path, instance: &str) -> Vec<serde_json::Value> {
    history(state)
        .into_iter()
        .filter(|e| e["data"]["instance"] == instance)
        .filter(|e| e["kind"] != "instance.created")
        .collect()
}

/// The Python of the pinned venv `scripts/ci-setup.sh` installs for the attestation checkers
/// (spdx-tools, the in-toto attestation bindings, securesystemslib).
pub const ATTEST_PYTHON: &str = "/opt/kiln-ci/attest/bin/python";
/// spdx-tools' command line, in the same venv.
pub const ATTEST_PYSPDXTOOLS: &str = "/opt/kiln-ci/attest/bin/pyspdxtools";

/// spdx-tools on the SPDX JSON document `doc`: a panic with its words when it refuses it
/// (a warning on stderr counts as a refusal).
pub fn assert_spdx_tools_accept(doc: &Path) {
    let check = std::process::Command::new(ATTEST_PYSPDXTOOLS)
        .arg("-i")
        .arg(doc)
        .output()
        .unwrap();
    assert!(
        check.status.success() && check.stderr.is_empty(),
        "spdx-tools refused {}: {}{}",
        doc.display(),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The in-toto attestation reference bindings on the provenance statement in `path`: the
/// statement parsed and validated, the predicate parsed strictly as SLSA v1 Provenance (an
/// unknown field fails); with `run_metadata`, `startedOn` and `invocationId` are required.
pub fn assert_in_toto_accepts_provenance(path: &Path, run_metadata: bool) {
    let script = r#"
import json, sys
from google.protobuf import json_format
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
doc = json.load(open(sys.argv[1]))
Statement.copy_from_pb(json_format.Parse(json.dumps(doc), statement_pb2.Statement())).validate()
p = json_format.Parse(json.dumps(doc["predicate"]), provenance_pb2.Provenance())
assert doc["predicateType"] == "https://slsa.dev/provenance/v1"
if sys.argv[2] == "run-metadata":
    assert p.run_details.metadata.HasField("started_on") and p.run_details.metadata.invocation_id
print(len(p.build_definition.resolved_dependencies))
"#;
    let check = std::process::Command::new(ATTEST_PYTHON)
        .args(["-c", script])
        .arg(path)
        .arg(if run_metadata { "run-metadata" } else { "-" })
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the in-toto bindings refused the provenance {}: {}",
        path.display(),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// securesystemslib's `Envelope.verify` of `envelope` against one ed25519 key, given as its
/// OpenSSH public key line; the key's id is kiln's keyid, the fingerprint. The payload
/// when it verifies (decoded by Python), else `None`.
pub fn sslib_verify(dir: &Path, envelope: &[u8], pub_line: &str, keyid: &str) -> Option<Vec<u8>> {
    let env_path = dir.join("envelope.json");
    std::fs::write(&env_path, envelope).unwrap();
    let script = r#"
import base64, json, sys
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey
env = Envelope.from_dict(json.load(open(sys.argv[1])))
# The OpenSSH wire form of an ed25519 key: string "ssh-ed25519", string <32 raw bytes>.
blob = base64.b64decode(sys.argv[2].split()[1])
assert blob[:15] == b"\x00\x00\x00\x0bssh-ed25519", blob[:15]
raw = blob[-32:]
key = SSlibKey(keyid=sys.argv[3], keytype="ed25519", scheme="ed25519", keyval={"public": raw.hex()})
try:
    env.verify([key], 1)
except Exception as e:
    print(f"not verified: {type(e).__name__}: {e}")
    sys.exit(1)
payload = json.loads(env.payload)
print("verified", payload["_type"], payload["predicateType"], file=sys.stderr)
print(env.payload.hex())
"#;
    let out = std::process::Command::new(ATTEST_PYTHON)
        .arg("-c")
        .arg(script)
        .arg(&env_path)
        .arg(pub_line)
        .arg(keyid)
        .output()
        .unwrap();
    eprintln!("securesystemslib: {}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        return None;
    }
    hex::decode(String::from_utf8_lossy(&out.stdout).trim()).ok()
}
