//! The swarm provider: instances as Docker Swarm services placed by a Swarm manager over its
//! nodes, driven through the manager's Engine API (bollard; Engine 20.10 speaks 1.41).
//!
//! - **An instance is a service of one task** (`service.rs`), so kiln's release model,
//!   strategies and rollback stay kiln's and Swarm does placement only: within the spec's
//!   `placement` constraints its scheduler puts each new task on the node running the fewest,
//!   which spreads an app's instances. No restart policy: a task that ends, or whose node the
//!   manager sees down, is an instance that ended, which kiln replaces through a new service
//!   Swarm places on a live node.
//! - **Reached directly**: the app's port is published in host mode on whichever node runs
//!   the task; kiln reads the task's node address and published port from the manager, and
//!   health checks and the router go there, never through Swarm's routing mesh.
//! - **Images by digest from kiln's registry**: nodes pull `<registry>/kiln/<app>@sha256:…`
//!   from the daemon's OCI Distribution endpoint (`kiln serve --registry-listen`), so the
//!   digest every engine reports is the one kiln built; there is no load into each engine.
//!   With `[target] registry` (a registry of the team's own), `create` first pushes the image
//!   there (`crate::push`, once per image and repository however many creates ask at once)
//!   and nodes pull `<HOST>/<PATH or kiln>/<app>@sha256:…` from it instead.
//! - **Sealed as on docker**, with what Engine 20.10's service API lacks made explicit: no
//!   per-service no-new-privileges (asked for, but 20.10 drops the field: then every node's
//!   engine must run with `no-new-privileges`, which no API shows, so kiln warns once), no
//!   unconfined seccomp, no OOM score; secrets are refused.
//! - **Drift**: a service updated behind kiln's back (its settings compared with the ones the
//!   manager reported right after create: `docker service update --env-add …`), a service
//!   removed, and an `exec` into a task on the manager's node (the engine kiln reaches),
//!   followed from the manager's event stream and a periodic rescan.
//!
//! Layout under the state directory: `swarm/<id>.json`, the record a new kiln adopts an
//! instance from; `swarm/<id>.exec` marks an instance tainted by an exec.
//!
//! Lifecycle: `create` checks and records the service it will be; `start` creates it (the
//! task is then scheduled, pulled and started by the Swarm); `stop` removes the service (the
//! engine stops the task with the spec's grace) and waits until its task is gone.

mod service;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{EventMessage, Node, ServiceSpec, Task};
use bollard::query_parameters::{
    EventsOptions, InspectServiceOptions, ListNodesOptions, ListServicesOptions, ListTasksOptions,
    LogsOptions,
};
use futures_util::StreamExt;
use kiln_spec::{ExecPolicy, HealthCheck, Seccomp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use crate::docker::container::{LABEL_INSTANCE, LABEL_STATE, changed_settings};
use crate::docker::{engine_address, engine_err, is_not_found, log_chunk, unix_ms};
use crate::health::{HealthMachine, Liveness, monitor, prober_for};
use crate::image::ImageSource;
use crate::local::record::HealthRecord;
use crate::provider::{Provider, ProviderError};
use crate::types::{
    Digest, DriftFinding, DriftReport, Health, InstanceId, InstanceSpec, InstanceState, LogChunk,
    Observation,
};

use self::service::{
    Wanted, current_task, node_down, service_spec, settings, task_addr, task_message, task_state,
};

/// How the swarm provider is set up.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// kiln's state directory (records).
    pub state: PathBuf,
    /// The manager's engine: `unix:///…`, `tcp://…`; `None` means `$DOCKER_HOST` or the
    /// local socket.
    pub host: Option<String>,
    /// Where nodes pull kiln's images from: `ADDR:PORT` of the daemon's registry endpoint,
    /// set once the daemon serves it. Without it no instance can be created.
    pub registry: Arc<std::sync::OnceLock<String>>,
    /// Period of the full drift rescan that backs the event stream.
    pub rescan_interval: Duration,
    /// A CA certificate trusted besides the system's roots when pushing to `[target]
    /// registry`: `<state>/push/ca.crt` when the operator put one there.
    pub push_ca: Option<PathBuf>,
}

impl SwarmConfig {
    /// Defaults: the manager `$DOCKER_HOST` names (or the local socket), no registry, a
    /// rescan every 5 s.
    pub fn new(state: impl Into<PathBuf>, host: Option<String>) -> SwarmConfig {
        let state = state.into();
        let ca = state.join(crate::push::EXTRA_CA);
        SwarmConfig {
            push_ca: ca.is_file().then_some(ca),
            state,
            host,
            registry: Arc::default(),
            rescan_interval: Duration::from_secs(5),
        }
    }
}

