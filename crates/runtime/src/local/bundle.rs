//! The OCI runtime bundle's `config.json` for one instance, built with the `oci-spec` types.
//!
//! What it promises (a sealed instance): the root is read-only, `nosuid` and `nodev` (kiln
//! mounts it so, see `mounts`); only `writable` paths (a size-capped `nosuid,nodev` tmpfs
//! each) can be written; own mount/PID/IPC/UTS namespaces, and the network namespace kiln
//! made (`local::network`) unless the spec asks for the host's; the resolved
//! non-root user unless the spec asked for root; no new privileges; no capability but
//! `NET_BIND_SERVICE` for root and those `[service] capabilities` adds (held by a non-root
//! process as ambient capabilities); the seccomp allowlist; an open-files rlimit; a
//! device cgroup that denies everything runc does not allow by default; a pids limit, and
//! memory/CPU limits when asked; an OOM score that makes the kernel kill an instance before
//! the daemon. A limit the host's cgroups cannot enforce is an error, never dropped. This
//! module does no I/O: it turns inputs into bytes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, LinuxSeccomp, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
    ProcessBuilder, RootBuilder, Spec, UserBuilder, get_default_maskedpaths, get_default_mounts,
    get_default_readonly_paths,
};

use crate::image::ImageConfig;
use crate::local::host::Controllers;
use crate::types::{INIT_DIR, INIT_PATH, Tmpfs};
use crate::user::ProcessUser;

/// The PATH an image without one gets, as Docker does.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The open-files limit an instance gets (soft = hard) when the host allows it; a process
/// cannot raise a hard limit, so it is capped by kiln's own (see [`nofile_limit`]).
const NOFILE: u64 = 65_536;

/// `oom_score_adj` of every instance: out of memory, the kernel kills an instance's process
/// before the daemon (which keeps its own score) and before the host's services.
pub(crate) const OOM_SCORE_ADJ: i32 = 500;

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
    /// tmpfs paths and their sizes.
    pub writable: &'a [Tmpfs],
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
    /// The pids limit.
    pub pids: u32,
    /// Which limits the host's cgroups can enforce.
    pub controllers: Controllers,
    /// The open-files limit.
    pub nofile: u64,
    /// Who the process runs as.
    pub user: &'a ProcessUser,
    /// The capability set, as [`capabilities`] makes it.
    pub capabilities: &'a HashSet<Capability>,
    /// The system-call filter, already made for `capabilities`; `None` means unconfined.
    pub seccomp: Option<&'a LinuxSeccomp>,
    /// The instance's own network namespace (a bind mount kiln made); `None` means the
    /// host's network.
    pub netns: Option<&'a Path>,
    /// The host directory (on a tmpfs) bound read-only at [`SECRETS_DIR`](crate::types::SECRETS_DIR), when it has
    /// secrets.
    pub secrets: Option<&'a Path>,
    /// kiln's init on the host, bound read-only at [`INIT_PATH`] and run as the process
    /// (`init -- argv…`), when the instance has one.
    pub init: Option<&'a Path>,
}

/// The capabilities an instance running as `user` holds: those `[service] capabilities`
/// adds, plus `NET_BIND_SERVICE` for root (which the spec must have asked for). Nothing else,
/// so the seccomp profile's capability rules open only what these need.
pub(crate) fn capabilities(
    user: &ProcessUser,
    added: &[kiln_spec::Capability],
) -> Result<HashSet<Capability>, String> {
    let mut caps: HashSet<Capability> = added
        .iter()
        .map(|c| {
            c.as_str()
                .parse::<Capability>()
                .map_err(|_| format!("the OCI runtime spec has no capability {c}"))
        })
        .collect::<Result<_, _>>()?;
    if user.uid == 0 {
        caps.insert(Capability::NetBindService);
    }
    Ok(caps)
}

