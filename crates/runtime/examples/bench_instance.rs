//! The instance start-up benchmark behind `bench/instance.sh`: median time from "create" to
//! "healthy" (first `200` from `GET /healthz`) for the example app on the local provider,
//! next to its peers, in one run with the series interleaved.
//!
//! Usage: `bench_instance HELLO_BINARY [RUNS]` as root with runc and the CNI plugins
//! installed; `PODMAN_IMAGE=<name>` adds `podman run` of that image (the same binary, entry
//! point and environment).
//!
//! - kiln: `Provider::create` (overlay mount, own network namespace on kiln's bridge through
//!   CNI, bundle) + `start` until the provider's own health check reports healthy (its
//!   probes back off from 5 ms).
//! - bare runc + CNI: kiln's own network setup (`local::network::Cni::attach`: a namespace,
//!   the `loopback` plugin, then the `kiln` list, `bridge` on `kiln0` with `host-local`),
//!   then `runc run` of the bundle kiln wrote, joined to that namespace by path, until `GET /healthz` on the
//!   namespace's address answers 200, polled every millisecond. Torn down with `DEL` after
//!   each run, outside the timing.
//! - host network (`network = "host"`, the figure before instances had their own network):
//!   kiln, and bare `runc run` of such an instance's bundle.
//! - podman: `podman run -d` on podman's default network, with a fixed address per run
//!   (`--ip`), polled from when the command returns (polling an address before its interface
//!   exists leaves the host's ARP entry incomplete for a second), so the figure may be late by
//!   whatever podman does after `runc start`.
//! - fork/exec: the binary itself with `PORT` set, polled every millisecond.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use kiln_runtime::health::http_get_status;
use kiln_runtime::local::network::Cni;
use kiln_runtime::{
    DirImageSource, Health, ImageConfig, InstanceId, InstanceSpec, LocalConfig, LocalProvider,
    Provider,
};
use kiln_spec::{HealthCheck, Network};

