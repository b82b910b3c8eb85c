//! End-to-end tests of the control plane on real runc and real sockets: a `kiln serve`
//! daemon process, the CLI as its client, the example app as the workload, and a load
//! generator that counts every failed request. They need root, runc and the release build of
//! `hello`; without them they are skipped with a note, except in CI where they must run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// The allowed cores of each `kiln-router-N` thread of a process.
fn router_threads(pid: u32) -> Vec<String> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !name.starts_with("kiln-router-") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(path.join("status")) else {
            continue;
        };
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap();
        threads.push(allowed.trim().to_owned());
    }
    threads.sort();
    threads
}

#[test]
fn the_router_flags_set_the_router_process_threads_and_their_cores() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = kiln(&state)
        .args(["serve", "--router-threads", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--router-threads"));

    let daemon = Daemon::start_with(&state, &["--router-threads", "3", "--router-pin", "false"]);
    let pid = router_pid(&state);
    // A thread names itself once it runs: on a busy machine that may be a little after the
    // daemon answers.
    let mut unpinned = router_threads(pid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while unpinned.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        unpinned = router_threads(pid);
    }
    assert_eq!(unpinned.len(), 3, "{unpinned:?}");
    let all = std::fs::read_to_string("/proc/self/status").unwrap();
    let all = all
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(unpinned.iter().all(|a| *a == all), "{unpinned:?} vs {all}");
    drop(daemon);

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores < 2 {
        eprintln!("one core: pinning two threads apart is not possible here");
        return;
    }
    // Other flags than the running router's: the daemon replaces it with one of its own.
    let _daemon = Daemon::start_with(&state, &["--router-threads", "2", "--router-pin", "true"]);
    let pid = router_pid(&state);
    let mut pinned = router_threads(pid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (pinned.len() < 2 || pinned.iter().any(|a| a.contains(['-', ','])))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        pinned = router_threads(pid);
    }
    assert_eq!(pinned.len(), 2, "{pinned:?}");
    assert!(
        pinned.iter().all(|a| a.parse::<usize>().is_ok()) && pinned[0] != pinned[1],
        "not a core each: {pinned:?}"
    );
}

#[test]
fn apply_and_warm_rollback_cycles_under_load_fail_no_request() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
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
    let _serial = serial();
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
    let drift_line = history
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some("drift.detected"));
    assert!(drift_line.is_some_and(|l| l.contains("/evil")), "{history}");
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
    // One event for it, naming the signal.
    let about = events_about(&state, &victim);
    assert_eq!(about.len(), 1, "{about:#?}");
    assert_eq!(about[0]["kind"], "instance.replaced");
    assert_eq!(
        about[0]["data"]["cause"],
        serde_json::json!({"cause": "exited", "code": 137})
    );
    kiln(&state)
        .args(["history", "web"])
        .assert()
        .success()
        .stdout(predicates::str::contains(format!(
            "{victim} killed by signal 9 (SIGKILL)"
        )));
}

