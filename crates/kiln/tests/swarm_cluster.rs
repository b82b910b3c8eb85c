//! End-to-end test of `scripts/swarm-cluster.sh`, the 3-node Docker Swarm on one machine that
//! the swarm provider's tests and benchmarks run on: it comes up from nothing (and a second
//! `up` changes nothing); a busybox service with host-mode published ports answers from the
//! root namespace at every node's address, on the port each task's status reports; overlay
//! networking carries traffic between nodes; a node whose dockerd is killed is seen Down and
//! its task rescheduled, and comes back Ready; the nodes trust a registry's CA installed with
//! `trust-registry`; `down` leaves nothing (namespaces, links, processes, mounts, files).
//!
//! Needs root, dockerd (docker.io), iproute2, util-linux and /bin/busybox (busybox-static);
//! with `CI=true` a missing prerequisite fails the test. It prints the measured times.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::swarm::{Cluster, ClusterEnv, cluster, script, script_ok, swarm_prerequisites};
use common::{BUSYBOX, raw_get};

const IMAGE: &str = "kiln-swarm-test/httpd:1";

#[test]
fn a_three_node_swarm_comes_up_serves_survives_a_dead_node_and_leaves_nothing() {
    if !swarm_prerequisites("cluster") {
        return;
    }
    if !Path::new(BUSYBOX).exists() {
        let why = "/bin/busybox is missing (apt-get install busybox-static)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {why}"
        );
        eprintln!("note: skipping the swarm cluster test ({why})");
        return;
    }
    let _serial = common::serial();

    // From nothing: `env` has nothing to print, `up` makes the cluster.
    script_ok(&["down"]);
    assert_eq!(script(&["env"]).status.code(), Some(1));
    let start = Instant::now();
    let env = ClusterEnv::parse(&script_ok(&["up"]));
    let up_time = start.elapsed();
    eprintln!("swarm-cluster up from nothing: {up_time:?}");
    assert_eq!(env.nodes.len(), 3);
    assert_eq!(env.manager, env.nodes[0]);
    let pids = dockerd_pids();

    // A second `up` (the one `cluster()` runs) is a no-op: same env, same engines.
    let start = Instant::now();
    let c = cluster();
    eprintln!(
        "swarm-cluster up on a running cluster: {:?}",
        start.elapsed()
    );
    assert_eq!(c.env, env);
    assert_eq!(dockerd_pids(), pids, "a second up restarted an engine");
    assert_eq!(ClusterEnv::parse(&script_ok(&["env"])), env);
    let nodes = c.nodes();
    assert_eq!(nodes.len(), 3);
    for node in &nodes {
        assert_eq!(node["Status"]["State"], "ready", "{node:#}");
        let n = c.node_number(node["ID"].as_str().unwrap());
        assert_eq!(node["Description"]["Hostname"], format!("kiln-sw{n}"));
    }
    script_ok(&["status"]);

    build_and_share_image(&c);
    let tasks = host_mode_service_answers_on_every_node(&c);
    routing_mesh(&c);
    overlay_carries_traffic_between_nodes(&c);
    a_dead_node_is_seen_and_its_task_rescheduled(&c, &tasks);
    a_node_killed_whole_stops_answering(&c);
    nodes_trust_a_registry_ca(&c);
    up_after_a_crash_starts_afresh(&c);

    // `down` leaves nothing of the cluster.
    let start = Instant::now();
    let out = c.down();
    let down_time = start.elapsed();
    assert!(
        out.status.success(),
        "down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("swarm-cluster down: {down_time:?}");
    nothing_left();
    // And again, with nothing up.
    script_ok(&["down"]);
}

/// Every engine killed (their containerd with them), their shims and containers left running:
/// `up` cleans that and makes a new cluster.
fn up_after_a_crash_starts_afresh(c: &Cluster) {
    c.wait("3 web tasks running", Duration::from_secs(90), || {
        c.task_addrs("web", 80).len() == 3
    });
    let old = dockerd_pids();
    let shims: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
            let pid = p.file_name().to_string_lossy().parse().ok()?;
            (cmdline.contains("containerd-shim") && cmdline.contains("/run/kiln-swarm/"))
                .then_some(pid)
        })
        .collect();
    assert!(shims.len() >= 3, "the web tasks' shims: {shims:?}");
    for n in 1..=3 {
        c.kill_node(n, false);
    }
    assert!(shims.iter().all(|pid| !common::exited(*pid)));
    let start = Instant::now();
    let env = ClusterEnv::parse(&script_ok(&["up"]));
    eprintln!("swarm-cluster up after a crash: {:?}", start.elapsed());
    assert_eq!(env, c.env);
    let new = dockerd_pids();
    assert!(old.iter().all(|pid| !new.contains(pid)), "{old:?} {new:?}");
    assert!(shims.iter().all(|pid| common::exited(*pid)));
    assert!(c.nodes().iter().all(|n| n["Status"]["State"] == "ready"));
    // A new swarm: the old service went with the old state; what trust-registry installed
    // stays until `down`.
    assert_eq!(c.docker_ok(1, &["service", "ls", "-q"]).trim(), "");
    assert!(
        !trusted_cas().is_empty(),
        "up after a crash dropped the trusted CA"
    );
}

