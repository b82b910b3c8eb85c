//! The docker provider: instances as containers on a Docker Engine, driven through its API
//! (bollard, version negotiated: Debian's Engine 20.10 speaks 1.41), never the `docker` CLI.
//!
//! - **Images without a registry**: when the engine lacks an instance's image (looked up by
//!   its config digest, which is the image ID an engine reports), kiln exports it from its
//!   own store as a docker-archive tagged `kiln.local/image:<manifest hex>` and loads it
//!   through the API, then checks the ID the engine reports is the config digest it built.
//! - **Containers as immutable instances**: read-only root, a size-capped tmpfs per
//!   `writable` path, `PORT`, the port published on 127.0.0.1 for the router, no restart
//!   policy, sealed (a non-root user, no new privileges, every capability dropped but the
//!   spec's `capabilities`, refused for a non-root user who could not hold them, the
//!   engine's default seccomp profile, which kiln never switches off unless the spec says
//!   `unconfined` and requires the engine to have, a pids limit, the OOM score), limits,
//!   labels (`container.rs`).
//! - **Drift**: filesystem changes outside `writable` (`/changes`), runtime settings that
//!   differ from the ones recorded right after create (`docker update`), a container removed
//!   or recreated behind kiln's back, and — from the engine's event stream — an `exec` into
//!   an instance, which taints it when `[target] exec = "taint"`.
//!
//! Layout under the state directory: `docker/<id>.json` is the record a new kiln adopts an
//! instance from (the container's ID and the settings it was created with); `docker/<id>.exec`
//! marks an instance tainted by an exec, so a restarted kiln still replaces it.
//!
//! **Invariant:** every container kiln creates carries the label `kiln.state=<this state
//! directory's id>`; a container with that label and no record (a crashed create, or one
//! made by hand) is removed by `list`.

pub(crate) mod container;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, EventMessage};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, ImportImageOptions, ListContainersOptions,
    ListImagesOptions, LogsOptions, RemoveContainerOptions, RemoveImageOptions,
    StopContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use kiln_spec::{ExecPolicy, HealthCheck, Seccomp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use crate::health::{HealthMachine, Liveness, monitor, prober_for};
use crate::image::{ImageSource, ResolvedImage};
use crate::local::record::{HealthRecord, ms};
use crate::ports::{self, allocate_port, local_addr};
use crate::provider::{Provider, ProviderError};
use crate::types::{
    Digest, DriftFinding, DriftReport, Health, InstanceId, InstanceSpec, InstanceState, LogChunk,
    Observation,
};

use self::container::{
    IMAGE_REPO, LABEL_INSTANCE, LABEL_STATE, Wanted, changed_settings, create_body, drifted_paths,
    image_tag, kiln_paths, settings,
};

/// How the docker provider is set up.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// kiln's state directory (records, and the temporary archives of images being loaded).
    pub state: PathBuf,
    /// The engine: `unix:///…`, `tcp://…`; `None` means `$DOCKER_HOST` or the local socket.
    pub host: Option<String>,
    /// Period of the full drift rescan that backs the event stream.
    pub rescan_interval: Duration,
    /// kiln's init (a static binary: kiln itself), bound read-only into containers whose
    /// spec has `init`; without it such an instance is refused. The engine must see the same
    /// path (a local engine, as for secrets).
    pub init: Option<PathBuf>,
}

impl DockerConfig {
    /// Defaults: the engine `$DOCKER_HOST` names (or the local socket), a rescan every 5 s.
    pub fn new(state: impl Into<PathBuf>, host: Option<String>) -> DockerConfig {
        DockerConfig {
            state: state.into(),
            host,
            rescan_interval: Duration::from_secs(5),
            init: None,
        }
    }
}

/// What the provider records about an instance (a storage format, so its own serde type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DockerRecord {
    version: u32,
    id: String,
    /// The engine's container ID: a container recreated by hand under the same name is not
    /// this one.
    container: String,
    app: String,
    /// The manifest digest kiln built.
    image: String,
    /// Also read by `ports::on_record`, so no provider gives the port to another instance.
    port: u16,
    writable: Vec<String>,
    health: Option<HealthRecord>,
    stop_grace_ms: u64,
    exec: String,
    created_unix_ms: u64,
    labels: BTreeMap<String, String>,
    /// The container's runtime settings as the engine reported them right after create.
    settings: BTreeMap<String, Value>,
    /// The container runs under kiln's init, whose mount point (`/.kiln/init`) is then no
    /// drift; absent in records written before it, which had none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    init: bool,
    /// Its secrets are bound at `/run/secrets`, whose mount point (and `/run`, when the image
    /// has none) the engine creates in the writable layer: no drift. Absent in records
    /// written before it, which reported that mount point as drift.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    secrets: bool,
}

