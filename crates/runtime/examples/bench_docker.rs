//! The docker provider's start-up benchmark behind `bench/docker.sh`: median time from
//! "create" to "healthy" for the example app on kiln's docker provider, next to a plain
//! `docker run` of the same image until its first successful response, in one run.
//!
//! Usage: `bench_docker STATE IMAGE [RUNS]`, where `STATE` is a kiln state directory whose
//! image store (`STATE/images`, written by `kiln build`) holds the manifest digest `IMAGE`.
//! `BENCH_LABEL=<token>` labels every container this run creates (`kiln-bench=<token>`), so
//! the script can remove whatever a crash leaves behind. `PROFILE=1` adds an independent
//! 1 ms poller to kiln's runs, to tell when the app answered from when kiln saw it.
//!
//! - kiln: `Provider::create` + `start` until the provider's own health check reports
//!   healthy (its probes back off from 1 ms to a tenth of the time since start).
//! - docker run (same hardening): `docker run -d --rm` with the flags kiln's containers
//!   get (read-only root, tmpfs /tmp, no capabilities, no new privileges, 64 MiB), from the
//!   command's start until `GET /healthz` answers 200, polled every millisecond once the
//!   command returns (see [`docker_run`] for why not earlier).
//! - docker run (bare): the same without the hardening flags.
//! - engine API: create + start of a container as hardened as kiln's through the Engine API
//!   (no CLI), polled the same way: the floor kiln's create → healthy can reach.
//!
//! The first kiln instance loads the image into the engine; it and a first `docker run` are
//! a warm-up, left out of the numbers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use kiln_runtime::health::http_get_status;
use kiln_runtime::image::SourceError;
use kiln_runtime::{
    Digest, DockerConfig, DockerProvider, Health, ImageConfig, ImageSource, InstanceSpec, Provider,
    ResolvedImage,
};
use kiln_spec::{HealthCheck, ProviderKind, TargetSpec};

/// kiln's image store as an [`ImageSource`], as the binary's `StoreImages` does it (the
/// docker provider never unpacks layers, so that part is left out).
struct StoreImages(kiln_image::Store);

impl ImageSource for StoreImages {
    fn resolve(&self, image: &Digest) -> Result<ResolvedImage, SourceError> {
        let manifest = self.0.manifest(image)?;
        let config = ImageConfig::from_oci_json(&self.0.config(&manifest.config.digest)?)?;
        Ok(ResolvedImage {
            digest: image.clone(),
            config_digest: manifest.config.digest,
            config,
            layers: manifest.layers.into_iter().map(|l| l.digest).collect(),
        })
    }

    fn unpack_layer(&self, image: &Digest, _: &Digest, _: &Path) -> Result<(), SourceError> {
        Err(format!("image {image}: the docker benchmark does not unpack layers").into())
    }

    fn export_docker_archive(
        &self,
        image: &Digest,
        tags: &[String],
        dest: &Path,
    ) -> Result<Digest, SourceError> {
        Ok(kiln_image::archive::export_docker_archive(
            &self.0, image, tags, dest,
        )?)
    }
}

