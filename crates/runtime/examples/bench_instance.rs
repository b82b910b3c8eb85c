//! The instance start-up benchmark behind `bench/instance.sh`: median time from "create" to
//! "healthy" for the example app on the local provider, next to a bare `runc run` of the
//! same bundle and a plain fork/exec of the binary, in one run.
//!
//! Usage: `bench_instance HELLO_BINARY [RUNS]` as root with runc installed.
//!
//! - kiln: `Provider::create` (overlay mount, bundle) + `start` until the provider's own
//!   health check reports healthy (its probes back off from 5 ms).
//! - runc: `runc run` (foreground, as kiln runs it) of the bundle kiln wrote, until
//!   `GET /healthz` answers 200, polled every millisecond.
//! - fork/exec: the binary itself with `PORT` set, polled the same way.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_runtime::health::http_get_status;
use kiln_runtime::{
    DirImageSource, Health, ImageConfig, InstanceSpec, LocalConfig, LocalProvider, Provider,
};
use kiln_spec::HealthCheck;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn until_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(200) = http_get_status(addr, "/healthz").await {
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let hello = PathBuf::from(
        args.next()
            .expect("usage: bench_instance HELLO_BINARY [RUNS]"),
    );
    let runs: usize = args.next().map_or(20, |s| s.parse().unwrap());
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
        network: kiln_spec::Network::Kiln,
        capabilities: Vec::new(),
        secrets: Vec::new(),
    };
    // Warm-up: unpacks the layer into the cache (once per image, not per instance).
    let warm = provider.create(spec.clone()).await.unwrap();
    provider.destroy(&warm).await.unwrap();

    let mut kiln = Vec::new();
    let (mut creates, mut starts) = (Vec::new(), Vec::new());
    // The same bundle (config.json + mounted overlay root) that kiln wrote, run bare.
    let id = provider.create(spec.clone()).await.unwrap();
    let addr = provider.observe(&id).await.unwrap().addr;
    let bundle = provider.paths(&id).dir.join("bundle");
    let root = work.path().join("bare-runc");
    let mut bare = Vec::new();
    // kiln and bare runc alternate, so whatever else the machine does at a moment weighs
    // on both series alike.
    for i in 0..runs {
        let t0 = Instant::now();
        let k = provider.create(spec.clone()).await.unwrap();
        let t1 = Instant::now();
        provider.start(&k).await.unwrap();
        let t2 = Instant::now();
        let mut health = provider.health(&k).await.unwrap();
        health.wait_for(|h| *h == Health::Healthy).await.unwrap();
        kiln.push(t0.elapsed());
        creates.push(t1 - t0);
        starts.push(t2 - t1);
        provider.destroy(&k).await.unwrap();

        let name = format!("bare-{i}");
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        until_healthy(addr).await;
        bare.push(t0.elapsed());
        let killed = std::process::Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["kill", &name, "KILL"])
            .status()
            .unwrap();
        assert!(killed.success());
        child.wait().await.unwrap();
    }
    eprintln!(
        "  (kiln's median split: create {:.1} ms, start {:.1} ms, then health)",
        median(creates).as_secs_f64() * 1000.0,
        median(starts).as_secs_f64() * 1000.0
    );
    provider.destroy(&id).await.unwrap();

    let mut fork = Vec::new();
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

    let (k, r, f) = (median(kiln), median(bare), median(fork));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("create → healthy, median of {runs} (example app `hello`, local provider)");
    println!("  kiln (create + start + health check) {:>8.1} ms", ms(k));
    println!("  bare runc run of the same bundle     {:>8.1} ms", ms(r));
    println!("  fork/exec of the binary              {:>8.1} ms", ms(f));
    println!(
        "  kiln / runc = {:.2}x (target <= 1.2x)",
        k.as_secs_f64() / r.as_secs_f64()
    );
}
