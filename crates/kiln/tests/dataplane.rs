//! The data plane outlives the control plane: the router is a process of its own (`kiln
//! router`), fed by the daemon. Under `wrk` load, the daemon SIGKILLed and restarted, and the
//! router replaced by a new binary, drop no request; the daemon adopts its instances; a
//! rollout started before a daemon kill completes after the restart. Needs root, runc, wrk
//! and the release build of `hello`; skipped with a note without them, except in CI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::wrk::{Wrk, wrk_available};
use common::*;

/// The instances' ids of app `web`, sorted.
fn instance_ids(s: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// A new binary of kiln for the router: a copy of the one under test (another file, so
/// another identity, as after a package upgrade).
fn new_binary(dir: &Path, n: u32) -> PathBuf {
    let to = dir.join(format!("kiln-{n}"));
    std::fs::copy(assert_cmd::cargo::cargo_bin("kiln"), &to).unwrap();
    to
}

/// Starts `binary` as the router of `state`, and waits until it took over and the router it
/// replaced exited.
fn replace_router(state: &Path, binary: &Path) -> Child {
    let old = router_pid(state);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.with_extension("router.log"))
        .unwrap();
    let child = Command::new(binary)
        .arg("--state")
        .arg(state)
        .arg("router")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while router_pid(state) != child.id() || !exited(old) {
        assert!(
            Instant::now() < deadline,
            "router {} did not take over from {old}",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn traffic_outlives_daemon_kills_and_router_replacements() {
    if !runc_prerequisites() || !wrk_available() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let spec = write_spec(dir.path(), port, "v1", 2);
    let mut daemon = Daemon::start(&state);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    wait_until(&state, Duration::from_secs(30), |s| {
        s["phase"] == "completed" && routed(s).len() == 2
    });
    // A second daemon on the same state is refused before it touches anything of it (the
    // router's apps included).
    let second = kiln(&state)
        .arg("serve")
        .timeout(Duration::from_secs(20))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already serves"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(raw_get(([127, 0, 0, 1], port).into(), "web", "/").contains("v1"));
    let first_router = router_pid(&state);
    let instances = instance_ids(&status(&state));
    let started = Instant::now();
    let wrk = Wrk::start(port, 600);

    // The daemon crashes and comes back, ten times: the router keeps serving meanwhile, and
    // each new daemon adopts the instances and the router.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        daemon.kill();
        std::thread::sleep(Duration::from_millis(300));
        daemon.spawn();
        wait_until(&state, Duration::from_secs(30), |s| {
            s["phase"] == "completed" && routed(s).len() == 2
        });
    }
    assert_eq!(
        router_pid(&state),
        first_router,
        "the router was not the daemon's to restart"
    );
    assert_eq!(
        instance_ids(&status(&state)),
        instances,
        "instances were not adopted"
    );

    // The router is replaced by a new binary, ten times: each takes the listening sockets over.
    let mut routers = Vec::new();
    for n in 0..10 {
        routers.push(replace_router(&state, &new_binary(dir.path(), n)));
        wait_until(&state, Duration::from_secs(30), |s| routed(s).len() == 2);
    }
    // A daemon restarted now runs another binary than the router: it replaces the router
    // with its own, the same way.
    let before = router_pid(&state);
    daemon.kill();
    daemon.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while router_pid(&state) == before || !exited(before) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not replace the router of another binary"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A rollout started before a daemon kill completes after the restart.
    write_spec(dir.path(), port, "v2", 2);
    kiln(&state)
        .args(["apply", "--no-wait", "-f"])
        .arg(&spec)
        .args(["--image", &image])
        .assert()
        .success();
    wait_until(&state, Duration::from_secs(30), |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["release"] == 2)
    });
    daemon.kill();
    std::thread::sleep(Duration::from_millis(500));
    daemon.spawn();
    wait_until(&state, Duration::from_secs(60), |s| {
        s["release"] == 2 && s["phase"] == "completed" && routed(s).len() == 2
    });
    let elapsed = started.elapsed();
    let report = wrk.finish();
    for mut r in routers {
        let _ = r.wait();
    }
    eprintln!(
        "under wrk for {elapsed:.1?}: 12 daemon kills, 11 router replacements, a rollout across a kill: \
         {} requests, {} failed\n{}",
        report.requests, report.failed, report.text
    );
    assert!(report.requests > 1000, "wrk barely ran: {}", report.text);
    assert_eq!(report.failed, 0, "{}", report.text);
    let body = raw_get(([127, 0, 0, 1], port).into(), "web", "/");
    assert!(body.contains("v2"), "{body}");
    kiln(&state).arg("verify").assert().success();

    // A router that crashes is started again by the daemon and fed every app: the app is
    // served again (its requests in flight at the crash are lost, as they would be with any
    // proxy process).
    let crashed = router_pid(&state);
    Command::new("kill")
        .args(["-KILL", &crashed.to_string()])
        .status()
        .unwrap();
    let crash = Instant::now();
    loop {
        let served = raw_get(([127, 0, 0, 1], port).into(), "web", "/").contains("v2");
        if served && router_pid(&state) != crashed {
            break;
        }
        assert!(
            crash.elapsed() < Duration::from_secs(30),
            "no router serves the app again after a crash"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "a crashed router was replaced and fed in {:?}",
        crash.elapsed()
    );
}