/// The CAs installed for registries at the host's address.
fn trusted_cas() -> Vec<String> {
    std::fs::read_dir("/etc/docker/certs.d")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("10.89.0.1:"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
}

/// The engines' pids, from their pidfiles.
fn dockerd_pids() -> Vec<String> {
    (1..=3)
        .map(|n| std::fs::read_to_string(format!("/run/kiln-swarm/n{n}/docker.pid")).unwrap())
        .collect()
}

/// `FROM scratch` + busybox serving its container's hostname over HTTP on :80, built on node 1
/// and loaded on the others.
fn build_and_share_image(c: &Cluster) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(BUSYBOX, dir.path().join("busybox")).unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         CMD [\"/bin/sh\", \"-c\", \"mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www\"]\n",
    )
    .unwrap();
    c.docker_ok(
        1,
        &["build", "-q", "-t", IMAGE, &dir.path().to_string_lossy()],
    );
    c.share_image(1, IMAGE);
    for n in 1..=3 {
        c.docker_ok(n, &["image", "inspect", IMAGE]);
    }
}

/// The body of `GET /` at `addr`, or what went wrong.
fn body(addr: SocketAddr) -> Option<String> {
    let resp = raw_get(addr, "web", "/");
    if !resp.starts_with("HTTP/1.1 200") && !resp.starts_with("HTTP/1.0 200") {
        return None;
    }
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
}

/// 3 replicas with `--publish mode=host,target=80` and no published port: Swarm picks one
/// on each node, the task status reports it, and each answers from the root namespace with
/// its node's name. Returns (task, node, address) of each.
fn host_mode_service_answers_on_every_node(c: &Cluster) -> Vec<(String, usize, SocketAddr)> {
    c.docker_ok(
        1,
        &[
            "service",
            "create",
            "-d",
            "--name",
            "web",
            "--replicas",
            "3",
            "--hostname",
            "{{.Node.Hostname}}",
            "--stop-grace-period",
            "1s",
            // busybox as pid 1 ignores SIGTERM; a restarting engine waits 10 s for such ones.
            "--init",
            "--publish",
            "mode=host,target=80",
            IMAGE,
        ],
    );
    let mut tasks = vec![];
    let took = c.wait("3 web tasks answering", Duration::from_secs(90), || {
        tasks = c.task_addrs("web", 80);
        tasks.len() == 3
            && tasks
                .iter()
                .all(|(_, n, addr)| body(*addr).as_deref() == Some(&format!("kiln-sw{n}")))
    });
    eprintln!("web: 3 host-mode tasks answering after {took:?}:");
    for (task, n, addr) in &tasks {
        eprintln!("  task {task} on node {n}: {addr}");
        assert_eq!(addr.ip(), c.addr(*n));
        assert_ne!(addr.port(), 0);
    }
    let mut on: Vec<usize> = tasks.iter().map(|t| t.1).collect();
    on.sort_unstable();
    assert_eq!(on, [1, 2, 3], "Swarm did not spread the 3 replicas");

    // Every container runs with no-new-privileges, from the node's daemon config.
    for (task, n, _) in &tasks {
        let t = c.inspect(1, "", task);
        let container = t["Status"]["ContainerStatus"]["ContainerID"]
            .as_str()
            .unwrap();
        let pid = c.inspect(*n, "", container)["State"]["Pid"]
            .as_u64()
            .unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.lines().any(|l| l == "NoNewPrivs:\t1"),
            "task {task} on node {n} runs without no-new-privileges"
        );
    }
    tasks
}