/// The app's port inside its own network namespace (kiln's default `PORT`).
const APP_PORT: u16 = 8080;

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn until_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = tokio::time::timeout(
            Duration::from_millis(200),
            http_get_status(addr, "/healthz"),
        );
        if let Ok(Ok(200)) = probe.await {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} never answered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The bare side's network: made by kiln's own code (`local::network::Cni`, the namespace,
/// `lo`, then the `kiln` list), so both sides pay exactly the same; its address.
fn bare_attach(id: &str, dir: &Path) -> Ipv4Addr {
    std::fs::create_dir_all(dir).unwrap();
    Cni::default().attach(id, dir, &Network::Kiln).unwrap()
}

fn bare_detach(id: &str, dir: &Path) {
    Cni::default().detach(id, dir).unwrap();
}

/// A copy of the bundle kiln wrote for `instance`, with an absolute root and, when given,
/// another network namespace.
fn bare_bundle(instance_dir: &Path, to: &Path, netns: Option<&Path>) {
    let bundle = instance_dir.join("bundle");
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    config["root"]["path"] = json!(bundle.join("rootfs"));
    if let Some(netns) = netns {
        let ns = config["linux"]["namespaces"].as_array_mut().unwrap();
        let net = ns.iter_mut().find(|n| n["type"] == "network").unwrap();
        net["path"] = json!(netns);
    }
    std::fs::create_dir_all(to).unwrap();
    std::fs::write(to.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
}

fn runc_kill(root: &Path, name: &str) {
    let killed = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["kill", name, "KILL"])
        .status()
        .unwrap();
    assert!(killed.success());
}

fn spawn_runc(root: &Path, bundle: &Path, name: &str) -> tokio::process::Child {
    tokio::process::Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// kiln: create + start + health check; returns (total, create, start).
async fn kiln_once(
    provider: &LocalProvider,
    spec: &InstanceSpec,
) -> (Duration, Duration, Duration) {
    let t0 = Instant::now();
    let k = provider.create(spec.clone()).await.unwrap();
    let t1 = Instant::now();
    provider.start(&k).await.unwrap();
    let t2 = Instant::now();
    let mut health = provider.health(&k).await.unwrap();
    health.wait_for(|h| *h == Health::Healthy).await.unwrap();
    let total = t0.elapsed();
    provider.destroy(&k).await.unwrap();
    (total, t1 - t0, t2 - t1)
}

/// podman's default limits (nofile 1048576, nproc 4194304) are refused where the runtime
/// lacks `CAP_SYS_RESOURCE` (this bench machine's container): kiln's own nofile, and a
/// nproc that such a host allows.
fn podman_args(image: &str, name: &str, ip: Ipv4Addr) -> Vec<String> {
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .map_or(65_536, |h| h.min(65_536));
    [
        "run",
        "-d",
        "--name",
        name,
        "--ip",
        &ip.to_string(),
        "--ulimit",
        &format!("nofile={nofile}:{nofile}"),
        "--ulimit",
        "nproc=4096:4096",
        image,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// podman: `podman run -d` until the app answers; returns (first response, command returned).
async fn podman_once(image: &str, name: &str, ip: Ipv4Addr) -> (Duration, Duration) {
    // A neighbour entry left from an earlier address's owner would delay the first packet.
    let _ = Command::new("ip")
        .args(["neigh", "flush", "to", &ip.to_string()])
        .status();
    let t0 = Instant::now();
    let out = tokio::process::Command::new("podman")
        .args(podman_args(image, name, ip))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let returned = t0.elapsed();
    until_healthy(SocketAddr::from((ip, APP_PORT))).await;
    let first = t0.elapsed();
    let rm = Command::new("podman")
        .args(["rm", "-f", "-t", "0", name])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(rm.success());
    (first, returned)
}

#[derive(Default)]
struct Series(Vec<Duration>);

impl Series {
    fn push(&mut self, d: Duration) {
        self.0.push(d);
    }
    fn median(&self) -> Duration {
        median(&self.0)
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let hello = PathBuf::from(
        args.next()
            .expect("usage: bench_instance HELLO_BINARY [RUNS]"),
    );
    let runs: usize = args.next().map_or(20, |s| s.parse().unwrap());
    let podman = std::env::var("PODMAN_IMAGE").ok().filter(|s| !s.is_empty());
    let work = tempfile::tempdir().unwrap();
    let layer = work.path().join("layer");
    std::fs::create_dir_all(&layer).unwrap();
    std::fs::copy(&hello, layer.join("hello")).unwrap();
    let mut source = DirImageSource::new();
    let image = source.add(
        ImageConfig {
            entrypoint: vec!["/hello".to_owned()],
            env: vec!["HELLO_VERSION=bench".to_owned()],
            ..ImageConfig::default()
        },
        &[layer],
    );
    let state = work.path().join("state");
    let provider = LocalProvider::new(LocalConfig::new(&state, "runc"), Arc::new(source)).unwrap();
    let spec = InstanceSpec {
        image,
        app: "bench".to_owned(),
        env: BTreeMap::new(),
        writable: vec![kiln_runtime::Tmpfs::new("/tmp", 64 << 20)],
        memory: Some(64 << 20),
        cpus: None,
        stop_grace: Duration::from_secs(1),
        init: false,
        health: Some(HealthCheck {
            path: Some("/healthz".to_owned()),
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(500),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            start_period: Duration::from_secs(10),
        }),
        port: None,
        container_port: None,
        command: None,
        labels: Default::default(),
        target: kiln_spec::TargetSpec::default(),
        user: None,
        pids: 512,
        seccomp: kiln_spec::Seccomp::Default,
        network: Network::Kiln,
        capabilities: Vec::new(),
        secrets: Vec::new(),
    };
    let host_spec = InstanceSpec {
        network: Network::Host,
        ..spec.clone()
    };
    // Warm-up: unpacks the layer into the cache (once per image, not per instance) and
    // makes the bridge; podman's first run sets up its own network and storage.
    kiln_once(&provider, &spec).await;
    kiln_once(&provider, &host_spec).await;
    if let Some(image) = &podman {
        podman_once(image, "kiln-bench-warm", Ipv4Addr::new(10, 88, 99, 2)).await;
    }

    // The bundles kiln wrote (config.json + mounted overlay root), run bare.
    let keep = |id: &InstanceId| provider.paths(id).dir;
    let own = provider.create(spec.clone()).await.unwrap();
    let host = provider.create(host_spec.clone()).await.unwrap();
    let host_addr = provider.observe(&host).await.unwrap().addr;
    let net_dir = work.path().join("bare-net");
    let netns = kiln_runtime::local::network::netns_path(&net_dir);
    let bare_cni_bundle = work.path().join("bare-cni-bundle");
    let bare_host_bundle = work.path().join("bare-host-bundle");
    bare_bundle(&keep(&own), &bare_cni_bundle, Some(&netns));
    bare_bundle(&keep(&host), &bare_host_bundle, None);
    let root = work.path().join("bare-runc");

    let (mut kiln, mut kiln_create, mut kiln_start) =
        (Series::default(), Series::default(), Series::default());
    let (mut bare, mut bare_net) = (Series::default(), Series::default());
    let (mut kiln_host, mut bare_host) = (Series::default(), Series::default());
    let (mut kiln_host_create, mut kiln_host_start) = (Series::default(), Series::default());
    let (mut pod, mut pod_returned) = (Series::default(), Series::default());
    // The series alternate, so whatever else the machine does at a moment weighs on all of
    // them alike.
    for i in 0..runs {
        let (total, create, start) = kiln_once(&provider, &spec).await;
        kiln.push(total);
        kiln_create.push(create);
        kiln_start.push(start);

        let name = format!("bare-{i}");
        let t0 = Instant::now();
        let ip = bare_attach(&name, &net_dir);
        bare_net.push(t0.elapsed());
        let mut child = spawn_runc(&root, &bare_cni_bundle, &name);
        until_healthy(SocketAddr::from((ip, APP_PORT))).await;
        bare.push(t0.elapsed());
        runc_kill(&root, &name);
        child.wait().await.unwrap();
        bare_detach(&name, &net_dir);

        let (total, create, start) = kiln_once(&provider, &host_spec).await;
        kiln_host.push(total);
        kiln_host_create.push(create);
        kiln_host_start.push(start);

        let name = format!("bare-host-{i}");
        let t0 = Instant::now();
        let mut child = spawn_runc(&root, &bare_host_bundle, &name);
        until_healthy(host_addr).await;
        bare_host.push(t0.elapsed());
        runc_kill(&root, &name);
        child.wait().await.unwrap();

        if let Some(image) = &podman {
            let ip = Ipv4Addr::new(10, 88, 100 + (i / 250) as u8, (i % 250) as u8 + 2);
            let (first, returned) = podman_once(image, &format!("kiln-bench-{i}"), ip).await;
            pod.push(first);
            pod_returned.push(returned);
        }
    }
    provider.destroy(&own).await.unwrap();
    provider.destroy(&host).await.unwrap();

    let mut fork = Series::default();
    for _ in 0..runs {
        let port = free_port();
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new(&hello)
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        until_healthy(SocketAddr::from(([127, 0, 0, 1], port))).await;
        fork.push(t0.elapsed());
        child.kill().await.unwrap();
    }

    let k = kiln.median();
    let r = bare.median();
    println!("create → healthy, median of {runs} (example app `hello`, local provider)");
    println!(
        "  kiln, own netns on kiln0 (create + start + health)   {:>8.1} ms   (create {:.1}, start {:.1}, then health)",
        ms(k),
        ms(kiln_create.median()),
        ms(kiln_start.median())
    );
    println!(
        "  bare runc run, same netns + CNI setup                {:>8.1} ms   (netns + CNI ADD {:.1})",
        ms(r),
        ms(bare_net.median())
    );
    println!(
        "  kiln, network = \"host\"                               {:>8.1} ms   (create {:.1}, start {:.1}, then health)",
        ms(kiln_host.median()),
        ms(kiln_host_create.median()),
        ms(kiln_host_start.median())
    );
    println!(
        "  bare runc run, host network                          {:>8.1} ms",
        ms(bare_host.median())
    );
    if podman.is_some() {
        println!(
            "  podman run -d, default network, to first response   {:>8.1} ms   (command returned {:.1})",
            ms(pod.median()),
            ms(pod_returned.median())
        );
    }
    println!(
        "  fork/exec of the binary                              {:>8.1} ms",
        ms(fork.median())
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "  kiln / bare runc (same netns + CNI) = {:.2}x (target <= 1.2x)",
        ratio(k, r)
    );
    println!(
        "  kiln / bare runc (host network)     = {:.2}x",
        ratio(kiln_host.median(), bare_host.median())
    );
    if podman.is_some() {
        println!(
            "  kiln / podman run                   = {:.2}x (target <= 0.5x)",
            ratio(k, pod.median())
        );
    }
}
