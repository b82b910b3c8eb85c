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
    /// `kiln.ip`: `eth0`'s address and default route; `None` leaves `eth0` down.
    pub ip: Option<Ip>,
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
        let ip = ip.map(parse_ip).transpose()?;
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
    const WHY: &str = "not <addr>/<prefix>[,<gateway>] (IPv4)";
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
        })
    }
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
        assert_eq!(hex::encode(c.root_hash), ROOT);
        assert_eq!(c.salt, [1, 2]);
        assert_eq!(c.data_blocks, 485);
        let ip = c.ip.unwrap();
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
        let ip = cmdline("kiln.ip=192.168.1.9/32").unwrap().ip.unwrap();
        assert_eq!((ip.netmask(), ip.gateway), (Ipv4Addr::BROADCAST, None));
        let ip = cmdline("kiln.ip=192.168.1.9/0").unwrap().ip.unwrap();
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
                "kernel command line kiln.ip=\"10.0.2.15\": not <addr>/<prefix>[,<gateway>] (IPv4)",
            ),
            (
                "kiln.ip=10.0.2.15/33",
                "kernel command line kiln.ip=\"10.0.2.15/33\": not <addr>/<prefix>[,<gateway>] (IPv4)",
            ),
            (
                "kiln.ip=10.0.2.15/24,gw",
                "kernel command line kiln.ip=\"10.0.2.15/24,gw\": not <addr>/<prefix>[,<gateway>] (IPv4)",
            ),
            (
                "kiln.ip",
                "kernel command line kiln.ip=\"\": not <addr>/<prefix>[,<gateway>] (IPv4)",
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
        "stop_grace_ms": 5000}"#;

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
            ("67108864", "0", "tmpfs_size_bytes: is zero"),
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