#[test]
fn daemon_killed_during_a_rolling_update_converges_every_time() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
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
        // Converged: the new release live and routed on 3 instances, the previous one warm,
        // and older releases' instances (retired in the background) gone. One condition: on a
        // busy machine an instance whose health checks time out is replaced, and a second look
        // could catch it between its destroy and its successor.
        wait_until(&state, Duration::from_secs(60), |s| {
            let instances = s["instances"].as_array().unwrap();
            let live = instances.iter().filter(|i| i["release"] == round).count();
            s["phase"] == "completed"
                && s["release"] == round
                && routed(s).len() == 3
                && live == 3
                && instances.iter().all(|i| {
                    let r = i["release"].as_u64().unwrap_or(0);
                    (r == round || r == round - 1) && (i["routed"] == true) == (r == round)
                })
        });
    }
    // No instance directory without a runc container, no container without a directory
    // (once the background destroys of retired instances have finished, and the leftover of
    // a create the kill interrupted has been cleaned up: 15 s after it was made).
    let consistent = || {
        let dirs = std::fs::read_dir(state.join("instances")).map_or(0, Iterator::count);
        let listed = std::process::Command::new("runc")
            .arg("--root")
            .arg(state.join("runc"))
            .args(["list", "-q"])
            .output()
            .unwrap();
        (
            dirs,
            String::from_utf8_lossy(&listed.stdout).lines().count(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut dirs, mut containers) = consistent();
    while dirs != containers && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        (dirs, containers) = consistent();
    }
    if dirs != containers {
        let names: Vec<String> = std::fs::read_dir(state.join("instances"))
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let files: Vec<String> = std::fs::read_dir(&p)
                    .map(|d| {
                        d.map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                format!("{} {files:?}", p.display())
            })
            .collect();
        let listed = std::process::Command::new("runc")
            .arg("--root")
            .arg(state.join("runc"))
            .arg("list")
            .output()
            .unwrap();
        panic!(
            "instance directories vs runc containers: {dirs} vs {containers}\n{names:#?}\n{}\n{:#}",
            String::from_utf8_lossy(&listed.stdout),
            status(&state)
        );
    }
    kiln(&state).arg("verify").assert().success();
    kiln(&state).args(["down", "web"]).assert().success();
    let left = std::fs::read_dir(state.join("instances")).map_or(0, Iterator::count);
    assert_eq!(left, 0, "instance directories left after down");
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
    let _serial = serial();
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
        .stderr(predicates::str::contains("(event rollout.started of web)"))
        .stderr(predicates::str::contains("edited"));
}

#[test]
fn tcp_api_requires_the_bearer_token() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .arg("--state")
        .arg(&state)
        .args([
            "serve",
            "--api-listen",
            &format!("127.0.0.1:{port}"),
            "--token-file",
        ])
        .arg(&token_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the TCP API did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let denied = tcp_get(port, "/v1/apps", None);
    let wrong = tcp_get(port, "/v1/apps", Some("guess"));
    let allowed = tcp_get(port, "/v1/apps", Some("s3cret-token"));
    // The Unix socket is private to its owner: bound under umask 077, so 0700 (the execute
    // bit means nothing on a socket).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("kiln.sock")).map(|m| m.permissions().mode() & 0o777);
    let _ = child.kill();
    let _ = child.wait();
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    assert!(denied.contains("bearer token"), "{denied}");
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    assert!(allowed.ends_with("[]"), "{allowed}");
    assert_eq!(mode.unwrap() & 0o077, 0);
}

