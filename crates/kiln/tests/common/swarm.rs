//! The 3-node Docker Swarm of `scripts/swarm-cluster.sh`, for the tests that need a cluster.
//!
//! [`cluster`] brings it up (once per test binary while any test holds a [`Cluster`]) and
//! parses what the script prints; dropping the last handle brings it down again, leaving
//! nothing. Nodes are numbered 1 to 3 as in the script; node 1 is the only manager.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::root;

/// The script, run from the repository's root (`KILN_SWARM_SCRIPT` names another, e.g. a
/// copy with other names and addresses, so two developers' clusters can coexist).
pub fn script_path() -> PathBuf {
    std::env::var_os("KILN_SWARM_SCRIPT")
        .map_or_else(|| root().join("scripts/swarm-cluster.sh"), PathBuf::from)
}

/// `bash scripts/swarm-cluster.sh ARGS…`, its output whatever the outcome.
pub fn script(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// [`script`], panicking with what it printed unless it succeeded; its stdout.
pub fn script_ok(args: &[&str]) -> String {
    let out = script(args);
    assert!(
        out.status.success(),
        "swarm-cluster.sh {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether the cluster can be made here (root, a docker CLI, dockerd, ip, nsenter, unshare,
/// iptables); panics in CI (`CI=true`) when it cannot.
pub fn swarm_prerequisites(what: &str) -> bool {
    let works = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let root_user = super::is_root();
    let tools = [
        ("docker", "--version"),
        ("dockerd", "--version"),
        ("ip", "-V"),
        ("nsenter", "--version"),
        ("unshare", "--version"),
        ("iptables", "--version"),
    ];
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, arg)| !works(cmd, arg))
        .map(|(cmd, _)| *cmd)
        .collect();
    if root_user && missing.is_empty() {
        return true;
    }
    let why = format!("root={root_user}, missing: {missing:?} (bash scripts/ci-setup.sh)");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the swarm cluster prerequisites are missing ({what}): {why}");
    }
    eprintln!("note: skipping the swarm {what} test ({why})");
    false
}

/// What `up` and `env` print, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterEnv {
    /// `KILN_SWARM_MANAGER`: node 1's engine, e.g. `unix:///run/kiln-swarm/n1/docker.sock`.
    pub manager: String,
    /// `KILN_SWARM_NODES`: every node's engine, node 1 first.
    pub nodes: Vec<String>,
    /// `KILN_SWARM_NODE_ADDRS`: every node's address (where its host-mode ports listen).
    pub node_addrs: Vec<IpAddr>,
    /// `KILN_SWARM_HOST_ADDR`: the root namespace's address on the nodes' bridge.
    pub host_addr: IpAddr,
}

impl ClusterEnv {
    /// Parses `NAME=value` / `NAME="a b c"` lines.
    pub fn parse(text: &str) -> ClusterEnv {
        let get = |name: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name}= in:\n{text}"))
                .trim_matches('"')
                .to_owned()
        };
        ClusterEnv {
            manager: get("KILN_SWARM_MANAGER"),
            nodes: get("KILN_SWARM_NODES")
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            node_addrs: get("KILN_SWARM_NODE_ADDRS")
                .split_whitespace()
                .map(|a| a.parse().unwrap())
                .collect(),
            host_addr: get("KILN_SWARM_HOST_ADDR").parse().unwrap(),
        }
    }
}

