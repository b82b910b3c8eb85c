//! What the guest init is told: the kernel command line's `kiln.*` keys (what the UKI's
//! signature covers: the root hash) and `/kiln/machine.json` (the app: modules, argv, env,
//! user, writable paths), both validated whole before anything acts on them.
//!
//! **API boundary:** pure: parses strings and bytes, reads no file.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why the command line or `machine.json` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A `kiln.*` key the init does not know (a typo would otherwise be ignored).
    #[error("unknown kernel command line key {0:?}")]
    UnknownKey(String),
    /// A key given twice.
    #[error("kernel command line key {0:?} is given twice")]
    RepeatedKey(String),
    /// A required key is absent.
    #[error("kernel command line lacks {0}")]
    MissingKey(&'static str),
    /// A value that does not parse.
    #[error("kernel command line {key}={value:?}: {why}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `machine.json` is not the expected JSON.
    #[error("/kiln/machine.json: {0}")]
    Json(String),
    /// `machine.json` parses but holds a value the init refuses.
    #[error("/kiln/machine.json: {field}: {why}")]
    BadField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The `kiln.*` keys of the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `kiln.verity`: the dm-verity root hash the root partition must match.
    pub root_hash: [u8; 32],
    /// `kiln.salt`: the verity salt (`-` or empty for none).
    pub salt: Vec<u8>,
    /// `kiln.data_blocks`: the root partition's size in 4096-byte blocks.
    pub data_blocks: u64,
    /// `kiln.ip`: how `eth0` gets its address; `None` leaves `eth0` down.
    pub ip: Option<Network>,
}

/// `kiln.ip=dhcp` or `kiln.ip=<addr>/<prefix>[,<gateway>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Ask the network's DHCP server (`super::dhcp`).
    Dhcp,
    /// This address and gateway.
    Static(Ip),
}

/// `kiln.ip=<addr>/<prefix>[,<gateway>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ip {
    /// The interface's address.
    pub addr: Ipv4Addr,
    /// The network prefix length (0 to 32).
    pub prefix: u8,
    /// The default route's gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

impl Ip {
    /// The netmask of [`Ip::prefix`].
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

impl Cmdline {
    /// Parses `/proc/cmdline`: the `kiln.*` words, every other word left to the kernel.
    pub fn parse(line: &str) -> Result<Cmdline, Error> {
        let (mut verity, mut salt, mut blocks, mut ip) = (None, None, None, None);
        for word in line.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix("kiln.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            let slot = match key {
                "verity" => &mut verity,
                "salt" => &mut salt,
                "data_blocks" => &mut blocks,
                "ip" => &mut ip,
                _ => return Err(Error::UnknownKey(format!("kiln.{key}"))),
            };
            if slot.replace(value).is_some() {
                return Err(Error::RepeatedKey(format!("kiln.{key}")));
            }
        }
        let verity = verity.ok_or(Error::MissingKey("kiln.verity"))?;
        let root_hash = hex::decode(verity)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| bad("kiln.verity", verity, "not 64 hex digits (a SHA-256)"))?;
        let salt = match salt.ok_or(Error::MissingKey("kiln.salt"))? {
            "" | "-" => Vec::new(),
            s => hex::decode(s)
                .ok()
                .filter(|b| b.len() <= crate::verity::MAX_SALT)
                .ok_or_else(|| bad("kiln.salt", s, "not hex of at most 256 bytes"))?,
        };
        let blocks_text = blocks.ok_or(Error::MissingKey("kiln.data_blocks"))?;
        let data_blocks = blocks_text
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0 && n <= u64::MAX / crate::verity::BLOCK_SIZE)
            .ok_or_else(|| {
                bad(
                    "kiln.data_blocks",
                    blocks_text,
                    "not a positive block count",
                )
            })?;
        let ip = ip
            .map(|v| match v {
                "dhcp" => Ok(Network::Dhcp),
                v => parse_ip(v).map(Network::Static),
            })
            .transpose()?;
        Ok(Cmdline {
            root_hash,
            salt,
            data_blocks,
            ip,
        })
    }

    /// The device-mapper table line of the root: `/dev/vda2` checked against `/dev/vda3`.
    pub fn verity_table(&self) -> Result<String, crate::verity::Error> {
        crate::verity::table(
            ROOT_DEVICE,
            HASH_DEVICE,
            self.data_blocks,
            &self.root_hash,
            &self.salt,
        )
    }
}

/// The root partition (the first virtio disk's second partition).
pub const ROOT_DEVICE: &str = "/dev/vda2";
/// The root's hash partition.
pub const HASH_DEVICE: &str = "/dev/vda3";