/// Median, min and max.
fn stats(v: &[Duration]) -> (Duration, Duration, Duration) {
    let mut v = v.to_vec();
    v.sort();
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until `GET /healthz` on `addr` answers 200, polling every millisecond; `None`
/// after 30 s.
async fn until_ready(addr: SocketAddr) -> Option<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(200) = http_get_status(addr, "/healthz").await {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The hardening flags kiln's containers get, as `docker run` spells them.
const HARDENING: &[&str] = &[
    "--read-only",
    "--tmpfs",
    "/tmp:rw,nosuid,nodev,size=64m",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--memory",
    "64m",
];

/// `docker run -d --rm` of `image` (with `flags`) from the command's start to the first 200.
async fn docker_run(image: &str, flags: &[&str], name: &str, label: &str) -> Duration {
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:{port}");
    let env = format!("PORT={port}");
    let label = format!("kiln-bench={label}");
    let t0 = Instant::now();
    let child = tokio::process::Command::new("docker")
        .args(["run", "-d", "--rm", "--name", name, "--label", &label])
        .args(["-p", &publish, "-e", &env])
        .args(flags)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the docker CLI");
    let out = child.wait_with_output().await.unwrap();
    if !out.status.success() {
        remove(name).await;
    }
    assert!(
        out.status.success(),
        "docker run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Polling starts once `docker run -d` returns, as kiln's health check starts once
    // `start` returns: a connection made earlier is accepted by the engine's port proxy
    // before the container's network is up and stalls for ~1 s (a 1 s retransmit), and in
    // our runs every probe in that window stalled with it — an artefact of watching too
    // early, not a cost of `docker run`.
    let ready = until_ready(SocketAddr::from(([127, 0, 0, 1], port))).await;
    remove(name).await;
    ready.unwrap_or_else(|| panic!("{name} never answered on port {port}")) - t0
}

/// Removes a peer container by name (the CLI, like the peer itself).
async fn remove(name: &str) {
    let _ = tokio::process::Command::new("docker")
        .args(["rm", "-f", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Create + start through the Engine API of a container as hardened as kiln's, to the first
/// 200: (total, create, start).
async fn engine_api(
    docker: &Docker,
    image: &str,
    name: &str,
    label: &str,
) -> (Duration, Duration, Duration) {
    let port = free_port();
    let port_key = format!("{port}/tcp");
    let mut bindings = HashMap::new();
    bindings.insert(
        port_key.clone(),
        Some(vec![PortBinding {
            host_ip: Some("127.0.0.1".to_owned()),
            host_port: Some(port.to_string()),
        }]),
    );
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        env: Some(vec![format!("PORT={port}")]),
        labels: Some(HashMap::from([("kiln-bench".to_owned(), label.to_owned())])),
        exposed_ports: Some(vec![port_key]),
        host_config: Some(HostConfig {
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                "rw,nosuid,nodev,size=64m".to_owned(),
            )])),
            port_bindings: Some(bindings),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            cap_drop: Some(vec!["ALL".to_owned()]),
            memory: Some(64 << 20),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    };
    let t0 = Instant::now();
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_owned()),
                platform: String::new(),
            }),
            body,
        )
        .await
        .unwrap();
    let t1 = Instant::now();
    docker.start_container(&created.id, None).await.unwrap();
    let t2 = Instant::now();
    let ready = until_ready(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        link: false,
    };
    docker
        .remove_container(&created.id, Some(options))
        .await
        .unwrap();
    let ready = ready.unwrap_or_else(|| panic!("{name} never answered on port {port}"));
    (ready - t0, t1 - t0, t2 - t1)
}

/// One kiln instance from create to healthy, destroyed after: (total, create, start,
/// first 200 seen by an independent poller when profiling).
async fn kiln_once(
    provider: &DockerProvider,
    state: &Path,
    spec: &InstanceSpec,
    profile: bool,
) -> (Duration, Duration, Duration, Option<Duration>) {
    let t0 = Instant::now();
    let id = provider.create(spec.clone()).await.unwrap();
    let t1 = Instant::now();
    provider.start(&id).await.unwrap();
    let t2 = Instant::now();
    let poller = profile.then(|| {
        let addr = recorded_addr(state, &id);
        tokio::spawn(until_ready(addr))
    });
    let mut health = provider.health(&id).await.unwrap();
    let healthy = tokio::time::timeout(
        Duration::from_secs(30),
        health.wait_for(|h| matches!(h, Health::Healthy | Health::Failed)),
    )
    .await
    .unwrap_or_else(|_| panic!("instance {id} never became healthy"))
    .map(|h| *h)
    .unwrap();
    assert_eq!(healthy, Health::Healthy, "instance {id} failed");
    let total = t0.elapsed();
    let ready = match poller {
        Some(p) => p.await.unwrap().map(|r| r - t0),
        None => None,
    };
    provider.destroy(&id).await.unwrap();
    (total, t1 - t0, t2 - t1, ready)
}