/// The image reference nodes pull an instance of `app` by: `<registry>/kiln/<app>@<digest>`,
/// the app's name made a valid repository path component (lowercase alphanumerics joined by
/// single separators), since kiln's registry serves any image under any valid `kiln/<name>`.
pub fn image_reference(registry: &str, app: &str, image: &Digest) -> String {
    let name = crate::push::app_component(app);
    format!("{registry}/kiln/{name}@{image}")
}

/// What the provider records about an instance (a storage format, so its own serde type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwarmRecord {
    version: u32,
    id: String,
    app: String,
    /// The manifest digest kiln built.
    image: String,
    /// The service `start` creates (the manager's own serialisation of it).
    spec: Value,
    /// The service's ID once started.
    #[serde(default)]
    service: Option<String>,
    health: Option<HealthRecord>,
    exec: String,
    created_unix_ms: u64,
    labels: BTreeMap<String, String>,
    /// The service's settings as the manager reported them right after it was created.
    #[serde(default)]
    settings: BTreeMap<String, Value>,
    /// kiln stopped it (its service is gone on purpose).
    #[serde(default)]
    stopped: bool,
    /// `start` is creating its service (a service by the instance's name may exist).
    #[serde(default)]
    starting: bool,
}

impl SwarmRecord {
    fn image(&self) -> Result<Digest, ProviderError> {
        Digest::parse(&self.image).map_err(|e| ProviderError::Record {
            path: PathBuf::from(format!("swarm/{}.json", self.id)),
            message: e.to_string(),
        })
    }

    fn created(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.created_unix_ms)
    }
}

/// What kiln holds in memory about an instance it started or adopted.
struct Live {
    health: watch::Receiver<Health>,
    health_task: Option<AbortHandle>,
    /// Where the task answers, once the manager reports it.
    addr: Arc<Mutex<Option<SocketAddr>>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(task) = &self.health_task {
            task.abort();
        }
    }
}

/// The service's task as the manager reports it now.
struct TaskView {
    state: InstanceState,
    exit_code: Option<i32>,
    addr: Option<SocketAddr>,
    message: Option<String>,
}

/// The swarm provider.
pub struct SwarmProvider {
    cfg: SwarmConfig,
    docker: Docker,
    images: Arc<dyn ImageSource>,
    state_label: String,
    live: Mutex<HashMap<InstanceId, Live>>,
    destroying: Mutex<HashSet<InstanceId>>,
    drift: crate::announce::Announcer,
    /// Warned once that the engines take no no-new-privileges per service.
    warned_privileges: std::sync::atomic::AtomicBool,
    /// The manager's node list, at most `NODES_TTL` old.
    nodes: tokio::sync::Mutex<(Option<tokio::time::Instant>, Vec<Node>)>,
    /// Since when each node the manager reports down has been so.
    down_since: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Services with this state's label and no record, since first seen.
    unrecorded: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Itself, for the health tasks it spawns.
    me: Weak<SwarmProvider>,
    /// Images pushed to `[target] registry` by this process.
    pushes: crate::push::PushOnce,
}

impl std::fmt::Debug for SwarmProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwarmProvider")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// How long a node listing stands for the observations of every instance.
const NODES_TTL: Duration = Duration::from_millis(500);

/// How long `stop` waits past the grace for the task to be gone.
const STOP_SLACK: Duration = Duration::from_secs(15);

/// How long the manager must report a node down before its tasks count as ended: a node
/// that misses a few heartbeats on a loaded machine comes back.
const NODE_DOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a service with this state's label may have no record before `list` removes it:
/// `start` records a service within milliseconds of creating it.
const UNRECORDED_GRACE: Duration = Duration::from_secs(15);

/// The longest any call to the manager may take (the event stream excepted).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// This state directory's id on the Swarm, made once at random: two kiln hosts with the same
/// state path (`/var/lib/kiln`) on one Swarm never take each other's services for their own.
fn state_label(dir: &std::path::Path) -> Result<String, ProviderError> {
    let path = dir.join("state-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ProviderError::io("read", &path)(e)),
    }
    let id = crate::types::InstanceId::generate("s")
        .as_str()
        .trim_start_matches("s-")
        .to_owned();
    kiln_durable::write(&path, id.as_bytes()).map_err(ProviderError::io("write", &path))?;
    Ok(id)
}

