//! End-to-end tests of sealed instances (DESIGN.md invariant 8), driving the real `kiln`
//! binary on real runc and on a real Docker Engine: a non-root user, no way to make
//! namespaces, a pids limit a fork bomb stops at while the daemon keeps answering, size-capped
//! `nosuid` tmpfs, a setuid-root binary that gives nothing, and each weakening only where the
//! spec says so.
//!
//! The only way into an instance is what its image holds, so the image is busybox: `httpd`
//! with CGI scripts (`www/cgi-bin/*`) that run inside the instance as its process would, under
//! its user, filter and limits, and answer through kiln's router. One daemon serves every
//! assertion of a provider.
//!
//! Needs root, runc, `/bin/busybox` (busybox-static), the host's seccomp profile
//! (golang-github-containers-common), the example build (the shared prerequisites) and, for
//! the docker test, a Docker Engine; with `CI=true` a missing prerequisite fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, kiln, serial};

const BUSYBOX: &str = "/bin/busybox";

fn prerequisites() -> bool {
    common::busybox_prerequisites("sealed-instance")
}

fn docker_prerequisites() -> bool {
    common::docker_busybox_prerequisites("sealed-instance")
}

/// A CGI script: headers, then `body` (shell, busybox called by path).
fn cgi(body: &str) -> String {
    format!("#!/bin/sh\necho 'Content-Type: text/plain'\necho\n{body}\n")
}

/// The scripts the instance runs on request, by name.
const SCRIPTS: &[(&str, &str)] = &[
    // Who the process is, and what the kernel says it may do.
    (
        "whoami",
        "echo \"uid=$(/bin/busybox id -u) gid=$(/bin/busybox id -g) groups=$(/bin/busybox id -G)\"\n\
         /bin/busybox grep -E '^(NoNewPrivs|Seccomp|CapEff|CapBnd):' /proc/self/status\n\
         echo \"oom_score_adj=$(/bin/busybox cat /proc/self/oom_score_adj)\"",
    ),
    // A user namespace: what a process needs to get capabilities and mounts of its own.
    (
        "unshare",
        "/bin/busybox unshare -U /bin/busybox true 2>&1\necho \"exit=$?\"",
    ),
    // Half the 1 MiB tmpfs, then twice it.
    (
        "fill",
        "/bin/busybox dd if=/dev/zero of=/scratch/half bs=65536 count=8 2>/dev/null\n\
         echo \"half=$?\"\n\
         /bin/busybox dd if=/dev/zero of=/scratch/over bs=65536 count=32 2>&1\n\
         echo \"over=$?\"\n\
         /bin/busybox rm -f /scratch/half /scratch/over",
    ),
    // The image's setuid-root busybox, and what it makes of the caller.
    (
        "suid",
        "echo \"mode=$(/bin/busybox stat -c '%a %u' /suid/busybox)\"\n\
         echo \"euid=$(/suid/busybox id -u)\"",
    ),
    // Every capability set of the process (a CGI child of httpd, after two execs).
    (
        "caps",
        "/bin/busybox grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status",
    ),
    // The names of the process's own ids, from the account files it sees.
    (
        "names",
        "echo \"user=$(/bin/busybox id -un 2>&1) group=$(/bin/busybox id -gn 2>&1)\"",
    ),
    (
        "mounts",
        "/bin/busybox grep -E ' / | /tmp | /scratch ' /proc/self/mountinfo",
    ),
    // 2000 children that live 5 s: the fork that fails says why. Builtins only after the
    // subshell (no fork is left to make).
    (
        "forkbomb",
        "( i=0; while [ $i -lt 2000 ]; do /bin/busybox sleep 5 & i=$((i+1)); echo $i > /tmp/forked; done ) 2>/tmp/fork-error\n\
         read n < /tmp/forked; echo \"forked=$n\"\n\
         read e < /tmp/fork-error; echo \"error=$e\"",
    ),
];

