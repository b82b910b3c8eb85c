//! The pure half of the swarm provider: the Swarm service one instance is, the settings of a
//! service kiln watches for drift, and what a task's status means for the instance.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, Limit, Mount, MountTmpfsOptions, MountType, Node, NodeState, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, Task, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecPrivileges, TaskSpecLogDriver, TaskSpecPlacement, TaskSpecResources,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use serde_json::{Value, json};

use crate::docker::container::{LABEL_APP, LABEL_IMAGE, LABEL_INSTANCE, LABEL_STATE};
use crate::types::{InstanceId, InstanceSpec, InstanceState};

/// What `start` asks of the manager for one instance.
pub(crate) struct Wanted<'a> {
    pub id: &'a InstanceId,
    pub spec: &'a InstanceSpec,
    /// `<registry>/<repository>@sha256:…`: what every node pulls.
    pub image_ref: &'a str,
    /// The port the app listens on inside its container (`PORT`).
    pub port: u16,
    pub state_label: &'a str,
    /// The `User` the engine resolves in the container (`crate::user::docker_user`).
    pub user: &'a str,
}

/// One instance as a Swarm service of one task: the docker provider's seal (read-only root,
/// a size-capped tmpfs per writable path, every capability dropped but the spec's, a pids
/// limit, memory/CPU limits, no new privileges where the engine takes it per service),
/// `PORT`, the port published in host mode on whichever node runs the task (so kiln reaches
/// each task directly, never through the routing mesh), Docker's init as PID 1 when the spec
/// has `init`, the spec's placement constraints, and no restart: a task that ends is an
/// instance that ended, which kiln replaces.
pub(crate) fn service_spec(w: &Wanted<'_>) -> ServiceSpec {
    let spec = w.spec;
    let mut env: Vec<String> = spec
        .env
        .iter()
        .filter(|(k, _)| k.as_str() != "PORT")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.push(format!("PORT={}", w.port));
    let mut labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_APP.to_owned(), spec.app.clone());
    labels.insert(LABEL_INSTANCE.to_owned(), w.id.to_string());
    labels.insert(LABEL_IMAGE.to_owned(), spec.image.to_string());
    // The task's container carries these, not the state's label: a docker provider of the
    // same state on a node's engine must never take it for one of its own containers.
    let container_labels = labels.clone();
    labels.insert(LABEL_STATE.to_owned(), w.state_label.to_owned());
    let mounts: Vec<Mount> = spec
        .writable
        .iter()
        .map(|t| Mount {
            target: Some(t.path.clone()),
            typ: Some(MountType::TMPFS),
            tmpfs_options: Some(MountTmpfsOptions {
                size_bytes: i64::try_from(t.size).ok(),
                mode: Some(0o1777),
                ..MountTmpfsOptions::default()
            }),
            ..Mount::default()
        })
        .collect();
    let (command, args) = match &spec.command {
        Some(argv) => (Some(argv.clone()), Some(Vec::new())),
        None => (None, None),
    };
    let mut log = HashMap::new();
    log.insert("max-size".to_owned(), "10m".to_owned());
    log.insert("max-file".to_owned(), "2".to_owned());
    ServiceSpec {
        name: Some(w.id.to_string()),
        labels: Some(labels.clone()),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..ServiceSpecMode::default()
        }),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(w.image_ref.to_owned()),
                labels: Some(container_labels),
                command,
                args,
                env: Some(env),
                user: Some(w.user.to_owned()),
                read_only: Some(true),
                mounts: (!mounts.is_empty()).then_some(mounts),
                stop_grace_period: Some(
                    i64::try_from(spec.stop_grace.as_nanos()).unwrap_or(i64::MAX),
                ),
                init: Some(spec.init),
                capability_drop: Some(vec!["ALL".to_owned()]),
                capability_add: (!spec.capabilities.is_empty()).then(|| {
                    spec.capabilities
                        .iter()
                        .map(|c| format!("CAP_{c}"))
                        .collect()
                }),
                // Engines from API 1.46 apply it per service; older ones ignore the field, so
                // `start` requires their daemon-wide `no-new-privileges`.
                privileges: Some(TaskSpecContainerSpecPrivileges {
                    no_new_privileges: Some(true),
                    ..TaskSpecContainerSpecPrivileges::default()
                }),
                ..TaskSpecContainerSpec::default()
            }),
            resources: Some(TaskSpecResources {
                limits: Some(Limit {
                    nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
                    memory_bytes: spec.memory.and_then(|m| i64::try_from(m).ok()),
                    pids: Some(i64::from(spec.pids)),
                }),
                ..TaskSpecResources::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                max_attempts: Some(0),
                ..TaskSpecRestartPolicy::default()
            }),
            placement: (!spec.target.placement.is_empty()).then(|| TaskSpecPlacement {
                constraints: Some(spec.target.placement.clone()),
                ..TaskSpecPlacement::default()
            }),
            log_driver: Some(TaskSpecLogDriver {
                name: Some("json-file".to_owned()),
                options: Some(log),
            }),
            ..TaskSpec::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            ports: Some(vec![EndpointPortConfig {
                protocol: Some(EndpointPortConfigProtocolEnum::TCP),
                target_port: Some(i64::from(w.port)),
                publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                ..EndpointPortConfig::default()
            }]),
            ..EndpointSpec::default()
        }),
        ..ServiceSpec::default()
    }
}

