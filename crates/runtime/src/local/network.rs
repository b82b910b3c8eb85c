//! An instance's own network: a network namespace kiln creates and bind-mounts at
//! `instances/<id>/netns`, joined to a CNI network by the standard plugins, and given to the
//! OCI runtime by path. The router and health checks reach the instance at its own address;
//! nothing it binds is on the host's addresses.
//!
//! The plugins are run as the CNI specification says (1.0: `ADD`, `DEL`, a network list's
//! plugins in order with `prevResult`, in reverse for `DEL`); kiln keeps no state of its own
//! about the network apart from `network.json`, written *before* the namespace is made, so a
//! destroy after a crash at any point knows what to undo. `DEL` is safe to repeat, also
//! without the namespace: the IP address and the host's rules go either way.
//!
//! The default network, `kiln`, is kiln's bridge (`bridge` + `host-local`, the address space
//! shared by every kiln on the host through host-local's own lock). Its host rules are
//! kiln's own and per subnet, not per instance, so a create runs no `iptables` (each call
//! costs milliseconds, and per-instance rules are what a crash leaves behind): new
//! connections forwarded into the bridge from anywhere else are dropped, so nothing an
//! instance binds is reachable from outside the host except through the router; replies and
//! the instances' own connections out are accepted and masqueraded. They are made once per
//! kiln process, on its first instance.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use kiln_spec::Network;

/// The bridge of the `kiln` network.
pub const BRIDGE: &str = "kiln0";
/// The `kiln` network's address space.
pub const SUBNET: &str = "10.209.0.0/16";
/// The interface name inside an instance.
const IFNAME: &str = "eth0";
/// The CNI version kiln speaks (Debian's plugins 1.1 speak it).
const CNI_VERSION: &str = "1.0.0";
/// Where kiln looks for network lists other than its own.
pub const CONF_DIR: &str = "/etc/cni/net.d";
/// Where kiln looks for the plugins: Debian's place, then the upstream default.
pub const BIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];
/// How much of a plugin's output is read.
const OUTPUT_CAP: usize = 1 << 20;

/// Why an instance's network could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A file or kernel call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The named network list is not there or not valid.
    #[error("CNI network {name:?}: {message}")]
    List {
        /// `[service] network`.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A plugin failed.
    #[error("CNI plugin {plugin} ({command}) for network {network:?}: {message}")]
    Plugin {
        /// Its type.
        plugin: String,
        /// `ADD` or `DEL`.
        command: &'static str,
        /// The network list.
        network: String,
        /// Its error, as it reported it.
        message: String,
    },
}

/// What kiln records about an instance's network before it exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkRecord {
    version: u32,
    /// The network list as used (kiln's own, or a copy of the named one), so that `DEL`
    /// runs the same plugins even if the file changed since.
    list: Value,
    /// The last plugin's result, once `ADD` finished.
    #[serde(default)]
    result: Option<Value>,
}