/// A busybox rootfs serving `SCRIPTS` (plus `/etc/passwd` and `/etc/group` naming `app`).
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "www/cgi-bin"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("www/healthz"), "ok\n").unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234::/www:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\napp:x:1234:\nstaff:x:50:app\n",
    )
    .unwrap();
    for (name, body) in SCRIPTS {
        let path = root.join("www/cgi-bin").join(name);
        std::fs::write(&path, cgi(body)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    root
}

/// A spec for app `name` on the busybox rootfs: `httpd` on `$PORT` (`listen` is what comes
/// before it: `127.0.0.1:` on the host network, nothing in an instance's own namespace), a 1 MiB `/scratch`
/// beside the default-sized `/tmp`, a health check that tolerates the fork bomb's 5 s, and
/// `extra` lines in `[service]`, `image` lines in `[image]`, `tail` at the end.
fn spec(
    dir: &Path,
    name: &str,
    port: u16,
    listen: &str,
    image: &str,
    extra: &str,
    tail: &str,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"name = "{name}"

[image]
base = "rootfs:rootfs"
entrypoint = ["/bin/busybox", "sh", "-c"]
cmd = ["exec /bin/busybox httpd -f -p {listen}$PORT -h /www"]
{image}

[[image.copy]]
from = {BUSYBOX:?}
to = "/suid/busybox"
mode = "4755"
allow_outside = true

[service]
writable = ["/tmp", {{ path = "/scratch", size = "1MiB" }}]
stop_grace = "1s"
{extra}

[service.health]
path = "/healthz"
interval = "200ms"
timeout = "200ms"
unhealthy_threshold = 60

[route]
listen = "127.0.0.1:{port}"
drain_timeout = "1s"
{tail}
"#
        ),
    )
    .unwrap();
    path
}

fn build(state: &Path, spec: &Path) -> String {
    common::build(state, spec)
}

fn apply(state: &Path, spec: &Path, image: &str) {
    let out = kiln(state)
        .args(["apply", "-f"])
        .arg(spec)
        .args(["--image", image])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln apply {}: {}{}",
        spec.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One `GET path` through the router on `port`: the whole response, or what went wrong.
fn get(port: u16, path: &str) -> String {
    common::raw_get(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "sealed",
        path,
    )
}

/// The body of `GET /cgi-bin/{script}` through the router on `port`, once it answers 200.
fn run(port: u16, script: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = get(port, &format!("/cgi-bin/{script}"));
        if resp.starts_with("HTTP/1.1 200") {
            return resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "/cgi-bin/{script} on {port} did not answer 200: {resp}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One line of `text` starting with `key`, e.g. `line(t, "uid=")`.
fn line<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
}

/// The mountinfo line of the mount at `point`.
fn mount<'a>(mounts: &'a str, point: &str) -> &'a str {
    mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(point))
        .unwrap_or_else(|| panic!("no mount at {point} in:\n{mounts}"))
}

/// The options of a mountinfo line: per-mount and per-superblock, together.
fn options(mountinfo_line: &str) -> Vec<&str> {
    let fields: Vec<&str> = mountinfo_line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-").unwrap();
    fields[5]
        .split(',')
        .chain(fields[sep + 3].split(','))
        .collect()
}

