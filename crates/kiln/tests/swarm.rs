//! `[target] provider = "swarm"` on the 3-node Swarm of `scripts/swarm-cluster.sh`, kiln's
//! router in front: a 3-replica app spread over the nodes, its images pulled by every node
//! from the daemon's registry (the digest each engine reports is kiln's), a rolling update, a
//! canary judged by analysis and a warm rollback under wrk load with no failed request, a
//! `docker service update` behind kiln's back found and undone, and a node killed under load
//! routed around and replaced. One cluster serves every assertion (it takes ~20 s to make).
//! Needs root, Docker Engine binaries, wrk and the release build of `hello`; skipped with a
//! note without them, except in CI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::distribution::{Distribution, distribution_available};
use common::swarm::{Cluster, cluster, swarm_prerequisites};
use common::wrk::{Wrk, wrk_available};
use common::*;

const CANARY: &str = r#"strategy = "canary"

[[deploy.steps]]
weight = 20
pause = "3s"

[[deploy.steps]]
weight = 100

[deploy.analysis]
max_error_rate = "1%"
max_p99 = "1s"
min_requests = 50
"#;

/// The example app on the swarm: 3 instances, `HELLO_VERSION = version`, `deploy` the inside
/// of `[deploy]`, `target` more lines of `[target]`.
fn swarm_spec(
    dir: &Path,
    port: u16,
    manager: &str,
    version: &str,
    deploy: &str,
    target: &str,
) -> std::path::PathBuf {
    write_spec_with(
        dir,
        port,
        &format!("HELLO_VERSION = \"{version}\""),
        3,
        &format!(
            "[target]\nprovider = \"swarm\"\ndocker_host = \"{manager}\"\n{target}\n[deploy]\n\
             keep_previous = \"10m\"\nprogress_deadline = \"3m\"\n{deploy}"
        ),
    )
}

