//! The pure half of the docker provider: the container kiln asks the engine for, the
//! settings it compares later to find drift, and which filesystem changes are drift.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, HostConfigLogConfig, PortBinding,
    RestartPolicy, RestartPolicyNameEnum,
};
use serde_json::{Value, json};

use kiln_spec::Seccomp;

use crate::types::{Digest, INIT_PATH, InstanceId, InstanceSpec, SECRETS_DIR};

/// Labels every kiln container carries.
pub(crate) const LABEL_APP: &str = "kiln.app";
pub(crate) const LABEL_INSTANCE: &str = "kiln.instance";
pub(crate) const LABEL_IMAGE: &str = "kiln.image";
/// Which kiln state directory owns the container, so two kilns on one engine never take
/// each other's containers for their own.
pub(crate) const LABEL_STATE: &str = "kiln.state";

/// The repository kiln tags the images it loads with (`kiln.local/image:<manifest hex>`):
/// never a name a user's own image has, and what `kiln gc` looks for.
pub(crate) const IMAGE_REPO: &str = "kiln.local/image";

/// The tag of the image kiln loads for `image` (a manifest digest).
pub(crate) fn image_tag(image: &Digest) -> String {
    format!("{IMAGE_REPO}:{}", image.hex())
}

/// What `create` asks of the engine for one instance.
pub(crate) struct Wanted<'a> {
    pub id: &'a InstanceId,
    pub spec: &'a InstanceSpec,
    /// The image ID on the engine (the config digest).
    pub image_id: &'a Digest,
    pub port: u16,
    pub state_label: &'a str,
    /// The `User` the engine resolves in the container (`crate::user::docker_user`).
    pub user: &'a str,
    /// The host directory (a tmpfs) bound read-only at `/run/secrets`, when it has secrets.
    pub secrets: Option<&'a std::path::Path>,
    /// kiln's init on the host, bound read-only at `/.kiln/init` and made the entrypoint,
    /// when the spec has `init`.
    pub init: Option<&'a std::path::Path>,
    /// The image's entrypoint followed by its cmd: what the init runs without a command.
    pub image_argv: &'a [String],
}

/// `OomScoreAdj` of every instance, as on the local provider: out of memory, the kernel
/// kills an instance before the engine or kiln.
pub(crate) const OOM_SCORE_ADJ: i64 = crate::local::OOM_SCORE_ADJ as i64;

