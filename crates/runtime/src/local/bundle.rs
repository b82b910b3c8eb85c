//! The OCI runtime bundle's `config.json` for one instance, built with the `oci-spec` types.
//!
//! What it promises: the root is read-only for the process; only `writable` paths (tmpfs
//! each) can be written; own mount/PID/IPC/UTS namespaces on the host network; no new
//! privileges; one capability (`NET_BIND_SERVICE`); an open-files rlimit; a device cgroup that
//! denies everything runc does not allow by default; memory/CPU limits when the host's
//! cgroups can enforce them. This module does no I/O: it turns inputs into bytes.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount,
    MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    UserBuilder, get_default_maskedpaths, get_default_mounts, get_default_readonly_paths,
};

use crate::image::ImageConfig;

/// The PATH an image without one gets, as Docker does.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The open-files limit an instance gets (soft = hard) when the host allows it; a process
/// cannot raise a hard limit, so it is capped by kiln's own (see [`nofile_limit`]).
const NOFILE: u64 = 65_536;

/// The open-files limit for instances: [`NOFILE`], or kiln's own hard limit when lower.
pub(crate) fn nofile_limit() -> u64 {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    hard.map_or(NOFILE, |h| h.min(NOFILE))
}

/// The CFS period the CPU quota is computed against (100 ms, the kernel default).
const CPU_PERIOD: u64 = 100_000;

/// Everything `config.json` is made from.
#[derive(Debug, Clone)]
pub(crate) struct BundleInput<'a> {
    /// The instance id: hostname and cgroup name.
    pub id: &'a str,
    /// The image's process defaults.
    pub image: &'a ImageConfig,
    /// Replaces entrypoint + cmd.
    pub command: Option<&'a [String]>,
    /// The service environment (over the image's).
    pub env: &'a BTreeMap<String, String>,
    /// The port in `PORT`.
    pub port: u16,
    /// tmpfs paths.
    pub writable: &'a [String],
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
    /// Whether the host's cgroups can enforce memory/CPU limits.
    pub cgroup_limits: bool,
    /// The open-files limit.
    pub nofile: u64,
}

/// The process arguments: the command override, or the image's entrypoint followed by its
/// cmd.
pub(crate) fn process_args(input: &BundleInput<'_>) -> Result<Vec<String>, String> {
    let args: Vec<String> = match input.command {
        Some(command) => command.to_vec(),
        None => input
            .image
            .entrypoint
            .iter()
            .chain(&input.image.cmd)
            .cloned()
            .collect(),
    };
    if args.is_empty() {
        return Err("the image has no entrypoint or cmd and no command was given".to_owned());
    }
    Ok(args)
}

/// The environment: the image's, then the service's (replacing same-named entries), then
/// `PORT`; `PATH` is added when nothing set it.
pub(crate) fn process_env(input: &BundleInput<'_>) -> Vec<String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if env.insert(k.to_owned(), v.to_owned()).is_none() {
            order.push(k.to_owned());
        }
    };
    for entry in &input.image.env {
        let (k, v) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        set(k, v);
    }
    for (k, v) in input.env {
        set(k, v);
    }
    set("PORT", &input.port.to_string());
    if !env.contains_key("PATH") {
        env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
        order.insert(0, "PATH".to_owned());
    }
    order
        .iter()
        .filter_map(|k| env.get(k).map(|v| format!("{k}={v}")))
        .collect()
}