/// The settings of a service that kiln fixes and nobody may change afterwards, as the
/// manager reports them, by name; compared key by key to find drift (a `docker service
/// update` behind kiln's back).
pub(crate) fn settings(s: &ServiceSpec) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut put = |name: &str, v: Value| {
        out.insert(name.to_owned(), v);
    };
    let sorted = |m: &Option<HashMap<String, String>>| -> BTreeMap<String, String> {
        m.clone().unwrap_or_default().into_iter().collect()
    };
    put("Labels", json!(sorted(&s.labels)));
    put(
        "Mode.Replicated.Replicas",
        json!(
            s.mode
                .as_ref()
                .and_then(|m| m.replicated.as_ref())
                .and_then(|r| r.replicas)
        ),
    );
    put(
        "EndpointSpec.Ports",
        json!(s.endpoint_spec.as_ref().map(|e| {
            e.ports
                .iter()
                .flatten()
                .map(|p| {
                    (
                        p.target_port,
                        p.published_port,
                        p.publish_mode.map(|m| m.to_string()),
                    )
                })
                .collect::<Vec<_>>()
        })),
    );
    let Some(t) = &s.task_template else {
        return out;
    };
    put(
        "TaskTemplate.ForceUpdate",
        json!(t.force_update.unwrap_or(0)),
    );
    put(
        "TaskTemplate.Placement.Constraints",
        json!(t.placement.as_ref().and_then(|p| p.constraints.clone())),
    );
    put(
        "TaskTemplate.RestartPolicy.Condition",
        json!(
            t.restart_policy
                .as_ref()
                .and_then(|r| r.condition.map(|c| c.to_string()))
        ),
    );
    if let Some(l) = t.resources.as_ref().and_then(|r| r.limits.as_ref()) {
        put("TaskTemplate.Resources.Limits.NanoCPUs", json!(l.nano_cpus));
        put(
            "TaskTemplate.Resources.Limits.MemoryBytes",
            json!(l.memory_bytes),
        );
        put("TaskTemplate.Resources.Limits.Pids", json!(l.pids));
    }
    if let Some(c) = &t.container_spec {
        let mut env = c.env.clone().unwrap_or_default();
        env.sort();
        put("ContainerSpec.Image", json!(c.image));
        put("ContainerSpec.Env", json!(env));
        put("ContainerSpec.Command", json!(c.command));
        put("ContainerSpec.Args", json!(c.args));
        put("ContainerSpec.User", json!(c.user));
        put("ContainerSpec.Dir", json!(c.dir));
        put(
            "ContainerSpec.ReadOnly",
            json!(c.read_only.unwrap_or(false)),
        );
        put("ContainerSpec.Init", json!(c.init.unwrap_or(false)));
        put("ContainerSpec.CapabilityAdd", json!(c.capability_add));
        put("ContainerSpec.CapabilityDrop", json!(c.capability_drop));
        put("ContainerSpec.Labels", json!(sorted(&c.labels)));
        put(
            "ContainerSpec.Mounts",
            json!(
                c.mounts
                    .iter()
                    .flatten()
                    .map(|m| (
                        m.target.clone(),
                        m.typ.map(|t| t.to_string()),
                        m.source.clone(),
                        m.read_only,
                        m.tmpfs_options.as_ref().and_then(|o| o.size_bytes)
                    ))
                    .collect::<Vec<_>>()
            ),
        );
        put(
            "ContainerSpec.Secrets",
            json!(c.secrets.as_ref().map(|s| {
                s.iter()
                    .map(|s| {
                        (
                            s.secret_name.clone(),
                            s.file.as_ref().and_then(|f| f.name.clone()),
                        )
                    })
                    .collect::<Vec<_>>()
            })),
        );
    }
    out
}

/// The task that stands for the instance now: the newest one (a service of one task with no
/// restart has one, unless somebody updated it).
pub(crate) fn current_task(tasks: &[Task]) -> Option<&Task> {
    tasks.iter().max_by(|a, b| {
        // The manager's object versions only grow; timestamps compare badly as strings.
        let key = |t: &Task| t.version.as_ref().and_then(|v| v.index);
        key(a).cmp(&key(b))
    })
}