/// `GET /v1/health` on the daemon's socket: whether it answered 200.
fn daemon_health(state: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(state.join("kiln.sock")) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET /v1/health HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

/// Polls the daemon's health every 50 ms until stopped: (answered, failed).
struct HealthPoller {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthPoller {
    fn start(state: &Path) -> HealthPoller {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, o, f, st) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
            state.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if daemon_health(&st) {
                    o.fetch_add(1, Ordering::SeqCst);
                } else {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        HealthPoller {
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

/// The one instance of `app`, from `kiln status`.
fn instance_of(state: &Path, app: &str) -> String {
    let out = kiln(state)
        .args(["status", app, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let instances = s[0]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{s:#}");
    instances[0]["id"].as_str().unwrap().to_owned()
}

/// The checks every sealed provider passes, on app `port`'s one instance: `uid` as its user,
/// namespaces refused, the tmpfs cap, the setuid binary, the fork bomb stopped at `pids`
/// while the daemon answers. Returns the fork bomb's output.
fn sealed_checks(state: &Path, port: u16, uid: u32, pids: u32) -> String {
    let who = run(port, "whoami");
    assert!(
        line(&who, "uid=").starts_with(&format!("uid={uid} gid={uid} ")),
        "{who}"
    );

    let unshare = run(port, "unshare");
    assert!(unshare.contains("Operation not permitted"), "{unshare}");
    assert!(unshare.contains("exit=1"), "{unshare}");

    let fill = run(port, "fill");
    assert_eq!(
        line(&fill, "half="),
        "half=0",
        "512 KiB fit in 1 MiB: {fill}"
    );
    assert!(fill.contains("No space left on device"), "{fill}");
    assert_eq!(line(&fill, "over="), "over=1", "{fill}");

    let suid = run(port, "suid");
    assert_eq!(
        line(&suid, "mode="),
        "mode=4755 0",
        "the image's setuid root: {suid}"
    );
    assert_eq!(
        line(&suid, "euid="),
        format!("euid={uid}"),
        "setuid gave nothing: {suid}"
    );

    // The fork bomb: the daemon answers all along; the instance's forks fail at the limit.
    let poller = HealthPoller::start(state);
    std::thread::sleep(Duration::from_millis(200));
    let bomb = run(port, "forkbomb");
    // The 5 s children still hold the pids: the daemon must keep answering meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    let (answered, failed) = poller.finish();
    assert_eq!(
        failed, 0,
        "the daemon stopped answering /v1/health during the fork bomb"
    );
    assert!(answered >= 10, "only {answered} health answers");
    let forked: u32 = line(&bomb, "forked=")["forked=".len()..].parse().unwrap();
    println!(
        "fork bomb: {forked} children under pids = {pids}; the daemon answered {answered} times"
    );
    assert!(
        forked < pids && forked > pids / 2,
        "{forked} children forked under a limit of {pids}: {bomb}"
    );
    assert!(
        line(&bomb, "error=").contains("Resource temporarily unavailable"),
        "{bomb}"
    );
    // The children exit; the instance serves again without having been replaced.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(port, "/healthz").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "the instance did not recover");
        std::thread::sleep(Duration::from_millis(200));
    }
    bomb
}

#[test]
fn sealed_instances_on_runc() {
    if !prerequisites() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    rootfs(dir.path());
    let _daemon = Daemon::start(&state);
    let ports: Vec<u16> = (0..4).map(|_| common::free_port()).collect();
    // Each instance in its own network namespace: httpd listens on all of its addresses.
    let local = "";

    // The default: no user anywhere, so 65534; every limit at its default.
    let web = spec(dir.path(), "web", ports[0], local, "", "", "");
    // A user by name from the image's /etc/passwd, and no seccomp filter (said explicitly).
    let named = spec(
        dir.path(),
        "named",
        ports[1],
        local,
        "",
        "user = \"app\"\nseccomp = \"unconfined\"",
        "",
    );
    // The image's numeric User.
    let imaged = spec(
        dir.path(),
        "imaged",
        ports[2],
        local,
        "user = \"4321:4321\"",
        "",
        "",
    );
    // Root, said explicitly.
    let rooted = spec(
        dir.path(),
        "rooted",
        ports[3],
        local,
        "",
        "user = \"root\"",
        "",
    );
    for s in [&web, &named, &imaged, &rooted] {
        let image = build(&state, s);
        apply(&state, s, &image);
    }

    // What the kernel says of the default instance's process.
    let who = run(ports[0], "whoami");
    assert_eq!(
        line(&who, "uid="),
        "uid=65534 gid=65534 groups=65534",
        "{who}"
    );
    assert_eq!(line(&who, "NoNewPrivs:"), "NoNewPrivs:\t1", "{who}");
    assert_eq!(line(&who, "Seccomp:"), "Seccomp:\t2", "a filter: {who}");
    assert_eq!(line(&who, "CapEff:"), "CapEff:\t0000000000000000", "{who}");
    assert_eq!(line(&who, "CapBnd:"), "CapBnd:\t0000000000000000", "{who}");
    assert_eq!(line(&who, "oom_score_adj="), "oom_score_adj=500", "{who}");

    // The root and the tmpfs are nosuid and nodev; the root is read-only; the tmpfs caps
    // are the spec's (64 MiB by default, 1 MiB where it says so), owned by the instance's
    // user (the kernel shows no `mode` when it is tmpfs's own 1777).
    let mounts = run(ports[0], "mounts");
    let root = options(mount(&mounts, "/"));
    for o in ["ro", "nosuid", "nodev"] {
        assert!(root.contains(&o), "/ lacks {o}: {mounts}");
    }
    for (point, size) in [("/tmp", "size=65536k"), ("/scratch", "size=1024k")] {
        let o = options(mount(&mounts, point));
        for want in ["rw", "nosuid", "nodev", size, "uid=65534", "gid=65534"] {
            assert!(o.contains(&want), "{point} lacks {want}: {mounts}");
        }
    }

    // The pids limit is the kernel's, in the instance's own cgroup.
    let id = instance_of(&state, "web");
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/kiln/{id}/pids.max"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/kiln/{id}/pids.max")))
        .unwrap();
    assert_eq!(max.trim(), "512");

    sealed_checks(&state, ports[0], 65534, 512);

    // A name from the image's /etc/passwd, with its groups; with seccomp unconfined (and only
    // then) a user namespace can be made: the filter, not something else, refused it above.
    let who = run(ports[1], "whoami");
    assert_eq!(
        line(&who, "uid="),
        "uid=1234 gid=1234 groups=1234 50",
        "{who}"
    );
    assert_eq!(line(&who, "Seccomp:"), "Seccomp:\t0", "{who}");
    let unshare = run(ports[1], "unshare");
    assert_eq!(line(&unshare, "exit="), "exit=0", "{unshare}");

    // The image's numeric User.
    let who = run(ports[2], "whoami");
    assert_eq!(line(&who, "uid="), "uid=4321 gid=4321 groups=4321", "{who}");

    // Root only where the spec says so; it keeps NET_BIND_SERVICE and nothing else.
    let who = run(ports[3], "whoami");
    assert_eq!(line(&who, "uid="), "uid=0 gid=0 groups=0", "{who}");
    assert_eq!(line(&who, "CapBnd:"), "CapBnd:\t0000000000000400", "{who}");
    let suid = run(ports[3], "suid");
    assert_eq!(line(&suid, "euid="), "euid=0", "{suid}");
}

/// A `scratch` image of busybox and the scripts, with no `/etc` at all, and `service` lines.
fn scratch_spec(dir: &Path, name: &str, port: u16, service: &str) -> PathBuf {
    let files = dir.join("scratch-files");
    if !files.exists() {
        let root = rootfs(&files);
        std::fs::remove_dir_all(root.join("etc")).unwrap();
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"name = "{name}"

[image]
entrypoint = ["/bin/busybox", "sh", "-c"]
cmd = ["exec /bin/busybox httpd -f -p $PORT -h /www"]

[[image.copy]]
from = "scratch-files/rootfs/bin"
to = "/bin"

[[image.copy]]
from = "scratch-files/rootfs/www"
to = "/www"

[service]
writable = ["/tmp"]
stop_grace = "1s"
{service}

[service.health]
path = "/healthz"
interval = "200ms"
timeout = "200ms"

[route]
listen = "127.0.0.1:{port}"
drain_timeout = "1s"
"#
        ),
    )
    .unwrap();
    path
}

/// Issue 14: `[service] capabilities` are held by a non-root process (ambient), a dangerous
/// one only with the opt-in; a `scratch` image resolves its user's name through kiln's
/// minimal account files, which are not drift.
#[test]
fn capabilities_and_account_files_on_runc() {
    if !prerequisites() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _daemon = Daemon::start(&state);

    // Safe ones in any spelling, and a dangerous one opted in.
    let port = common::free_port();
    let bare = scratch_spec(
        dir.path(),
        "bare",
        port,
        "capabilities = [\"chown\", \"CAP_SETUID\", \"net_admin\"]\n\
         allow_dangerous_capabilities = true",
    );
    let image = build(&state, &bare);

    // A dangerous capability without the opt-in: refused at the door, naming the key.
    let refused = scratch_spec(
        dir.path(),
        "refused",
        common::free_port(),
        "capabilities = [\"CHOWN\", \"sys_admin\"]",
    );
    let out = kiln(&state)
        .args(["apply", "-f"])
        .arg(&refused)
        .args(["--image", &image])
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("service.capabilities: capability SYS_ADMIN is dangerous")
            && said.contains("allow_dangerous_capabilities = true"),
        "{said}"
    );

    // The default user (65534) holds each added capability in every set, ambient included,
    // and nothing else.
    apply(&state, &bare, &image);
    let caps = run(port, "caps");
    // CHOWN (bit 0), SETUID (7), NET_ADMIN (12).
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            line(&caps, set),
            format!("{set}:\t0000000000001081"),
            "{caps}"
        );
    }
    let who = run(port, "whoami");
    assert_eq!(
        line(&who, "uid="),
        "uid=65534 gid=65534 groups=65534",
        "{who}"
    );

    // No /etc in the image, yet the process's ids have names: kiln's minimal files.
    let names = run(port, "names");
    assert_eq!(
        line(&names, "user="),
        "user=nobody group=nogroup",
        "{names}"
    );
    // They are a lower layer, not writes in the instance's upper dir, so not drift.
    let id = instance_of(&state, "bare");
    let upper = state.join("instances").join(&id).join("upper");
    assert!(upper.is_dir(), "{}", upper.display());
    assert!(!upper.join("etc/passwd").exists() && !upper.join("etc/group").exists());
    let history = kiln(&state).args(["history", "bare"]).output().unwrap();
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(history.contains("instance.created"), "{history}");
    assert!(!history.contains("drift.detected"), "{history}");
}

