//! End-to-end tests of the control plane on real runc and real sockets: a `kiln serve`
//! daemon process, the CLI as its client, the example app as the workload, and a load
//! generator that counts every failed request. They need root, runc and the release build of
//! `hello`; without them they are skipped with a note, except in CI where they must run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{free_port, hello_binary, kiln, mounts_under, runc_prerequisites};

/// A `kiln serve` child process on a state directory; dropping it kills the daemon and
/// removes every instance it left (runc containers, mounts).
struct Daemon {
    state: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn start(state: &Path) -> Daemon {
        let mut d = Daemon {
            state: state.to_owned(),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
            .arg("--state")
            .arg(&self.state)
            .arg("serve")
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
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
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
        }
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

/// A spec for the example app listening on `port`, version `version` (a [service] env, so
/// versions share one image), 2 replicas.
fn write_spec(dir: &Path, port: u16, version: &str, replicas: u32) -> PathBuf {
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

[service]
replicas = {replicas}
writable = ["/tmp"]
stop_grace = "2s"
env = {{ HELLO_VERSION = "{version}" }}

[service.health]
path = "/healthz"
interval = "100ms"
timeout = "100ms"
start_period = "20s"

[deploy]
keep_previous = "10m"
progress_deadline = "1m"

[route]
listen = "127.0.0.1:{port}"
drain_timeout = "5s"
"#,
            hello = hello_binary()
        ),
    )
    .unwrap();
    spec
}