impl DockerRecord {
    fn image(&self) -> Result<Digest, ProviderError> {
        Digest::parse(&self.image).map_err(|e| ProviderError::Record {
            path: PathBuf::from(format!("docker/{}.json", self.id)),
            message: e.to_string(),
        })
    }

    fn created(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.created_unix_ms)
    }
}

/// What kiln holds in memory about an instance it created or adopted.
struct Live {
    health: watch::Receiver<Health>,
    health_task: Option<AbortHandle>,
    /// `Some(code)` once the engine reported the container died.
    exit: watch::Sender<Option<Option<i32>>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(task) = &self.health_task {
            task.abort();
        }
    }
}

/// The docker provider.
pub struct DockerProvider {
    cfg: DockerConfig,
    docker: Docker,
    images: Arc<dyn ImageSource>,
    /// This state directory's id on the engine (`kiln.state` label).
    state_label: String,
    live: Mutex<HashMap<InstanceId, Live>>,
    /// Instances kiln is destroying: their disappearance is not drift.
    destroying: Mutex<HashSet<InstanceId>>,
    /// The findings last published per instance, so a finding is announced once.
    drift: crate::announce::Announcer,
    /// One image load at a time (two instances of a new release need it once).
    loading: tokio::sync::Mutex<()>,
    /// The engine's seccomp profile as its `SecurityOptions` name it (`default`, `builtin`,
    /// a path, `unconfined`); `None` when it has none. Sealed instances need one.
    seccomp_profile: Option<String>,
}

impl std::fmt::Debug for DockerProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerProvider")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

pub(crate) fn engine_err(what: impl std::fmt::Display, e: DockerError) -> ProviderError {
    ProviderError::Engine {
        what: what.to_string(),
        message: e.to_string(),
    }
}

pub(crate) fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(ms)
        .unwrap_or_default()
}

/// Reads an engine's log stream of instance `id` whole and returns it from byte `from`. The
/// engine rotates logs: an offset past the end means they were rotated, so it starts again.
pub(crate) async fn log_chunk(
    id: &InstanceId,
    mut stream: impl futures_util::Stream<Item = Result<bollard::container::LogOutput, DockerError>>
    + Unpin,
    from: u64,
) -> Result<LogChunk, ProviderError> {
    let mut all = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(out) => all.extend_from_slice(&out.into_bytes()),
            Err(e) if is_not_found(&e) => break,
            Err(e) => return Err(engine_err(format!("read the logs of {id}"), e)),
        }
    }
    let total = all.len() as u64;
    let from = if from > total { 0 } else { from };
    let start = usize::try_from(from).unwrap_or(0);
    Ok(LogChunk {
        data: all.get(start..).unwrap_or_default().to_vec(),
        next: total,
    })
}

/// The engine address `host` names, or `$DOCKER_HOST`, or the local socket.
pub(crate) fn engine_address(host: Option<&str>) -> String {
    host.map(str::to_owned)
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
}