/// The container create request: read-only root, a size-capped `nosuid,nodev` tmpfs per
/// writable path, `PORT` (the spec's container port, else the host port), that port published
/// on 127.0.0.1 only, no restart (kiln replaces), the non-root user, no new privileges, every
/// capability dropped but those `[service] capabilities` adds, the engine's default seccomp profile (never switched off unless the
/// spec says `unconfined`), a pids limit, memory/CPU limits, the OOM score, capped json-file
/// logs, kiln's labels.
pub(crate) fn create_body(w: &Wanted<'_>) -> ContainerCreateBody {
    let spec = w.spec;
    let mut env: Vec<String> = spec
        .env
        .iter()
        .filter(|(k, _)| k.as_str() != "PORT")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // With its own network the app listens on `[service] port`; the host port maps to it.
    let inside = spec.container_port.unwrap_or(w.port);
    env.push(format!("PORT={inside}"));
    let mut labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_APP.to_owned(), spec.app.clone());
    labels.insert(LABEL_INSTANCE.to_owned(), w.id.to_string());
    labels.insert(LABEL_IMAGE.to_owned(), spec.image.to_string());
    labels.insert(LABEL_STATE.to_owned(), w.state_label.to_owned());
    let tmpfs: HashMap<String, String> = spec
        .writable
        .iter()
        .map(|w| {
            (
                w.path.clone(),
                format!("rw,nosuid,nodev,mode=1777,size={}", w.size),
            )
        })
        .collect();
    let mut security_opt = vec!["no-new-privileges".to_owned()];
    if spec.seccomp == Seccomp::Unconfined {
        security_opt.push("seccomp=unconfined".to_owned());
    }
    let port_key = format!("{inside}/tcp");
    let mut bindings = HashMap::new();
    bindings.insert(
        port_key.clone(),
        Some(vec![PortBinding {
            host_ip: Some("127.0.0.1".to_owned()),
            host_port: Some(w.port.to_string()),
        }]),
    );
    let mut log = HashMap::new();
    log.insert("max-size".to_owned(), "10m".to_owned());
    log.insert("max-file".to_owned(), "2".to_owned());
    // Setting the entrypoint clears the image's cmd, so under the init the whole argv is
    // kiln's to give.
    let (entrypoint, cmd) = match (w.init, &spec.command) {
        (Some(_), command) => {
            let argv = command.clone().unwrap_or_else(|| w.image_argv.to_vec());
            (Some(crate::types::with_init(argv)), Some(Vec::new()))
        }
        (None, Some(command)) => (Some(command.clone()), Some(Vec::new())),
        (None, None) => (None, None),
    };
    let binds: Vec<String> = w
        .secrets
        .map(|dir| format!("{}:{SECRETS_DIR}:ro", dir.display()))
        .into_iter()
        .chain(
            w.init
                .map(|binary| format!("{}:{INIT_PATH}:ro", binary.display())),
        )
        .collect();
    ContainerCreateBody {
        image: Some(w.image_id.to_string()),
        env: Some(env),
        entrypoint,
        cmd,
        labels: Some(labels),
        exposed_ports: Some(vec![port_key]),
        user: Some(w.user.to_owned()),
        stop_timeout: Some(i64::try_from(spec.stop_grace.as_secs()).unwrap_or(i64::MAX)),
        host_config: Some(HostConfig {
            readonly_rootfs: Some(true),
            tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
            // The engine takes only `ro` here; the tmpfs is mounted nosuid, nodev and
            // noexec, and a bind keeps its mount's flags.
            binds: (!binds.is_empty()).then_some(binds),
            port_bindings: Some(bindings),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            security_opt: Some(security_opt),
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: (!spec.capabilities.is_empty()).then(|| {
                spec.capabilities
                    .iter()
                    .map(|c| format!("CAP_{c}"))
                    .collect()
            }),
            memory: spec.memory.and_then(|m| i64::try_from(m).ok()),
            nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
            pids_limit: Some(i64::from(spec.pids)),
            oom_score_adj: Some(OOM_SCORE_ADJ),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".to_owned()),
                config: Some(log),
            }),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

/// The runtime settings of a container that kiln fixes at create and that nobody may change
/// afterwards, as the engine reports them, by name. Compared key by key to find drift.
pub(crate) fn settings(c: &ContainerInspectResponse) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut put = |name: &str, v: Value| {
        out.insert(name.to_owned(), v);
    };
    if let Some(cfg) = &c.config {
        let mut env = cfg.env.clone().unwrap_or_default();
        env.sort();
        put("Config.Image", json!(cfg.image));
        put("Config.Env", json!(env));
        put("Config.Entrypoint", json!(cfg.entrypoint));
        put("Config.Cmd", json!(cfg.cmd));
        put("Config.User", json!(cfg.user));
        put("Config.WorkingDir", json!(cfg.working_dir));
        let labels: BTreeMap<_, _> = cfg.labels.clone().unwrap_or_default().into_iter().collect();
        put("Config.Labels", json!(labels));
    }
    if let Some(h) = &c.host_config {
        let tmpfs: BTreeMap<_, _> = h.tmpfs.clone().unwrap_or_default().into_iter().collect();
        let ports: BTreeMap<_, _> = h
            .port_bindings
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let v: Vec<(Option<String>, Option<String>)> = v
                    .unwrap_or_default()
                    .into_iter()
                    .map(|b| (b.host_ip, b.host_port))
                    .collect();
                (k, v)
            })
            .collect();
        put("HostConfig.ReadonlyRootfs", json!(h.readonly_rootfs));
        put("HostConfig.Tmpfs", json!(tmpfs));
        put("HostConfig.PortBindings", json!(ports));
        put("HostConfig.Memory", json!(h.memory));
        put("HostConfig.MemorySwap", json!(h.memory_swap));
        put("HostConfig.NanoCpus", json!(h.nano_cpus));
        put("HostConfig.CpuQuota", json!(h.cpu_quota));
        put("HostConfig.CpuShares", json!(h.cpu_shares));
        put("HostConfig.PidsLimit", json!(h.pids_limit));
        put("HostConfig.OomScoreAdj", json!(h.oom_score_adj));
        put("HostConfig.CapAdd", json!(h.cap_add));
        put("HostConfig.CapDrop", json!(h.cap_drop));
        put("HostConfig.Privileged", json!(h.privileged));
        put("HostConfig.SecurityOpt", json!(h.security_opt));
        put(
            "HostConfig.RestartPolicy",
            json!(
                h.restart_policy
                    .as_ref()
                    .and_then(|r| r.name.map(|n| n.to_string()))
            ),
        );
        put("HostConfig.Binds", json!(h.binds));
        put("HostConfig.NetworkMode", json!(h.network_mode));
    }
    out
}