/// `uid[:gid]` from the image's `User`; names would need the image's `/etc/passwd`, which a
/// read-only instance cannot be trusted to resolve the same way later, so they are refused.
pub(crate) fn parse_user(user: Option<&str>) -> Result<(u32, u32), String> {
    let Some(user) = user else {
        return Ok((0, 0));
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid: u32 = u
        .parse()
        .map_err(|_| format!("image user {user:?}: only numeric uid[:gid] is supported"))?;
    let gid: u32 = match g {
        Some(g) => g
            .parse()
            .map_err(|_| format!("image user {user:?}: only numeric uid[:gid] is supported"))?,
        None => 0,
    };
    Ok((uid, gid))
}

/// The mounts: runc's defaults (`/proc`, `/dev`, `/sys`…) plus one tmpfs per writable path.
pub(crate) fn mounts(writable: &[String]) -> Result<Vec<Mount>, String> {
    let mut mounts = get_default_mounts();
    for path in writable {
        let mount = MountBuilder::default()
            .destination(PathBuf::from(path))
            .typ("tmpfs")
            .source(PathBuf::from("tmpfs"))
            .options(vec![
                "nosuid".to_owned(),
                "nodev".to_owned(),
                "mode=1777".to_owned(),
            ])
            .build()
            .map_err(|e| format!("tmpfs {path}: {e}"))?;
        mounts.push(mount);
    }
    Ok(mounts)
}

/// `config.json` for `input`: canonical JSON (sorted keys), so the same input gives the same
/// bytes and the recorded digest is stable.
pub(crate) fn config_json(input: &BundleInput<'_>) -> Result<Vec<u8>, String> {
    let spec = spec(input)?;
    let value = serde_json::to_value(&spec).map_err(|e| e.to_string())?;
    serde_json::to_vec_pretty(&sorted(value)).map_err(|e| e.to_string())
}

fn spec(input: &BundleInput<'_>) -> Result<Spec, String> {
    fn err(what: &'static str) -> impl Fn(oci_spec::OciSpecError) -> String {
        move |e| format!("{what}: {e}")
    }
    let (uid, gid) = parse_user(input.image.user.as_deref())?;
    let caps: HashSet<Capability> = [Capability::NetBindService].into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(err("capabilities"))?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(process_args(input)?)
        .env(process_env(input))
        .cwd(PathBuf::from(
            input
                .image
                .workdir
                .clone()
                .unwrap_or_else(|| "/".to_owned()),
        ))
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(err("user"))?,
        )
        .no_new_privileges(true)
        .capabilities(capabilities)
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .soft(input.nofile)
                .hard(input.nofile)
                .build()
                .map_err(err("rlimit"))?,
        ])
        .build()
        .map_err(err("process"))?;

    let namespaces = [
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()
    .map_err(err("namespaces"))?;

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(err("devices"))?,
    ]);
    if input.cgroup_limits {
        if let Some(bytes) = input.memory {
            let limit = i64::try_from(bytes).map_err(|_| format!("memory {bytes} too large"))?;
            resources = resources.memory(
                LinuxMemoryBuilder::default()
                    .limit(limit)
                    .build()
                    .map_err(err("memory"))?,
            );
        }
        if let Some(cpus) = input.cpus {
            // Rounded to whole microseconds of quota; at least 1 ms so a tiny value still runs.
            let quota = ((cpus * CPU_PERIOD as f64).round() as i64).max(1000);
            resources = resources.cpu(
                LinuxCpuBuilder::default()
                    .quota(quota)
                    .period(CPU_PERIOD)
                    .build()
                    .map_err(err("cpu"))?,
            );
        }
    }
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build().map_err(err("resources"))?)
        .cgroups_path(PathBuf::from(format!("/kiln/{}", input.id)))
        .masked_paths(get_default_maskedpaths())
        .readonly_paths(get_default_readonly_paths())
        .build()
        .map_err(err("linux"))?;

    let mut spec = Spec::default();
    spec.set_hostname(Some(input.id.to_owned()));
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path(PathBuf::from("rootfs"))
            .readonly(true)
            .build()
            .map_err(err("root"))?,
    ));
    spec.set_mounts(Some(mounts(input.writable)?));
    spec.set_linux(Some(linux));
    spec.set_annotations(None);
    Ok(spec)
}