/// Regression: with a relative `--state` (the default is `./.kiln`), the periodic drift
/// rescan compared mount points with relative paths, reported every instance's root as
/// vanished every 5 s, and the reconciler replaced them all in a loop.
#[test]
fn relative_state_dir_does_not_look_like_drift() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let spec = write_spec(dir.path(), port, "v1", 2);
    let rel = |args: &[&str]| {
        let mut cmd = assert_cmd::Command::cargo_bin("kiln").unwrap();
        cmd.current_dir(dir.path())
            .env_remove("KILN_STATE")
            .args(["--state", "rel-state"])
            .args(args);
        cmd
    };
    let mut daemon = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .current_dir(dir.path())
        .env_remove("KILN_STATE")
        .args(["--state", "rel-state", "serve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Absolute from here on, for the cleanup guard (which kills nothing: the child is ours).
    let guard = Daemon {
        state: dir.path().join("rel-state"),
        child: None,
        args: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(guard.state.join("kiln.sock")).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let image = rel(&["build", "-q", "-f"]).arg(&spec).output().unwrap();
    let image = String::from_utf8(image.stdout).unwrap().trim().to_owned();
    rel(&["apply", "--image", &image, "-f"])
        .arg(&spec)
        .assert()
        .success();
    let before = routed(&status(&guard.state));
    // Past the provider's 5 s rescan.
    std::thread::sleep(Duration::from_secs(7));
    let after = routed(&status(&guard.state));
    let history = rel(&["history", "web"]).output().unwrap();
    let history = String::from_utf8(history.stdout).unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let kinds: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert!(!kinds.contains(&"drift.detected"), "{history}");
    assert_eq!(before, after, "instances were replaced");
}

#[test]
fn a_stopped_daemon_leaves_the_router_serving_and_a_stopped_router_finishes_its_requests() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let mut daemon = Daemon::start(&state);
    // Each request to / takes the instance 1.5 s.
    let spec = write_spec_with(
        dir.path(),
        port,
        "HELLO_LATENCY_MS = \"1500\"",
        1,
        "[deploy]\nprogress_deadline = \"1m\"\n",
    );
    let image = build(&state, &spec);
    apply(&state, &spec, &image);

    // The daemon stops at once; the router it fed goes on serving, the request in flight and
    // new ones.
    let client = slow_request(port);
    let mut child = daemon.child.take().unwrap();
    terminate(child.id());
    let status = wait_exit(&mut child);
    assert!(status.success(), "the daemon exited with {status}");
    let reply = client.join().unwrap().unwrap();
    assert!(reply.ends_with("hello from v1\n"), "{reply:?}");
    let reply = slow_request(port).join().unwrap().unwrap();
    assert!(
        reply.ends_with("hello from v1\n"),
        "no daemon, still served: {reply:?}"
    );

    // SIGTERM stops the router: it stops accepting and answers what it took.
    let router = router_pid(&state);
    let client = slow_request(port);
    let asked = Instant::now();
    terminate(router);
    wait_gone(router);
    let took = asked.elapsed();
    let reply = client.join().unwrap().unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200 OK\r\n") && reply.ends_with("hello from v1\n"),
        "{reply:?}"
    );
    eprintln!("the router stopped {took:?} after SIGTERM, its request answered");
    // Stopped means stopped: nothing accepts on the app's address any more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    // A second signal stops it without waiting.
    daemon.spawn();
    wait_until(&state, Duration::from_secs(20), |s| routed(s).len() == 1);
    let router = router_pid(&state);
    let client = slow_request(port);
    terminate(router);
    // Once the address refuses connections the router is stopping, and listens for another
    // signal.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "the router kept accepting");
        std::thread::sleep(Duration::from_millis(10));
    }
    terminate(router);
    wait_gone(router);
    let reply = client.join().unwrap().unwrap_or_default();
    assert!(!reply.contains("hello from v1"), "{reply:?}");
}

/// Waits up to 30 s for process `pid` (not a child of this one) to exit.
fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exited(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn down_lets_the_requests_in_flight_finish() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    // Each request to / takes the instance 1.5 s.
    let spec = write_spec_with(
        dir.path(),
        port,
        "HELLO_LATENCY_MS = \"1500\"",
        2,
        "[deploy]\nprogress_deadline = \"1m\"\n",
    );
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    let clients: Vec<_> = (0..2).map(|_| slow_request(port)).collect();
    // Sent is not yet routed: a request the router reads after `down` emptied the route gets
    // a 503, rightly. The instances take 1.5 s over each, so 300 ms lets both reach them even
    // on a busy machine (under two CPU burners, the router once read one only after `down`).
    std::thread::sleep(Duration::from_millis(300));
    kiln(&state)
        .args(["down", "web"])
        .timeout(Duration::from_secs(30))
        .assert()
        .success();
    for client in clients {
        let reply = client.join().unwrap().unwrap();
        assert!(
            reply.starts_with("HTTP/1.1 200 OK\r\n") && reply.ends_with("hello from v1\n"),
            "{reply:?}"
        );
    }
    kiln(&state)
        .args(["status", "web"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("no app named web"));
}

/// Sends a GET / (the instance takes its time) and returns once it is on its way; the thread
/// then reads the whole reply.
fn slow_request(port: u16) -> std::thread::JoinHandle<std::io::Result<String>> {
    use std::io::{Read, Write};
    let (sent, request_sent) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")?;
        let _ = sent.send(());
        let mut reply = String::new();
        s.read_to_string(&mut reply).map(|_| reply)
    });
    // Once the connection is made the request is the router's (accepted, or queued on its
    // socket, which a stopping listener still serves).
    let _ = request_sent.recv();
    client
}