/// The settings that differ between `expected` and `found`: (name, expected, found). Only
/// the settings recorded at create are compared: one a newer kiln started recording is not
/// drift of a container an older one made.
pub(crate) fn changed_settings(
    expected: &BTreeMap<String, Value>,
    found: &BTreeMap<String, Value>,
) -> Vec<(String, String, String)> {
    expected
        .keys()
        .filter_map(|name| {
            let e = expected.get(name).unwrap_or(&Value::Null);
            let f = found.get(name).unwrap_or(&Value::Null);
            (e != f).then(|| (name.clone(), e.to_string(), f.to_string()))
        })
        .collect()
}

/// Paths the engine itself creates in a container's writable layer: mount points for the
/// files it injects and for the kernel filesystems, whatever the image holds.
const ENGINE_PATHS: &[&str] = &[
    "/dev",
    "/proc",
    "/sys",
    "/etc",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/etc/mtab",
    "/.dockerenv",
];

/// The paths kiln itself mounts in an instance: its `writable` tmpfs, kiln's init when it
/// runs under it, and the secrets directory when it has secrets.
pub(crate) fn kiln_paths(writable: &[String], init: bool, secrets: bool) -> Vec<String> {
    let mut out = writable.to_vec();
    out.extend(init.then(|| INIT_PATH.to_owned()));
    out.extend(secrets.then(|| SECRETS_DIR.to_owned()));
    out
}