/// The CNI plugins and configuration directories.
#[derive(Debug, Clone)]
pub struct Cni {
    /// Where named network lists are.
    pub conf_dir: PathBuf,
    /// Where plugin binaries are, in order.
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for Cni {
    fn default() -> Cni {
        Cni {
            conf_dir: PathBuf::from(CONF_DIR),
            bin_dirs: BIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// The namespace file of an instance whose directory is `dir`.
pub fn netns_path(dir: &Path) -> PathBuf {
    dir.join("netns")
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join("network.json")
}

impl Cni {
    /// Gives the instance `id` (files in `dir`) its own namespace on `network` and returns
    /// its address. On failure, whatever was set up is torn down again.
    pub fn attach(
        &self,
        id: &str,
        dir: &Path,
        network: &Network,
    ) -> Result<Ipv4Addr, NetworkError> {
        let list = self.list(network)?;
        let mut record = NetworkRecord {
            version: 1,
            list,
            result: None,
        };
        write_record(dir, &record)?;
        let netns = netns_path(dir);
        let attached = new_netns(&netns)
            .map_err(|source| NetworkError::Io {
                op: "create a network namespace at",
                path: netns.clone(),
                source,
            })
            .and_then(|()| {
                if *network == Network::Kiln {
                    host_rules();
                }
                self.loopback_up(id, &netns)?;
                self.add(id, &netns, &record.list)
            });
        let result = match attached {
            Ok(result) => result,
            Err(e) => {
                if let Err(cleanup) = self.detach(id, dir) {
                    tracing::warn!(instance = id, error = %cleanup, "network cleanup after a failed attach");
                }
                return Err(e);
            }
        };
        let Some(addr) = ipv4_of(&result) else {
            if let Err(cleanup) = self.detach(id, dir) {
                tracing::warn!(instance = id, error = %cleanup, "network cleanup after a failed attach");
            }
            return Err(NetworkError::List {
                name: network.as_str().to_owned(),
                message: format!("its result gives the instance no IPv4 address: {result}"),
            });
        };
        record.result = Some(result);
        write_record(dir, &record)?;
        Ok(addr)
    }

    /// Tears down what `attach` set up, as far as it got: `DEL` through the list (the
    /// address and the host's rules), then the namespace. Safe to repeat; nothing to do
    /// when the instance never had a network.
    pub fn detach(&self, id: &str, dir: &Path) -> Result<(), NetworkError> {
        let path = record_path(dir);
        let record: NetworkRecord = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| NetworkError::Io {
                op: "read",
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(NetworkError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        };
        let netns = netns_path(dir);
        let mounted = is_netns(&netns);
        self.del(
            id,
            mounted.then_some(netns.as_path()),
            &record.list,
            record.result.as_ref(),
        )?;
        if mounted {
            rustix::mount::unmount(&netns, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
                NetworkError::Io {
                    op: "unmount",
                    path: netns.clone(),
                    source: e.into(),
                }
            })?;
        }
        for file in [netns, path] {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(NetworkError::Io {
                        op: "remove",
                        path: file,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// The network list `network` names: kiln's own, or the `*.conflist` in `conf_dir`
    /// whose `name` it is.
    fn list(&self, network: &Network) -> Result<Value, NetworkError> {
        let name = match network {
            Network::Kiln => return Ok(kiln_list()),
            Network::Named(name) => name,
            Network::Host => {
                return Err(NetworkError::List {
                    name: Network::HOST.to_owned(),
                    message: "the host network has no network list".to_owned(),
                });
            }
        };
        let err = |message: String| NetworkError::List {
            name: name.clone(),
            message,
        };
        let entries = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| err(format!("{}: {e}", self.conf_dir.display())))?;
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
            .collect();
        paths.sort();
        for path in paths {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok(list) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            if list["name"].as_str() == Some(name.as_str()) {
                check_list(&list).map_err(|m| err(format!("{}: {m}", path.display())))?;
                return Ok(list);
            }
        }
        Err(err(format!(
            "no *.conflist in {} has this name",
            self.conf_dir.display()
        )))
    }

    fn plugin_binary(&self, plugin: &str) -> Option<PathBuf> {
        if plugin.contains('/') || plugin.starts_with('.') {
            return None;
        }
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
    }

    /// Brings `lo` up in the namespace (the runtime only does so for namespaces it makes).
    fn loopback_up(&self, id: &str, netns: &Path) -> Result<(), NetworkError> {
        let conf = json!({"cniVersion": CNI_VERSION, "name": "lo", "type": "loopback"});
        self.exec("ADD", id, Some(netns), "lo", "lo", &conf)
            .map(drop)
    }

    fn add(&self, id: &str, netns: &Path, list: &Value) -> Result<Value, NetworkError> {
        let mut prev: Option<Value> = None;
        for conf in plugin_confs(list) {
            let conf = with_prev(conf, prev.as_ref());
            prev = Some(self.exec("ADD", id, Some(netns), IFNAME, net_name(list), &conf)?);
        }
        prev.ok_or_else(|| NetworkError::List {
            name: net_name(list).to_owned(),
            message: "it has no plugins".to_owned(),
        })
    }

    fn del(
        &self,
        id: &str,
        netns: Option<&Path>,
        list: &Value,
        result: Option<&Value>,
    ) -> Result<(), NetworkError> {
        let mut first = None;
        for conf in plugin_confs(list).into_iter().rev() {
            let conf = with_prev(conf, result);
            if let Err(e) = self.exec("DEL", id, netns, IFNAME, net_name(list), &conf) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Runs one plugin as the CNI specification says: configuration on stdin, parameters in
    /// the environment, the result (or an error object) on stdout.
    fn exec(
        &self,
        command: &'static str,
        id: &str,
        netns: Option<&Path>,
        ifname: &str,
        network: &str,
        conf: &Value,
    ) -> Result<Value, NetworkError> {
        let plugin = conf["type"].as_str().unwrap_or_default().to_owned();
        let fail = |message: String| NetworkError::Plugin {
            plugin: plugin.clone(),
            command,
            network: network.to_owned(),
            message,
        };
        let binary = self.plugin_binary(&plugin).ok_or_else(|| {
            fail(format!(
                "no such plugin in {} (Debian: apt-get install -y containernetworking-plugins)",
                self.bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let cni_path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        let mut child = Command::new(&binary)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns.map(Path::as_os_str).unwrap_or_default())
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("{}: {e}", binary.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            let bytes = serde_json::to_vec(conf).unwrap_or_default();
            io::Write::write_all(&mut stdin, &bytes).map_err(|e| fail(e.to_string()))?;
        }
        let out = wait_bounded(child).map_err(fail)?;
        let stdout = &out.stdout[..out.stdout.len().min(OUTPUT_CAP)];
        if !out.status.success() {
            let reported = serde_json::from_slice::<Value>(stdout).ok().map(|v| {
                let msg = v["msg"].as_str().unwrap_or_default();
                match v["details"].as_str() {
                    Some(d) if !d.is_empty() => format!("{msg}: {d}"),
                    _ => msg.to_owned(),
                }
            });
            let stderr = String::from_utf8_lossy(&out.stderr[..out.stderr.len().min(4096)]);
            return Err(fail(match reported {
                Some(m) if !m.is_empty() => m,
                _ => format!("{}: {}", out.status, stderr.trim()),
            }));
        }
        if command == "DEL" || stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(stdout).map_err(|e| fail(format!("its result is not JSON: {e}")))
    }
}

/// kiln's chain for connections out of its bridge.
const OUT_CHAIN: &str = "KILN-OUT";

/// The plugins kiln's own network list runs (`loopback` first, for `lo`).
pub const KILN_PLUGINS: &[&str] = &["loopback", "bridge", "host-local"];

/// How long one plugin may run: a hung one must not hold creates and destroys for ever.
const PLUGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for a plugin at most [`PLUGIN_TIMEOUT`] (then kills it), reading at most
/// [`OUTPUT_CAP`] of its stdout and 4 KiB of its stderr (the rest is read and dropped).
fn wait_bounded(mut child: std::process::Child) -> Result<std::process::Output, String> {
    use std::io::Read as _;
    let reader = |pipe: Option<Box<dyn io::Read + Send>>, cap: usize| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = (&mut pipe).take(cap as u64).read_to_end(&mut v);
                let _ = io::copy(&mut pipe, &mut io::sink());
            }
            let _ = tx.send(v);
        });
        rx
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
        OUTPUT_CAP,
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
        4096,
    );
    let deadline = std::time::Instant::now() + PLUGIN_TIMEOUT;
    // Polled from 100 µs up to 5 ms: a plugin takes a few milliseconds, and a create waits
    // for three of them.
    let mut pause = std::time::Duration::from_micros(100);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(5));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "it did not finish within {} s",
                    PLUGIN_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    Ok(std::process::Output {
        status,
        stdout: out.recv_timeout(left).unwrap_or_default(),
        stderr: err.recv_timeout(left).unwrap_or_default(),
    })
}

/// kiln's own network list.
fn kiln_list() -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": Network::DEFAULT,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                // kiln's own rule masquerades the whole subnet (`host_rules`).
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
        ],
    })
}

/// What a network list must have for kiln to run it.
fn check_list(list: &Value) -> Result<(), String> {
    let plugins = list["plugins"]
        .as_array()
        .ok_or("it has no `plugins` array")?;
    if plugins.is_empty() {
        return Err("its `plugins` array is empty".to_owned());
    }
    for (i, p) in plugins.iter().enumerate() {
        match p["type"].as_str() {
            Some(t) if !t.is_empty() && !t.contains('/') && !t.starts_with('.') => {}
            _ => return Err(format!("plugins[{i}] has no valid `type`")),
        }
    }
    Ok(())
}

fn net_name(list: &Value) -> &str {
    list["name"].as_str().unwrap_or_default()
}

/// Each plugin's configuration as it is given to the plugin: its own keys, plus the list's
/// `name` and `cniVersion`.
fn plugin_confs(list: &Value) -> Vec<Value> {
    let version = list["cniVersion"].as_str().unwrap_or(CNI_VERSION);
    list["plugins"]
        .as_array()
        .map(|plugins| {
            plugins
                .iter()
                .map(|p| {
                    let mut conf = p.clone();
                    conf["name"] = json!(net_name(list));
                    conf["cniVersion"] = json!(version);
                    conf
                })
                .collect()
        })
        .unwrap_or_default()
}

fn with_prev(mut conf: Value, prev: Option<&Value>) -> Value {
    if let Some(prev) = prev.filter(|p| !p.is_null()) {
        conf["prevResult"] = prev.clone();
    }
    conf
}

/// The first IPv4 address of a CNI result (`ips[].address`, `a.b.c.d/len`).
fn ipv4_of(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr = ip["address"].as_str()?;
        addr.split('/').next()?.parse().ok()
    })
}

fn write_record(dir: &Path, record: &NetworkRecord) -> Result<(), NetworkError> {
    let path = record_path(dir);
    let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
    kiln_durable::write(&path, &bytes).map_err(|source| NetworkError::Io {
        op: "write",
        path,
        source,
    })
}

/// Creates a network namespace and bind-mounts it at `path` (an empty file first), from a
/// thread of its own: `unshare` moves only the calling thread, which then ends.
fn new_netns(path: &Path) -> io::Result<()> {
    std::fs::File::create(path)?;
    let target = path.to_owned();
    std::thread::spawn(move || -> io::Result<()> {
        // Deprecated in rustix because `UnshareFlags::FILES` can break other threads' file
        // descriptors; a new network namespace for this thread alone cannot.
        #[allow(deprecated)]
        rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNET)?;
        rustix::mount::mount_bind("/proc/thread-self/ns/net", &target)?;
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("the thread making the namespace panicked"))?
}

/// Whether `path` is a network namespace bind mount (and not the empty file under it).
fn is_netns(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == NSFS_MAGIC)
}