fn terminate(pid: u32) {
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
}

/// Waits up to 30 s for the daemon to exit.
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `head` then `body` over a fresh connection; the whole reply.
fn raw_request(port: u16, head: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // The router may answer and close before it has read everything.
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn the_route_size_limits_of_kiln_toml_reach_the_router() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    let spec = write_spec(dir.path(), port, "v1", 1);
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "sticky = \"none\"\n",
        "sticky = \"none\"\nmax_body_size = \"1KiB\"\nmax_header_size = \"8KiB\"\n",
    );
    std::fs::write(&spec, text).unwrap();
    let image = build(&state, &spec);
    apply(&state, &spec, &image);

    let post = |size: usize| {
        raw_request(
            port,
            &format!(
                "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
            ),
            &vec![b'x'; size],
        )
    };
    let reply = post(2048);
    assert!(
        reply.starts_with("HTTP/1.1 413 ")
            && reply.ends_with("kiln: request body larger than 1024 bytes\n"),
        "{reply:?}"
    );
    let reply = post(1000);
    assert!(
        reply.starts_with("HTTP/1.1 200 ") && reply.ends_with("hello from v1\n"),
        "{reply:?}"
    );
    let padded = |size: usize| {
        raw_request(
            port,
            &format!(
                "GET / HTTP/1.1\r\nHost: web\r\nX-Padding: {}\r\nConnection: close\r\n\r\n",
                "p".repeat(size)
            ),
            b"",
        )
    };
    let reply = padded(6 * 1024);
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply:?}");
    let reply = padded(16 * 1024);
    assert!(
        reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{reply:?}"
    );
}

#[test]
fn an_apply_to_an_address_in_use_fails_and_a_later_one_is_release_1() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    let spec = write_spec(dir.path(), port, "v1", 1);
    let image = build(&state, &spec);
    let other_process = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    kiln(&state)
        .args(["apply", "-f"])
        .arg(&spec)
        .args(["--image", &image])
        .assert()
        .code(1)
        .stderr(predicates::str::contains(format!("127.0.0.1:{port}")));
    drop(other_process);
    kiln(&state)
        .args(["apply", "-f"])
        .arg(&spec)
        .args(["--image", &image])
        .timeout(Duration::from_secs(120))
        .assert()
        .success()
        .stdout(predicates::str::contains("release 1"));
}

#[test]
fn scale_logs_and_status_through_the_cli() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let _daemon = Daemon::start(&state);
    let spec = write_spec(dir.path(), port, "v1", 2);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    kiln(&state)
        .args(["scale", "web", "3"])
        .assert()
        .success()
        .stdout(predicates::str::contains("scaling to 3"));
    wait_until(&state, Duration::from_secs(20), |s| routed(s).len() == 3);
    kiln(&state)
        .args(["status", "web"])
        .assert()
        .success()
        .stdout(predicates::str::contains("live release 1"))
        .stdout(predicates::str::contains("healthy"));
    // Each instance's output, prefixed by its id.
    kiln(&state)
        .args(["logs", "web"])
        .assert()
        .success()
        .stdout(predicates::str::contains("| hello v1 listening on"));
    kiln(&state)
        .args(["scale", "web", "0"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains(
            "replicas must be between 1 and 1000",
        ));
    kiln(&state)
        .args(["status", "nope"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("no app named nope"));
}

/// `kiln up` on a spec with an `[image.test]` in a directory of its own, its stdout read
/// line by line.
struct Up {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    state: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Up {
    fn spawn(port: u16) -> Self {
        Self::spawn_with(port, |spec| spec)
    }

    /// With `edit` applied to the spec's text.
    fn spawn_with(port: u16, edit: impl Fn(String) -> String) -> Self {
        Self::spawn_full(port, edit, &[])
    }

    /// With `edit` applied to the spec's text and `args` after `up -f SPEC`.
    fn spawn_full(port: u16, edit: impl Fn(String) -> String, args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let spec = write_spec(dir.path(), port, "v1", 2);
        // `up` runs [image.test] first: give the spec one.
        let text = std::fs::read_to_string(&spec).unwrap().replace(
            "[service]\n",
            "[image.test]\nhttp = \"/healthz\"\n\n[service]\n",
        );
        std::fs::write(&spec, edit(text)).unwrap();
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
            .arg("--state")
            .arg(&state)
            .args(["up", "-f"])
            .arg(&spec)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            state,
            _dir: dir,
        }
    }

    /// Reads lines until one contains `text`.
    fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("kiln up never said {text:?}: {:#?}", self.seen));
            let done = line.contains(text);
            self.seen.push(line);
            if done {
                return;
            }
        }
    }

    /// Sends SIGINT, as Ctrl-C would, and waits for the exit; then checks that nothing of
    /// its instances is left. Returns the exit status and every line printed.
    fn interrupt(mut self) -> (std::process::ExitStatus, Vec<String>) {
        std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.try_iter());
        assert_nothing_left(&self.state);
        (status, self.seen)
    }
}