/// Swarm's ingress routing mesh balances with IPVS. With IPVS in the kernel, a published port
/// answers on every node's address; without it (CONFIG_IP_VS unset, no modules: the CI's
/// kernel) it answers on none, and dockerd says why.
fn routing_mesh(c: &Cluster) {
    c.docker_ok(
        1,
        &[
            "service",
            "create",
            "-d",
            "--name",
            "mesh",
            "--replicas",
            "3",
            "--hostname",
            "{{.Node.Hostname}}",
            "--stop-grace-period",
            "1s",
            "--publish",
            "published=8080,target=80",
            IMAGE,
        ],
    );
    c.wait("3 mesh tasks running", Duration::from_secs(90), || {
        let ids = c.docker_ok(
            1,
            &["service", "ps", "-q", "-f", "desired-state=running", "mesh"],
        );
        let ids: Vec<&str> = ids.split_whitespace().collect();
        ids.len() == 3
            && ids
                .iter()
                .all(|id| c.inspect(1, "", id)["Status"]["State"] == "running")
    });
    let ipvs = Path::new("/proc/net/ip_vs").exists();
    let addrs: Vec<SocketAddr> = (1..=3).map(|n| SocketAddr::new(c.addr(n), 8080)).collect();
    if ipvs {
        let took = c.wait("the mesh answering", Duration::from_secs(60), || {
            addrs.iter().all(|a| body(*a).is_some())
        });
        eprintln!("routing mesh: answers on every node after {took:?}");
    } else {
        // FIXME: no routing mesh without IPVS; kiln's router reaches the tasks over host-mode
        // ports instead. Pinned as it is so a kernel with IPVS turns this branch off.
        for a in &addrs {
            let resp = raw_get(*a, "web", "/");
            assert!(
                !resp.starts_with("HTTP/"),
                "the mesh answered at {a} without IPVS: {resp}"
            );
        }
        let logs: String = (1..=3)
            .map(|n| {
                std::fs::read_to_string(format!("/run/kiln-swarm/n{n}/dockerd.log"))
                    .unwrap_or_default()
            })
            .collect();
        assert!(
            logs.contains("Could not get ipvs family information from the kernel"),
            "no IPVS here, yet dockerd did not say so"
        );
        eprintln!("note: no IPVS in this kernel: Swarm's ingress routing mesh does not answer");
    }
    c.docker_ok(1, &["service", "rm", "mesh"]);
}

/// Two containers on an attachable overlay network, on nodes 2 and 3: one reaches the other
/// over VXLAN between the node namespaces.
fn overlay_carries_traffic_between_nodes(c: &Cluster) {
    c.docker_ok(
        1,
        &["network", "create", "-d", "overlay", "--attachable", "ov"],
    );
    let run = |n: usize, name: &str| {
        c.docker_ok(
            n,
            &[
                "run",
                "-d",
                "--name",
                name,
                "--hostname",
                name,
                "--network",
                "ov",
                IMAGE,
            ],
        );
    };
    run(2, "overlay-a");
    run(3, "overlay-b");
    let a = c.inspect(2, "", "overlay-a");
    let ip = a["NetworkSettings"]["Networks"]["ov"]["IPAddress"]
        .as_str()
        .unwrap()
        .to_owned();
    let get = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 80");
    let mut last = String::new();
    c.wait(
        "node 3 reaching node 2 over the overlay",
        Duration::from_secs(30),
        || {
            let out = c
                .docker(3)
                .args(["exec", "overlay-b", "sh", "-c", &get])
                .output()
                .unwrap();
            last = String::from_utf8_lossy(&out.stdout).into_owned();
            last.ends_with("overlay-a\n")
        },
    );
    eprintln!("overlay: node 3 reached node 2's container at {ip}");
    c.docker_ok(2, &["rm", "-f", "overlay-a"]);
    c.docker_ok(3, &["rm", "-f", "overlay-b"]);
    c.docker_ok(1, &["network", "rm", "ov"]);
}

fn node_state(c: &Cluster, n: usize) -> String {
    c.nodes()
        .into_iter()
        .find(|node| node["Status"]["Addr"] == c.addr(n).to_string())
        .map(|node| node["Status"]["State"].as_str().unwrap().to_owned())
        .unwrap()
}

/// `kill-node 3`: the manager marks node 3 Down, Swarm runs its task on a live node (on
/// another host port), and `start-node 3` brings the node back Ready.
fn a_dead_node_is_seen_and_its_task_rescheduled(
    c: &Cluster,
    before: &[(String, usize, SocketAddr)],
) {
    let lost = before.iter().find(|t| t.1 == 3).unwrap().0.clone();
    let start = Instant::now();
    c.kill_node(3, false);
    c.wait("node 3 Down", Duration::from_secs(60), || {
        node_state(c, 3) == "down"
    });
    eprintln!(
        "kill-node 3: the manager saw node 3 Down after {:?}",
        start.elapsed()
    );
    let mut tasks = vec![];
    c.wait("the task rescheduled", Duration::from_secs(90), || {
        tasks = c.task_addrs("web", 80);
        tasks.len() == 3
            && tasks.iter().all(|(task, n, addr)| {
                *n != 3 && *task != lost && body(*addr).as_deref() == Some(&format!("kiln-sw{n}"))
            })
    });
    eprintln!(
        "kill-node 3: 3 tasks answering on nodes 1 and 2 after {:?}:",
        start.elapsed()
    );
    for (task, n, addr) in &tasks {
        eprintln!("  task {task} on node {n}: {addr}");
    }
    let start = Instant::now();
    c.start_node(3);
    eprintln!("start-node 3: Ready again after {:?}", start.elapsed());
    assert_eq!(node_state(c, 3), "ready");
}