/// `NSFS_MAGIC` from `linux/magic.h`.
const NSFS_MAGIC: rustix::fs::FsWord = 0x6e73_6673;

/// The host's rules for kiln's bridge, made once per process (each is checked first, so a
/// rule another kiln made is not added twice): new connections forwarded into the bridge
/// from elsewhere are dropped (a host whose FORWARD policy accepts would otherwise let a
/// neighbour that routes to the subnet reach instances directly); replies into it are
/// accepted, and the instances' own connections out go through `KILN-OUT`, which accepts
/// them (a FORWARD policy of DROP, as Docker sets, would refuse them) except towards
/// Docker's bridges, left to Docker's own rules; they are masqueraded. Only logged when `iptables` fails: an instance still
/// starts, reachable from this host, and `kiln doctor` names the missing tool.
fn host_rules() {
    static DONE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return;
    }
    let comment = |what: &'static str| ["-m", "comment", "--comment", what];
    let forward_drop: Vec<&str> = ["!", "-i", BRIDGE, "-o", BRIDGE, "-m", "conntrack"]
        .into_iter()
        .chain(["--ctstate", "NEW"])
        .chain(comment("kiln: instances only through the router"))
        .chain(["-j", "DROP"])
        .collect();
    let forward_replies: Vec<&str> = ["-o", BRIDGE, "-m", "conntrack"]
        .into_iter()
        .chain(["--ctstate", "RELATED,ESTABLISHED"])
        .chain(comment("kiln: replies to instances"))
        .chain(["-j", "ACCEPT"])
        .collect();
    // Out of the bridge: through `KILN-OUT`, which leaves traffic to Docker's bridges to
    // Docker's own rules (its unpublished ports stay closed to instances) and accepts the rest.
    let forward_out: Vec<&str> = ["-i", BRIDGE, "!", "-o", BRIDGE]
        .into_iter()
        .chain(comment("kiln: connections from instances"))
        .chain(["-j", OUT_CHAIN])
        .collect();
    let out_docker: Vec<&str> = ["-o", "docker+"]
        .into_iter()
        .chain(comment("kiln: Docker decides for its bridges"))
        .chain(["-j", "RETURN"])
        .collect();
    let out_docker_networks: Vec<&str> = ["-o", "br-+"]
        .into_iter()
        .chain(comment("kiln: Docker decides for its bridges"))
        .chain(["-j", "RETURN"])
        .collect();
    let out_accept: Vec<&str> = comment("kiln: connections from instances")
        .into_iter()
        .chain(["-j", "ACCEPT"])
        .collect();
    let masquerade: Vec<&str> = ["-s", SUBNET, "!", "-o", BRIDGE]
        .into_iter()
        .chain(comment("kiln: connections from instances"))
        .chain(["-j", "MASQUERADE"])
        .collect();
    // The chain first (an error when it exists is fine), its rules in order (`-A`), then
    // the jumps into it and the others at the top of FORWARD (`-I`).
    let _ = Command::new("iptables")
        .args(["-w", "-t", "filter", "-N", OUT_CHAIN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let rules: [(&str, &str, &str, &[&str]); 7] = [
        ("filter", OUT_CHAIN, "-A", &out_docker),
        ("filter", OUT_CHAIN, "-A", &out_docker_networks),
        ("filter", OUT_CHAIN, "-A", &out_accept),
        ("filter", "FORWARD", "-I", &forward_out),
        ("filter", "FORWARD", "-I", &forward_replies),
        // Inserted last, so it is first: nothing above it lets a new connection in.
        ("filter", "FORWARD", "-I", &forward_drop),
        ("nat", "POSTROUTING", "-I", &masquerade),
    ];
    let mut all = true;
    for (table, chain, add, rule) in rules {
        let run = |op: &str| {
            Command::new("iptables")
                .args(["-w", "-t", table, op, chain])
                .args(rule)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        };
        let made = match run("-C") {
            Ok(s) if s.success() => true,
            _ => run(add).is_ok_and(|s| s.success()),
        };
        if !made {
            all = false;
            tracing::warn!(
                table,
                chain,
                rule = rule.join(" "),
                "iptables: cannot add kiln's rule"
            );
        }
    }
    *done = all;
}

/// What the processes in `pid`'s network namespace listen on (TCP, IPv4 and IPv6), from
/// `/proc/<pid>/net/tcp{,6}`: in an instance's own namespace, exactly the instance's.
pub(crate) fn listening(pid: u32) -> io::Result<Vec<std::net::SocketAddr>> {
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        match std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            Ok(text) => out.extend(listeners_in(&text, v6)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && v6 => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The `LISTEN` (state `0A`) sockets of a `/proc/net/tcp` table: `local_address` is the
/// address as hex in host byte order words, then the port in hex.
fn listeners_in(table: &str, v6: bool) -> Vec<std::net::SocketAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let words: Vec<u32> = (0..ip.len() / 8)
                .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
                .collect::<Option<_>>()?;
            let ip: std::net::IpAddr = match (v6, words.as_slice()) {
                (false, [w]) => Ipv4Addr::from(u32::from_be(*w)).into(),
                (true, [a, b, c, d]) => {
                    let mut bytes = [0u8; 16];
                    for (i, w) in [a, b, c, d].into_iter().enumerate() {
                        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    std::net::Ipv6Addr::from(bytes).into()
                }
                _ => return None,
            };
            Some(std::net::SocketAddr::new(ip, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn each_plugin_gets_the_list_s_name_and_version_and_the_previous_result() {
        let list = kiln_list();
        let confs = plugin_confs(&list);
        assert_eq!(confs.len(), 1);
        assert_eq!(confs[0]["type"], "bridge");
        assert_eq!(confs[0]["name"], "kiln");
        assert_eq!(confs[0]["cniVersion"], CNI_VERSION);
        let prev = json!({"ips": [{"address": "10.209.0.7/16"}]});
        let with = with_prev(confs[0].clone(), Some(&prev));
        assert_eq!(with["prevResult"], prev);
        assert!(with_prev(confs[0].clone(), Some(&Value::Null))["prevResult"].is_null());
    }

    #[test]
    fn the_address_is_the_first_ipv4_of_the_result() {
        let result = json!({"ips": [
            {"address": "fd00::7/64"},
            {"address": "10.209.0.7/16", "gateway": "10.209.0.1"},
        ]});
        assert_eq!(ipv4_of(&result), Some(Ipv4Addr::new(10, 209, 0, 7)));
        assert_eq!(ipv4_of(&json!({})), None);
    }

    #[test]
    fn a_named_list_is_found_by_name_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |file: &str, text: &str| std::fs::write(dir.path().join(file), text).unwrap();
        write(
            "10-a.conflist",
            r#"{"name":"a","plugins":[{"type":"bridge"}]}"#,
        );
        write(
            "20-b.conflist",
            r#"{"name":"b","plugins":[{"type":"../../bin/sh"}]}"#,
        );
        write("30-c.conf", r#"{"name":"c","type":"bridge"}"#);
        write("40-broken.conflist", "{");
        let cni = Cni {
            conf_dir: dir.path().to_owned(),
            bin_dirs: vec![],
        };
        let named = |n: &str| cni.list(&Network::Named(n.to_owned()));
        assert_eq!(named("a").unwrap()["plugins"][0]["type"], "bridge");
        let b = named("b").unwrap_err().to_string();
        assert!(b.contains("plugins[0] has no valid `type`"), "{b}");
        let c = named("c").unwrap_err().to_string();
        assert!(c.contains("no *.conflist"), "{c}");
        assert_eq!(cni.list(&Network::Kiln).unwrap()["name"], "kiln");
    }

    #[test]
    fn a_plugin_is_only_looked_up_by_plain_name_in_the_plugin_dirs() {
        let cni = Cni {
            conf_dir: PathBuf::new(),
            bin_dirs: vec![PathBuf::from("/bin")],
        };
        assert!(cni.plugin_binary("sh").is_some());
        assert!(cni.plugin_binary("../bin/sh").is_none());
        assert!(cni.plugin_binary("/bin/sh").is_none());
        let err = cni
            .exec("ADD", "x", None, IFNAME, "n", &json!({"type": "nope"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CNI plugin nope (ADD)"), "{err}");
        assert!(err.contains("containernetworking-plugins"), "{err}");
    }

    #[test]
    fn listening_sockets_are_read_from_the_proc_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 65534        0 3 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(
            listeners_in(v4, false),
            [
                "127.0.0.1:8080".parse::<std::net::SocketAddr>().unwrap(),
                "0.0.0.0:80".parse().unwrap()
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000
";
        assert_eq!(
            listeners_in(v6, true),
            ["[::1]:8080".parse::<std::net::SocketAddr>().unwrap()]
        );
        let here = listening(std::process::id()).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let after = listening(std::process::id()).unwrap();
        assert!(
            after.contains(&l.local_addr().unwrap()),
            "{here:?} {after:?}"
        );
    }

    #[test]
    fn detach_without_a_record_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        Cni::default().detach("x", dir.path()).unwrap();
    }
}
