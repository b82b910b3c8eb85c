//! End-to-end test of an ordinary third-party server run unchanged (issue 14, the last "done
//! when"): Debian's nginx binary, copied with `closure = true`, with Debian's stock
//! configuration from `/etc/nginx` (`user www-data;`, the default site on port 80, its pid in
//! `/run`, logs in `/var/log/nginx`, temp files in `/var/lib/nginx`), runs as 3 replicas
//! behind kiln's router and survives a rolling update under load with no failed request.
//!
//! Nothing of nginx is edited: the binary and the configuration files are copied as they are
//! installed. What kiln adds is what the spec says: each instance its own network namespace
//! (so all three listen on port 80), `user = "root"` for the master, the few capabilities it
//! needs to drop privileges, and tmpfs where the stock configuration writes. The image brings
//! its own `/etc/passwd` and `/etc/group` naming `www-data`, as a Debian system would.
//!
//! From the host the test then reads each instance's processes: a root master holding only
//! the capabilities the spec grants, and workers that really run as `www-data` with none.
//!
//! Needs root, runc, the CNI plugins, the host's seccomp profile, the example build (the
//! shared prerequisites) and Debian's `nginx-light` (`scripts/ci-setup.sh` installs them);
//! with `CI=true` a missing prerequisite fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Load, kiln, runc_prerequisites, serial};

const NGINX: &str = "/usr/sbin/nginx";
const CNI_BRIDGE: &str = "/usr/lib/cni/bridge";

/// `www-data` in Debian's base-passwd, as the image's own account files name it.
const WWW_DATA: u32 = 33;

/// The capabilities the spec grants, beside the `NET_BIND_SERVICE` root keeps (port 80 needs
/// none in the instance's own namespace anyway). Each is needed; without it:
/// - `SETGID`, `SETUID`: each worker calls `setgid`, `initgroups` (`setgroups`) and `setuid`
///   to become `www-data`, the privilege drop itself. Without either, every worker logs
///   `setgid(33) failed` (or `setuid(33)`) and exits with "fatal code 2 and cannot be
///   respawned", while the master keeps its port open: a TCP health check would pass, which is
///   why the check here is an HTTP one.
/// - `CHOWN`: the master creates the temp directories of the stock build
///   (`/var/lib/nginx/body`, `proxy`, `fastcgi`, `uwsgi`, `scgi`) at start, mode 0700, and
///   hands them to `www-data`, whose workers write request bodies there. Without it the master
///   stops at `chown("/var/lib/nginx/body", 33) failed (1: Operation not permitted)`.
///
/// Nothing else: every file the master opens as root is its own or in a root-owned tmpfs, so
/// it needs no `DAC_OVERRIDE`, and it changes no mode of a file it does not own (`FOWNER`).
const CAPABILITIES: &[&str] = &["SETUID", "SETGID", "CHOWN"];

/// The master's effective set: `CHOWN` (0), `SETGID` (6), `SETUID` (7), `NET_BIND_SERVICE` (10).
const MASTER_CAPS: u64 = 1 << 0 | 1 << 6 | 1 << 7 | 1 << 10;

fn prerequisites() -> bool {
    if !runc_prerequisites() {
        return false;
    }
    let missing: Vec<&str> = [NGINX, "/etc/nginx/nginx.conf", CNI_BRIDGE]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "missing {missing:?} (apt-get install nginx-light containernetworking-plugins, or \
         bash scripts/ci-setup.sh)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the third-party server prerequisites are missing: {why}");
    }
    eprintln!("note: skipping third-party server test ({why})");
    false
}

/// The body release `n` serves at `/`.
fn page(n: u32) -> String {
    format!("release {n} of Debian's nginx, behind kiln\n")
}

/// The base layer: only the account files (root and `www-data`) a Debian system has and
/// nginx looks `www-data` up in; and `html-N/index.html`, the page of release N.
fn files(dir: &Path) {
    let etc = dir.join("rootfs/etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\n\
             www-data:x:{WWW_DATA}:{WWW_DATA}:www-data:/var/www:/usr/sbin/nologin\n"
        ),
    )
    .unwrap();
    std::fs::write(
        etc.join("group"),
        format!("root:x:0:\nwww-data:x:{WWW_DATA}:\n"),
    )
    .unwrap();
    for n in [1, 2] {
        let html = dir.join(format!("html-{n}"));
        std::fs::create_dir_all(&html).unwrap();
        std::fs::write(html.join("index.html"), page(n)).unwrap();
    }
}