/// The process arguments: the command override, or the image's entrypoint followed by its
/// cmd; behind kiln's init when the instance has one.
pub(crate) fn process_args(input: &BundleInput<'_>) -> Result<Vec<String>, String> {
    let mut args: Vec<String> = match input.command {
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
    if input.init.is_some() {
        args = crate::types::with_init(args);
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

/// The mounts: runc's defaults (`/proc`, `/dev`, `/sys`…) plus one tmpfs per writable path,
/// capped at its size, owned by the instance's user and writable by anyone in it; the
/// secrets, and kiln's init, read-only.
pub(crate) fn mounts(
    writable: &[Tmpfs],
    user: &ProcessUser,
    secrets: Option<&Path>,
    init: Option<&Path>,
) -> Result<Vec<Mount>, String> {
    let mut mounts = get_default_mounts();
    for w in writable {
        let mount = MountBuilder::default()
            .destination(PathBuf::from(&w.path))
            .typ("tmpfs")
            .source(PathBuf::from("tmpfs"))
            .options(vec![
                "nosuid".to_owned(),
                "nodev".to_owned(),
                "mode=1777".to_owned(),
                format!("size={}", w.size),
                format!("uid={}", user.uid),
                format!("gid={}", user.gid),
            ])
            .build()
            .map_err(|e| format!("tmpfs {}: {e}", w.path))?;
        mounts.push(mount);
    }
    // After the tmpfs: a writable `/run` holds the mount point.
    if let Some(dir) = secrets {
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(crate::types::SECRETS_DIR))
                .typ("bind")
                .source(dir.to_path_buf())
                .options(
                    ["rbind", "ro", "nosuid", "nodev", "noexec"]
                        .map(str::to_owned)
                        .to_vec(),
                )
                .build()
                .map_err(|e| format!("{}: {e}", crate::types::SECRETS_DIR))?,
        );
    }
    if let Some(binary) = init {
        // A file is bound onto a file: runc creates that one in a tiny tmpfs of its own (the
        // root is read-only by then), so nothing of it is in the instance's upper dir. The
        // tmpfs is `noexec`; the binary's own bind mount is not.
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(INIT_DIR))
                .typ("tmpfs")
                .source(PathBuf::from("tmpfs"))
                .options(
                    ["nosuid", "nodev", "noexec", "mode=0755", "size=4k"]
                        .map(str::to_owned)
                        .to_vec(),
                )
                .build()
                .map_err(|e| format!("{INIT_DIR}: {e}"))?,
        );
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(INIT_PATH))
                .typ("bind")
                .source(binary.to_path_buf())
                .options(
                    ["bind", "ro", "nosuid", "nodev"]
                        .map(str::to_owned)
                        .to_vec(),
                )
                .build()
                .map_err(|e| format!("{INIT_PATH}: {e}"))?,
        );
    }
    Ok(mounts)
}

/// Refuses limits the host cannot enforce: an instance never silently runs without one.
fn enforceable(input: &BundleInput<'_>) -> Result<(), String> {
    let c = input.controllers;
    let refuse = |key: &str, controller: &str| {
        Err(format!(
            "the host cannot enforce [service] {key}: its cgroups have no {controller} \
             controller (`kiln doctor` says how to enable it)"
        ))
    };
    if input.memory.is_some() && !c.memory {
        return refuse("memory", "memory");
    }
    if input.cpus.is_some() && !c.cpu {
        return refuse("cpus", "cpu");
    }
    if !c.pids {
        return refuse("pids (every instance has one)", "pids");
    }
    Ok(())
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
    enforceable(input)?;
    let caps = input.capabilities;
    // A non-root process loses its permitted and effective capabilities at exec unless they
    // are ambient (which needs them inheritable too), so that is where it gets them; the
    // image's files cannot add any (no new privileges, `nosuid`). Root gets them at exec
    // from the bounding set and needs no ambient ones.
    let ambient = if input.user.uid == 0 {
        HashSet::new()
    } else {
        caps.clone()
    };
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps.clone())
        .inheritable(ambient.clone())
        .ambient(ambient)
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
        .user({
            let mut user = UserBuilder::default()
                .uid(input.user.uid)
                .gid(input.user.gid);
            if !input.user.additional_gids.is_empty() {
                user = user.additional_gids(input.user.additional_gids.clone());
            }
            user.build().map_err(err("user"))?
        })
        .no_new_privileges(true)
        .oom_score_adj(OOM_SCORE_ADJ)
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

    let mut namespaces = [
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()
    .map_err(err("namespaces"))?;
    if let Some(netns) = input.netns {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(netns.to_path_buf())
                .build()
                .map_err(err("network namespace"))?,
        );
    }

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(err("devices"))?,
    ]);
    resources = resources.pids(
        LinuxPidsBuilder::default()
            .limit(i64::from(input.pids))
            .build()
            .map_err(err("pids"))?,
    );
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
    let mut linux = LinuxBuilder::default();
    if let Some(seccomp) = input.seccomp {
        linux = linux.seccomp(seccomp.clone());
    }
    if input.netns.is_some() {
        // Its own namespace, its own ports: any user may bind any of them there, as Docker
        // allows, so a server's fixed port 80 needs no capability.
        linux = linux.sysctl(HashMap::from([(
            "net.ipv4.ip_unprivileged_port_start".to_owned(),
            "0".to_owned(),
        )]));
    }
    let linux = linux
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
    // Not `readonly` here: kiln mounts the root read-only, nosuid and nodev itself, and
    // runc's read-only remount would drop nosuid and nodev.
    spec.set_root(Some(
        RootBuilder::default()
            .path(PathBuf::from("rootfs"))
            .readonly(false)
            .build()
            .map_err(err("root"))?,
    ));
    spec.set_mounts(Some(mounts(
        input.writable,
        input.user,
        input.secrets,
        input.init,
    )?));
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