/// What a task's state means for the instance, and its exit code when it ended. A task on a
/// node the manager sees down is an instance that ended: its node may be gone for good.
pub(crate) fn task_state(task: &Task, node_down: bool) -> (InstanceState, Option<i32>) {
    let status = task.status.as_ref();
    let code = status
        .and_then(|s| s.container_status.as_ref())
        .and_then(|c| c.exit_code)
        .and_then(|c| i32::try_from(c).ok());
    if node_down {
        return (InstanceState::Exited, code);
    }
    let state = status.and_then(|s| s.state).unwrap_or(TaskState::NEW);
    match state {
        TaskState::RUNNING => {
            // Asked to stop (by kiln's remove, or by the orchestrator): ending.
            if task.desired_state.is_some_and(|d| d != TaskState::RUNNING) {
                (InstanceState::Exited, code)
            } else {
                (InstanceState::Running, None)
            }
        }
        TaskState::NEW
        | TaskState::ALLOCATED
        | TaskState::PENDING
        | TaskState::ASSIGNED
        | TaskState::ACCEPTED
        | TaskState::PREPARING
        | TaskState::READY
        | TaskState::STARTING => (InstanceState::Running, None),
        _ => (InstanceState::Exited, code),
    }
}

/// Why the task is not running, as the manager says it (`rejected: No such image…`).
pub(crate) fn task_message(task: &Task) -> Option<String> {
    let s = task.status.as_ref()?;
    let state = s.state.map(|s| s.to_string()).unwrap_or_default();
    match (s.err.as_deref(), s.message.as_deref()) {
        (Some(e), _) if !e.is_empty() => Some(format!("{state}: {e}")),
        (_, Some(m)) if !m.is_empty() => Some(format!("{state}: {m}")),
        _ => None,
    }
}

/// The address kiln reaches the task at: its node's address and the port published there.
pub(crate) fn task_addr(task: &Task, node: Option<&Node>) -> Option<SocketAddr> {
    let port = task
        .status
        .as_ref()?
        .port_status
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .find_map(|p| p.published_port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)?;
    Some(SocketAddr::new(node_ip(node?)?, port))
}

/// A node's address as the manager knows it; a manager that advertised `0.0.0.0` is reached
/// at the address its manager status names. Never a loopback, link-local or unspecified
/// address: a node claiming one would point kiln's router and probes at kiln's own host.
pub(crate) fn node_ip(node: &Node) -> Option<IpAddr> {
    let usable = |ip: &IpAddr| {
        !ip.is_unspecified()
            && !ip.is_loopback()
            && !ip.is_multicast()
            && match ip {
                IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_broadcast(),
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            }
    };
    let status: Option<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addr.as_deref())
        .and_then(|a| a.parse().ok())
        .filter(usable);
    status.or_else(|| {
        let addr = node.manager_status.as_ref()?.addr.as_deref()?;
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        host.trim_matches(['[', ']']).parse().ok().filter(usable)
    })
}