fn bad(key: &'static str, value: &str, why: &'static str) -> Error {
    Error::BadValue {
        key,
        value: value.to_owned(),
        why,
    }
}

fn parse_ip(value: &str) -> Result<Ip, Error> {
    const WHY: &str = "not dhcp or <addr>/<prefix>[,<gateway>] (IPv4)";
    let (net, gateway) = match value.split_once(',') {
        Some((net, gw)) => (net, Some(gw)),
        None => (value, None),
    };
    let (addr, prefix) = net
        .split_once('/')
        .ok_or_else(|| bad("kiln.ip", value, WHY))?;
    let addr = addr.parse().map_err(|_| bad("kiln.ip", value, WHY))?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|&p| p <= 32)
        .ok_or_else(|| bad("kiln.ip", value, WHY))?;
    let gateway = gateway
        .map(|g| g.parse())
        .transpose()
        .map_err(|_| bad("kiln.ip", value, WHY))?;
    Ok(Ip {
        addr,
        prefix,
        gateway,
    })
}

/// `/kiln/machine.json` as the export writes it (the wire format; [`Machine`] is what the
/// init acts on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineJson {
    /// Module file names under `/lib/modules`, in load order.
    pub modules: Vec<String>,
    /// The app's argv; `argv[0]` is the program.
    pub argv: Vec<String>,
    /// The app's whole environment, `NAME=value` each.
    pub env: Vec<String>,
    /// The app's working directory.
    pub cwd: String,
    /// The app's user id.
    pub uid: u32,
    /// The app's group id.
    pub gid: u32,
    /// Absolute paths in the image that get a tmpfs each.
    pub writable: Vec<String>,
    /// Each tmpfs's size cap.
    pub tmpfs_size_bytes: u64,
    /// How long the app has between SIGTERM and SIGKILL at power-off.
    pub stop_grace_ms: u64,
    /// The image's manifest digest (`sha256:…`), as the status endpoint reports it.
    pub image: String,
    /// The app's cgroup limits.
    pub limits: Limits,
    /// The secrets the platform must give, by name (values never reach the disk).
    pub secrets: Vec<Secret>,
    /// The app's health check, as `[service.health]` says it.
    pub health: Option<HealthJson>,
    /// The init's status endpoint's TCP port; `None` for no endpoint.
    pub status_port: Option<u16>,
}

/// The app's cgroup (v2) limits; `None` leaves one unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// `memory.max`, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time in thousandths of a core (`cpu.max`).
    pub cpu_millis: Option<u64>,
    /// `pids.max`: processes and threads.
    pub pids: Option<u32>,
}

/// A secret the app finds at `/run/secrets/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// Its name: the file under `/run/secrets/`, and the variable with `expose_env`.
    pub name: String,
    /// Also in the app's environment.
    pub expose_env: bool,
}

/// `[service.health]` in `machine.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthJson {
    /// The app's port, on the guest's loopback.
    pub port: u16,
    /// HTTP path; `None` for a TCP connect.
    pub path: Option<String>,
    /// Time between checks.
    pub interval_ms: u64,
    /// Bound on one check.
    pub timeout_ms: u64,
    /// Consecutive passes to become healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Grace period after start, during which failures do not count.
    pub start_period_ms: u64,
}

/// The validated health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The app's port, on the guest's loopback.
    pub port: u16,
    /// HTTP path (visible ASCII, starting with `/`); `None` for a TCP connect.
    pub path: Option<String>,
    /// Time between checks (not zero).
    pub interval: Duration,
    /// Bound on one check (not zero).
    pub timeout: Duration,
    /// Consecutive passes to become healthy (at least 1).
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy (at least 1).
    pub unhealthy_threshold: u32,
    /// Grace period after start.
    pub start_period: Duration,
}

/// The directory the modules are in.
pub const MODULES_DIR: &str = "/lib/modules";
/// Where the initramfs carries the machine's configuration.
pub const MACHINE_JSON: &str = "/kiln/machine.json";

/// The validated `machine.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Module file names (no `/`), in load order.
    pub modules: Vec<String>,
    /// The app's argv, never empty.
    pub argv: Vec<String>,
    /// The app's environment as (name, value).
    pub env: Vec<(String, String)>,
    /// The app's working directory (absolute).
    pub cwd: String,
    /// The app's user id.
    pub uid: u32,
    /// The app's group id.
    pub gid: u32,
    /// Clean absolute paths, each a tmpfs.
    pub writable: Vec<String>,
    /// Each tmpfs's size cap in bytes.
    pub tmpfs_size_bytes: u64,
    /// SIGTERM to SIGKILL at power-off.
    pub stop_grace: Duration,
    /// The image's manifest digest.
    pub image: String,
    /// The app's cgroup limits (each one given is above zero).
    pub limits: Limits,
    /// Secrets, each name a valid environment variable name, each once.
    pub secrets: Vec<Secret>,
    /// The health check.
    pub health: Option<Health>,
    /// The status endpoint's port (not 0, not the app's).
    pub status_port: Option<u16>,
}

