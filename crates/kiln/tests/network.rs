//! End-to-end tests of instances' own networks (issue 14, part 1), driving the real `kiln`
//! binary on real runc and the real CNI plugins: each instance in its own network namespace
//! on kiln's bridge, reached by the router at its own address; the host's loopback services
//! out of its reach; the router's address not its to take; nothing it binds reachable from a
//! neighbouring machine; everything torn down with the instance; the host's network only
//! where the spec says so.
//!
//! As in `sealed.rs`, the way into an instance is its image: busybox `httpd` with CGI scripts
//! that run inside the instance and answer through kiln's router. One daemon serves every
//! assertion.
//!
//! Needs root, runc, `/bin/busybox`, the CNI plugins (containernetworking-plugins), `ip` and
//! `iptables`; with `CI=true` a missing prerequisite fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, kiln, runc_prerequisites, serial};

const BUSYBOX: &str = "/bin/busybox";
const CNI_BRIDGE: &str = "/usr/lib/cni/bridge";

fn prerequisites() -> bool {
    if !runc_prerequisites() {
        return false;
    }
    let missing: Vec<&str> = [BUSYBOX, CNI_BRIDGE, "/usr/sbin/iptables"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "missing {missing:?} (apt-get install busybox-static containernetworking-plugins iptables)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the network prerequisites are missing: {why}");
    }
    eprintln!("note: skipping network test ({why})");
    false
}

/// A CGI script: headers, then `body`.
fn cgi(body: &str) -> String {
    format!("#!/bin/sh\necho 'Content-Type: text/plain'\necho\n{body}\n")
}