/// The routed, healthy instances of `web` on release `release`, with their addresses.
fn live_on(s: &serde_json::Value, release: u64) -> Vec<(String, SocketAddr)> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["release"] == release && i["routed"] == true && i["health"] == "healthy")
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                i["addr"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// Waits until release `release` is completed and live on 3 healthy routed instances.
fn converged(state: &Path, release: u64, limit: Duration) -> Duration {
    wait_until(state, limit, |s| {
        s["phase"] == "completed" && s["release"] == release && live_on(s, release).len() == 3
    })
}

fn run(state: &Path, args: &[&str]) -> String {
    let out = kiln(state)
        .args(args)
        .timeout(Duration::from_secs(300))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(kind, summary)` of every event of `web`.
fn kinds(state: &Path) -> Vec<(String, String)> {
    history(state)
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_owned(),
                e.to_string(),
            )
        })
        .collect()
}

/// The image references the engine of node `n` holds, with their digests.
fn repo_digests(c: &Cluster, n: usize) -> String {
    c.docker_ok(
        n,
        &[
            "image",
            "ls",
            "--digests",
            "--format",
            "{{.Repository}}@{{.Digest}}",
        ],
    )
}

#[test]
fn a_3_replica_app_on_a_3_node_swarm_behind_kiln_s_router() {
    if !swarm_prerequisites("provider") || !wrk_available() || !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let registry = SocketAddr::new(c.env.host_addr, free_port());
    let mut daemon = Daemon::start_with(&state, &["--registry-listen", &registry.to_string()]);
    c.trust_registry(registry, &state.join("registry/ca.crt"));
    let port = free_port();
    let manager = c.env.manager.clone();

    // Release 1: three instances, one per node (Swarm puts each new task on the node running
    // the fewest), every node pulled the image by kiln's digest from kiln's registry.
    let spec = swarm_spec(dir.path(), port, &manager, "v1", "", "");
    let image = build(&state, &spec);
    let started = Instant::now();
    apply(&state, &spec, &image);
    let took = converged(&state, 1, Duration::from_secs(180));
    eprintln!(
        "release 1 live on 3 swarm instances {:.1?} after apply",
        started.elapsed().max(took)
    );
    let s = status(&state);
    let nodes: BTreeSet<_> = live_on(&s, 1).iter().map(|(_, a)| a.ip()).collect();
    assert_eq!(nodes.len(), 3, "not spread over the 3 nodes: {s:#}");
    for n in 1..=3 {
        let digests = repo_digests(&c, n);
        assert!(
            digests.contains(&format!("{registry}/kiln/web@{image}")),
            "node {n} holds no image by kiln's digest {image}: {digests}"
        );
    }
    assert!(raw_get(([127, 0, 0, 1], port).into(), "web", "/").contains("v1"));
    // Each instance's output, read from the manager's service logs.
    let logs = run(&state, &["logs", "web"]);
    assert!(logs.contains("| hello v1 listening on"), "{logs}");

    // A rolling update, a canary judged by analysis, and a warm rollback, each under wrk
    // load through kiln's router: no failed request.
    let phases: [(&str, &str, u64); 2] = [("v2", "", 2), ("v3", CANARY, 3)];
    for (version, deploy, release) in phases {
        swarm_spec(dir.path(), port, &manager, version, deploy, "");
        let wrk = Wrk::start(port, 600);
        let started = Instant::now();
        apply(&state, &spec, &image);
        converged(&state, release, Duration::from_secs(180));
        let took = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let report = wrk.finish();
        eprintln!(
            "release {release} ({}) on the swarm in {took:.1?} under wrk: {} requests, {} failed",
            if deploy.is_empty() {
                "rolling"
            } else {
                "canary"
            },
            report.requests,
            report.failed
        );
        assert!(report.requests > 100, "wrk barely ran: {}", report.text);
        assert_eq!(report.failed, 0, "{}", report.text);
    }
    let judged: Vec<String> = kinds(&state)
        .into_iter()
        .filter(|(k, _)| k == "rollout.step_judged")
        .map(|(_, e)| e)
        .collect();
    assert!(
        !judged.is_empty() && judged.iter().all(|e| e.contains("\"verdict\":\"pass\"")),
        "the canary's steps were not judged on live traffic: {judged:?}"
    );
    let wrk = Wrk::start(port, 600);
    let started = Instant::now();
    run(&state, &["rollback", "web"]);
    let took = started.elapsed();
    wait_until(&state, Duration::from_secs(60), |s| {
        live_on(s, 2).len() == 3
    });
    let report = wrk.finish();
    eprintln!(
        "warm rollback to release 2 on the swarm: {took:.1?} for the command, under wrk: {} requests, {} failed",
        report.requests, report.failed
    );
    assert_eq!(report.failed, 0, "{}", report.text);
    assert!(raw_get(([127, 0, 0, 1], port).into(), "web", "/").contains("v2"));

    // A service updated behind kiln's back is drift, named, and its instance replaced.
    let s = status(&state);
    let (victim, _) = live_on(&s, 2)[0].clone();
    c.docker_ok(
        1,
        &["service", "update", "--detach", "--env-add", "X=1", &victim],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let about = events_about(&state, &victim);
        let drift = about.iter().find(|e| e["kind"] == "drift.detected");
        let replaced = about.iter().any(|e| e["kind"] == "instance.replaced");
        if let Some(d) = drift
            && replaced
        {
            let text = d.to_string();
            assert!(
                text.contains("ContainerSpec.Env") && text.contains("X=1"),
                "{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no drift for {victim}: {about:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_until(&state, Duration::from_secs(120), |s| {
        live_on(s, 2).len() == 3 && live_on(s, 2).iter().all(|(id, _)| *id != victim)
    });
    let gone = c
        .docker(1)
        .args(["service", "inspect", &victim])
        .output()
        .unwrap();
    assert!(
        !gone.status.success(),
        "the drifted service {victim} is still there"
    );

    // A node dies under load (its engine and every process on it): kiln routes around its
    // instances and replaces them on the live nodes. Failed requests are counted and reported.
    let s = status(&state);
    let on_node3: Vec<String> = live_on(&s, 2)
        .into_iter()
        .filter(|(_, a)| a.ip() == c.addr(3))
        .map(|(id, _)| id)
        .collect();
    let wrk = Wrk::start(port, 600);
    c.kill_node(3, true);
    let took = wait_until(&state, Duration::from_secs(180), |s| {
        let live = live_on(s, 2);
        live.len() == 3 && live.iter().all(|(_, a)| a.ip() != c.addr(3))
    });
    let report = wrk.finish();
    eprintln!(
        "node 3 killed with {} instance(s) of web: 3 healthy instances on the other nodes {:.1?} later; under wrk: {} requests, {} failed",
        on_node3.len(),
        took,
        report.requests,
        report.failed
    );
    c.start_node(3);

    // A worker's engine dies alone (its containers keep answering, as on a host whose dockerd
    // crashed): kiln learns it only from the manager, which marks the node down, and replaces
    // the instances it ran while they still serve.
    let s = status(&state);
    let victim = (2..=3)
        .max_by_key(|n| {
            live_on(&s, 2)
                .iter()
                .filter(|(_, a)| a.ip() == c.addr(*n))
                .count()
        })
        .unwrap();
    let wrk = Wrk::start(port, 600);
    let started = Instant::now();
    c.kill_node(victim, false);
    wait_until(&state, Duration::from_secs(180), |s| {
        let live = live_on(s, 2);
        live.len() == 3 && live.iter().all(|(_, a)| a.ip() != c.addr(victim))
    });
    let took = started.elapsed();
    let report = wrk.finish();
    eprintln!(
        "node {victim}'s engine killed (its containers still up): its instances replaced on the other nodes {took:.1?} later; under wrk: {} requests, {} failed",
        report.requests, report.failed
    );
    assert_eq!(report.failed, 0, "{}", report.text);
    c.start_node(victim);

    // A restarted daemon adopts its swarm instances: the same three, still routed.
    let before: BTreeSet<String> = live_on(&status(&state), 2)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // The team's own registry instead of kiln's (`[target] registry`, TLS with its own CA,
    // which the daemon reads at start): `create` pushes the image there and the nodes pull it
    // from there, by kiln's digest.
    assert!(
        distribution_available(),
        "docker-registry is required (scripts/ci-setup.sh installs it)"
    );
    let (team, ca) = Distribution::start_tls(&dir.path().join("team"), c.env.host_addr);
    c.trust_registry(team.addr, &ca);
    std::fs::create_dir_all(state.join("push")).unwrap();
    std::fs::copy(&ca, state.join("push/ca.crt")).unwrap();
    daemon.kill();
    daemon.spawn();
    wait_until(&state, Duration::from_secs(60), |s| {
        let live: BTreeSet<String> = live_on(s, 2).into_iter().map(|(id, _)| id).collect();
        live == before
    });
    let release = status(&state)["release"].as_u64().unwrap();
    swarm_spec(
        dir.path(),
        port,
        &manager,
        "v4",
        "",
        &format!("registry = \"{}\"", team.addr),
    );
    apply(&state, &spec, &image);
    wait_until(&state, Duration::from_secs(180), |s| {
        let r = s["release"].as_u64().unwrap_or(0);
        s["phase"] == "completed" && r > release && live_on(s, r).len() == 3
    });
    assert!(raw_get(([127, 0, 0, 1], port).into(), "web", "/").contains("v4"));
    // The image went once, not once per instance, and its signatures and attestations
    // with it (their referrers tag, once).
    assert_eq!(
        team.requests(&["method=PUT", &format!("/manifests/{image}\"")]),
        1,
        "{}",
        team.log_text()
    );
    // (The registry's log quotes a URI only when it has a `:`.)
    let referrers_tag = format!("/manifests/sha256-{} ", image.trim_start_matches("sha256:"));
    assert_eq!(
        team.requests(&["method=PUT", &referrers_tag]),
        1,
        "{}",
        team.log_text()
    );
    let s = status(&state);
    for n in live_on(&s, s["release"].as_u64().unwrap())
        .iter()
        .map(|(_, a)| c.env.node_addrs.iter().position(|x| *x == a.ip()).unwrap() + 1)
    {
        let digests = repo_digests(&c, n);
        assert!(
            digests.contains(&format!("{}/kiln/web@{image}", team.addr)),
            "node {n} did not pull kiln's digest from the team's registry: {digests}"
        );
    }

    // `kiln down` removes every service kiln made.
    run(&state, &["down", "web"]);
    let left = c.docker_ok(
        1,
        &["service", "ls", "--filter", "label=kiln.app=web", "-q"],
    );
    assert_eq!(left.trim(), "", "services left after kiln down");
}