/// The manager sees the node down (or gone from its list).
pub(crate) fn node_down(node: Option<&Node>) -> bool {
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.state)
        .is_none_or(|s| s == NodeState::DOWN || s == NodeState::DISCONNECTED)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use bollard::models::{NodeStatus, PortStatus, TaskStatus};

    use super::*;
    use crate::types::{Digest, Tmpfs};

    fn spec() -> InstanceSpec {
        let mut env = BTreeMap::new();
        env.insert("A".to_owned(), "1".to_owned());
        env.insert("PORT".to_owned(), "1".to_owned());
        let mut target = kiln_spec::TargetSpec {
            provider: kiln_spec::ProviderKind::Swarm,
            ..kiln_spec::TargetSpec::default()
        };
        target.placement = vec!["node.role == worker".to_owned()];
        InstanceSpec {
            image: Digest::of(b"image"),
            app: "web".to_owned(),
            env,
            writable: vec![Tmpfs {
                path: "/tmp".to_owned(),
                size: 1 << 20,
            }],
            memory: Some(64 << 20),
            cpus: Some(0.5),
            stop_grace: Duration::from_secs(2),
            init: true,
            health: None,
            port: None,
            container_port: Some(8080),
            command: None,
            labels: BTreeMap::new(),
            target,
            user: None,
            pids: 128,
            seccomp: kiln_spec::Seccomp::Default,
            network: kiln_spec::Network::Kiln,
            secrets: Vec::new(),
            capabilities: Vec::new(),
        }
    }

    #[test]
    fn an_instance_is_a_sealed_service_of_one_task_published_in_host_mode() {
        let spec = spec();
        let id = InstanceId::new("web-0123456789ab").unwrap();
        let s = service_spec(&Wanted {
            id: &id,
            spec: &spec,
            image_ref: "10.0.0.1:5000/kiln/web@sha256:00",
            port: 8080,
            state_label: "st",
            user: "65534:65534",
        });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["Name"], "web-0123456789ab");
        assert_eq!(v["Mode"]["Replicated"]["Replicas"], 1);
        let c = &v["TaskTemplate"]["ContainerSpec"];
        assert_eq!(c["Image"], "10.0.0.1:5000/kiln/web@sha256:00");
        assert_eq!(c["ReadOnly"], true);
        assert_eq!(c["CapabilityDrop"], json!(["ALL"]));
        assert_eq!(c["Env"], json!(["A=1", "PORT=8080"]));
        assert_eq!(c["Mounts"][0]["Type"], "tmpfs");
        assert_eq!(c["Mounts"][0]["TmpfsOptions"]["SizeBytes"], 1 << 20);
        assert_eq!(c["Init"], true);
        assert_eq!(v["Labels"]["kiln.state"], "st");
        assert!(c["Labels"].get("kiln.state").is_none());
        let t = &v["TaskTemplate"];
        assert_eq!(t["RestartPolicy"]["Condition"], "none");
        assert_eq!(t["Resources"]["Limits"]["Pids"], 128);
        assert_eq!(t["Resources"]["Limits"]["MemoryBytes"], 64 << 20);
        assert_eq!(
            t["Placement"]["Constraints"],
            json!(["node.role == worker"])
        );
        let p = &v["EndpointSpec"]["Ports"][0];
        assert_eq!(p["PublishMode"], "host");
        assert_eq!(p["TargetPort"], 8080);
        assert!(p.get("PublishedPort").is_none());
    }

    #[test]
    fn an_env_added_behind_kiln_s_back_is_a_changed_setting() {
        let spec = spec();
        let id = InstanceId::new("web-0123456789ab").unwrap();
        let mut s = service_spec(&Wanted {
            id: &id,
            spec: &spec,
            image_ref: "r/kiln/web@sha256:00",
            port: 8080,
            state_label: "st",
            user: "65534:65534",
        });
        let before = settings(&s);
        if let Some(c) = s
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
        {
            c.env.get_or_insert_with(Vec::new).push("X=1".to_owned());
        }
        let changed = crate::docker::container::changed_settings(&before, &settings(&s));
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0, "ContainerSpec.Env");
        assert!(changed[0].2.contains("X=1"));
    }

    fn task(state: TaskState, desired: TaskState, port: Option<i64>) -> Task {
        Task {
            status: Some(TaskStatus {
                state: Some(state),
                port_status: Some(PortStatus {
                    ports: Some(vec![EndpointPortConfig {
                        published_port: port,
                        ..EndpointPortConfig::default()
                    }]),
                }),
                ..TaskStatus::default()
            }),
            desired_state: Some(desired),
            ..Task::default()
        }
    }

    fn node(addr: &str, state: NodeState) -> Node {
        Node {
            status: Some(NodeStatus {
                state: Some(state),
                addr: Some(addr.to_owned()),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn task_states_map_to_instance_states() {
        let r = TaskState::RUNNING;
        assert_eq!(
            task_state(&task(r, r, None), false).0,
            InstanceState::Running
        );
        assert_eq!(
            task_state(&task(TaskState::PREPARING, r, None), false).0,
            InstanceState::Running
        );
        assert_eq!(
            task_state(&task(r, TaskState::SHUTDOWN, None), false).0,
            InstanceState::Exited
        );
        assert_eq!(
            task_state(&task(TaskState::FAILED, r, None), false).0,
            InstanceState::Exited
        );
        assert_eq!(task_state(&task(r, r, None), true).0, InstanceState::Exited);
    }

    #[test]
    fn a_task_is_reached_at_its_node_and_published_port() {
        let r = TaskState::RUNNING;
        let n = node("10.89.0.12", NodeState::READY);
        assert_eq!(
            task_addr(&task(r, r, Some(30001)), Some(&n)),
            Some("10.89.0.12:30001".parse().unwrap())
        );
        assert_eq!(task_addr(&task(r, r, None), Some(&n)), None);
        assert_eq!(task_addr(&task(r, r, Some(30001)), None), None);
        for bad in ["0.0.0.0", "127.0.0.1", "169.254.1.1", "::1", "fe80::1"] {
            let n = node(bad, NodeState::READY);
            assert_eq!(task_addr(&task(r, r, Some(1)), Some(&n)), None, "{bad}");
        }
        assert!(node_down(Some(&node("1.2.3.4", NodeState::DOWN))));
        assert!(node_down(None));
        assert!(!node_down(Some(&n)));
    }
}