impl SwarmProvider {
    /// Connects to the manager, checks it is one, and starts following its events and the
    /// periodic drift rescan. Call inside a tokio runtime.
    pub async fn connect(
        cfg: SwarmConfig,
        images: Arc<dyn ImageSource>,
    ) -> Result<Arc<SwarmProvider>, ProviderError> {
        let mut cfg = cfg;
        cfg.state =
            std::path::absolute(&cfg.state).map_err(ProviderError::io("resolve", &cfg.state))?;
        let host = engine_address(cfg.host.as_deref());
        let docker = Docker::connect_with_host(&host)
            .map_err(|e| engine_err(format!("connect to the Swarm manager at {host}"), e))?
            .with_timeout(CALL_TIMEOUT)
            .negotiate_version()
            .await
            .map_err(|e| engine_err(format!("reach the Swarm manager at {host}"), e))?;
        let info = docker
            .info()
            .await
            .map_err(|e| engine_err(format!("ask the engine at {host} about itself"), e))?;
        let manager = info
            .swarm
            .as_ref()
            .and_then(|s| s.control_available)
            .unwrap_or(false);
        if !manager {
            return Err(ProviderError::Engine {
                what: format!("use the engine at {host} as a Swarm manager"),
                message: "it is not a Swarm manager (docker swarm init, or point docker_host \
                          at a manager)"
                    .to_owned(),
            });
        }
        crate::private::private_dir(&cfg.state.join("swarm"))?;
        let state_label = state_label(&cfg.state.join("swarm"))?;
        let provider = Arc::new_cyclic(|me| SwarmProvider {
            cfg,
            docker,
            images,
            state_label,
            live: Mutex::new(HashMap::new()),
            destroying: Mutex::new(HashSet::new()),
            drift: crate::announce::Announcer::new(),
            warned_privileges: std::sync::atomic::AtomicBool::new(false),
            nodes: tokio::sync::Mutex::new((None, Vec::new())),
            down_since: Mutex::new(HashMap::new()),
            unrecorded: Mutex::new(HashMap::new()),
            me: me.clone(),
            pushes: crate::push::PushOnce::new(),
        });
        // The event stream lasts as long as the provider: no call timeout.
        let events = provider
            .docker
            .clone()
            .with_timeout(Duration::from_secs(u64::MAX >> 2));
        tokio::spawn(follow_events(Arc::downgrade(&provider), events));
        tokio::spawn(crate::rescan::every_interval(Arc::downgrade(&provider)));
        Ok(provider)
    }

    /// The manager's client (for tests and the benchmark).
    pub fn engine(&self) -> &Docker {
        &self.docker
    }

    fn record_path(&self, id: &InstanceId) -> PathBuf {
        self.cfg.state.join("swarm").join(format!("{id}.json"))
    }

    fn taint_path(&self, id: &InstanceId) -> PathBuf {
        self.cfg.state.join("swarm").join(format!("{id}.exec"))
    }