/// `kiln doctor`'s check of the Docker Engine: its version and API when it answers; a
/// warning otherwise (only `provider = "docker"` needs one).
pub async fn engine_check(host: Option<&str>) -> crate::Check {
    let address = engine_address(host);
    let answer = match Docker::connect_with_host(&address) {
        Ok(d) => match d.negotiate_version().await {
            Ok(d) => d.version().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match answer {
        Ok(v) => crate::Check {
            name: "docker",
            status: crate::CheckStatus::Ok,
            detail: format!(
                "Docker Engine {} (API {}) at {address}",
                v.version.unwrap_or_default(),
                v.api_version.unwrap_or_default()
            ),
            fix: None,
        },
        Err(e) => crate::Check {
            name: "docker",
            status: crate::CheckStatus::Warn,
            detail: format!(
                "no Docker Engine answers at {address} ({e}); only provider = \"docker\" needs one"
            ),
            fix: Some(
                "apt-get install -y docker.io and start dockerd (or set DOCKER_HOST)".to_owned(),
            ),
        },
    }
}

impl DockerProvider {
    /// Connects to the engine, negotiates the API version, and starts following its events
    /// and the periodic drift rescan. Call inside a tokio runtime.
    pub async fn connect(
        cfg: DockerConfig,
        images: Arc<dyn ImageSource>,
    ) -> Result<Arc<DockerProvider>, ProviderError> {
        let mut cfg = cfg;
        cfg.state =
            std::path::absolute(&cfg.state).map_err(ProviderError::io("resolve", &cfg.state))?;
        let host = engine_address(cfg.host.as_deref());
        let docker = Docker::connect_with_host(&host)
            .map_err(|e| engine_err(format!("connect to the Docker Engine at {host}"), e))?
            .negotiate_version()
            .await
            .map_err(|e| engine_err(format!("reach the Docker Engine at {host}"), e))?;
        for dir in ["docker", "docker/tmp"] {
            crate::private::private_dir(&cfg.state.join(dir))?;
        }
        let info = docker
            .info()
            .await
            .map_err(|e| engine_err(format!("ask the Docker Engine at {host} about itself"), e))?;
        let seccomp_profile = engine_seccomp(&info.security_options.unwrap_or_default());
        let state_label = Digest::of(cfg.state.as_os_str().as_encoded_bytes())
            .short()
            .to_owned();
        let provider = Arc::new(DockerProvider {
            cfg,
            docker,
            images,
            state_label,
            live: Mutex::new(HashMap::new()),
            destroying: Mutex::new(HashSet::new()),
            drift: crate::announce::Announcer::new(),
            loading: tokio::sync::Mutex::new(()),
            seccomp_profile,
        });
        tokio::spawn(follow_events(Arc::downgrade(&provider)));
        tokio::spawn(crate::rescan::every_interval(Arc::downgrade(&provider)));
        Ok(provider)
    }

    /// The engine client (for the image gc and tests).
    pub fn engine(&self) -> &Docker {
        &self.docker
    }

    fn record_path(&self, id: &InstanceId) -> PathBuf {
        self.cfg.state.join("docker").join(format!("{id}.json"))
    }

    /// The tmpfs an instance's secrets are on, bound at `/run/secrets`.
    fn secrets_path(&self, id: &InstanceId) -> PathBuf {
        self.cfg.state.join("docker").join(format!("{id}.secrets"))
    }

    /// Mounts the instance's secrets tmpfs and writes them, owned by its user when the
    /// engine's `User` is numeric.
    fn write_secrets(
        &self,
        id: &InstanceId,
        dir: &std::path::Path,
        secrets: &[crate::types::Secret],
        user: &str,
    ) -> Result<(), ProviderError> {
        use crate::local::mounts::Mounter as _;
        std::fs::create_dir_all(dir).map_err(ProviderError::io("create", dir))?;
        let written = crate::local::mounts::KernelMounter
            .mount_tmpfs(dir, crate::secrets::TMPFS_SIZE)
            .map_err(|source| ProviderError::Mount {
                op: "mount tmpfs on",
                target: dir.to_path_buf(),
                source,
            })
            .and_then(|()| crate::secrets::write_dir(dir, secrets, numeric_owner(user)));
        if written.is_err() {
            let _ = self.remove_secrets(id);
        }
        written
    }

    /// Unmounts and removes an instance's secrets; nothing there is not an error.
    fn remove_secrets(&self, id: &InstanceId) -> Result<(), ProviderError> {
        use crate::local::mounts::Mounter as _;
        let dir = self.secrets_path(id);
        if !dir.exists() {
            return Ok(());
        }
        crate::local::mounts::KernelMounter
            .unmount(&dir)
            .map_err(|source| ProviderError::Mount {
                op: "unmount",
                target: dir.clone(),
                source,
            })?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::io("remove", &dir)(e)),
        }
    }

    fn taint_path(&self, id: &InstanceId) -> PathBuf {
        self.cfg.state.join("docker").join(format!("{id}.exec"))
    }

    fn record(&self, id: &InstanceId) -> Result<DockerRecord, ProviderError> {
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

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_destroying(&self, id: &InstanceId) -> bool {
        self.destroying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Makes sure the engine has `image`; returns what the store says of it (its config
    /// digest is the image ID on the engine).
    async fn ensure_image(&self, image: &Digest) -> Result<ResolvedImage, ProviderError> {
        let resolved = self
            .images
            .resolve(image)
            .map_err(|e| ProviderError::Image {
                digest: image.clone(),
                message: e.to_string(),
            })?;
        let id = resolved.config_digest.clone();
        if self.docker.inspect_image(id.as_str()).await.is_ok() {
            return Ok(resolved);
        }
        let _one = self.loading.lock().await;
        if self.docker.inspect_image(id.as_str()).await.is_ok() {
            return Ok(resolved);
        }
        let tmp = tempfile::Builder::new()
            .prefix("load-")
            .tempdir_in(self.cfg.state.join("docker/tmp"))
            .map_err(ProviderError::io("create temp dir in", &self.cfg.state))?;
        let archive = tmp.path().join("image.tar");
        let images = Arc::clone(&self.images);
        let (img, dest) = (image.clone(), archive.clone());
        let exported = tokio::task::spawn_blocking(move || {
            images
                .export_docker_archive(&img, &[image_tag(&img)], &dest)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|message| ProviderError::Image {
            digest: image.clone(),
            message: format!("export as a docker archive: {message}"),
        })?;
        if exported != id {
            return Err(ProviderError::Image {
                digest: image.clone(),
                message: format!("exported config {exported} is not the resolved {id}"),
            });
        }
        let file = tokio::fs::File::open(&archive)
            .await
            .map_err(ProviderError::io("open", &archive))?;
        let body = futures_util::stream::unfold(file, |mut file| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = bytes::BytesMut::with_capacity(1 << 20);
            match file.read_buf(&mut buf).await {
                Ok(0) => None,
                Ok(_) => Some((Ok::<_, std::io::Error>(buf.freeze()), file)),
                Err(e) => Some((Err(e), file)),
            }
        });
        let mut progress =
            self.docker
                .import_image_stream(ImportImageOptions::default(), body, None);
        while let Some(item) = progress.next().await {
            item.map_err(|e| ProviderError::Image {
                digest: image.clone(),
                message: format!("load into the Docker Engine: {e}"),
            })?;
        }
        let loaded =
            self.docker
                .inspect_image(id.as_str())
                .await
                .map_err(|e| ProviderError::Image {
                    digest: image.clone(),
                    message: format!("the engine does not show the loaded image {id}: {e}"),
                })?;
        if loaded.id.as_deref() != Some(id.as_str()) {
            return Err(ProviderError::Image {
                digest: image.clone(),
                message: format!(
                    "the engine reports image ID {}, kiln built {id}",
                    loaded.id.unwrap_or_default()
                ),
            });
        }
        Ok(resolved)
    }

    async fn inspect(
        &self,
        record: &DockerRecord,
    ) -> Result<Option<ContainerInspectResponse>, ProviderError> {
        match self.docker.inspect_container(&record.container, None).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine_err(format!("inspect instance {}", record.id), e)),
        }
    }

    /// Starts (once) what kiln follows for an instance: its exit, and its health once its
    /// container runs.
    fn adopt(&self, id: &InstanceId, record: &DockerRecord, running: bool, long_running: bool) {
        let mut live = self.lock_live();
        if let Some(l) = live.get(id)
            && (l.health_task.is_some() || !running)
        {
            return;
        }
        let exit = live
            .remove(id)
            .map(|mut l| {
                l.health_task.take();
                l.exit.clone()
            })
            .unwrap_or_else(|| watch::channel(None).0);
        let (health, health_task) = match (&record.health, running) {
            (Some(h), true) => {
                let check = HealthCheck::from(h);
                let prober = prober_for(&check, local_addr(record.port));
                let (tx, rx) = watch::channel(Health::Starting);
                let exited = exit.subscribe();
                let alive: Liveness = Arc::new(move || exited.borrow().is_none());
                let started = if long_running {
                    // An adopted instance may have been healthy for hours: no start period.
                    tokio::time::Instant::now()
                        .checked_sub(Duration::from_secs(86_400))
                        .unwrap_or_else(tokio::time::Instant::now)
                } else {
                    tokio::time::Instant::now()
                };
                let task = tokio::spawn(monitor(
                    HealthMachine::new(check, started),
                    prober,
                    alive,
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
                exit,
            },
        );
    }

    /// The full drift check of one instance.
    async fn drift_findings(
        &self,
        id: &InstanceId,
        record: &DockerRecord,
    ) -> Result<Vec<DriftFinding>, ProviderError> {
        let mut findings = Vec::new();
        if let Ok(command) = std::fs::read_to_string(self.taint_path(id)) {
            findings.push(DriftFinding::Exec { command });
        }
        let Some(c) = self.inspect(record).await? else {
            findings.push(DriftFinding::Vanished {
                what: format!(
                    "container {} (removed outside kiln)",
                    short_id(&record.container)
                ),
            });
            return Ok(findings);
        };
        for (name, expected, found) in changed_settings(&record.settings, &settings(&c)) {
            findings.push(DriftFinding::Setting {
                name,
                expected,
                found,
            });
        }
        let changes = match self.docker.container_changes(&record.container).await {
            Ok(c) => c.unwrap_or_default(),
            Err(e) if is_not_found(&e) => Vec::new(),
            Err(e) => return Err(engine_err(format!("list the changes of {id}"), e)),
        };
        let paths: Vec<String> = changes.into_iter().map(|c| c.path).collect();
        let expected = kiln_paths(&record.writable, record.init, record.secrets);
        for path in drifted_paths(&paths, &expected) {
            findings.push(DriftFinding::Write { path });
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

    /// One pass of the periodic rescan over every instance this process holds.
    async fn rescan(&self) {
        let ids: Vec<InstanceId> = self.lock_live().keys().cloned().collect();
        for id in ids {
            self.check(&id).await;
        }
    }

    /// Reacts to one engine event about one of kiln's containers.
    async fn on_event(self: &Arc<Self>, event: EventMessage) {
        let action = event.action.unwrap_or_default();
        let (container, attributes) = event
            .actor
            .map(|a| (a.id, a.attributes.unwrap_or_default()))
            .unwrap_or_default();
        let Some(id) = attributes
            .get(LABEL_INSTANCE)
            .and_then(|s| InstanceId::new(s).ok())
        else {
            return;
        };
        let verb = action.split(':').next().unwrap_or_default().trim();
        match verb {
            "die" => {
                let code = attributes.get("exitCode").and_then(|c| c.parse().ok());
                if let Some(l) = self.lock_live().get(&id) {
                    l.exit.send_replace(Some(code));
                }
            }
            "exec_create" | "exec_start" => {
                let Ok(record) = self.record(&id) else {
                    return;
                };
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
                // Let the exec finish, so the report names what it wrote too; the
                // instance is tainted either way.
                let exec_id = attributes.get("execID").cloned();
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    if let Some(exec_id) = exec_id {
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                        while tokio::time::Instant::now() < deadline {
                            match this.docker.inspect_exec(&exec_id).await {
                                Ok(e) if e.running == Some(true) => {}
                                _ => break,
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    this.check(&id).await;
                });
            }
            "update" | "rename" | "destroy" | "start" | "restart" => {
                let this = Arc::clone(self);
                tokio::spawn(async move { this.check(&id).await });
            }
            "create" => {
                // A kiln (this one, or `kiln test` on the same state) records a container it
                // creates within milliseconds; one still unrecorded after ADOPT_WINDOW was
                // made by hand with kiln's labels, and goes.
                let Some(container) = container else {
                    return;
                };
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep(ADOPT_WINDOW).await;
                    if this.record(&id).is_ok_and(|r| r.container == container) {
                        return;
                    }
                    tracing::warn!(container = %container, name = %id, "removing a container with kiln's labels that kiln did not create");
                    if let Err(e) = this.remove(&id, &container).await {
                        tracing::warn!(container = %container, error = %e, "cannot remove it");
                    }
                });
            }
            _ => {}
        }
    }

    /// Removes the container and the record, whatever their state.
    async fn remove(&self, id: &InstanceId, container: &str) -> Result<(), ProviderError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            link: false,
        };
        match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // Removal already under way (a second destroy): wait for it below.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(engine_err(format!("remove instance {id}"), e)),
        }
    }

    /// Removes the images kiln loaded into the engine that no container uses and that are
    /// not in `keep` (manifest digests). Returns the tags removed.
    pub async fn gc_images(&self, keep: &HashSet<Digest>) -> Result<Vec<String>, ProviderError> {
        let mut filters = HashMap::new();
        filters.insert("reference".to_owned(), vec![format!("{IMAGE_REPO}:*")]);
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                filters: Some(filters),
                ..ListImagesOptions::default()
            }))
            .await
            .map_err(|e| engine_err("list the engine's images", e))?;
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                ..ListContainersOptions::default()
            }))
            .await
            .map_err(|e| engine_err("list the engine's containers", e))?;
        let in_use: HashSet<String> = containers.into_iter().filter_map(|c| c.image_id).collect();
        let mut removed = Vec::new();
        for image in images {
            if in_use.contains(&image.id) {
                continue;
            }
            for tag in &image.repo_tags {
                let Some(hex) = tag.strip_prefix(&format!("{IMAGE_REPO}:")) else {
                    continue;
                };
                if keep
                    .iter()
                    .any(|d| d.hex() == hex || d.hex().starts_with(hex))
                {
                    continue;
                }
                match self
                    .docker
                    .remove_image(tag, None::<RemoveImageOptions>, None)
                    .await
                {
                    Ok(_) => removed.push(tag.clone()),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(engine_err(format!("remove image {tag}"), e)),
                }
            }
        }
        Ok(removed)
    }
}

