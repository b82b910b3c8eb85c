//! The local provider against the real kernel and real runc: read-only roots, writable
//! tmpfs, health, drift from the host, adoption by a new provider, and a destroy that leaves
//! nothing behind. Needs root and runc: skipped with a note without them, except in CI
//! (`CI=true`), where missing prerequisites fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_runtime::{
    DirImageSource, DriftReport, Health, ImageConfig, InstanceSpec, InstanceState, LocalConfig,
    LocalProvider, Provider,
};
use kiln_spec::HealthCheck;

/// Whether the real-runc tests can run here; panics in CI when they cannot.
fn prerequisites() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let runc = std::process::Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let busybox = Path::new("/bin/busybox").exists();
    // Sealed instances get the host's seccomp allowlist, or do not start.
    let profile = Path::new("/usr/share/containers/seccomp.json").exists();
    if root && runc && busybox && profile {
        return true;
    }
    let why = format!(
        "root={root} runc={runc} /bin/busybox={busybox} seccomp profile={profile} \
         (golang-github-containers-common)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the real-runc prerequisites are missing: {why}");
    }
    eprintln!("note: skipping real-runc test ({why}); install runc and busybox-static as root");
    false
}

/// A busybox image: `/bin/busybox` and a `/www` with a `healthz` page.
struct Fixture {
    _dir: tempfile::TempDir,
    state: PathBuf,
    source: DirImageSource,
    image: kiln_runtime::Digest,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("layer-busybox");
    std::fs::create_dir_all(base.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", base.join("bin/busybox")).unwrap();
    let www = dir.path().join("layer-www");
    std::fs::create_dir_all(www.join("www")).unwrap();
    std::fs::write(www.join("www/healthz"), "ok\n").unwrap();
    let mut source = DirImageSource::new();
    let image = source.add(
        ImageConfig {
            entrypoint: vec!["/bin/busybox".into(), "sh".into(), "-c".into()],
            cmd: vec!["exec /bin/busybox httpd -f -p $PORT -h /www".into()],
            env: vec!["GREETING=hi".into()],
            user: None,
            workdir: None,
        },
        &[base, www],
    );
    Fixture {
        state: dir.path().join("state"),
        _dir: dir,
        source,
        image,
    }
}

fn spec(f: &Fixture, command: Option<&str>) -> InstanceSpec {
    InstanceSpec {
        image: f.image.clone(),
        app: "bb".to_owned(),
        env: BTreeMap::from([("SERVICE".to_owned(), "1".to_owned())]),
        writable: vec![kiln_runtime::Tmpfs::new("/tmp", 64 << 20)],
        memory: Some(64 << 20),
        cpus: Some(0.5),
        stop_grace: Duration::from_secs(1),
        init: false,
        health: command.is_none().then(|| HealthCheck {
            path: Some("/healthz".to_owned()),
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(500),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            start_period: Duration::from_secs(5),
        }),
        port: None,
        container_port: None,
        command: command.map(|c| vec!["/bin/busybox".into(), "sh".into(), "-c".into(), c.into()]),
        labels: Default::default(),
        target: kiln_spec::TargetSpec::default(),
        user: None,
        pids: 512,
        seccomp: kiln_spec::Seccomp::Default,
        network: kiln_spec::Network::Kiln,
        capabilities: Vec::new(),
        secrets: Vec::new(),
    }
}

fn provider(f: &Fixture) -> Arc<LocalProvider> {
    provider_with(f, |_| {})
}

fn provider_with(f: &Fixture, edit: impl FnOnce(&mut LocalConfig)) -> Arc<LocalProvider> {
    let mut cfg = LocalConfig::new(&f.state, "runc");
    cfg.rescan_interval = Duration::from_millis(500);
    edit(&mut cfg);
    LocalProvider::new(cfg, Arc::new(f.source.clone())).unwrap()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

async fn logs(p: &LocalProvider, id: &kiln_runtime::InstanceId) -> String {
    String::from_utf8_lossy(&p.logs(id, 0).await.unwrap().data).into_owned()
}

/// Waits for a drift report naming `path`, for at most 5 s (a generous bound; the real
/// figure is printed).
async fn drift_naming(
    rx: &mut tokio::sync::broadcast::Receiver<DriftReport>,
    path: &str,
    since: Instant,
) -> DriftReport {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let report = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no drift naming {path} within 5 s"))
            .unwrap();
        if report.paths().iter().any(|p| p == path) {
            println!("drift on {path} reported after {:?}", since.elapsed());
            return report;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_off_instance_has_a_read_only_root_and_writable_tmp() {
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let p = provider(&f);
    let script = "touch /x; echo root=$?; touch /bin/y; echo bin=$?; \
                  echo data > /tmp/z && echo tmp=$(cat /tmp/z); echo port=$PORT env=$GREETING$SERVICE; \
                  exit 7";
    let id = p.create(spec(&f, Some(script))).await.unwrap();
    p.start(&id).await.unwrap();
    assert_eq!(
        p.wait(&id).await.unwrap(),
        Some(7),
        "{}",
        logs(&p, &id).await
    );
    let out = logs(&p, &id).await;
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("root=1"), "{out}");
    assert!(out.contains("bin=1"), "{out}");
    assert!(out.contains("tmp=data"), "{out}");
    let obs = p.observe(&id).await.unwrap();
    assert!(
        out.contains(&format!("port={} env=hi1", obs.port())),
        "{out}"
    );
    assert_eq!((obs.state, obs.exit_code), (InstanceState::Exited, Some(7)));
    // Writes inside the instance never reached its upper dir: no drift.
    assert_eq!(p.check_drift(&id).await.unwrap(), None);
    p.destroy(&id).await.unwrap();
    assert!(!f.state.join("instances").join(id.as_str()).exists());
    assert_eq!(mounts_under(&f.state), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_host_seccomp_profile_only_an_unconfined_instance_starts() {
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let p = provider_with(&f, |cfg| {
        cfg.seccomp_profile = f.state.join("no-such-seccomp.json");
    });
    let err = p
        .create(spec(&f, Some("true")))
        .await
        .unwrap_err()
        .to_string();
    for said in [
        "no seccomp allowlist for a sealed instance",
        "apt-get install -y golang-github-containers-common",
        "[service] seccomp = \"unconfined\"",
    ] {
        assert!(err.contains(said), "{err}");
    }
    // Refused before anything was left behind.
    assert_eq!(
        std::fs::read_dir(f.state.join("instances"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(mounts_under(&f.state), Vec::<String>::new());

    let mut unconfined = spec(&f, Some("grep Seccomp: /proc/self/status"));
    unconfined.seccomp = kiln_spec::Seccomp::Unconfined;
    let id = p.create(unconfined).await.unwrap();
    p.start(&id).await.unwrap();
    assert_eq!(
        p.wait(&id).await.unwrap(),
        Some(0),
        "{}",
        logs(&p, &id).await
    );
    assert!(logs(&p, &id).await.contains("Seccomp:\t0"));
    p.destroy(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_drift_adoption_and_a_clean_destroy() {
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let p = provider(&f);
    let id = p.create(spec(&f, None)).await.unwrap();
    let dir = f.state.join("instances").join(id.as_str());
    let mut mounted = mounts_under(&dir);
    mounted.sort();
    assert_eq!(
        mounted,
        [
            dir.join("bundle/rootfs").display().to_string(),
            dir.join("netns").display().to_string()
        ],
        "the overlay root and the network namespace are mounted at create"
    );
    p.start(&id).await.unwrap();
    let mut health = p.health(&id).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        health.wait_for(|h| *h == Health::Healthy),
    )
    .await
    .unwrap_or_else(|_| panic!("not healthy in 10 s; logs:\n{}", futures_logs(&p, &id)))
    .unwrap();
    let obs = p.observe(&id).await.unwrap();
    assert_eq!(obs.state, InstanceState::Running);
    let pid = obs.pid.unwrap();

    // Running with runc's mount points in the upper dir is not drift.
    assert_eq!(p.check_drift(&id).await.unwrap(), None);

    // A file created from the host in the upper dir is drift, named by its path.
    let mut drift = p.drift_events();
    let t0 = Instant::now();
    std::fs::create_dir_all(dir.join("upper/etc")).unwrap();
    std::fs::write(dir.join("upper/etc/evil"), "x").unwrap();
    drift_naming(&mut drift, "/etc/evil", t0).await;
    std::fs::remove_dir_all(dir.join("upper/etc")).unwrap();

    // So is a modified file of a cached layer.
    let layers = f.state.join("layers");
    let healthz = std::fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().path().join("www/healthz"))
        .find(|p| p.exists())
        .unwrap();
    let t0 = Instant::now();
    std::fs::write(&healthz, "tampered\n").unwrap();
    let report = drift_naming(&mut drift, "/www/healthz", t0).await;
    assert_eq!(report.instance, id);

    // A new provider (a restarted kiln) lists and adopts the running instance.
    drop(p);
    let p2 = provider(&f);
    let listed = p2.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id.clone(), listed[0].state),
        (id.clone(), InstanceState::Running)
    );
    assert_eq!(listed[0].pid, Some(pid), "the same process, not a new one");
    let mut health = p2.health(&id).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        health.wait_for(|h| *h == Health::Healthy),
    )
    .await
    .unwrap()
    .unwrap();

    // Stop honours the grace period, then kills; destroy leaves nothing behind.
    p2.stop(&id, Duration::from_millis(300)).await.unwrap();
    assert_eq!(p2.observe(&id).await.unwrap().state, InstanceState::Exited);
    p2.destroy(&id).await.unwrap();
    assert!(!dir.exists());
    assert_eq!(mounts_under(&f.state), Vec::<String>::new());
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
    assert!(p2.list().await.unwrap().is_empty());
    // Destroy again: idempotent.
    p2.destroy(&id).await.unwrap();
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

fn futures_logs(p: &LocalProvider, id: &kiln_runtime::InstanceId) -> String {
    std::fs::read_to_string(p.paths(id).log).unwrap_or_default()
}

/// `GET path` on 127.0.0.1:`port`; the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(out)
}

async fn healthy(p: &LocalProvider, id: &kiln_runtime::InstanceId) {
    let mut health = p.health(id).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        health.wait_for(|h| *h == Health::Healthy),
    )
    .await
    .unwrap_or_else(|_| panic!("not healthy in 10 s; logs:\n{}", futures_logs(p, id)))
    .unwrap();
}

/// The issue: a cached layer that failed verification was reused, so the replacement of an
/// instance drifted by a tampered layer ran the tampered layer too, and drifted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_layer_is_evicted_and_the_next_instance_runs_the_store_s_copy() {
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let p = provider(&f);
    let old = p.create(spec(&f, None)).await.unwrap();
    p.start(&old).await.unwrap();
    healthy(&p, &old).await;
    let old_port = p.observe(&old).await.unwrap().addr;

    // One byte appended to a file of a cached layer, under the running instance.
    let layers = f.state.join("layers");
    let healthz = std::fs::read_dir(&layers)
        .unwrap()
        .map(|e| e.unwrap().path().join("www/healthz"))
        .find(|p| p.exists())
        .unwrap();
    let mut drift = p.drift_events();
    let t0 = Instant::now();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&healthz)
        .unwrap();
    std::io::Write::write_all(&mut file, b"!").unwrap();
    drop(file);
    let report = drift_naming(&mut drift, "/www/healthz", t0).await;
    assert_eq!(report.instance, old);
    assert_eq!(http_get(old_port, "/healthz"), "ok\n!");

    // The next instance runs a copy unpacked again from the source, not the tampered one.
    let new = p.create(spec(&f, None)).await.unwrap();
    let rootfs = f
        .state
        .join("instances")
        .join(new.as_str())
        .join("bundle/rootfs");
    assert_eq!(std::fs::read(rootfs.join("www/healthz")).unwrap(), b"ok\n");
    assert_eq!(
        std::fs::read(&healthz).unwrap(),
        b"ok\n",
        "the cache holds the store's copy"
    );
    p.start(&new).await.unwrap();
    healthy(&p, &new).await;
    let new_port = p.observe(&new).await.unwrap().addr;
    assert_eq!(http_get(new_port, "/healthz"), "ok\n");
    assert_eq!(p.check_drift(&new).await.unwrap(), None);
    // The old instance is still drifted: it runs the evicted copy.
    let old_drift = p.check_drift(&old).await.unwrap().expect("still drifted");
    assert!(
        old_drift.paths().iter().any(|p| p == "/www/healthz"),
        "{old_drift:?}"
    );
    assert_eq!(http_get(old_port, "/healthz"), "ok\n!");
    let evicted = layers.join("evicted");
    assert_eq!(
        std::fs::read_dir(&evicted).unwrap().count(),
        2,
        "a copy and its record"
    );

    // Once the last instance on it is gone, so is the evicted copy.
    p.destroy(&old).await.unwrap();
    assert_eq!(std::fs::read_dir(&evicted).unwrap().count(), 0);
    assert_eq!(http_get(new_port, "/healthz"), "ok\n");
    assert_eq!(p.check_drift(&new).await.unwrap(), None);
    p.destroy(&new).await.unwrap();
    assert_eq!(mounts_under(&f.state), Vec::<String>::new());
}

// A destroy after the namespace went (unmounted behind kiln's back, as a crash between the
// steps of a destroy leaves it) still releases the address, and repeats harmlessly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_torn_down_network_is_finished_by_destroy() {
    if !prerequisites() {
        return;
    }
    let f = fixture();
    let p = provider(&f);
    let id = p.create(spec(&f, None)).await.unwrap();
    let dir = f.state.join("instances").join(id.as_str());
    let ip = p.observe(&id).await.unwrap().addr.ip().to_string();
    let reserved = Path::new("/var/lib/cni/networks/kiln").join(&ip);
    assert!(
        reserved.exists(),
        "{ip} is reserved while the instance exists"
    );
    let umount = std::process::Command::new("umount")
        .arg(dir.join("netns"))
        .status()
        .unwrap();
    assert!(umount.success());

    p.destroy(&id).await.unwrap();
    assert!(!reserved.exists(), "{ip} is released");
    assert!(!dir.exists());
    p.destroy(&id).await.unwrap();
}