#[test]
fn an_image_that_runs_as_root_needs_the_spec_to_say_so() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    rootfs(dir.path());
    let spec = spec(
        dir.path(),
        "rootimage",
        1,
        "127.0.0.1:",
        "user = \"0\"",
        "",
        "",
    );
    let image = build(&state, &spec);
    let out = kiln(&state)
        .current_dir(dir.path())
        .args(["run", &image, "-f"])
        .arg(&spec)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("the image's User \"0\" is root")
            && said.contains("[service] user = \"root\""),
        "{said}"
    );
    assert_eq!(common::mounts_under(&state), Vec::<String>::new());
}

#[test]
fn sealed_instances_on_docker() {
    if !docker_prerequisites() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    rootfs(dir.path());
    let _daemon = Daemon::start(&state);
    let port = common::free_port();
    let web = spec(
        dir.path(),
        "web",
        port,
        "",
        "",
        "pids = 64",
        "[target]\nprovider = \"docker\"\n",
    );
    let image = build(&state, &web);
    apply(&state, &web, &image);

    // What kiln asked of the engine: nothing switches its default seccomp profile off.
    let id = instance_of(&state, "web");
    let out = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{json .Config.User}} {{json .HostConfig.PidsLimit}} {{json .HostConfig.OomScoreAdj}} \
             {{json .HostConfig.SecurityOpt}} {{json .HostConfig.Tmpfs}}",
            &id,
        ])
        .output()
        .unwrap();
    let inspected = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        inspected.trim(),
        "\"65534:65534\" 64 500 [\"no-new-privileges\"] \
         {\"/scratch\":\"rw,nosuid,nodev,mode=1777,size=1048576\",\
         \"/tmp\":\"rw,nosuid,nodev,mode=1777,size=67108864\"}"
    );

    let who = run(port, "whoami");
    assert_eq!(line(&who, "NoNewPrivs:"), "NoNewPrivs:\t1", "{who}");
    assert_eq!(
        line(&who, "Seccomp:"),
        "Seccomp:\t2",
        "the engine's filter: {who}"
    );
    assert_eq!(line(&who, "oom_score_adj="), "oom_score_adj=500", "{who}");
    let mounts = run(port, "mounts");
    let o = options(mount(&mounts, "/scratch"));
    for want in ["nosuid", "nodev", "size=1024k"] {
        assert!(o.contains(&want), "/scratch lacks {want}: {mounts}");
    }

    sealed_checks(&state, port, 65534, 64);
}