    fn record(&self, id: &InstanceId) -> Result<SwarmRecord, ProviderError> {
        let path = self.record_path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ProviderError::NotFound(id.clone()));
            }
            Err(e) => return Err(ProviderError::io("read", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| ProviderError::Record {
            path,
            message: e.to_string(),
        })
    }

    fn write_record(&self, record: &SwarmRecord) -> Result<(), ProviderError> {
        let id = InstanceId::new(&record.id).map_err(|e| ProviderError::Record {
            path: PathBuf::from(format!("swarm/{}.json", record.id)),
            message: e.to_string(),
        })?;
        let path = self.record_path(&id);
        serde_json::to_vec_pretty(record)
            .map_err(std::io::Error::other)
            .and_then(|bytes| kiln_durable::write(&path, &bytes))
            .map_err(ProviderError::io("write", &path))
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_destroying(&self, id: &InstanceId) -> bool {
        self.destroying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// The manager's nodes, listed at most every `NODES_TTL`.
    async fn nodes(&self) -> Result<Vec<Node>, ProviderError> {
        let mut cached = self.nodes.lock().await;
        if let (Some(at), nodes) = &*cached
            && at.elapsed() < NODES_TTL
        {
            return Ok(nodes.clone());
        }
        let nodes = self
            .docker
            .list_nodes(None::<ListNodesOptions>)
            .await
            .map_err(|e| engine_err("list the Swarm's nodes", e))?;
        *cached = (Some(tokio::time::Instant::now()), nodes.clone());
        Ok(nodes)
    }

    /// The service's current task, or `None` when the service is gone.
    async fn task_view(&self, record: &SwarmRecord) -> Result<Option<TaskView>, ProviderError> {
        let Some(service) = &record.service else {
            return Ok(None);
        };
        self.view(service).await
    }

    /// Whether the manager has reported `node` (by ID) down for longer than
    /// `NODE_DOWN_GRACE`, given the node as listed now (`None`: gone from the list).
    fn node_down_long(&self, id: &str, node: Option<&Node>) -> bool {
        let mut since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        if !node_down(node) {
            since.remove(id);
            return false;
        }
        let first = *since
            .entry(id.to_owned())
            .or_insert_with(tokio::time::Instant::now);
        first.elapsed() >= NODE_DOWN_GRACE
    }

    /// What the manager reports of `service`'s current task (`None`: the service is gone).
    async fn view(&self, service: &str) -> Result<Option<TaskView>, ProviderError> {
        match self
            .docker
            .inspect_service(service, None::<InspectServiceOptions>)
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(engine_err(format!("inspect service {service}"), e)),
        }
        let tasks = tasks_of(&self.docker, service).await?;
        let Some(task) = current_task(&tasks) else {
            // Created, not yet given a task by the orchestrator.
            return Ok(Some(TaskView {
                state: InstanceState::Running,
                exit_code: None,
                addr: None,
                message: None,
            }));
        };
        let nodes = self.nodes().await?;
        let node = task
            .node_id
            .as_ref()
            .and_then(|n| nodes.iter().find(|x| x.id.as_ref() == Some(n)));
        let down = task
            .node_id
            .as_deref()
            .is_some_and(|n| self.node_down_long(n, node));
        let (state, exit_code) = task_state(task, down);
        Ok(Some(TaskView {
            state,
            exit_code,
            addr: task_addr(task, node),
            message: if down {
                Some("its node is down".to_owned())
            } else {
                task_message(task)
            },
        }))
    }

    /// Starts (once) what kiln follows for a started instance: its health, probed at the
    /// task's address once the manager reports one.
    fn adopt(&self, id: &InstanceId, record: &SwarmRecord, long_running: bool) {
        if self.is_destroying(id) {
            return;
        }
        let mut live = self.lock_live();
        let started = record.service.is_some() && !record.stopped;
        if live
            .get(id)
            .is_some_and(|l| l.health_task.is_some() || !started || record.health.is_none())
        {
            return;
        }
        let addr = Arc::new(Mutex::new(None));
        let (health, health_task) = match (&record.health, &record.service) {
            (Some(h), Some(service)) if !record.stopped => {
                let (tx, rx) = watch::channel(Health::Starting);
                let task = tokio::spawn(follow_health(
                    self.me.clone(),
                    service.clone(),
                    HealthCheck::from(h),
                    long_running,
                    Arc::clone(&addr),
                    tx,
                ));
                (rx, Some(task.abort_handle()))
            }
            _ => (watch::channel(Health::Unknown).1, None),
        };
        live.insert(
            id.clone(),
            Live {
                health,
                health_task,
                addr,
            },
        );
    }

    /// The full drift check of one instance.
    async fn drift_findings(
        &self,
        id: &InstanceId,
        record: &SwarmRecord,
    ) -> Result<Vec<DriftFinding>, ProviderError> {
        let mut findings = Vec::new();
        if let Ok(command) = std::fs::read_to_string(self.taint_path(id)) {
            findings.push(DriftFinding::Exec { command });
        }
        let Some(service) = &record.service else {
            return Ok(findings);
        };
        if record.stopped {
            return Ok(findings);
        }
        let found = match self
            .docker
            .inspect_service(service, None::<InspectServiceOptions>)
            .await
        {
            Ok(s) => s,
            Err(e) if is_not_found(&e) => {
                findings.push(DriftFinding::Vanished {
                    what: format!("service {service} removed behind kiln's back"),
                });
                return Ok(findings);
            }
            Err(e) => return Err(engine_err(format!("inspect instance {id}"), e)),
        };
        let now = found.spec.as_ref().map(settings).unwrap_or_default();
        for (name, expected, found) in changed_settings(&record.settings, &now) {
            findings.push(DriftFinding::Setting {
                name,
                expected,
                found,
            });
        }
        Ok(findings)
    }

    /// Announces `findings` when they hold something not announced before; returns them as a
    /// report (or `None` when clean).
    fn publish(&self, id: &InstanceId, findings: Vec<DriftFinding>) -> Option<DriftReport> {
        self.drift.publish(id, findings, self.is_destroying(id))
    }

    async fn check(&self, id: &InstanceId) {
        if self.is_destroying(id) {
            return;
        }
        let Ok(record) = self.record(id) else {
            return;
        };
        match self.drift_findings(id, &record).await {
            Ok(findings) => {
                self.publish(id, findings);
            }
            Err(e) => tracing::warn!(instance = %id, error = %e, "drift check failed"),
        }
    }

    /// Reacts to one event of the manager's engine about one of kiln's services or tasks.
    async fn on_event(self: &Arc<Self>, event: EventMessage) {
        let action = event.action.unwrap_or_default();
        let attributes = event.actor.and_then(|a| a.attributes).unwrap_or_default();
        let name = attributes
            .get("name")
            .cloned()
            .or_else(|| attributes.get("com.docker.swarm.service.name").cloned());
        let Some(id) = attributes
            .get(LABEL_INSTANCE)
            .cloned()
            .or(name)
            .and_then(|s| InstanceId::new(&s).ok())
        else {
            return;
        };
        let Ok(record) = self.record(&id) else {
            return;
        };
        let verb = action.split(':').next().unwrap_or_default().trim();
        match verb {
            "exec_create" | "exec_start" => {
                if record.exec != ExecPolicy::Taint.as_str() || self.is_destroying(&id) {
                    return;
                }
                let command = action
                    .split_once(':')
                    .map(|(_, c)| c.trim().to_owned())
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| "(unknown command)".to_owned());
                let path = self.taint_path(&id);
                if !path.exists()
                    && let Err(e) = kiln_durable::write(&path, command.as_bytes())
                {
                    tracing::warn!(instance = %id, error = %e, "cannot record an exec taint");
                }
                self.check(&id).await;
            }
            "update" | "remove" => self.check(&id).await,
            _ => {}
        }
    }

    /// Removes the service, whatever its state; gone already is fine.
    async fn remove_service(&self, id: &InstanceId, service: &str) -> Result<(), ProviderError> {
        match self.docker.delete_service(service).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(engine_err(format!("remove instance {id}"), e)),
        }
    }

    /// Waits until each of `tasks` ended or is gone, up to `limit`.
    async fn wait_ended(&self, tasks: &[String], limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        for task in tasks {
            while tokio::time::Instant::now() < deadline {
                match self.docker.inspect_task(task).await {
                    Ok(t)
                        if !t
                            .status
                            .as_ref()
                            .and_then(|s| s.state)
                            .is_some_and(task_state_ended) => {}
                    // Ended, gone, or the manager cannot say: nothing to wait for.
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Finds a service by the instance's name, made by a `start` that crashed before
    /// recording it: its ID when it carries this instance's and this state's labels.
    async fn orphan_service(&self, id: &InstanceId) -> Option<String> {
        let s = self
            .docker
            .inspect_service(id.as_str(), None::<InspectServiceOptions>)
            .await
            .ok()?;
        let labels = s.spec.as_ref()?.labels.as_ref()?;
        (labels.get(LABEL_INSTANCE).map(String::as_str) == Some(id.as_str())
            && labels.get(LABEL_STATE) == Some(&self.state_label))
        .then_some(s.id)
        .flatten()
    }
}

/// The tasks of `service`; none once it is gone (the manager resolves the filter through
/// the service, so a removed one is a 404).
async fn tasks_of(docker: &Docker, service: &str) -> Result<Vec<Task>, ProviderError> {
    let mut filters = HashMap::new();
    filters.insert("service".to_owned(), vec![service.to_owned()]);
    match docker
        .list_tasks(Some(ListTasksOptions {
            filters: Some(filters),
        }))
        .await
    {
        Ok(tasks) => Ok(tasks),
        Err(e) if is_not_found(&e) => Ok(Vec::new()),
        Err(e) => Err(engine_err(
            format!("list the tasks of service {service}"),
            e,
        )),
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows one started instance's health: waits for the manager to report where its task
/// answers, then probes it there until the task ends (or its node is down). The start period
/// runs from then, not from the service's creation (scheduling and the pull come first);
/// an adopted instance (`long_running`) has none.
async fn follow_health(
    provider: Weak<SwarmProvider>,
    service: String,
    check: HealthCheck,
    long_running: bool,
    addr: Arc<Mutex<Option<SocketAddr>>>,
    tx: watch::Sender<Health>,
) {
    let view = |provider: Weak<SwarmProvider>, service: String| async move {
        match provider.upgrade() {
            Some(p) => p.view(&service).await.map(Some),
            None => Ok(None),
        }
    };
    let at = loop {
        match view(provider.clone(), service.clone()).await {
            Ok(None) => return,
            Ok(Some(Some(v))) if v.state == InstanceState::Running => {
                if let Some(a) = v.addr {
                    break a;
                }
            }
            Ok(Some(_)) => {
                tx.send_replace(Health::Failed);
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    *addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    let started = if long_running {
        tokio::time::Instant::now()
            .checked_sub(Duration::from_secs(86_400))
            .unwrap_or_else(tokio::time::Instant::now)
    } else {
        tokio::time::Instant::now()
    };
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let alive: Liveness = {
        let running = Arc::clone(&running);
        Arc::new(move || running.load(std::sync::atomic::Ordering::Relaxed))
    };
    let _watcher = AbortOnDrop(
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match view(provider.clone(), service.clone()).await {
                    Ok(Some(Some(v))) if v.state == InstanceState::Running => {}
                    Ok(_) => {
                        running.store(false, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    Err(_) => {}
                }
            }
        })
        .abort_handle(),
    );
    let prober = prober_for(&check, at);
    monitor(HealthMachine::new(check, started), prober, alive, tx).await;
}

fn task_state_ended(s: bollard::models::TaskState) -> bool {
    use bollard::models::TaskState as T;
    matches!(
        s,
        T::COMPLETE | T::SHUTDOWN | T::FAILED | T::REJECTED | T::REMOVE | T::ORPHANED
    )
}

/// Follows the manager's engine events for as long as the provider lives, reconnecting
/// after an error.
async fn follow_events(provider: Weak<SwarmProvider>, docker: Docker) {
    loop {
        if provider.strong_count() == 0 {
            return;
        }
        let mut filters = HashMap::new();
        filters.insert(
            "type".to_owned(),
            vec!["service".to_owned(), "container".to_owned()],
        );
        let mut stream = docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..EventsOptions::default()
        }));
        while let Some(item) = stream.next().await {
            let Some(p) = provider.upgrade() else { return };
            match item {
                Ok(event) => p.on_event(event).await,
                Err(e) => {
                    tracing::debug!(error = %e, "the manager's event stream ended");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[async_trait]
impl Provider for SwarmProvider {
    fn name(&self) -> &'static str {
        "swarm"
    }

    async fn create(&self, spec: InstanceSpec) -> Result<InstanceId, ProviderError> {
        let id = InstanceId::generate(&spec.app);
        let refuse = |message: String| ProviderError::Config {
            id: id.clone(),
            message,
        };
        // A registry of the team's own, or the daemon's endpoint.
        let pushed = match &spec.target.registry {
            Some(r) => Some(
                crate::push::Repository::for_app(r, &spec.app)
                    .map_err(|e| refuse(e.to_string()))?,
            ),
            None => None,
        };
        let own = self.cfg.registry.get().map(String::as_str);
        if pushed.is_none() && own.is_none() {
            return Err(refuse(
                "provider = \"swarm\" needs a registry every node pulls from: run kiln serve \
                 with --registry-listen ADDR (an address the nodes reach), or name one in \
                 [target] registry"
                    .to_owned(),
            ));
        }
        if spec.network != kiln_spec::Network::Kiln {
            return Err(refuse(format!(
                "[service] network = {:?} is for the local provider",
                spec.network.as_str()
            )));
        }
        if spec.seccomp == Seccomp::Unconfined {
            return Err(refuse(
                "the Swarm service API (Engine 20.10) cannot switch seccomp off per service: \
                 remove [service] seccomp = \"unconfined\" or use provider = \"docker\""
                    .to_owned(),
            ));
        }
        if !spec.secrets.is_empty() {
            return Err(refuse(
                "secrets are not delivered on provider = \"swarm\" yet (they would have to \
                 pass through the Swarm's raft store): use provider = \"docker\" or \"local\""
                    .to_owned(),
            ));
        }
        let resolved = self
            .images
            .resolve(&spec.image)
            .map_err(|e| ProviderError::Image {
                digest: spec.image.clone(),
                message: e.to_string(),
            })?;
        let user = crate::user::docker_user(spec.user.as_deref(), resolved.config.user.as_deref())
            .and_then(|user| {
                crate::user::docker_capabilities(&user, &spec.capabilities).map(|()| user)
            })
            .map_err(&refuse)?;
        let port = spec.container_port.or(spec.port).unwrap_or(8080);
        let image_ref = match (&pushed, own) {
            (Some(repo), _) => {
                let opts = crate::push::PushOptions {
                    insecure: spec.target.registry_insecure,
                    ca_file: self.cfg.push_ca.clone(),
                };
                let sent = self
                    .pushes
                    .ensure(&*self.images, &spec.image, repo, &opts)
                    .await
                    .map_err(|e| ProviderError::Image {
                        digest: spec.image.clone(),
                        message: format!("cannot push it for instance {id}: {e}"),
                    })?;
                if let Some(p) = sent {
                    tracing::info!(
                        reference = %p.reference,
                        blobs_sent = p.blobs_sent,
                        bytes_sent = p.bytes_sent,
                        blobs_present = p.blobs_present,
                        "pushed the image to the target registry"
                    );
                }
                repo.reference(&spec.image)
            }
            (None, Some(own)) => image_reference(own, &spec.app, &spec.image),
            (None, None) => return Err(refuse("no registry".to_owned())),
        };
        let body = service_spec(&Wanted {
            id: &id,
            spec: &spec,
            image_ref: &image_ref,
            port,
            state_label: &self.state_label,
            user: &user,
        });
        let record = SwarmRecord {
            version: 1,
            id: id.to_string(),
            app: spec.app.clone(),
            image: spec.image.to_string(),
            spec: serde_json::to_value(&body).map_err(|e| refuse(e.to_string()))?,
            service: None,
            health: spec.health.as_ref().map(HealthRecord::from),
            exec: spec.target.exec.as_str().to_owned(),
            created_unix_ms: unix_ms(SystemTime::now()),
            labels: spec.labels.clone(),
            settings: BTreeMap::new(),
            stopped: false,
            starting: false,
        };
        self.write_record(&record)?;
        Ok(id)
    }

    async fn start(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let mut record = self.record(id)?;
        if record.service.is_some() || record.stopped {
            return Err(ProviderError::InvalidState {
                id: id.clone(),
                action: "start",
                state: if record.stopped { "stopped" } else { "started" },
            });
        }
        let spec: ServiceSpec =
            serde_json::from_value(record.spec.clone()).map_err(|e| ProviderError::Record {
                path: self.record_path(id),
                message: e.to_string(),
            })?;
        // Recorded first, so a destroy that races this start, or follows a crash in it,
        // removes the service by the instance's name.
        record.starting = true;
        self.write_record(&record)?;
        let service = match self.docker.create_service(spec, None).await {
            Ok(created) => created.id,
            // A start that crashed after creating it: that service is this instance's.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => self.orphan_service(id).await,
            Err(e) => {
                return Err(engine_err(
                    format!("create the service of instance {id}"),
                    e,
                ));
            }
        };
        let Some(service) = service else {
            return Err(ProviderError::Engine {
                what: format!("create the service of instance {id}"),
                message: "the manager returned no service ID".to_owned(),
            });
        };
        let mut stored = None;
        for _ in 0..3 {
            match self
                .docker
                .inspect_service(&service, None::<InspectServiceOptions>)
                .await
            {
                Ok(s) => {
                    stored = s.spec;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        // Without the settings the manager kept there is no baseline for drift.
        let Some(stored) = stored else {
            if let Err(e) = self.remove_service(id, &service).await {
                tracing::warn!(instance = %id, error = %e, "the service of a failed start not removed");
            }
            return Err(ProviderError::Engine {
                what: format!("inspect the service of instance {id}"),
                message: "the manager does not show the service it created".to_owned(),
            });
        };
        // An engine that kept the field applies it per service; one that dropped it (Engine
        // 20.10) applies only its daemon-wide setting, which no API shows.
        let per_service = stored
            .task_template
            .as_ref()
            .and_then(|t| t.container_spec.as_ref())
            .and_then(|c| c.privileges.as_ref())
            .and_then(|p| p.no_new_privileges)
            == Some(true);
        if !per_service
            && !self
                .warned_privileges
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "the Swarm's engines take no no-new-privileges per service (Engine 20.10): \
                 every node's /etc/docker/daemon.json must say \"no-new-privileges\": true \
                 for kiln's instances to be sealed"
            );
        }
        record.settings = settings(&stored);
        record.service = Some(service.clone());
        record.starting = false;
        // Destroyed while its service was being created: the service goes too.
        if self.is_destroying(id) || !self.record_path(id).exists() {
            if let Err(e) = self.remove_service(id, &service).await {
                tracing::warn!(instance = %id, error = %e, "the service of a destroyed instance not removed");
            }
            return Err(ProviderError::NotFound(id.clone()));
        }
        if let Err(e) = self.write_record(&record) {
            if let Err(e) = self.remove_service(id, &service).await {
                tracing::warn!(instance = %id, error = %e, "the service of an unrecorded instance not removed");
            }
            return Err(e);
        }
        self.adopt(id, &record, false);
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), ProviderError> {
        let mut record = self.record(id)?;
        if !record.stopped {
            record.stopped = true;
            self.write_record(&record)?;
        }
        let service = match (&record.service, record.starting) {
            (Some(s), _) => s.clone(),
            (None, true) => id.to_string(),
            (None, false) => return Ok(()),
        };
        // The manager forgets a removed service's tasks at once: remember them to wait.
        let tasks: Vec<String> = tasks_of(&self.docker, &service)
            .await?
            .into_iter()
            .filter_map(|t| t.id)
            .collect();
        self.remove_service(id, &service).await?;
        self.wait_ended(&tasks, grace + STOP_SLACK).await;
        Ok(())
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), ProviderError> {
        self.destroying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        let result = async {
            match self.record(id) {
                Ok(SwarmRecord {
                    service: Some(service),
                    ..
                }) => self.remove_service(id, &service).await?,
                // Not started, starting, or an unreadable record: a service by the instance's
                // name still goes (only one this state made).
                _ => {
                    if let Some(service) = self.orphan_service(id).await {
                        self.remove_service(id, &service).await?;
                    }
                }
            }
            for path in [self.record_path(id), self.taint_path(id)] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ProviderError::io("remove", &path)(e)),
                }
            }
            Ok(())
        }
        .await;
        self.lock_live().remove(id);
        self.drift.forget(id);
        self.destroying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        result
    }

    async fn observe(&self, id: &InstanceId) -> Result<Observation, ProviderError> {
        let record = self.record(id)?;
        let view = self.task_view(&record).await?;
        let (state, exit_code, addr) = match (&record.service, view, record.stopped) {
            (_, _, true) => (InstanceState::Exited, None, None),
            (None, _, false) if record.starting => (InstanceState::Running, None, None),
            (None, _, false) => (InstanceState::Created, None, None),
            (Some(_), None, false) => (InstanceState::Vanished, None, None),
            (Some(_), Some(v), false) => {
                if v.state == InstanceState::Exited
                    && let Some(m) = &v.message
                {
                    tracing::info!(instance = %id, why = %m, "swarm task ended");
                }
                (v.state, v.exit_code, v.addr)
            }
        };
        let live_addr = self
            .lock_live()
            .get(id)
            .and_then(|l| *l.addr.lock().unwrap_or_else(|p| p.into_inner()));
        let health = match state {
            InstanceState::Exited | InstanceState::Vanished => Health::Failed,
            InstanceState::Created => Health::Unknown,
            InstanceState::Running => self
                .lock_live()
                .get(id)
                .map_or(Health::Unknown, |l| *l.health.borrow()),
        };
        Ok(Observation {
            id: id.clone(),
            image: record.image()?,
            app: record.app.clone(),
            state,
            exit_code,
            health,
            addr: addr
                .or(live_addr)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            pid: None,
            listening: None,
            created: record.created(),
            labels: record.labels.clone(),
        })
    }

    async fn list(&self) -> Result<Vec<Observation>, ProviderError> {
        let dir = self.cfg.state.join("swarm");
        let mut out = Vec::new();
        let mut recorded = HashSet::new();
        let entries = std::fs::read_dir(&dir).map_err(ProviderError::io("read", &dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".json")
                .and_then(|n| InstanceId::new(n).ok())
            else {
                continue;
            };
            let record = match self.record(&id) {
                Ok(r) => r,
                Err(ProviderError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            recorded.insert(record.id.clone());
            self.adopt(&id, &record, true);
            match self.observe(&id).await {
                Ok(o) => out.push(o),
                Err(ProviderError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        // A service with this state's label and no record: a crashed start, or one made by
        // hand. It goes.
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_owned(),
            vec![format!("{LABEL_STATE}={}", self.state_label)],
        );
        let services = self
            .docker
            .list_services(Some(ListServicesOptions {
                filters: Some(filters),
                ..ListServicesOptions::default()
            }))
            .await
            .map_err(|e| engine_err("list kiln's services", e))?;
        let mut seen = HashSet::new();
        for s in services {
            let name = s
                .spec
                .as_ref()
                .and_then(|s| s.name.clone())
                .unwrap_or_default();
            let (Some(service), Ok(id)) = (s.id, InstanceId::new(&name)) else {
                continue;
            };
            if recorded.contains(&name) || self.record_path(&id).exists() {
                continue;
            }
            seen.insert(service.clone());
            let first = *self
                .unrecorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(service.clone())
                .or_insert_with(tokio::time::Instant::now);
            if first.elapsed() >= UNRECORDED_GRACE && !self.record_path(&id).exists() {
                tracing::warn!(service = %service, name = %name, "removing a service with kiln's labels that kiln did not record");
                self.remove_service(&id, &service).await?;
            }
        }
        self.unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s, _| seen.contains(s));
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn logs(&self, id: &InstanceId, from: u64) -> Result<LogChunk, ProviderError> {
        let record = self.record(id)?;
        let Some(service) = record.service else {
            return Ok(LogChunk {
                data: Vec::new(),
                next: 0,
            });
        };
        let stream = self.docker.service_logs(
            &service,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: "all".to_owned(),
                ..LogsOptions::default()
            }),
        );
        log_chunk(id, stream, from).await
    }

    async fn check_drift(&self, id: &InstanceId) -> Result<Option<DriftReport>, ProviderError> {
        let record = self.record(id)?;
        let findings = self.drift_findings(id, &record).await?;
        Ok(self.publish(id, findings))
    }

    fn drift_events(&self) -> broadcast::Receiver<DriftReport> {
        self.drift.subscribe()
    }

    async fn health(&self, id: &InstanceId) -> Result<watch::Receiver<Health>, ProviderError> {
        if let Some(live) = self.lock_live().get(id) {
            return Ok(live.health.clone());
        }
        let record = self.record(id)?;
        self.adopt(id, &record, true);
        self.lock_live()
            .get(id)
            .map(|l| l.health.clone())
            .ok_or_else(|| ProviderError::NotFound(id.clone()))
    }

    async fn wait(&self, id: &InstanceId) -> Result<Option<i32>, ProviderError> {
        loop {
            let o = match self.observe(id).await {
                Ok(o) => o,
                Err(ProviderError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            if matches!(o.state, InstanceState::Exited | InstanceState::Vanished) {
                return Ok(o.exit_code);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl crate::rescan::Rescan for SwarmProvider {
    fn interval(&self) -> Duration {
        self.cfg.rescan_interval
    }

    async fn pass(&self) {
        let ids: Vec<InstanceId> = self.lock_live().keys().cloned().collect();
        for id in ids {
            self.check(&id).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_name_becomes_a_valid_repository_component() {
        let d = Digest::of(b"x");
        let r = |app: &str| image_reference("10.0.0.1:5000", app, &d);
        assert_eq!(r("web"), format!("10.0.0.1:5000/kiln/web@{d}"));
        assert_eq!(r("Web_API"), format!("10.0.0.1:5000/kiln/web-api@{d}"));
        assert_eq!(r("web-"), format!("10.0.0.1:5000/kiln/web@{d}"));
        assert_eq!(r("--"), format!("10.0.0.1:5000/kiln/app@{d}"));
    }
}