/// The spec of release `n`: nginx and what its stock configuration reads, as installed.
fn spec(dir: &Path, port: u16, n: u32) -> PathBuf {
    // The stock configuration loads the dynamic modules `nginx-light` installs
    // (`modules-enabled/*.conf` links into `/usr/share/nginx/modules-available`, whose
    // `load_module modules/…` resolves through `/usr/share/nginx/modules` to `/usr/lib/nginx`).
    let mut copies = String::new();
    for path in ["/etc/nginx", "/usr/share/nginx", "/usr/lib/nginx"] {
        if Path::new(path).exists() {
            copies.push_str(&format!(
                "[[image.copy]]\nfrom = {path:?}\nto = {path:?}\nallow_outside = true\n\n"
            ));
        }
    }
    let capabilities = CAPABILITIES
        .iter()
        .map(|c| format!("{c:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let path = dir.join("kiln.toml");
    std::fs::write(
        &path,
        format!(
            r#"name = "web"

[image]
base = "rootfs:rootfs"
# nginx daemonizes unless told otherwise; an instance's process must stay in the foreground.
# A directive on the command line, as Docker's nginx image does: the files stay stock.
entrypoint = ["{NGINX}", "-g", "daemon off;"]

[[image.copy]]
from = "{NGINX}"
to = "{NGINX}"
closure = true
allow_outside = true

{copies}[[image.copy]]
from = "html-{n}"
to = "/var/www/html"

[service]
port = 80
replicas = 3
# The master starts as root and drops to `user www-data;` itself.
user = "root"
capabilities = [{capabilities}]
# Where the stock configuration writes, each needed or the master stops at start: the pid
# file (/run/nginx.pid), the logs (error.log is opened first, access.log), the temp files.
writable = ["/run", "/var/log/nginx", "/var/lib/nginx"]
stop_grace = "5s"

[service.health]
path = "/"
interval = "200ms"
timeout = "200ms"
start_period = "20s"

[route]
listen = "127.0.0.1:{port}"
drain_timeout = "5s"

[deploy]
progress_deadline = "2m"
"#
        ),
    )
    .unwrap();
    path
}

fn apply(state: &Path, spec: &Path, image: &str) {
    let out = kiln(state)
        .args(["apply", "-f"])
        .arg(spec)
        .args(["--image", image])
        .timeout(Duration::from_secs(180))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln apply: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One `GET /` straight to an instance's own address: the whole response, or what went wrong.
fn get_at(addr: SocketAddr) -> String {
    common::raw_get(addr, "web", "/")
}

/// The routed, healthy instances of release `n`: (id, address).
fn instances_of(s: &serde_json::Value, n: u64) -> Vec<(String, SocketAddr)> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["release"] == n && i["routed"] == true && i["health"] == "healthy")
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                i["addr"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// What `/proc/<pid>/status` says of one process.
#[derive(Debug)]
struct Process {
    pid: u32,
    name: String,
    ppid: u32,
    /// Real, effective, saved and filesystem uids.
    uids: Vec<u32>,
    gids: Vec<u32>,
    cap_eff: u64,
    cap_prm: u64,
    no_new_privs: bool,
}

fn process(pid: u32) -> Option<Process> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    let ids = |name: &str| -> Vec<u32> {
        field(name)
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let caps = |name: &str| u64::from_str_radix(field(name), 16).unwrap();
    Some(Process {
        pid,
        name: field("Name").to_owned(),
        ppid: field("PPid").parse().unwrap(),
        uids: ids("Uid"),
        gids: ids("Gid"),
        cap_eff: caps("CapEff"),
        cap_prm: caps("CapPrm"),
        no_new_privs: field("NoNewPrivs") == "1",
    })
}

/// The instance's nginx master (the child of kiln's init, the container's process by runc's
/// record of it) and its children, the workers.
fn processes_of(state: &Path, id: &str) -> (Process, Vec<Process>) {
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(state.join("runc"))
        .args(["state", id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "runc state {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let init = u32::try_from(runc["pid"].as_u64().unwrap()).unwrap();
    let children = |parent: u32| -> Vec<Process> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(process)
            .filter(|p| p.ppid == parent)
            .collect()
    };
    // PID 1 is kiln's init ([service] init, the default); nginx's master is its one child.
    let pid = match process(init) {
        Some(p) if p.name == "init" => {
            children(init)
                .into_iter()
                .find(|c| c.name == "nginx")
                .unwrap_or_else(|| panic!("{id}: kiln's init {init} has no nginx child"))
                .pid
        }
        _ => init,
    };
    let master = process(pid).unwrap_or_else(|| panic!("{id}: no process {pid}"));
    // The process is the instance's: it sits in the instance's own cgroup.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("/kiln/{id}")),
        "{id}: {pid} is not in its cgroup: {cgroup}"
    );
    (master, children(pid))
}

/// The error log of an instance's nginx, read through its master's root, for failures.
fn error_log(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/root/var/log/nginx/error.log"))
        .unwrap_or_else(|e| format!("(no error log: {e})"))
}

/// Each instance of release `n` serves its page from its own address, and runs a root master
/// that dropped privileges: workers as `www-data`, without a capability.
fn check_instances(state: &Path, s: &serde_json::Value, n: u32) {
    let instances = instances_of(s, u64::from(n));
    assert_eq!(instances.len(), 3, "release {n}: {s:#}");
    let mut addrs: Vec<SocketAddr> = instances.iter().map(|(_, a)| *a).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "three addresses: {addrs:?}");
    for (id, addr) in &instances {
        assert_eq!(addr.port(), 80, "{id}: nginx's own port");
        let (master, workers) = processes_of(state, id);
        let resp = get_at(*addr);
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with(&page(n)),
            "{id} at {addr}: {resp}\nerror log: {}",
            error_log(master.pid)
        );
        assert_eq!(master.name, "nginx", "{master:?}");
        assert_eq!(master.uids, [0; 4], "{id}: the master is root: {master:?}");
        assert_eq!(
            (master.cap_eff, master.cap_prm),
            (MASTER_CAPS, MASTER_CAPS),
            "{id}: the master holds exactly the granted capabilities: {master:?}"
        );
        assert!(master.no_new_privs, "{master:?}");
        assert!(!workers.is_empty(), "{id}: no worker of {master:?}");
        for w in &workers {
            assert_eq!(w.name, "nginx", "{w:?}");
            assert_eq!(w.uids, [WWW_DATA; 4], "{id}: a worker is www-data: {w:?}");
            assert_eq!(w.gids, [WWW_DATA; 4], "{id}: a worker is www-data: {w:?}");
            assert_eq!((w.cap_eff, w.cap_prm), (0, 0), "{id}: {w:?}");
        }
    }
}

#[test]
fn debian_nginx_runs_unchanged_as_three_replicas_through_a_rolling_update() {
    if !prerequisites() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = common::free_port();
    files(dir.path());
    let _daemon = Daemon::start(&state);

    // Release 1: three nginx instances, each on port 80 in its own network namespace.
    let spec1 = spec(dir.path(), port, 1);
    let image1 = common::build(&state, &spec1);
    apply(&state, &spec1, &image1);
    let s = common::status(&state);
    check_instances(&state, &s, 1);

    // Release 2 (another page) rolls out while clients keep the router busy.
    let load = Load::start(port, 8);
    let started = Instant::now();
    while load.counts().0 < 500 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the load barely runs before the update: {:?}",
            load.counts()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let spec2 = spec(dir.path(), port, 2);
    let image2 = common::build(&state, &spec2);
    assert_ne!(image1, image2);
    let rollout_started = Instant::now();
    apply(&state, &spec2, &image2);
    let s_done = common::wait_until(&state, Duration::from_secs(120), |s| {
        s["phase"] == "completed" && s["live"] == 2 && instances_of(s, 2).len() == 3
    });
    let rollout = rollout_started.elapsed();
    // Some traffic after the last switch, all of it to release 2.
    let (before, _) = load.counts();
    while load.counts().0 < before + 500 {
        assert!(
            rollout_started.elapsed() < Duration::from_secs(180),
            "the load stalled after the update: {:?}",
            load.counts()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let bodies = load.bodies();
    let (ok, failed) = load.finish();
    eprintln!(
        "rolling update of 3 nginx replicas in {rollout:?} (status completed after {s_done:?}): \
         {ok} requests ok, {failed} failed; bodies {:?}",
        bodies
            .iter()
            .map(|(b, n)| (String::from_utf8_lossy(b).into_owned(), *n))
            .collect::<Vec<_>>()
    );
    assert_eq!(failed, 0, "requests failed during the rolling update");
    let pages: Vec<Vec<u8>> = [1, 2].map(|n| page(n).into_bytes()).into();
    assert!(
        bodies.keys().all(|b| pages.contains(b)),
        "only the two pages were served: {bodies:?}"
    );
    assert!(bodies.contains_key(&pages[1]), "release 2 was served");

    // Release 2 is what the router serves now, from each of its three instances.
    let s = common::status(&state);
    check_instances(&state, &s, 2);
    for _ in 0..30 {
        let resp = get_at(SocketAddr::from(([127, 0, 0, 1], port)));
        assert!(resp.ends_with(&page(2)), "through the router: {resp}");
    }
    kiln(&state).arg("verify").assert().success();
}