/// `(uid, gid)` of a numeric docker `User` (`"1000"`, `"1000:1000"`); `None` for a name the
/// engine resolves.
fn numeric_owner(user: &str) -> Option<(u32, u32)> {
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// The seccomp profile an engine's `SecurityOptions` name (`name=seccomp,profile=default`);
/// `None` when seccomp is not among them.
pub(crate) fn engine_seccomp(options: &[String]) -> Option<String> {
    options.iter().find_map(|o| {
        let mut fields = o.split(',');
        (fields.next() == Some("name=seccomp")).then(|| {
            fields
                .find_map(|f| f.strip_prefix("profile="))
                .unwrap_or("default")
                .to_owned()
        })
    })
}

fn short_id(container: &str) -> &str {
    container.get(..12).unwrap_or(container)
}

/// Follows the engine's events about kiln's containers for as long as the provider lives,
/// reconnecting after an error.
async fn follow_events(provider: Weak<DockerProvider>) {
    loop {
        let Some(p) = provider.upgrade() else {
            return;
        };
        let mut filters = HashMap::new();
        filters.insert("type".to_owned(), vec!["container".to_owned()]);
        filters.insert(
            "label".to_owned(),
            vec![format!("{LABEL_STATE}={}", p.state_label)],
        );
        let mut events = p.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..EventsOptions::default()
        }));
        drop(p);
        while let Some(event) = events.next().await {
            let Some(p) = provider.upgrade() else {
                return;
            };
            match event {
                Ok(e) => p.on_event(e).await,
                Err(e) => {
                    tracing::warn!(error = %e, "the Docker Engine's event stream failed");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Whatever happened while the stream was down is found by a full check.
        if let Some(p) = provider.upgrade() {
            p.rescan().await;
        }
    }
}

/// How long after its `create` event a container with kiln's state label may go without a
/// record before the event follower takes it for one made by hand.
const ADOPT_WINDOW: Duration = Duration::from_secs(2);

/// How long a container with kiln's state label may exist without a record before `list`
/// takes it for the leftover of a crashed create, or one made by hand, and removes it.
const UNRECORDED_GRACE: Duration = Duration::from_secs(15);

fn state_of(c: &ContainerInspectResponse) -> (InstanceState, Option<i32>, Option<u32>) {
    let state = c.state.as_ref();
    let status = state.and_then(|s| s.status);
    let code = state
        .and_then(|s| s.exit_code)
        .and_then(|c| i32::try_from(c).ok());
    let pid = state
        .and_then(|s| s.pid)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0);
    match status {
        Some(ContainerStateStatusEnum::CREATED) => (InstanceState::Created, None, None),
        Some(
            ContainerStateStatusEnum::RUNNING
            | ContainerStateStatusEnum::PAUSED
            | ContainerStateStatusEnum::RESTARTING,
        ) => (InstanceState::Running, None, pid),
        _ => (InstanceState::Exited, code, None),
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn create(&self, spec: InstanceSpec) -> Result<InstanceId, ProviderError> {
        let id = InstanceId::generate(&spec.app);
        if spec.network != kiln_spec::Network::Kiln {
            return Err(ProviderError::Config {
                id,
                message: format!(
                    "[service] network = {:?} is for the local provider; on docker an instance \
                     is on the engine's bridge, published on 127.0.0.1 only",
                    spec.network.as_str()
                ),
            });
        }
        if spec.seccomp == Seccomp::Default {
            match self.seccomp_profile.as_deref() {
                Some(p) if p != "unconfined" => {}
                found => {
                    return Err(ProviderError::Config {
                        id,
                        message: format!(
                            "the Docker Engine applies no seccomp profile ({}), so a sealed \
                             instance cannot have its allowlist; run dockerd with seccomp, or \
                             weaken the spec explicitly with [service] seccomp = \"unconfined\"",
                            found.unwrap_or("none in its SecurityOptions")
                        ),
                    });
                }
            }
        }
        let resolved = self.ensure_image(&spec.image).await?;
        let image_id = resolved.config_digest.clone();
        let user = crate::user::docker_user(spec.user.as_deref(), resolved.config.user.as_deref())
            .and_then(|user| {
                crate::user::docker_capabilities(&user, &spec.capabilities).map(|()| user)
            })
            .map_err(|message| ProviderError::Config {
                id: id.clone(),
                message,
            })?;
        let port = match spec.port {
            Some(p) => p,
            None => allocate_port(&ports::on_record(&self.cfg.state)).map_err(|e| {
                ProviderError::Config {
                    id: id.clone(),
                    message: format!("no free port on 127.0.0.1: {e}"),
                }
            })?,
        };
        let secrets_dir = self.secrets_path(&id);
        if !spec.secrets.is_empty() {
            if let Some(s) = spec.secrets.iter().find(|s| s.expose_env) {
                return Err(ProviderError::Config {
                    id,
                    message: format!(
                        "secret {} has expose_env, but the Docker Engine keeps a container's \
                         environment on disk; read it from /run/secrets/{} instead",
                        s.name, s.name
                    ),
                });
            }
            self.write_secrets(&id, &secrets_dir, &spec.secrets, &user)?;
        }
        let image_argv: Vec<String> = resolved
            .config
            .entrypoint
            .iter()
            .chain(&resolved.config.cmd)
            .cloned()
            .collect();
        let init = match (spec.init, &self.cfg.init) {
            (false, _) => None,
            (true, Some(binary)) if spec.command.is_some() || !image_argv.is_empty() => {
                Some(binary.as_path())
            }
            (true, Some(_)) => {
                let _ = self.remove_secrets(&id);
                return Err(ProviderError::Config {
                    id,
                    message: "the image has no entrypoint or cmd and no command was given"
                        .to_owned(),
                });
            }
            (true, None) => {
                let _ = self.remove_secrets(&id);
                return Err(ProviderError::Config {
                    id,
                    message: "the instance runs under kiln's init, but this provider has no \
                              init binary"
                        .to_owned(),
                });
            }
        };
        let body = create_body(&Wanted {
            id: &id,
            spec: &spec,
            image_id: &image_id,
            port,
            state_label: &self.state_label,
            user: &user,
            secrets: (!spec.secrets.is_empty()).then_some(secrets_dir.as_path()),
            init,
            image_argv: &image_argv,
        });
        let created = match self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(id.to_string()),
                    platform: String::new(),
                }),
                body,
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let _ = self.remove_secrets(&id);
                return Err(engine_err(format!("create instance {id}"), e));
            }
        };
        let cleanup = |e: ProviderError| async {
            let _ = self.remove(&id, &created.id).await;
            let _ = self.remove_secrets(&id);
            e
        };
        let inspected = match self.docker.inspect_container(&created.id, None).await {
            Ok(c) => c,
            Err(e) => return Err(cleanup(engine_err(format!("inspect instance {id}"), e)).await),
        };
        let record = DockerRecord {
            version: 1,
            id: id.to_string(),
            container: created.id.clone(),
            app: spec.app.clone(),
            image: spec.image.to_string(),
            port,
            writable: spec.writable_paths(),
            health: spec.health.as_ref().map(HealthRecord::from),
            stop_grace_ms: ms(spec.stop_grace),
            exec: spec.target.exec.as_str().to_owned(),
            created_unix_ms: unix_ms(SystemTime::now()),
            labels: spec.labels.clone(),
            settings: settings(&inspected),
            init: spec.init,
            secrets: !spec.secrets.is_empty(),
        };
        let path = self.record_path(&id);
        let written = serde_json::to_vec_pretty(&record)
            .map_err(std::io::Error::other)
            .and_then(|bytes| kiln_durable::write(&path, &bytes));
        if let Err(e) = written {
            return Err(cleanup(ProviderError::io("write", &path)(e)).await);
        }
        self.adopt(&id, &record, false, false);
        Ok(id)
    }

    async fn start(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let record = self.record(id)?;
        let c = self
            .inspect(&record)
            .await?
            .ok_or_else(|| ProviderError::NotFound(id.clone()))?;
        if state_of(&c).0 != InstanceState::Created {
            return Err(ProviderError::InvalidState {
                id: id.clone(),
                action: "start",
                state: "started",
            });
        }
        self.docker
            .start_container(&record.container, None)
            .await
            .map_err(|e| engine_err(format!("start instance {id}"), e))?;
        self.adopt(id, &record, true, false);
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), ProviderError> {
        let record = self.record(id)?;
        let t = i32::try_from(grace.as_secs_f64().ceil() as u64).unwrap_or(i32::MAX);
        match self
            .docker
            .stop_container(
                &record.container,
                Some(StopContainerOptions {
                    t: Some(t),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 304: already stopped.
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(engine_err(format!("stop instance {id}"), e)),
        }
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), ProviderError> {
        self.destroying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        let result = async {
            match self.record(id) {
                Ok(r) => self.remove(id, &r.container).await?,
                Err(ProviderError::NotFound(_)) => self.remove(id, id.as_str()).await?,
                // An unreadable record: the container still goes, by name.
                Err(_) => self.remove(id, id.as_str()).await?,
            }
            self.remove_secrets(id)?;
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
        let (state, exit_code, pid) = match self.inspect(&record).await? {
            Some(c) => state_of(&c),
            None => (InstanceState::Vanished, None, None),
        };
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
            addr: local_addr(record.port),
            pid,
            listening: None,
            created: record.created(),
            labels: record.labels.clone(),
        })
    }

    async fn list(&self) -> Result<Vec<Observation>, ProviderError> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_owned(),
            vec![format!("{LABEL_STATE}={}", self.state_label)],
        );
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..ListContainersOptions::default()
            }))
            .await
            .map_err(|e| engine_err("list kiln's containers", e))?;
        let dir = self.cfg.state.join("docker");
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
            recorded.insert(record.container.clone());
            let obs = match self.observe(&id).await {
                Ok(o) => o,
                Err(ProviderError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            self.adopt(&id, &record, obs.state == InstanceState::Running, true);
            // Health as adoption left it.
            let obs = self.observe(&id).await.unwrap_or(obs);
            out.push(obs);
        }
        let now = SystemTime::now();
        for c in containers {
            let Some(cid) = c.id else { continue };
            if recorded.contains(&cid) {
                continue;
            }
            let age = c
                .created
                .and_then(|s| u64::try_from(s).ok())
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                .and_then(|t| now.duration_since(t).ok());
            if age.is_some_and(|a| a > UNRECORDED_GRACE) {
                let name = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_INSTANCE).cloned())
                    .unwrap_or_else(|| cid.clone());
                tracing::warn!(container = %cid, name = %name, "removing a container with kiln's labels that kiln did not create");
                if let Ok(id) = InstanceId::new(&name) {
                    self.remove(&id, &cid).await?;
                    self.remove_secrets(&id)?;
                }
            }
        }
        // Secrets mounted by a create that crashed before its record: nothing runs with them.
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".secrets")
                .and_then(|n| InstanceId::new(n).ok())
            else {
                continue;
            };
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            if !self.record_path(&id).exists() && age.is_some_and(|a| a > UNRECORDED_GRACE) {
                self.remove_secrets(&id)?;
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn logs(&self, id: &InstanceId, from: u64) -> Result<LogChunk, ProviderError> {
        let record = self.record(id)?;
        let stream = self.docker.logs(
            &record.container,
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
        let running = matches!(
            self.inspect(&record).await?.map(|c| state_of(&c).0),
            Some(InstanceState::Running)
        );
        self.adopt(id, &record, running, true);
        self.lock_live()
            .get(id)
            .map(|l| l.health.clone())
            .ok_or_else(|| ProviderError::NotFound(id.clone()))
    }

    async fn wait(&self, id: &InstanceId) -> Result<Option<i32>, ProviderError> {
        let record = self.record(id)?;
        let mut stream = self.docker.wait_container(
            &record.container,
            Some(WaitContainerOptions {
                condition: "not-running".to_owned(),
            }),
        );
        match stream.next().await {
            Some(Ok(r)) => Ok(i32::try_from(r.status_code).ok()),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => {
                Ok(i32::try_from(code).ok())
            }
            Some(Err(e)) if is_not_found(&e) => Ok(None),
            Some(Err(e)) => Err(engine_err(format!("wait for instance {id}"), e)),
            None => Ok(None),
        }
    }
}

impl crate::rescan::Rescan for DockerProvider {
    fn interval(&self) -> Duration {
        self.cfg.rescan_interval
    }

    async fn pass(&self) {
        self.rescan().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_s_seccomp_profile_is_read_from_its_security_options() {
        let opts = |o: &[&str]| o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            engine_seccomp(&opts(&["name=apparmor", "name=seccomp,profile=default"])).as_deref(),
            Some("default")
        );
        assert_eq!(
            engine_seccomp(&opts(&["name=seccomp,profile=unconfined"])).as_deref(),
            Some("unconfined")
        );
        assert_eq!(
            engine_seccomp(&opts(&["name=seccomp"])).as_deref(),
            Some("default")
        );
        assert_eq!(engine_seccomp(&opts(&["name=userns"])), None);
    }
}