/// `kill-node 2 --all`: nothing of node 2 runs, so its task's port no longer answers; then it
/// comes back.
fn a_node_killed_whole_stops_answering(c: &Cluster) {
    let tasks = c.task_addrs("web", 80);
    let on2: Vec<SocketAddr> = tasks.iter().filter(|t| t.1 == 2).map(|t| t.2).collect();
    assert!(!on2.is_empty(), "no web task on node 2: {tasks:?}");
    c.kill_node(2, true);
    for addr in on2 {
        assert!(
            body(addr).is_none(),
            "{addr} still answers after kill-node 2 --all"
        );
    }
    let start = Instant::now();
    c.start_node(2);
    eprintln!(
        "start-node 2 after --all: Ready again after {:?}",
        start.elapsed()
    );
}

/// A TLS endpoint at `addr` with a certificate for its IP: counts the HTTP requests that
/// reach it (so only clients that trusted the certificate) and answers 404 to each.
fn tls_endpoint(addr: IpAddr) -> (SocketAddr, String, Arc<AtomicU64>) {
    let cert = rcgen::generate_simple_self_signed(vec![addr.to_string()]).unwrap();
    let pem = cert.cert.pem();
    let key: rustls_pki_types::PrivateKeyDer =
        rustls_pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()).into();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap(),
    );
    let listener = TcpListener::bind((addr, 0)).unwrap();
    let local = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&requests);
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
            let Ok(conn) = rustls::ServerConnection::new(Arc::clone(&config)) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            if req.windows(4).any(|w| w == b"\r\n\r\n") {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = tls.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    (local, pem, requests)
}

/// A pull on node 2 from a TLS registry at the host's address fails on the certificate until
/// `trust-registry` installs its CA; then the request gets through TLS (and fails on what the
/// endpoint answers). `--insecure` puts the address in every node's insecure-registries.
fn nodes_trust_a_registry_ca(c: &Cluster) {
    let (addr, pem, requests) = tls_endpoint(c.env.host_addr);
    let reference = format!("{addr}/kiln/probe:1");
    let pull = || {
        let out = c.docker(2).args(["pull", &reference]).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let untrusted = pull();
    assert!(
        untrusted.contains("x509") || untrusted.contains("certificate"),
        "{untrusted}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 0);

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pem).unwrap();
    c.trust_registry(addr, &ca);
    let installed = format!("/etc/docker/certs.d/{addr}/ca.crt");
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), pem);
    let trusted = pull();
    assert!(
        !trusted.contains("x509") && !trusted.contains("certificate"),
        "{trusted}"
    );
    assert!(
        requests.load(Ordering::SeqCst) > 0,
        "the pull never reached the endpoint over TLS: {trusted}"
    );
    eprintln!("trust-registry: node 2 pulled over verified TLS from {addr}");

    // Not a certificate: refused with exit 1.
    let bad = script(&["trust-registry", &addr.to_string(), "/etc/hostname"]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        script(&["trust-registry", "nonsense"]).status.code(),
        Some(2)
    );

    script_ok(&["trust-registry", &addr.to_string(), "--insecure"]);
    for n in 1..=3 {
        c.wait(
            "insecure-registries reloaded",
            Duration::from_secs(20),
            || {
                let configs = c.docker_ok(
                    n,
                    &["info", "--format", "{{json .RegistryConfig.IndexConfigs}}"],
                );
                let v: serde_json::Value = serde_json::from_str(&configs).unwrap();
                v[addr.to_string()]["Secure"] == false
            },
        );
    }
}

fn nothing_left() {
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains("kiln-sw"), "namespaces left: {netns}");
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("kiln-sw"), "links left: {links}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains("/run/kiln-swarm") && !mounts.contains("/var/lib/kiln-swarm"),
        "mounts left: {mounts}"
    );
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains("/run/kiln-swarm") && !cmdline.contains("/var/lib/kiln-swarm"),
            "process left: {cmdline}"
        );
    }
    for n in 1..=3 {
        let cgroup = format!("/sys/fs/cgroup/pids/kiln-swarm-n{n}");
        assert!(!Path::new(&cgroup).exists(), "{cgroup} left");
    }
    assert!(!Path::new("/run/kiln-swarm").exists());
    assert!(!Path::new("/var/lib/kiln-swarm").exists());
    let certs = trusted_cas();
    assert!(certs.is_empty(), "registry CAs left: {certs:?}");
    let rules = std::process::Command::new("iptables")
        .args(["-S", "FORWARD"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains("kiln-swarm"),
        "iptables rules left: {rules}"
    );
}