fn build(state: &Path, spec: &Path) -> String {
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

fn apply(state: &Path, spec: &Path, image: &str) {
    kiln(state)
        .args(["apply", "-f"])
        .arg(spec)
        .args(["--image", image])
        .timeout(Duration::from_secs(120))
        .assert()
        .success();
}

fn status(state: &Path) -> serde_json::Value {
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
fn wait_until(state: &Path, limit: Duration, ok: impl Fn(&serde_json::Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let s = status(state);
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

fn routed(s: &serde_json::Value) -> Vec<String> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["routed"] == true && i["health"] == "healthy")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Clients sending `GET /` over keep-alive connections until stopped, counting failures
/// (a non-200 answer or a request that got no answer).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for _ in 0..connections {
                    let (s, o, f) = (Arc::clone(&s), Arc::clone(&o), Arc::clone(&f));
                    tasks.push(tokio::spawn(async move { client(port, s, o, f).await }));
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
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, u64) {
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

async fn client(port: u16, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
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
            Ok(resp) if resp.status() == 200 => {
                let _ = resp.into_body().collect().await;
                ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok(resp) => {
                eprintln!("load: HTTP {}", resp.status());
                failed.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                eprintln!("load: {e}");
                failed.fetch_add(1, Ordering::SeqCst);
                sender = None;
            }
        }
    }
}

#[test]
fn apply_and_warm_rollback_cycles_under_load_fail_no_request() {
    if !runc_prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    let spec = write_spec(dir.path(), port, "v1", 2);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    let load = Load::start(port, 8);
    let mut rollbacks = Vec::new();
    for cycle in 2..=11 {
        write_spec(dir.path(), port, &format!("v{cycle}"), 2);
        apply(&state, &spec, &image);
        let started = Instant::now();
        kiln(&state).args(["rollback", "web"]).assert().success();
        rollbacks.push(started.elapsed());
    }
    let (ok, failed) = load.finish();
    eprintln!(
        "10 apply/rollback cycles: {ok} requests ok, {failed} failed; rollback command times {rollbacks:?}"
    );
    assert!(ok > 1000, "the load generator barely ran: {ok}");
    assert_eq!(failed, 0);
    let s = status(&state);
    assert_eq!(s["phase"], "completed");
    assert_eq!(routed(&s).len(), 2);
    kiln(&state).arg("verify").assert().success();
}

#[test]
fn drifted_and_killed_instances_are_replaced() {
    if !runc_prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    let spec = write_spec(dir.path(), port, "v1", 2);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);

    // A file written from the host into an instance's read-only area.
    let victim = routed(&status(&state))[0].clone();
    std::fs::write(
        state.join("instances").join(&victim).join("upper/evil"),
        "x",
    )
    .unwrap();
    let took = wait_until(&state, Duration::from_secs(10), |s| {
        let r = routed(s);
        r.len() == 2 && !r.contains(&victim)
    });
    eprintln!("drifted instance replaced in {took:?}");
    let history = kiln(&state)
        .args(["history", "web"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let history = String::from_utf8(history).unwrap();
    assert!(
        history.contains("drift.detected") && history.contains("/evil"),
        "{history}"
    );
    kiln(&state)
        .args(["drift", "web"])
        .assert()
        .success()
        .stdout(predicates::str::contains(victim.as_str()));

    // A SIGKILLed instance.
    let victim = routed(&status(&state))[0].clone();
    let pid: i32 = std::fs::read_to_string(state.join("instances").join(&victim).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let took = wait_until(&state, Duration::from_secs(10), |s| {
        let r = routed(s);
        r.len() == 2 && !r.contains(&victim)
    });
    eprintln!("killed instance replaced in {took:?}");
}

#[test]
fn daemon_killed_during_a_rolling_update_converges_every_time() {
    if !runc_prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let mut daemon = Daemon::start(&state);
    let spec = write_spec(dir.path(), port, "v1", 3);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    for round in 2..=11u64 {
        write_spec(dir.path(), port, &format!("v{round}"), 3);
        kiln(&state)
            .args(["apply", "--no-wait", "-f"])
            .arg(&spec)
            .args(["--image", &image])
            .assert()
            .success();
        // Kill at a different point of the rollout each round.
        std::thread::sleep(Duration::from_millis(30 * (round - 1)));
        daemon.kill();
        daemon.spawn();
        wait_until(&state, Duration::from_secs(60), |s| {
            s["phase"] == "completed" && s["release"] == round && routed(s).len() == 3
        });
        let s = status(&state);
        // Exactly one live release routed, the previous one warm, nothing else.
        for i in s["instances"].as_array().unwrap() {
            let r = i["release"].as_u64().unwrap();
            assert!(
                r == round || r == round - 1,
                "orphan instance of release {r}: {s:#}"
            );
            assert_eq!(i["routed"] == true, r == round, "{s:#}");
        }
        let live = s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["release"] == round)
            .count();
        assert_eq!(live, 3, "{s:#}");
    }
    // No instance directory without a runc container, no container without a directory.
    let dirs = std::fs::read_dir(state.join("instances")).unwrap().count();
    let listed = std::process::Command::new("runc")
        .arg("--root")
        .arg(state.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    let containers = String::from_utf8_lossy(&listed.stdout).lines().count();
    assert_eq!(dirs, containers);
    kiln(&state).arg("verify").assert().success();
    kiln(&state).args(["down", "web"]).assert().success();
    assert!(
        std::fs::read_dir(state.join("instances"))
            .unwrap()
            .next()
            .is_none()
    );
    let mounts: Vec<String> = mounts_under(&state)
        .into_iter()
        .filter(|m| m.contains("/instances/"))
        .collect();
    assert!(mounts.is_empty(), "{mounts:?}");
}

#[test]
fn verify_names_an_edited_event_and_plan_shows_the_diff() {
    if !runc_prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let mut daemon = Daemon::start(&state);
    let spec = write_spec(dir.path(), port, "v1", 1);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);

    // Nothing changed: exit 0. An env change: the diff, exit 2.
    kiln(&state)
        .args(["plan", "--detailed-exitcode", "-f"])
        .arg(&spec)
        .assert()
        .code(0);
    write_spec(dir.path(), port, "v2", 1);
    kiln(&state)
        .args(["plan", "--detailed-exitcode", "-f"])
        .arg(&spec)
        .assert()
        .code(2)
        .stdout(predicates::str::contains(
            "service.env.HELLO_VERSION: \"v1\" → \"v2\"",
        ));

    kiln(&state).args(["down", "web"]).assert().success();
    daemon.kill();
    kiln(&state).arg("verify").assert().success();
    let db = rusqlite::Connection::open(state.join("ledger.db")).unwrap();
    db.execute_batch(
        "DROP TRIGGER events_no_update;
         UPDATE events SET data = replace(data, 'rolling', 'Rolling') WHERE kind = 'rollout.started';",
    )
    .unwrap();
    drop(db);
    kiln(&state)
        .arg("verify")
        .assert()
        .code(1)
        .stderr(predicates::str::contains(
            "ledger entry 2 (event rollout.started of web)",
        ))
        .stderr(predicates::str::contains("edited"));
}