impl Machine {
    /// Parses and validates `machine.json`'s bytes.
    pub fn parse(bytes: &[u8]) -> Result<Machine, Error> {
        let json: MachineJson =
            serde_json::from_slice(bytes).map_err(|e| Error::Json(e.to_string()))?;
        Machine::try_from(json)
    }
}

impl TryFrom<MachineJson> for Machine {
    type Error = Error;

    fn try_from(j: MachineJson) -> Result<Machine, Error> {
        let field = |field, why: String| Error::BadField { field, why };
        for m in &j.modules {
            if m.is_empty() || m.contains('/') || m == "." || m == ".." {
                return Err(field("modules", format!("{m:?} is not a file name")));
            }
        }
        if j.argv.first().is_none_or(String::is_empty) {
            return Err(field("argv", "names no program".to_owned()));
        }
        let env = j
            .env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
                _ => Err(field("env", format!("{e:?} is not NAME=value"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !j.cwd.starts_with('/') {
            return Err(field("cwd", format!("{:?} is not absolute", j.cwd)));
        }
        for w in &j.writable {
            if !is_clean_absolute(w) {
                return Err(field(
                    "writable",
                    format!("{w:?} is not a clean absolute path below /"),
                ));
            }
            if ["/dev", "/proc"]
                .iter()
                .any(|m| w == m || w.starts_with(&format!("{m}/")))
            {
                return Err(field("writable", format!("{w:?} is the init's own mount")));
            }
        }
        if j.tmpfs_size_bytes == 0 {
            return Err(field("tmpfs_size_bytes", "is zero".to_owned()));
        }
        let l = j.limits;
        if l.memory_bytes == Some(0) || l.cpu_millis == Some(0) || l.pids == Some(0) {
            return Err(field("limits", "a limit of zero".to_owned()));
        }
        for (i, s) in j.secrets.iter().enumerate() {
            if !is_env_name(&s.name) {
                return Err(field(
                    "secrets",
                    format!("{:?} is not an environment variable name", s.name),
                ));
            }
            if j.secrets[..i].iter().any(|t| t.name == s.name) {
                return Err(field("secrets", format!("{:?} is given twice", s.name)));
            }
        }
        let health = j.health.map(Health::try_from).transpose()?;
        if let Some(port) = j.status_port
            && (port == 0 || health.as_ref().is_some_and(|h| h.port == port))
        {
            return Err(field(
                "status_port",
                format!("{port} is not a port of its own"),
            ));
        }
        Ok(Machine {
            modules: j.modules,
            argv: j.argv,
            env,
            cwd: j.cwd,
            uid: j.uid,
            gid: j.gid,
            writable: j.writable,
            tmpfs_size_bytes: j.tmpfs_size_bytes,
            stop_grace: Duration::from_millis(j.stop_grace_ms),
            image: j.image,
            limits: j.limits,
            secrets: j.secrets,
            health,
            status_port: j.status_port,
        })
    }
}

impl TryFrom<HealthJson> for Health {
    type Error = Error;

    fn try_from(h: HealthJson) -> Result<Health, Error> {
        let field = |why: String| Error::BadField {
            field: "health",
            why,
        };
        if let Some(path) = &h.path {
            // It goes into a request line: nothing but a visible path.
            if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(field(format!("path {path:?} is not an HTTP path")));
            }
        }
        if h.port == 0 || h.interval_ms == 0 || h.timeout_ms == 0 {
            return Err(field(
                "port, interval_ms and timeout_ms must be above zero".to_owned(),
            ));
        }
        if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
            return Err(field("thresholds must be at least 1".to_owned()));
        }
        Ok(Health {
            port: h.port,
            path: h.path,
            interval: Duration::from_millis(h.interval_ms),
            timeout: Duration::from_millis(h.timeout_ms),
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
            start_period: Duration::from_millis(h.start_period_ms),
        })
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, as `[service.secrets]` names are.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `/a/b`: absolute, not `/` itself, no empty, `.` or `..` component, no trailing `/`.
fn is_clean_absolute(path: &str) -> bool {
    path.strip_prefix('/').is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const ROOT: &str = "12bf42131e193da6219e2528b25a5f4c2bf18a987a1dfc45681ec134fe46b242";

    fn cmdline(extra: &str) -> Result<Cmdline, Error> {
        Cmdline::parse(&format!(
            "console=ttyS0 panic=-1 kiln.verity={ROOT} kiln.salt=0102 kiln.data_blocks=485 {extra}"
        ))
    }

    #[test]
    fn the_contracts_command_line() {
        let c = cmdline("kiln.ip=10.0.2.15/24,10.0.2.2\n").unwrap();
        let Some(Network::Static(ip)) = c.ip else {
            panic!("{:?}", c.ip);
        };
        assert_eq!(hex::encode(c.root_hash), ROOT);
        assert_eq!(c.salt, [1, 2]);
        assert_eq!(c.data_blocks, 485);
        assert_eq!(ip.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(ip.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(ip.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(
            c.verity_table().unwrap(),
            format!("0 3880 verity 1 /dev/vda2 /dev/vda3 4096 4096 485 0 sha256 {ROOT} 0102")
        );
    }

    #[test]
    fn no_ip_no_gateway_no_salt() {
        assert_eq!(cmdline("").unwrap().ip, None);
        assert_eq!(cmdline("kiln.ip=dhcp").unwrap().ip, Some(Network::Dhcp));
        let fixed = |line| match cmdline(line).unwrap().ip {
            Some(Network::Static(ip)) => ip,
            other => panic!("{other:?}"),
        };
        let ip = fixed("kiln.ip=192.168.1.9/32");
        assert_eq!((ip.netmask(), ip.gateway), (Ipv4Addr::BROADCAST, None));
        let ip = fixed("kiln.ip=192.168.1.9/0");
        assert_eq!(ip.netmask(), Ipv4Addr::UNSPECIFIED);
        let c = Cmdline::parse(&format!(
            "kiln.verity={ROOT} kiln.salt=- kiln.data_blocks=1"
        ))
        .unwrap();
        assert!(c.salt.is_empty());
        assert!(c.verity_table().unwrap().ends_with(" -"));
    }

    #[test]
    fn refusals() {
        let cases: [(&str, &str); 8] = [
            (
                "kiln.verity=00",
                "kernel command line key \"kiln.verity\" is given twice",
            ),
            (
                "kiln.rooot=1",
                "unknown kernel command line key \"kiln.rooot\"",
            ),
            (
                "kiln.ip=10.0.2.15",
                "kernel command line kiln.ip=\"10.0.2.15\": not dhcp or <addr>/<prefix>[,<gateway>] (IPv4)",
            ),
            (
                "kiln.ip=10.0.2.15/33",
                "kernel command line kiln.ip=\"10.0.2.15/33\": not dhcp or <addr>/<prefix>[,<gateway>] (IPv4)",
            ),
            (
                "kiln.ip=10.0.2.15/24,gw",
                "kernel command line kiln.ip=\"10.0.2.15/24,gw\": not dhcp or <addr>/<prefix>[,<gateway>] (IPv4)",
            ),
            (
                "kiln.ip",
                "kernel command line kiln.ip=\"\": not dhcp or <addr>/<prefix>[,<gateway>] (IPv4)",
            ),
            (
                "kiln.data_blocks=0",
                "kernel command line key \"kiln.data_blocks\" is given twice",
            ),
            (
                "kiln.salt",
                "kernel command line key \"kiln.salt\" is given twice",
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(cmdline(extra).unwrap_err().to_string(), want, "{extra}");
        }
        let only = |s: &str| Cmdline::parse(s).unwrap_err().to_string();
        assert_eq!(only("quiet"), "kernel command line lacks kiln.verity");
        assert_eq!(
            only("kiln.verity=abc kiln.salt= kiln.data_blocks=1"),
            "kernel command line kiln.verity=\"abc\": not 64 hex digits (a SHA-256)"
        );
        assert_eq!(
            only(&format!("kiln.verity={ROOT} kiln.data_blocks=1")),
            "kernel command line lacks kiln.salt"
        );
        assert_eq!(
            only(&format!(
                "kiln.verity={ROOT} kiln.salt=zz kiln.data_blocks=1"
            )),
            "kernel command line kiln.salt=\"zz\": not hex of at most 256 bytes"
        );
        assert_eq!(
            only(&format!("kiln.verity={ROOT} kiln.salt= kiln.data_blocks=0")),
            "kernel command line kiln.data_blocks=\"0\": not a positive block count"
        );
    }

    const JSON: &str = r#"{"modules": ["virtio_ring.ko", "virtio.ko"],
        "argv": ["/hello"], "env": ["HELLO_VERSION=v1", "PORT=8080", "EMPTY="], "cwd": "/",
        "uid": 0, "gid": 0, "writable": ["/tmp", "/var/cache"], "tmpfs_size_bytes": 67108864,
        "stop_grace_ms": 5000, "image": "sha256:ab",
        "limits": {"memory_bytes": 67108864, "cpu_millis": 500, "pids": 64},
        "secrets": [{"name": "DB_PASSWORD", "expose_env": false}],
        "health": {"port": 8080, "path": "/healthz", "interval_ms": 500, "timeout_ms": 400,
            "healthy_threshold": 1, "unhealthy_threshold": 2, "start_period_ms": 10000},
        "status_port": 9901}"#;

    #[test]
    fn the_contracts_machine_json() {
        let m = Machine::parse(JSON.as_bytes()).unwrap();
        assert_eq!(m.modules, ["virtio_ring.ko", "virtio.ko"]);
        assert_eq!(m.argv, ["/hello"]);
        assert_eq!(
            m.env,
            [
                ("HELLO_VERSION".to_owned(), "v1".to_owned()),
                ("PORT".to_owned(), "8080".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
        assert_eq!(m.writable, ["/tmp", "/var/cache"]);
        assert_eq!(m.stop_grace, Duration::from_secs(5));
        assert_eq!(m.tmpfs_size_bytes, 64 << 20);
        assert_eq!(m.limits.memory_bytes, Some(64 << 20));
        assert_eq!(m.limits.cpu_millis, Some(500));
        assert_eq!(m.secrets[0].name, "DB_PASSWORD");
        let h = m.health.unwrap();
        assert_eq!((h.port, h.path.as_deref()), (8080, Some("/healthz")));
        assert_eq!(h.start_period, Duration::from_secs(10));
        assert_eq!(m.status_port, Some(9901));
    }

    #[test]
    fn machine_json_refusals() {
        let with = |from: &str, to: &str| {
            Machine::parse(JSON.replace(from, to).as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert!(
            with("\"cwd\"", "\"user\": \"app\", \"cwd\"")
                .starts_with("/kiln/machine.json: unknown field `user`"),
        );
        let cases = [
            (
                "virtio.ko",
                "../virtio.ko",
                "modules: \"../virtio.ko\" is not a file name",
            ),
            ("[\"/hello\"]", "[]", "argv: names no program"),
            ("EMPTY=", "EMPTY", "env: \"EMPTY\" is not NAME=value"),
            (
                "\"cwd\": \"/\"",
                "\"cwd\": \"srv\"",
                "cwd: \"srv\" is not absolute",
            ),
            (
                "/var/cache",
                "/var/../etc",
                "writable: \"/var/../etc\" is not a clean absolute path below /",
            ),
            (
                "/var/cache",
                "/",
                "writable: \"/\" is not a clean absolute path below /",
            ),
            (
                "/var/cache",
                "/tmp/",
                "writable: \"/tmp/\" is not a clean absolute path below /",
            ),
            (
                "/var/cache",
                "/dev/shm",
                "writable: \"/dev/shm\" is the init's own mount",
            ),
            (
                "\"tmpfs_size_bytes\": 67108864",
                "\"tmpfs_size_bytes\": 0",
                "tmpfs_size_bytes: is zero",
            ),
            ("\"pids\": 64", "\"pids\": 0", "limits: a limit of zero"),
            (
                "DB_PASSWORD",
                "DB-PASSWORD",
                "secrets: \"DB-PASSWORD\" is not an environment variable name",
            ),
            (
                "[{\"name\": \"DB_PASSWORD\", \"expose_env\": false}]",
                "[{\"name\": \"A\", \"expose_env\": false}, {\"name\": \"A\", \"expose_env\": true}]",
                "secrets: \"A\" is given twice",
            ),
            (
                "\"/healthz\"",
                "\"/healthz HTTP/1.0\\r\\nX: y\"",
                "health: path \"/healthz HTTP/1.0\\r\\nX: y\" is not an HTTP path",
            ),
            (
                "\"unhealthy_threshold\": 2",
                "\"unhealthy_threshold\": 0",
                "health: thresholds must be at least 1",
            ),
            ("9901", "8080", "status_port: 8080 is not a port of its own"),
        ];
        for (from, to, want) in cases {
            assert_eq!(
                with(from, to),
                format!("/kiln/machine.json: {want}"),
                "{to}"
            );
        }
    }

    #[test]
    fn machine_json_round_trips() {
        let j: MachineJson = serde_json::from_str(JSON).unwrap();
        let again: MachineJson = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(j, again);
    }
}