/// The mount points the runtime needs in the root itself (not inside another mount), which
/// kiln creates before it makes the root read-only.
pub(crate) fn rootfs_mount_points(writable: &[String]) -> Vec<String> {
    let destinations: Vec<String> = get_default_mounts()
        .iter()
        .map(|m| m.destination().to_string_lossy().into_owned())
        .chain(writable.iter().cloned())
        .collect();
    let mut out: Vec<String> = destinations
        .iter()
        .filter(|d| {
            !destinations
                .iter()
                .any(|other| other != *d && d.starts_with(&format!("{other}/")))
        })
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
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

    use oci_spec::runtime::LinuxSeccompAction;

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

    const ALL: Controllers = Controllers {
        memory: true,
        cpu: true,
        pids: true,
    };

    static NONE: std::sync::LazyLock<HashSet<Capability>> = std::sync::LazyLock::new(HashSet::new);

    fn user(uid: u32) -> ProcessUser {
        ProcessUser {
            uid,
            gid: uid + 1,
            additional_gids: Vec::new(),
        }
    }

    /// An input with everything at a plain value; tests change what they look at.
    fn input<'a>(
        image: &'a ImageConfig,
        env: &'a BTreeMap<String, String>,
        user: &'a ProcessUser,
    ) -> BundleInput<'a> {
        BundleInput {
            id: "x",
            image,
            command: None,
            env,
            port: 1,
            writable: &[],
            memory: None,
            cpus: None,
            pids: 512,
            controllers: ALL,
            nofile: NOFILE,
            user,
            capabilities: &NONE,
            seccomp: None,
            netns: None,
            secrets: None,
            init: None,
        }
    }

    fn config(input: &BundleInput<'_>) -> serde_json::Value {
        serde_json::from_slice(&config_json(input).unwrap()).unwrap()
    }

    #[test]
    fn an_own_network_namespace_is_joined_by_path_and_opens_low_ports() {
        let image = image();
        let env = BTreeMap::new();
        let u = user(65534);
        let netns = Path::new("/state/instances/x/netns");
        let mut input = input(&image, &env, &u);
        input.netns = Some(netns);
        let c = config(&input);
        let ns = c["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(
            ns.last().unwrap(),
            &serde_json::json!({"type": "network", "path": "/state/instances/x/netns"})
        );
        assert_eq!(
            c["linux"]["sysctl"],
            serde_json::json!({"net.ipv4.ip_unprivileged_port_start": "0"})
        );
    }

    #[test]
    fn the_config_pins_every_promise() {
        let image = image();
        let env = BTreeMap::from([("A".to_owned(), "service".to_owned())]);
        let writable = [
            Tmpfs::new("/tmp", 64 << 20),
            Tmpfs::new("/var/cache/app", 1 << 30),
        ];
        let mut seccomp = LinuxSeccomp::default();
        seccomp.set_default_action(LinuxSeccompAction::ScmpActErrno);
        let u = ProcessUser {
            uid: 1000,
            gid: 1001,
            additional_gids: vec![50],
        };
        let input = BundleInput {
            id: "hello-abc",
            image: &image,
            command: None,
            env: &env,
            port: 41234,
            writable: &writable,
            memory: Some(64 << 20),
            cpus: Some(0.5),
            pids: 100,
            controllers: ALL,
            nofile: NOFILE,
            user: &u,
            capabilities: &HashSet::new(),
            seccomp: Some(&seccomp),
            netns: None,
            secrets: None,
            init: None,
        };
        let c = config(&input);
        // Read-only, nosuid and nodev by kiln's own mount (see `mounts`), not runc's remount.
        assert_eq!(
            c["root"],
            serde_json::json!({"path": "rootfs", "readonly": false})
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
        assert_eq!(
            p["user"],
            serde_json::json!({"uid": 1000, "gid": 1001, "additionalGids": [50]})
        );
        assert_eq!(p["cwd"], "/srv");
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["oomScoreAdj"], 500);
        for set in [
            "bounding",
            "effective",
            "permitted",
            "inheritable",
            "ambient",
        ] {
            assert_eq!(p["capabilities"][set], serde_json::json!([]), "{set}");
        }
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
        let r = &c["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 64 << 20);
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["pids"]["limit"], 100);
        assert_eq!(
            r["devices"],
            serde_json::json!([{"allow": false, "access": "rwm"}])
        );
        assert_eq!(c["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert!(
            c["linux"]["sysctl"].is_null(),
            "the host's sysctls are not ours"
        );
        let tmpfs: Vec<(&str, Vec<&str>)> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                m["source"] == "tmpfs" && m["type"] == "tmpfs" && m["destination"] != "/dev"
            })
            .map(|m| {
                let options = m["options"].as_array().unwrap();
                (
                    m["destination"].as_str().unwrap(),
                    options.iter().map(|o| o.as_str().unwrap()).collect(),
                )
            })
            .collect();
        let opts =
            |size: &'static str| vec!["nosuid", "nodev", "mode=1777", size, "uid=1000", "gid=1001"];
        assert_eq!(
            tmpfs,
            [
                ("/tmp", opts("size=67108864")),
                ("/var/cache/app", opts("size=1073741824"))
            ]
        );
        assert_eq!(c["hostname"], "hello-abc");
        // Same input, same bytes.
        assert_eq!(config_json(&input).unwrap(), config_json(&input).unwrap());
    }

    #[test]
    fn root_keeps_one_capability_and_unconfined_has_no_filter() {
        let image = image();
        let env = BTreeMap::new();
        let root = ProcessUser {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
        };
        let caps = capabilities(&root, &[]).unwrap();
        let c = config(&BundleInput {
            capabilities: &caps,
            ..input(&image, &env, &root)
        });
        let p = &c["process"];
        assert_eq!(p["user"], serde_json::json!({"uid": 0, "gid": 0}));
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(
                p["capabilities"][set],
                serde_json::json!(["CAP_NET_BIND_SERVICE"])
            );
        }
        assert_eq!(p["capabilities"]["ambient"], serde_json::json!([]));
        assert!(c["linux"].get("seccomp").is_none());
    }

    /// The five capability sets of `c`'s process, each sorted.
    fn cap_sets(c: &serde_json::Value) -> Vec<(&'static str, Vec<String>)> {
        [
            "bounding",
            "effective",
            "permitted",
            "inheritable",
            "ambient",
        ]
        .into_iter()
        .map(|set| {
            let mut names: Vec<String> = c["process"]["capabilities"][set]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect();
            names.sort();
            (set, names)
        })
        .collect()
    }

    #[test]
    fn added_capabilities_are_held_by_root_and_by_a_non_root_user_as_ambient() {
        let image = image();
        let env = BTreeMap::new();
        let added =
            ["CHOWN", "SETUID", "NET_ADMIN"].map(|n| kiln_spec::Capability::parse(n).unwrap());
        let names = |list: &[&str]| -> Vec<String> { list.iter().map(|n| n.to_string()).collect() };
        let all = names(&["CAP_CHOWN", "CAP_NET_ADMIN", "CAP_SETUID"]);
        // A non-root process holds them only as ambient capabilities (inheritable too).
        let u = user(1000);
        let caps = capabilities(&u, &added).unwrap();
        let c = config(&BundleInput {
            capabilities: &caps,
            ..input(&image, &env, &u)
        });
        for (set, got) in cap_sets(&c) {
            assert_eq!(got, all, "{set}");
        }
        // Root gets them from the bounding set at exec, and keeps NET_BIND_SERVICE.
        let root = user(0);
        let caps = capabilities(&root, &added).unwrap();
        let c = config(&BundleInput {
            capabilities: &caps,
            ..input(&image, &env, &root)
        });
        let with_bind = names(&[
            "CAP_CHOWN",
            "CAP_NET_ADMIN",
            "CAP_NET_BIND_SERVICE",
            "CAP_SETUID",
        ]);
        assert_eq!(
            cap_sets(&c),
            [
                ("bounding", with_bind.clone()),
                ("effective", with_bind.clone()),
                ("permitted", with_bind),
                ("inheritable", vec![]),
                ("ambient", vec![]),
            ]
        );
        // Nothing added, nothing held.
        assert_eq!(capabilities(&u, &[]).unwrap(), HashSet::new());
    }

    #[test]
    fn every_capability_the_spec_names_is_one_the_runtime_spec_knows() {
        let all: Vec<kiln_spec::Capability> = kiln_spec::Capability::all().collect();
        let caps = capabilities(&user(1), &all).unwrap();
        assert_eq!(caps.len(), all.len());
    }

    #[test]
    fn limits_the_host_cannot_enforce_are_refused() {
        let image = image();
        let env = BTreeMap::new();
        let u = user(1000);
        for (controllers, memory, cpus, want) in [
            (
                Controllers {
                    memory: false,
                    ..ALL
                },
                Some(1 << 20),
                None,
                "cannot enforce [service] memory",
            ),
            (
                Controllers { cpu: false, ..ALL },
                None,
                Some(1.0),
                "cannot enforce [service] cpus",
            ),
            (
                Controllers { pids: false, ..ALL },
                None,
                None,
                "cannot enforce [service] pids",
            ),
        ] {
            let mut i = input(&image, &env, &u);
            i.controllers = controllers;
            i.memory = memory;
            i.cpus = cpus;
            let err = config_json(&i).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        // Without a memory controller, an instance that asks for no memory limit still runs.
        let mut i = input(&image, &env, &u);
        i.controllers = Controllers {
            memory: false,
            cpu: false,
            pids: true,
        };
        let c = config(&BundleInput {
            command: Some(&["/bin/true".to_owned()]),
            ..i
        });
        assert!(c["linux"]["resources"].get("memory").is_none());
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 512);
        assert_eq!(c["process"]["args"], serde_json::json!(["/bin/true"]));
    }

    #[test]
    fn no_args_is_an_error() {
        let image = ImageConfig::default();
        let env = BTreeMap::new();
        let u = user(1);
        assert!(
            config_json(&input(&image, &env, &u))
                .unwrap_err()
                .contains("no entrypoint")
        );
    }

    #[test]
    fn under_the_init_the_process_is_the_init_and_the_binary_is_bound_read_only() {
        let image = image();
        let env = BTreeMap::new();
        let u = user(65534);
        let c = config(&BundleInput {
            init: Some(Path::new("/usr/bin/kiln")),
            ..input(&image, &env, &u)
        });
        assert_eq!(
            c["process"]["args"],
            serde_json::json!(["/.kiln/init", "instance-init", "--", "/hello", "--flag"])
        );
        let mounts = c["mounts"].as_array().unwrap();
        let n = mounts.len();
        assert_eq!(mounts[n - 2]["destination"], "/.kiln");
        assert_eq!(mounts[n - 2]["type"], "tmpfs");
        assert_eq!(
            mounts[n - 1],
            serde_json::json!({
                "destination": "/.kiln/init",
                "type": "bind",
                "source": "/usr/bin/kiln",
                "options": ["bind", "ro", "nosuid", "nodev"],
            })
        );
        // Its mount point is made before the root is sealed, and is no drift.
        assert!(rootfs_mount_points(&["/.kiln".to_owned()]).contains(&"/.kiln".to_owned()));
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
        // In the root itself: only what no other mount holds.
        assert_eq!(
            rootfs_mount_points(&[
                "/tmp".to_owned(),
                "/tmp/x".to_owned(),
                "/dev/y".to_owned(),
                "/var/cache/app".to_owned()
            ]),
            ["/dev", "/proc", "/sys", "/tmp", "/var/cache/app"]
        );
    }
}