/// Which of the engine's reported filesystem changes (`GET /containers/{id}/changes`) are
/// drift: anything but the engine's own mount points, the `writable` paths and what lies
/// below them, and the directories leading to them (created as mount points).
pub(crate) fn drifted_paths(changes: &[String], writable: &[String]) -> Vec<String> {
    let mut out: Vec<String> = changes
        .iter()
        .filter(|path| {
            let path = path.trim_end_matches('/');
            let path = if path.is_empty() { "/" } else { path };
            if path == "/" || ENGINE_PATHS.contains(&path) {
                return false;
            }
            !writable.iter().any(|w| {
                let w = w.trim_end_matches('/');
                path == w
                    || path.starts_with(&format!("{w}/"))
                    || w.starts_with(&format!("{path}/"))
            })
        })
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec() -> InstanceSpec {
        let mut env = BTreeMap::new();
        env.insert("A".to_owned(), "1".to_owned());
        // PORT from the spec is kiln's to set.
        env.insert("PORT".to_owned(), "1".to_owned());
        InstanceSpec {
            image: Digest::of(b"manifest"),
            app: "web".to_owned(),
            env,
            writable: vec![
                crate::types::Tmpfs::new("/tmp", 64 << 20),
                crate::types::Tmpfs::new("/var/cache/app", 1 << 30),
            ],
            memory: Some(64 << 20),
            cpus: Some(0.5),
            stop_grace: Duration::from_secs(3),
            init: false,
            health: None,
            port: None,
            container_port: None,
            command: None,
            labels: BTreeMap::from([("kiln.release".to_owned(), "4".to_owned())]),
            target: kiln_spec::TargetSpec::default(),
            user: None,
            pids: 100,
            seccomp: Seccomp::Default,
            network: kiln_spec::Network::Kiln,
            capabilities: Vec::new(),
            secrets: Vec::new(),
        }
    }

    #[test]
    fn the_container_is_sealed_and_labelled() {
        let s = spec();
        let id = InstanceId::new("web-0123").unwrap();
        let image_id = Digest::of(b"config");
        let body = create_body(&Wanted {
            id: &id,
            spec: &s,
            image_id: &image_id,
            port: 41000,
            state_label: "abc",
            user: "65534:65534",
            secrets: None,
            init: None,
            image_argv: &[],
        });
        assert_eq!(body.image.as_deref(), Some(image_id.as_str()));
        // kiln's PORT wins over one in the spec.
        assert_eq!(
            body.env.clone().unwrap(),
            vec!["A=1".to_owned(), "PORT=41000".to_owned()]
        );
        // With a container port, the app listens on it and the host port maps to it.
        let mut inside = s.clone();
        inside.container_port = Some(8080);
        let mapped = create_body(&Wanted {
            id: &id,
            spec: &inside,
            image_id: &image_id,
            port: 41000,
            state_label: "abc",
            user: "65534:65534",
            secrets: None,
            init: None,
            image_argv: &[],
        });
        assert!(mapped.env.unwrap().contains(&"PORT=8080".to_owned()));
        assert_eq!(mapped.exposed_ports, Some(vec!["8080/tcp".to_owned()]));
        let binding = &mapped.host_config.unwrap().port_bindings.unwrap()["8080/tcp"];
        assert_eq!(
            binding.as_ref().unwrap()[0].host_port.as_deref(),
            Some("41000")
        );
        let labels = body.labels.clone().unwrap();
        assert_eq!(labels["kiln.app"], "web");
        assert_eq!(labels["kiln.instance"], "web-0123");
        assert_eq!(labels["kiln.release"], "4");
        assert_eq!(labels["kiln.image"], s.image.to_string());
        assert_eq!(labels["kiln.state"], "abc");
        let h = body.host_config.unwrap();
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.cap_add, None);
        // No seccomp option: the engine's default profile applies.
        assert_eq!(h.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(body.user.as_deref(), Some("65534:65534"));
        assert_eq!(h.memory, Some(64 << 20));
        assert_eq!(h.nano_cpus, Some(500_000_000));
        assert_eq!(h.pids_limit, Some(100));
        assert_eq!(h.oom_score_adj, Some(500));
        let tmpfs: BTreeMap<String, String> = h.tmpfs.unwrap().into_iter().collect();
        assert_eq!(
            tmpfs,
            BTreeMap::from([
                (
                    "/tmp".to_owned(),
                    "rw,nosuid,nodev,mode=1777,size=67108864".to_owned()
                ),
                (
                    "/var/cache/app".to_owned(),
                    "rw,nosuid,nodev,mode=1777,size=1073741824".to_owned()
                ),
            ])
        );
        let binding = &h.port_bindings.unwrap()["41000/tcp"];
        assert_eq!(
            binding.as_ref().unwrap()[0].host_ip.as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(
            h.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
    }

    #[test]
    fn unconfined_is_the_only_way_seccomp_is_switched_off() {
        let mut s = spec();
        s.seccomp = Seccomp::Unconfined;
        let id = InstanceId::new("web-0123").unwrap();
        let image_id = Digest::of(b"config");
        let body = create_body(&Wanted {
            id: &id,
            spec: &s,
            image_id: &image_id,
            port: 1,
            state_label: "abc",
            user: "0:0",
            secrets: None,
            init: None,
            image_argv: &[],
        });
        assert_eq!(
            body.host_config.unwrap().security_opt,
            Some(vec![
                "no-new-privileges".to_owned(),
                "seccomp=unconfined".to_owned()
            ])
        );
        assert_eq!(body.user.as_deref(), Some("0:0"));
    }

    #[test]
    fn added_capabilities_are_the_only_ones_after_dropping_all() {
        let mut s = spec();
        s.capabilities = ["CHOWN", "net_bind_service"]
            .iter()
            .map(|n| kiln_spec::Capability::parse(n).unwrap())
            .collect();
        let id = InstanceId::new("web-0123").unwrap();
        let image_id = Digest::of(b"config");
        let body = create_body(&Wanted {
            id: &id,
            spec: &s,
            image_id: &image_id,
            port: 1,
            state_label: "abc",
            user: "0:0",
            secrets: None,
            init: None,
            image_argv: &[],
        });
        let h = body.host_config.unwrap();
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            h.cap_add,
            Some(vec![
                "CAP_CHOWN".to_owned(),
                "CAP_NET_BIND_SERVICE".to_owned()
            ])
        );
    }

    #[test]
    fn a_one_off_command_replaces_entrypoint_and_cmd() {
        let mut s = spec();
        s.command = Some(vec!["/hello".to_owned(), "migrate".to_owned()]);
        let id = InstanceId::new("web-0123").unwrap();
        let image_id = Digest::of(b"config");
        let body = create_body(&Wanted {
            id: &id,
            spec: &s,
            image_id: &image_id,
            port: 1,
            state_label: "abc",
            user: "65534:65534",
            secrets: None,
            init: None,
            image_argv: &[],
        });
        assert_eq!(
            body.entrypoint,
            Some(vec!["/hello".to_owned(), "migrate".to_owned()])
        );
        assert_eq!(body.cmd, Some(Vec::new()));
    }

    #[test]
    fn under_the_init_the_entrypoint_wraps_the_image_s_argv_and_binds_the_binary() {
        let s = spec();
        let id = InstanceId::new("web-0123").unwrap();
        let image_id = Digest::of(b"config");
        let argv = ["/hello".to_owned(), "--flag".to_owned()];
        let body = create_body(&Wanted {
            id: &id,
            spec: &s,
            image_id: &image_id,
            port: 1,
            state_label: "abc",
            user: "65534:65534",
            secrets: None,
            init: Some(std::path::Path::new("/usr/bin/kiln")),
            image_argv: &argv,
        });
        let want: Vec<String> = ["/.kiln/init", "instance-init", "--", "/hello", "--flag"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(body.entrypoint, Some(want));
        assert_eq!(body.cmd, Some(Vec::new()));
        assert_eq!(
            body.host_config.unwrap().binds,
            Some(vec!["/usr/bin/kiln:/.kiln/init:ro".to_owned()])
        );
        // The bind's mount point is the engine's doing, not drift.
        let changes = [
            "/.kiln".to_owned(),
            "/.kiln/init".to_owned(),
            "/srv".to_owned(),
        ];
        assert_eq!(
            drifted_paths(&changes, &kiln_paths(&[], true, false)),
            ["/srv".to_owned()]
        );
    }

    #[test]
    fn the_secrets_mount_point_is_not_drift() {
        // What the engine reported for an instance with secrets on an image without /run.
        let changes = ["/run".to_owned(), "/run/secrets".to_owned()];
        assert_eq!(
            drifted_paths(&changes, &kiln_paths(&["/tmp".to_owned()], true, true)),
            Vec::<String>::new()
        );
        // Without secrets, the same paths are somebody else's doing.
        assert_eq!(
            drifted_paths(&changes, &kiln_paths(&["/tmp".to_owned()], true, false)),
            changes.to_vec()
        );
    }

    #[test]
    fn settings_name_what_changed() {
        let mut c = ContainerInspectResponse {
            host_config: Some(HostConfig {
                memory: Some(64 << 20),
                ..HostConfig::default()
            }),
            ..ContainerInspectResponse::default()
        };
        let before = settings(&c);
        assert!(changed_settings(&before, &settings(&c)).is_empty());
        // A setting the record does not have (recorded by a newer kiln) is not drift.
        let mut older = before.clone();
        older.remove("HostConfig.OomScoreAdj");
        assert!(changed_settings(&older, &settings(&c)).is_empty());
        if let Some(h) = c.host_config.as_mut() {
            h.memory = Some(128 << 20);
        }
        let changed = changed_settings(&before, &settings(&c));
        assert_eq!(
            changed,
            vec![(
                "HostConfig.Memory".to_owned(),
                "67108864".to_owned(),
                "134217728".to_owned()
            )]
        );
    }

    #[test]
    fn mount_points_and_writable_paths_are_not_drift() {
        let writable = vec!["/tmp".to_owned(), "/var/cache/app".to_owned()];
        let changes: Vec<String> = [
            "/dev",
            "/etc",
            "/etc/hosts",
            "/proc",
            "/sys",
            "/tmp",
            "/tmp/x",
            "/var",
            "/var/cache",
            "/var/cache/app",
            "/etc/passwd",
            "/evil",
            "/variable",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(
            drifted_paths(&changes, &writable),
            vec!["/etc/passwd", "/evil", "/variable"]
        );
    }
}