/// A busybox rootfs whose `/who` says `real`, with `scripts` under `/cgi-bin/`.
fn rootfs(dir: &Path, scripts: &[(&str, String)]) {
    let root = dir.join("rootfs");
    for d in ["bin", "www/cgi-bin", "squat"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("www/healthz"), "ok\n").unwrap();
    std::fs::write(root.join("www/who"), "real\n").unwrap();
    std::fs::write(root.join("squat/who"), "squatter\n").unwrap();
    for (name, body) in scripts {
        let path = root.join("www/cgi-bin").join(name);
        std::fs::write(&path, cgi(body)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// App `name` on the rootfs: `httpd` on `listen$PORT`, `extra` lines in `[service]`.
fn spec(dir: &Path, name: &str, port: u16, listen: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"name = "{name}"

[image]
base = "rootfs:rootfs"
entrypoint = ["/bin/busybox", "sh", "-c"]
cmd = ["exec /bin/busybox httpd -f -p {listen}$PORT -h /www"]

[service]
writable = ["/tmp"]
stop_grace = "1s"
{extra}

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

/// `GET path` through the router on `port`: the whole response, or what went wrong.
fn get(port: u16, path: &str) -> String {
    get_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), path)
}

fn get_at(addr: SocketAddr, path: &str) -> String {
    common::raw_get(addr, "net", path)
}

fn body(resp: &str) -> &str {
    resp.split("\r\n\r\n").nth(1).unwrap_or("")
}

/// The body of `GET /cgi-bin/{script}` through the router on `port`, once it answers 200.
fn run(port: u16, script: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = get(port, &format!("/cgi-bin/{script}"));
        if resp.starts_with("HTTP/1.1 200") {
            return body(&resp).to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "/cgi-bin/{script} on {port} did not answer 200: {resp}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The one instance of `app` in `kiln status`: (id, address).
fn instance_of(state: &Path, app: &str) -> (String, SocketAddr) {
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
    (
        instances[0]["id"].as_str().unwrap().to_owned(),
        instances[0]["addr"].as_str().unwrap().parse().unwrap(),
    )
}

/// A listener on the host's loopback only, answering `secret` to whoever connects.
fn loopback_service(secret: &'static str) -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(secret.as_bytes());
        }
    });
    port
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packet count of kiln's FORWARD rule that drops new connections into its bridge.
fn kiln_drops() -> u64 {
    sh(&["iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n"])
        .lines()
        .filter(|l| l.contains("kiln: instances only through the router"))
        .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// A neighbouring machine: a network namespace linked to the host by a veth pair, routing
/// kiln's subnet through the host as a LAN neighbour could. Removed on drop.
struct Neighbour {
    name: String,
}

impl Neighbour {
    fn new() -> Neighbour {
        let name = format!("kiln-nb-{}", std::process::id());
        let host_if = format!("knh{}", std::process::id() % 100_000);
        sh(&["ip", "netns", "add", &name]);
        let n = Neighbour { name };
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &n.name,
        ]);
        sh(&["ip", "addr", "add", "192.168.251.1/30", "dev", &host_if]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        let ns = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &n.name];
            all.extend_from_slice(args);
            sh(&all)
        };
        ns(&["ip", "addr", "add", "192.168.251.2/30", "dev", "eth0"]);
        ns(&["ip", "link", "set", "eth0", "up"]);
        ns(&["ip", "link", "set", "lo", "up"]);
        ns(&[
            "ip",
            "route",
            "add",
            "10.209.0.0/16",
            "via",
            "192.168.251.1",
        ]);
        n
    }

    /// Whether a TCP connection from the neighbour to `addr` succeeds within 2 s.
    fn connects(&self, addr: SocketAddr) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, BUSYBOX, "nc", "-w", "2"])
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
            .status
            .success()
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and so the host's.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[test]
fn each_instance_has_its_own_network() {
    if !prerequisites() {
        return;
    }
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret = loopback_service("host-loopback-secret\n");
    let router = common::free_port();
    let hosted_port = common::free_port();
    // An address of this host that is not loopback, for the bind test.
    let host_ip = sh(&["hostname", "-I"])
        .split_whitespace()
        .find(|a| a.parse::<Ipv4Addr>().is_ok_and(|a| !a.is_loopback()))
        .unwrap()
        .to_owned();
    rootfs(
        dir.path(),
        &[
            (
                "loopback",
                format!(
                    "/bin/busybox nc -w 2 127.0.0.1 {secret} </dev/null 2>&1; echo \"exit=$?\""
                ),
            ),
            (
                "gateway",
                format!(
                    "/bin/busybox nc -w 2 10.209.0.1 {secret} </dev/null 2>&1; echo \"exit=$?\""
                ),
            ),
            (
                "bindhost",
                format!(
                    "/bin/busybox httpd -f -p {host_ip}:{router} -h /squat 2>&1; echo \"exit=$?\""
                ),
            ),
            (
                "squat",
                format!(
                    "/bin/busybox httpd -p 127.0.0.1:{router} -h /squat 2>&1; echo \"exit=$?\""
                ),
            ),
            ("addr", "/bin/busybox ip -4 -o addr show eth0".to_owned()),
            (
                "egress",
                "printf 'GET /nothing-here HTTP/1.0\\r\\n\\r\\n' | \
                 /bin/busybox nc -w 5 192.168.251.2 7777 2>&1; echo \"exit=$?\""
                    .to_owned(),
            ),
        ],
    );
    let _daemon = Daemon::start(&state);
    // The default network, and the host's where the spec says so.
    let web = spec(dir.path(), "web", router, "", "");
    let hosted = spec(
        dir.path(),
        "hosted",
        hosted_port,
        "127.0.0.1:",
        "network = \"host\"",
    );
    for s in [&web, &hosted] {
        let image = common::build(&state, s);
        common::apply(&state, s, &image);
    }

    // The router reaches the instance at its own address on kiln's bridge, on the app's
    // port; so does this host.
    let (id, addr) = instance_of(&state, "web");
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("{other}"),
    };
    assert_eq!(ip.octets()[..2], [10, 209], "{addr}");
    assert_eq!(addr.port(), 8080, "PORT is the app's own port");
    assert!(
        run(router, "addr").contains(&format!("inet {ip}/16")),
        "the instance sees its own address"
    );
    assert_eq!(body(&get_at(addr, "/who")), "real\n");

    // The host's loopback services are out of reach: its own 127.0.0.1 is not the host's,
    // and the bridge's gateway address does not lead to them either.
    for script in ["loopback", "gateway"] {
        let out = run(router, script);
        assert!(!out.contains("host-loopback-secret"), "{script}: {out}");
        assert!(!out.contains("exit=0"), "{script}: {out}");
    }

    // A host address cannot be bound inside; 127.0.0.1:<router port> can, but it is the
    // instance's own loopback: every request through the router still reaches the app.
    let bind = run(router, "bindhost");
    assert!(
        bind.contains("Cannot assign requested address") && bind.contains("exit=1"),
        "{bind}"
    );
    let squat = run(router, "squat");
    assert!(squat.contains("exit=0"), "the squat is made: {squat}");
    for _ in 0..50 {
        assert_eq!(body(&get(router, "/who")), "real\n");
    }

    // A neighbouring machine that routes kiln's subnet through this host reaches nothing:
    // kiln's rule drops the connection (and it is that rule, by its counter).
    let neighbour = Neighbour::new();
    let before = kiln_drops();
    assert!(!neighbour.connects(addr), "the neighbour reached {addr}");
    assert!(kiln_drops() > before, "kiln's FORWARD rule dropped nothing");
    // The other way is open: an instance reaches a machine outside (forwarded, masqueraded),
    // here the neighbour's web server, which answers 404.
    let mut server = Command::new("ip")
        .args(["netns", "exec", &neighbour.name, BUSYBOX, "httpd", "-f"])
        .args(["-p", "192.168.251.2:7777", "-h", "/tmp"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let egress = loop {
        let out = run(router, "egress");
        if out.contains("404") || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        egress.contains("404"),
        "the instance did not reach outside: {egress}"
    );
    drop(neighbour);

    // `network = "host"`: the host's network, loopback included: an explicit weakening.
    let out = run(hosted_port, "loopback");
    assert!(out.contains("host-loopback-secret"), "{out}");
    let (_, hosted_addr) = instance_of(&state, "hosted");
    assert!(hosted_addr.ip().is_loopback(), "{hosted_addr}");

    // An app that listens on its own loopback only never becomes healthy, and its
    // replacement's event says where it does listen. (It reads "became unhealthy": the health
    // machine does not tell never-healthy from unhealthy after the start period.)
    let loopy = spec(dir.path(), "loopy", common::free_port(), "127.0.0.1:", "")
        .with_file_name("loopy.toml");
    let text = std::fs::read_to_string(&loopy).unwrap().replace(
        "[service.health]\n",
        "[service.health]\nstart_period = \"1s\"\n",
    );
    std::fs::write(&loopy, text).unwrap();
    let image = common::build(&state, &loopy);
    let out = kiln(&state)
        .args(["apply", "-f"])
        .arg(&loopy)
        .args(["--image", &image, "--no-wait"])
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let said = loop {
        let out = kiln(&state).args(["history", "loopy"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(line) = text.lines().find(|l| l.contains("it listens on")) {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no event says where it listens:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        said.contains("it listens on 127.0.0.1:8080 only, its own loopback"),
        "{said}"
    );
    let out = kiln(&state).args(["down", "loopy"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Down: the namespace, the address and the host's rules go with the instance.
    let out = kiln(&state)
        .args(["down", "web"])
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while state.join("instances").join(&id).exists() {
        assert!(Instant::now() < deadline, "{id} was not destroyed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !Path::new("/var/lib/cni/networks/kiln")
            .join(ip.to_string())
            .exists(),
        "{ip} is still reserved"
    );
    // kiln's host rules are per subnet: no instance leaves one behind.
    let rules = sh(&["iptables-save"]);
    assert!(!rules.contains(&id), "rules of {id} are left:\n{rules}");
    assert!(
        !rules.contains(&format!("{ip}/32")),
        "rules for {ip} are left"
    );
    assert!(
        rules
            .lines()
            .any(|l| l.contains("-s 10.209.0.0/16 ! -o kiln0")
                && l.contains("kiln: connections from instances")
                && l.ends_with("-j MASQUERADE")),
        "the subnet is masqueraded:\n{rules}"
    );
}