/// Brings the cluster down when the last [`Cluster`] handle goes.
struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in 1..=3 {
                let log = format!("/run/kiln-swarm/n{n}/dockerd.log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                eprintln!("--- {log} (end) ---\n{}", tail.join("\n"));
            }
        }
        let out = script(&["down"]);
        if !out.status.success() {
            eprintln!(
                "swarm-cluster.sh down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

static SHARED: Mutex<Weak<Guard>> = Mutex::new(Weak::new());

/// A handle on the running cluster. Handles held at the same time share one cluster; when
/// the last one is dropped the cluster is brought down (so tests that run one after another
/// each bring it up, a few seconds each).
#[derive(Clone)]
pub struct Cluster {
    /// Where everything is.
    pub env: ClusterEnv,
    _guard: Arc<Guard>,
}

/// The cluster, brought up (or found up) by `swarm-cluster.sh up`: 3 nodes Ready.
pub fn cluster() -> Cluster {
    let mut shared = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let guard = match shared.upgrade() {
        Some(g) => g,
        None => {
            let g = Arc::new(Guard);
            *shared = Arc::downgrade(&g);
            g
        }
    };
    // `up` is a no-op that prints the env when the cluster is up (and cleans first after a
    // crash), so every handle reads the same env.
    let env = ClusterEnv::parse(&script_ok(&["up"]));
    Cluster { env, _guard: guard }
}

impl Cluster {
    /// Node `n`'s (1-based) engine address.
    pub fn engine(&self, n: usize) -> &str {
        &self.env.nodes[n - 1]
    }

    /// Node `n`'s address.
    pub fn addr(&self, n: usize) -> IpAddr {
        self.env.node_addrs[n - 1]
    }

    /// The docker CLI pointed at node `n`'s engine.
    pub fn docker(&self, n: usize) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H").arg(self.engine(n)).stdin(Stdio::null());
        cmd
    }

    /// `docker ARGS…` on node `n`, panicking with its stderr unless it succeeded; its stdout.
    pub fn docker_ok(&self, n: usize, args: &[&str]) -> String {
        let out = self.docker(n).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "docker -H {} {} failed: {}",
            self.engine(n),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `docker inspect`-style JSON of one object on node `n` (`kind` = node, service, …, or
    /// "" for a task or container).
    pub fn inspect(&self, n: usize, kind: &str, id: &str) -> serde_json::Value {
        let mut args = vec![];
        if !kind.is_empty() {
            args.push(kind);
        }
        args.extend(["inspect", id]);
        let v: serde_json::Value = serde_json::from_str(&self.docker_ok(n, &args)).unwrap();
        v[0].clone()
    }

    /// Copies image `reference` from node `from` to every other node (`docker save | load`).
    pub fn share_image(&self, from: usize, reference: &str) {
        for to in 1..=self.env.nodes.len() {
            if to == from {
                continue;
            }
            let mut save = self
                .docker(from)
                .args(["save", reference])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let load = self
                .docker(to)
                .args(["load", "-q"])
                .stdin(save.stdout.take().unwrap())
                .output()
                .unwrap();
            assert!(save.wait().unwrap().success(), "docker save {reference}");
            assert!(
                load.status.success(),
                "docker load on node {to}: {}",
                String::from_utf8_lossy(&load.stderr)
            );
        }
    }

    /// The manager's node objects, by id.
    pub fn nodes(&self) -> Vec<serde_json::Value> {
        let ids = self.docker_ok(1, &["node", "ls", "-q"]);
        ids.split_whitespace()
            .map(|id| self.inspect(1, "node", id))
            .collect()
    }

    /// The node number (1-based) of the swarm node with id `node_id`, from its address.
    pub fn node_number(&self, node_id: &str) -> usize {
        let node = self.inspect(1, "node", node_id);
        let addr: IpAddr = node["Status"]["Addr"].as_str().unwrap().parse().unwrap();
        1 + self
            .env
            .node_addrs
            .iter()
            .position(|a| *a == addr)
            .unwrap_or_else(|| panic!("node {node_id} at {addr} is none of the cluster's"))
    }

    /// The running tasks of `service` with where each answers: (task id, node number,
    /// node address + the host-mode port the task's status reports for `target`).
    pub fn task_addrs(&self, service: &str, target: u64) -> Vec<(String, usize, SocketAddr)> {
        let ids = self.docker_ok(
            1,
            &[
                "service",
                "ps",
                "-q",
                "--filter",
                "desired-state=running",
                service,
            ],
        );
        let mut out = vec![];
        for id in ids.split_whitespace() {
            let task = self.inspect(1, "", id);
            if task["Status"]["State"] != "running" {
                continue;
            }
            let node = self.node_number(task["NodeID"].as_str().unwrap());
            let ports = task["Status"]["PortStatus"]["Ports"].as_array();
            let port = ports
                .into_iter()
                .flatten()
                .find(|p| p["TargetPort"] == target && p["PublishMode"] == "host")
                .and_then(|p| p["PublishedPort"].as_u64());
            if let Some(port) = port {
                out.push((
                    id.to_owned(),
                    node,
                    SocketAddr::new(self.addr(node), u16::try_from(port).unwrap()),
                ));
            }
        }
        out
    }

    /// Polls `ok` every 100 ms until it holds or `limit` passes; how long it took.
    pub fn wait(&self, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !ok() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        start.elapsed()
    }

    /// SIGKILL to node `n`'s dockerd (and so its containerd; its containers keep running and
    /// answering until the engine is back); with `whole` (`--all`), to every process of the
    /// node, containers included.
    pub fn kill_node(&self, n: usize, whole: bool) {
        let n = n.to_string();
        if whole {
            script_ok(&["kill-node", &n, "--all"]);
        } else {
            script_ok(&["kill-node", &n]);
        }
    }

    /// Starts node `n`'s dockerd again; returns once the manager reports it Ready.
    pub fn start_node(&self, n: usize) {
        script_ok(&["start-node", &n.to_string()]);
    }

    /// Makes every node trust `ca` (PEM) for the registry at `addr`.
    pub fn trust_registry(&self, addr: SocketAddr, ca: &Path) {
        script_ok(&["trust-registry", &addr.to_string(), &ca.to_string_lossy()]);
    }

    /// Brings the cluster down now, for every holder; the script's output.
    pub fn down(self) -> Output {
        script(&["down"])
    }
}