/// Rebuilds every object with sorted keys (independent of serde_json's map feature).
fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let entries: BTreeMap<String, serde_json::Value> =
                map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            serde_json::Value::Object(entries.into_iter().collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

/// Mount destinations and all their ancestors: the directories the OCI runtime may create
/// in an instance's upper dir before the root becomes read-only (so not drift).
pub(crate) fn mount_points(writable: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |dest: &str| {
        let mut path = String::new();
        for part in dest.split('/').filter(|p| !p.is_empty()) {
            path.push('/');
            path.push_str(part);
            if !out.contains(&path) {
                out.push(path.clone());
            }
        }
    };
    for m in get_default_mounts() {
        add(&m.destination().to_string_lossy());
    }
    for w in writable {
        add(w);
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/hello".to_owned()],
            cmd: vec!["--flag".to_owned()],
            env: vec!["HELLO_VERSION=v1".to_owned(), "A=image".to_owned()],
            user: Some("1000:1001".to_owned()),
            workdir: Some("/srv".to_owned()),
        }
    }

    fn config(input: &BundleInput<'_>) -> serde_json::Value {
        serde_json::from_slice(&config_json(input).unwrap()).unwrap()
    }

    #[test]
    fn the_config_pins_every_promise() {
        let image = image();
        let env = BTreeMap::from([("A".to_owned(), "service".to_owned())]);
        let writable = ["/tmp".to_owned(), "/var/cache/app".to_owned()];
        let input = BundleInput {
            id: "hello-abc",
            image: &image,
            command: None,
            env: &env,
            port: 41234,
            writable: &writable,
            memory: Some(64 << 20),
            cpus: Some(0.5),
            cgroup_limits: true,
            nofile: NOFILE,
        };
        let c = config(&input);
        assert_eq!(
            c["root"],
            serde_json::json!({"path": "rootfs", "readonly": true})
        );
        let p = &c["process"];
        assert_eq!(p["args"], serde_json::json!(["/hello", "--flag"]));
        assert_eq!(
            p["env"],
            serde_json::json!([
                format!("PATH={DEFAULT_PATH}"),
                "HELLO_VERSION=v1",
                "A=service",
                "PORT=41234"
            ])
        );
        assert_eq!(p["user"], serde_json::json!({"uid": 1000, "gid": 1001}));
        assert_eq!(p["cwd"], "/srv");
        assert_eq!(p["noNewPrivileges"], true);
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(
                p["capabilities"][set],
                serde_json::json!(["CAP_NET_BIND_SERVICE"])
            );
        }
        assert_eq!(p["capabilities"]["ambient"], serde_json::json!([]));
        assert_eq!(
            p["rlimits"],
            serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 65536, "hard": 65536}])
        );
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            ns,
            ["mount", "pid", "ipc", "uts"],
            "host network: no network namespace"
        );
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(
            c["linux"]["resources"]["devices"],
            serde_json::json!([{"allow": false, "access": "rwm"}])
        );
        let tmpfs: Vec<&str> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["source"] == "tmpfs" && m["type"] == "tmpfs")
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(tmpfs, ["/dev", "/tmp", "/var/cache/app"]);
        assert_eq!(c["hostname"], "hello-abc");
        // Same input, same bytes.
        assert_eq!(config_json(&input).unwrap(), config_json(&input).unwrap());
    }

    #[test]
    fn limits_are_left_out_when_cgroups_cannot_enforce_them() {
        let image = image();
        let env = BTreeMap::new();
        let input = BundleInput {
            id: "x",
            image: &image,
            command: Some(&["/bin/true".to_owned()]),
            env: &env,
            port: 1,
            writable: &[],
            memory: Some(1 << 20),
            cpus: Some(1.0),
            cgroup_limits: false,
            nofile: NOFILE,
        };
        let c = config(&input);
        assert!(c["linux"]["resources"].get("memory").is_none());
        assert!(c["linux"]["resources"].get("cpu").is_none());
        assert_eq!(c["process"]["args"], serde_json::json!(["/bin/true"]));
    }

    #[test]
    fn users_must_be_numeric() {
        assert_eq!(parse_user(None), Ok((0, 0)));
        assert_eq!(parse_user(Some("65534")), Ok((65534, 0)));
        assert_eq!(parse_user(Some("1:2")), Ok((1, 2)));
        assert!(parse_user(Some("nobody")).unwrap_err().contains("numeric"));
    }

    #[test]
    fn no_args_is_an_error() {
        let image = ImageConfig::default();
        let env = BTreeMap::new();
        let input = BundleInput {
            id: "x",
            image: &image,
            command: None,
            env: &env,
            port: 1,
            writable: &[],
            memory: None,
            cpus: None,
            cgroup_limits: false,
            nofile: NOFILE,
        };
        assert!(config_json(&input).unwrap_err().contains("no entrypoint"));
    }

    #[test]
    fn mount_points_include_ancestors() {
        let points = mount_points(&["/var/cache/app".to_owned()]);
        for p in [
            "/dev",
            "/dev/pts",
            "/proc",
            "/sys",
            "/var",
            "/var/cache",
            "/var/cache/app",
        ] {
            assert!(
                points.contains(&p.to_owned()),
                "{p} missing from {points:?}"
            );
        }
    }
}