/// No instance directory or overlay mount is left under `state`.
fn assert_nothing_left(state: &Path) {
    let left = std::fs::read_dir(state.join("instances")).map_or(0, Iterator::count);
    assert_eq!(left, 0);
    let mounts: Vec<String> = mounts_under(state)
        .into_iter()
        .filter(|m| m.contains("/instances/"))
        .collect();
    assert!(mounts.is_empty(), "{mounts:?}");
}

#[test]
fn up_builds_tests_rolls_out_and_ctrl_c_stops_everything() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let port = free_port();
    // With the dashboard, read-only (no token file).
    let ui = free_port();
    let ui_listen = format!("127.0.0.1:{ui}");
    let mut up = Up::spawn_full(port, |spec| spec, &["--ui-listen", &ui_listen]);
    up.wait_for("is up on http://");
    assert!(
        up.seen.iter().any(|l| l.contains("==> testing")),
        "{:#?}",
        up.seen
    );
    assert!(
        up.seen
            .iter()
            .any(|l| l.contains(&format!("==> dashboard: http://{ui_listen}/"))),
        "{:#?}",
        up.seen
    );
    let session = raw_get(
        std::net::SocketAddr::from(([127, 0, 0, 1], ui)),
        &ui_listen,
        "/ui/session",
    );
    assert!(session.contains(r#""actions":false"#), "{session}");
    let body = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(body.ends_with("hello from v1\n"), "{body}");
    // Ctrl-C: the app and the daemon `up` started stop, and nothing is left behind.
    let (status, seen) = up.interrupt();
    assert!(status.success(), "{status}: {seen:#?}");
}

#[test]
fn ctrl_c_the_moment_up_says_it_is_up_is_not_lost() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    // The signal goes out as soon as the line is read: before the fix, SIGINT could arrive
    // before `up` listened for it and kill it, leaving its instances running.
    let mut up = Up::spawn(free_port());
    up.wait_for("is up on http://");
    let (status, seen) = up.interrupt();
    assert!(status.success(), "{status}: {seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("==> stopping web and the daemon")),
        "{seen:#?}"
    );
}

#[test]
fn ctrl_c_during_the_rollout_of_up_stops_what_it_started() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    // Instances that never pass their health check: the rollout cannot end by itself.
    let mut up = Up::spawn_with(free_port(), |spec| {
        assert!(spec.contains("[service.health]\npath = \"/healthz\""));
        spec.replace(
            "[service.health]\npath = \"/healthz\"",
            "[service.health]\npath = \"/never\"",
        )
    });
    up.wait_for("==> rolling out");
    let instances = up.state.join("instances");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&instances).map_or(0, Iterator::count) == 0 {
        assert!(
            Instant::now() < deadline,
            "no instance started: {:#?}",
            up.seen
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // `interrupt` checks that the started instances are gone.
    let (status, seen) = up.interrupt();
    assert_eq!(status.code(), Some(130), "{seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("interrupted while rolling out web")),
        "{seen:#?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("is up on http://")),
        "{seen:#?}"
    );
}