/// The instance's address from the record kiln wrote at create (a file read, not an engine
/// call, so the poller adds nothing to kiln's timed path).
fn recorded_addr(state: &Path, id: &kiln_runtime::InstanceId) -> SocketAddr {
    let record = std::fs::read(state.join("docker").join(format!("{id}.json"))).unwrap();
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    let port = record["port"].as_u64().and_then(|p| u16::try_from(p).ok());
    SocketAddr::from(([127, 0, 0, 1], port.expect("a port in the record")))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_docker STATE IMAGE [RUNS]";
    let state = PathBuf::from(args.next().expect(usage));
    let image = Digest::parse(&args.next().expect(usage)).expect("IMAGE must be a sha256 digest");
    let runs: usize = args.next().map_or(10, |s| s.parse().expect(usage));
    let label = std::env::var("BENCH_LABEL").unwrap_or_else(|_| std::process::id().to_string());
    let profile = std::env::var("PROFILE").is_ok_and(|v| v == "1");

    let store = kiln_image::Store::open(state.join("images")).unwrap();
    let images = Arc::new(StoreImages(store));
    let image_id = images.resolve(&image).unwrap().config_digest.to_string();
    let kiln_state = state.join("bench");
    let provider = DockerProvider::connect(DockerConfig::new(&kiln_state, None), images)
        .await
        .unwrap();
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
        labels: BTreeMap::from([("kiln-bench".to_owned(), label.clone())]),
        target: TargetSpec {
            provider: ProviderKind::Docker,
            ..TargetSpec::default()
        },
        user: None,
        pids: 512,
        seccomp: kiln_spec::Seccomp::Default,
        network: kiln_spec::Network::Kiln,
        capabilities: Vec::new(),
        secrets: Vec::new(),
    };
    let docker = provider.engine().clone();

    // Warm-up: the first create loads the image into the engine (once per image, not per
    // instance); the first `docker run` and API create pay their own first-time costs.
    let loaded = docker.inspect_image(&image_id).await.is_ok();
    let t = Instant::now();
    kiln_once(&provider, &kiln_state, &spec, false).await;
    eprintln!(
        "  (warm-up, left out: kiln's first instance, {}, {:.0} ms)",
        if loaded {
            "image already in the engine"
        } else {
            "loading the image into the engine"
        },
        ms(t.elapsed())
    );
    docker_run(
        &image_id,
        HARDENING,
        &format!("kiln-bench-{label}-warm"),
        &label,
    )
    .await;
    engine_api(
        &docker,
        &image_id,
        &format!("kiln-bench-{label}-warm-api"),
        &label,
    )
    .await;

    let (mut kiln, mut creates, mut starts, mut readies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut hardened, mut bare) = (Vec::new(), Vec::new());
    let (mut api, mut api_creates, mut api_starts) = (Vec::new(), Vec::new(), Vec::new());
    // The four alternate, one run each in turn, so whatever else the machine does at a
    // moment weighs on every series alike.
    for i in 0..runs {
        let (total, create, start, ready) = kiln_once(&provider, &kiln_state, &spec, profile).await;
        kiln.push(total);
        creates.push(create);
        starts.push(start);
        readies.extend(ready.map(|r| total.saturating_sub(r)));

        let name = format!("kiln-bench-{label}-{i}");
        hardened.push(docker_run(&image_id, HARDENING, &format!("{name}-h"), &label).await);
        bare.push(docker_run(&image_id, &[], &format!("{name}-b"), &label).await);
        let (total, create, start) =
            engine_api(&docker, &image_id, &format!("{name}-a"), &label).await;
        api.push(total);
        api_creates.push(create);
        api_starts.push(start);
    }

    let m = |v: &[Duration]| ms(stats(v).0);
    eprintln!(
        "  (kiln's median split: create {:.1} ms, start {:.1} ms, then its health check)",
        m(&creates),
        m(&starts)
    );
    if !readies.is_empty() {
        eprintln!(
            "  (PROFILE: kiln saw healthy a median {:.1} ms after a 1 ms poller saw a 200)",
            m(&readies)
        );
    }
    eprintln!(
        "  (engine API's median split: create {:.1} ms, start {:.1} ms, then the app)",
        m(&api_creates),
        m(&api_starts)
    );

    println!("create → healthy, docker provider, median (min–max) of {runs}, warm-up left out");
    println!("(example app `hello`, a static binary on scratch, built by `kiln build`)");
    let row = |name: &str, v: &[Duration]| {
        let (med, min, max) = stats(v);
        println!(
            "  {name:<44} {:>7.1} ms  ({:.1}–{:.1})",
            ms(med),
            ms(min),
            ms(max)
        );
    };
    row("kiln (create + start + health check)", &kiln);
    row("docker run, same hardening, to first 200", &hardened);
    row("docker run, bare, to first 200", &bare);
    row("engine API create + start, to first 200", &api);
    let k = stats(&kiln).0.as_secs_f64();
    println!(
        "  kiln / docker run (same hardening) = {:.2}x (target <= 1.2x)",
        k / stats(&hardened).0.as_secs_f64()
    );
    println!(
        "  kiln / docker run (bare)           = {:.2}x",
        k / stats(&bare).0.as_secs_f64()
    );
}
