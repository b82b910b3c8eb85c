//! The local provider: instances on this host with an OCI runtime (runc) and overlayfs.
//!
//! Layout under the state directory:
//!
//! ```text
//! layers/sha256-<hex>/            a cached layer (overlay lower dir), shared read-only
//! layers/sha256-<hex>.tree.json   its metadata as unpacked (for drift)
//! layers/evicted/sha256-<hex>.<inode>[.tree.json]  a copy that failed verification, kept
//!                                 while instances created before still run on it
//! runc/                           the OCI runtime's --root: only kiln's containers
//! instances/<id>/instance.json    the record a new kiln adopts the instance from
//! instances/<id>/bundle/          config.json + rootfs (the overlay mount point)
//! instances/<id>/upper, work      the instance's overlay upper and work dirs
//! instances/<id>/accounts/        the bottom-most lower dir: `/etc/passwd`, `/etc/group`
//!                                 for an image without its own (`accounts`)
//! instances/<id>/logs/            output.log and its rotations
//! instances/<id>/{pid,started,stopped,exit}  lifecycle markers
//! ```
//!
//! **Invariant:** everything an instance owns is under `instances/<id>/` (plus its runc
//! state under `runc/<id>`), and `destroy` removes all of it in an order that is safe to
//! repeat after a crash at any point: process, runtime state, mounts, files.
//!
//! **Invariant:** `instances/`, `layers/` and `runc/` are `0700`, whatever the state
//! directory's mode: the layers keep images' owners and setuid bits, and the records, logs
//! and configs are the instances' business. Only the root of each overlay (upper dir, layer
//! root) is `0755`, because it becomes the instance's own `/`.
//!
//! This module does not decide when to replace an instance; it reports state, health and
//! drift, and the controller decides.

mod accounts;
mod bundle;
mod drift;
pub mod host;
mod layers;
mod logs;
pub mod mounts;
pub mod network;
pub(crate) mod record;
pub mod runc;
pub(crate) mod seccomp;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kiln_spec::{HealthCheck, Network};
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use crate::health::{HealthMachine, Liveness, monitor, prober_for};
use crate::image::ImageSource;
use crate::ports::{self, allocate_port};
use crate::private::private_dir;
use crate::provider::{Provider, ProviderError};
use crate::types::{
    Digest, DriftFinding, DriftReport, Health, InstanceId, InstancePaths, InstanceSpec,
    InstanceState, LogChunk, Observation,
};

use self::bundle::BundleInput;
pub(crate) use self::bundle::OOM_SCORE_ADJ;
use self::drift::{WatchedInstance, Watcher, config_finding, scan_upper};
use self::layers::{CachedLayer, InUse, LayerCache};
use self::logs::LogFiles;
use self::mounts::{KernelMounter, Mounter};
use self::record::{HealthRecord, InstanceRecord, ProcIdentity};
use self::runc::{OciRuntime, RuncCli};

/// How the local provider is set up.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// kiln's state directory.
    pub state: PathBuf,
    /// The OCI runtime binary (`[target] runtime`).
    pub runtime: String,
    /// Size at which an instance's log file is rotated.
    pub log_cap: u64,
    /// Rotated log files kept.
    pub log_keep: u32,
    /// Period of the full drift rescan that backs the inotify watches.
    pub rescan_interval: Duration,
    /// The host's container seccomp profile (containers/common format) that instances with
    /// `[service] seccomp = "default"` get; without it they do not start.
    pub seccomp_profile: PathBuf,
    /// The CNI plugins and network lists instances' own networks are made with.
    pub cni: network::Cni,
    /// kiln's init (a static binary: kiln itself), bound read-only into instances whose spec
    /// has `init`; without it such an instance is refused.
    pub init: Option<PathBuf>,
}

impl LocalConfig {
    /// Defaults: 10 MiB logs, 2 rotations, a rescan every 5 s, the seccomp profile where
    /// Debian installs it.
    pub fn new(state: impl Into<PathBuf>, runtime: impl Into<String>) -> LocalConfig {
        LocalConfig {
            state: state.into(),
            runtime: runtime.into(),
            log_cap: 10 << 20,
            log_keep: 2,
            rescan_interval: Duration::from_secs(5),
            seccomp_profile: PathBuf::from(seccomp::HOST_PROFILE),
            cni: network::Cni::default(),
            init: None,
        }
    }
}

/// What kiln holds in memory about an instance it created or adopted.
struct Live {
    health: watch::Receiver<Health>,
    health_task: Option<AbortHandle>,
    /// For instances whose runtime process this kiln spawned: `Some(code)` once it exited.
    exit: Option<watch::Receiver<Option<Option<i32>>>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(task) = &self.health_task {
            task.abort();
        }
    }
}

/// The local provider.
pub struct LocalProvider {
    cfg: LocalConfig,
    images: Arc<dyn ImageSource>,
    layers: LayerCache,
    mounter: Arc<dyn Mounter>,
    runtime: Arc<dyn OciRuntime>,
    controllers: host::Controllers,
    live: Mutex<HashMap<InstanceId, Live>>,
    drift_tx: broadcast::Sender<DriftReport>,
    watcher: Option<Arc<Watcher>>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl LocalProvider {
    /// A provider on the real kernel and the configured runtime binary. Must be called
    /// inside a tokio runtime: it starts the periodic drift rescan.
    pub fn new(
        cfg: LocalConfig,
        images: Arc<dyn ImageSource>,
    ) -> Result<Arc<LocalProvider>, ProviderError> {
        let root = std::path::absolute(cfg.state.join("runc"))
            .map_err(ProviderError::io("resolve", &cfg.state))?;
        let runtime = Arc::new(RuncCli {
            binary: cfg.runtime.clone(),
            root,
        });
        LocalProvider::with_parts(cfg, images, Arc::new(KernelMounter), runtime)
    }

    /// A provider with the given mounter and runtime (tests use fakes).
    pub fn with_parts(
        mut cfg: LocalConfig,
        images: Arc<dyn ImageSource>,
        mounter: Arc<dyn Mounter>,
        runtime: Arc<dyn OciRuntime>,
    ) -> Result<Arc<LocalProvider>, ProviderError> {
        // Mount points are compared with /proc/self/mountinfo, which lists absolute paths,
        // and runc resolves bundles against its own working directory: the state directory
        // must be absolute whatever the caller passed (`--state .kiln` is the default).
        cfg.state =
            std::path::absolute(&cfg.state).map_err(ProviderError::io("resolve", &cfg.state))?;
        for dir in ["instances", "layers", "runc"] {
            private_dir(&cfg.state.join(dir))?;
        }
        let (drift_tx, _) = broadcast::channel(256);
        let watcher = match Watcher::start(drift_tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable: drift is found by the rescan only");
                None
            }
        };
        let provider = Arc::new(LocalProvider {
            layers: LayerCache::new(cfg.state.join("layers")),
            controllers: host::cgroups().1,
            cfg,
            images,
            mounter,
            runtime,
            live: Mutex::new(HashMap::new()),
            drift_tx,
            watcher,
        });
        // Evicted layers whose last instance went while no kiln ran.
        provider.sweep_layers();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(crate::rescan::every_interval(Arc::downgrade(&provider)));
        }
        Ok(provider)
    }

    fn dir(&self, id: &InstanceId) -> PathBuf {
        self.cfg.state.join("instances").join(id.as_str())
    }

    /// Where an instance keeps its files.
    pub fn paths(&self, id: &InstanceId) -> InstancePaths {
        let dir = self.dir(id);
        InstancePaths {
            log: self.log_files(id).current(),
            dir,
        }
    }

    fn log_files(&self, id: &InstanceId) -> LogFiles {
        LogFiles::new(
            self.dir(id).join("logs"),
            self.cfg.log_cap,
            self.cfg.log_keep,
        )
    }

    fn record(&self, id: &InstanceId) -> Result<InstanceRecord, ProviderError> {
        let path = self.dir(id).join("instance.json");
        if !path.exists() {
            return Err(ProviderError::NotFound(id.clone()));
        }
        InstanceRecord::read(&path)
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime_err(&self, id: &InstanceId, f: runc::RuntimeFailure) -> ProviderError {
        ProviderError::Runtime {
            id: id.clone(),
            command: f.command,
            message: f.message,
        }
    }

    /// Makes everything an instance needs before it starts. Its network is made on a thread
    /// of its own meanwhile (the CNI plugins are processes that mostly wait), joined before
    /// the bundle is written; an error anywhere returns only once that thread is done, so
    /// the cleanup finds the network whole or absent.
    fn prepare(&self, id: &InstanceId, spec: &InstanceSpec) -> Result<(), ProviderError> {
        let dir = self.dir(id);
        private_dir(&dir)?;
        let own_network = spec.network != Network::Host;
        std::thread::scope(|s| {
            let attaching = own_network
                .then(|| s.spawn(|| self.cfg.cni.attach(id.as_str(), &dir, &spec.network)));
            self.prepare_in(id, spec, &dir, attaching)
        })
    }

    fn prepare_in(
        &self,
        id: &InstanceId,
        spec: &InstanceSpec,
        dir: &Path,
        attaching: Option<
            std::thread::ScopedJoinHandle<'_, Result<Ipv4Addr, network::NetworkError>>,
        >,
    ) -> Result<(), ProviderError> {
        let resolved = self
            .images
            .resolve(&spec.image)
            .map_err(|e| ProviderError::Image {
                digest: spec.image.clone(),
                message: e.to_string(),
            })?;
        let mut lower = Vec::new();
        let mut layer_roots = Vec::new();
        for layer in &resolved.layers {
            let ensured = self
                .layers
                .ensure(self.images.as_ref(), &spec.image, layer)?;
            if let (Some((copy, dir)), Some(w)) = (ensured.evicted, &self.watcher) {
                w.layer_moved(&copy, dir);
            }
            lower.push(ensured.dir);
            layer_roots.push(ensured.layer.root);
        }
        if lower.is_empty() {
            lower.push(self.layers.empty_dir()?);
        }
        // overlayfs lists the top-most layer first.
        lower.reverse();
        let own_network = spec.network != Network::Host;
        let port = match spec.port {
            Some(p) => p,
            // In its own namespace, the app's own port: nothing else listens there.
            None if own_network => spec.container_port.unwrap_or(DEFAULT_PORT),
            None => allocate_port(&ports::on_record(&self.cfg.state)).map_err(|e| {
                ProviderError::Config {
                    id: id.clone(),
                    message: format!("no free port on 127.0.0.1: {e}"),
                }
            })?,
        };
        let dir = dir.to_path_buf();
        // With secrets, the whole bundle (the secrets, and `config.json`, which holds the
        // exposed ones) is on a tmpfs: nothing of them reaches the disk.
        if !spec.secrets.is_empty() {
            let bundle = dir.join("bundle");
            fs::create_dir_all(&bundle).map_err(ProviderError::io("create", &bundle))?;
            self.mounter
                .mount_tmpfs(&bundle, BUNDLE_TMPFS)
                .map_err(|source| ProviderError::Mount {
                    op: "mount tmpfs on",
                    target: bundle.clone(),
                    source,
                })?;
        }
        let rootfs = dir.join("bundle/rootfs");
        for d in [
            rootfs.clone(),
            dir.join("upper"),
            dir.join("work"),
            dir.join("logs"),
        ] {
            fs::create_dir_all(&d).map_err(ProviderError::io("create", &d))?;
        }
        // The upper dir's mode is the mode of the instance's `/`: 0755 whatever kiln's
        // umask, or a non-root user in the instance could not reach its own files.
        let upper = dir.join("upper");
        fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(ProviderError::io("chmod", &upper))?;
        // Bottom-most, so the image's own account files win wherever it has them.
        lower.push(accounts::layer(
            &dir,
            &crate::user::minimal_accounts(spec.user.as_deref(), resolved.config.user.as_deref()),
        )?);
        // The root is mounted (read-only, nosuid, nodev) before the record is written: a
        // create that crashes in between leaves a directory without a record, which `list`
        // cleans up, mounts included.
        let paths = spec.writable_paths();
        let mut destinations = paths.clone();
        if !spec.secrets.is_empty() {
            destinations.push(crate::types::SECRETS_DIR.to_owned());
        }
        if spec.init {
            destinations.push(crate::types::INIT_DIR.to_owned());
        }
        self.mounter
            .mount_overlay(
                &lower,
                &dir.join("upper"),
                &dir.join("work"),
                &rootfs,
                &bundle::rootfs_mount_points(&destinations),
            )
            .map_err(|source| ProviderError::Mount {
                op: "mount overlay on",
                target: rootfs.clone(),
                source,
            })?;
        // The namespace (made meanwhile): the record of what to tear down (`network.json`)
        // is in the directory first, so `list` cleans up after a crash.
        let address = match attaching {
            Some(thread) => Some(
                thread
                    .join()
                    .map_err(|_| ProviderError::Config {
                        id: id.clone(),
                        message: "the thread making its network panicked".to_owned(),
                    })?
                    .map_err(|source| ProviderError::Network {
                        id: id.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let netns = own_network.then(|| network::netns_path(&dir));
        let config_err = |message: String| ProviderError::Config {
            id: id.clone(),
            message,
        };
        let init = match (spec.init, &self.cfg.init) {
            (false, _) => None,
            (true, Some(binary)) => Some(binary.as_path()),
            (true, None) => {
                return Err(config_err(
                    "the instance runs under kiln's init, but this provider has no init binary"
                        .to_owned(),
                ));
            }
        };
        let user = self
            .process_user(&rootfs, spec, &resolved.config)
            .map_err(config_err)?;
        let caps = bundle::capabilities(&user, &spec.capabilities).map_err(config_err)?;
        let secrets_dir = dir.join("bundle/secrets");
        let env = if spec.secrets.is_empty() {
            spec.env.clone()
        } else {
            crate::secrets::write_dir(&secrets_dir, &spec.secrets, Some((user.uid, user.gid)))?;
            with_exposed_secrets(&spec.env, &spec.secrets).map_err(config_err)?
        };
        let seccomp = self.seccomp(spec, &caps).map_err(config_err)?;
        let config = bundle::config_json(&BundleInput {
            id: id.as_str(),
            image: &resolved.config,
            command: spec.command.as_deref(),
            env: &env,
            port,
            writable: &spec.writable,
            memory: spec.memory,
            cpus: spec.cpus,
            pids: spec.pids,
            controllers: self.controllers,
            nofile: bundle::nofile_limit(),
            user: &user,
            capabilities: &caps,
            seccomp: seccomp.as_ref(),
            netns: netns.as_deref(),
            secrets: (!spec.secrets.is_empty()).then_some(secrets_dir.as_path()),
            init,
        })
        .map_err(config_err)?;
        if !spec.secrets.is_empty() {
            let salt = dir.join("bundle").join(drift::CONFIG_SALT);
            kiln_durable::write(&salt, crate::types::random_hex(32).as_bytes())
                .map_err(ProviderError::io("write", &salt))?;
        }
        let config_digest = drift::config_digest(&dir.join("bundle"), &config);
        let config_path = dir.join("bundle/config.json");
        kiln_durable::write(&config_path, &config)
            .map_err(ProviderError::io("write", &config_path))?;
        let record = InstanceRecord {
            version: 1,
            id: id.to_string(),
            app: spec.app.clone(),
            image: spec.image.to_string(),
            layers: resolved.layers.iter().map(ToString::to_string).collect(),
            port,
            writable: paths,
            env: spec.env.clone(),
            memory: spec.memory,
            cpus: spec.cpus,
            stop_grace_ms: record::ms(spec.stop_grace),
            health: spec.health.as_ref().map(HealthRecord::from),
            command: spec.command.clone(),
            config_digest: config_digest.to_string(),
            created_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(record::ms)
                .unwrap_or_default(),
            runtime: self.runtime.binary().to_owned(),
            labels: spec.labels.clone(),
            layer_roots,
            address,
            secrets: spec.secrets.iter().map(|s| s.name.clone()).collect(),
            init: spec.init,
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| ProviderError::Config {
            id: id.clone(),
            message: e.to_string(),
        })?;
        let record_path = dir.join("instance.json");
        kiln_durable::write(&record_path, &bytes)
            .map_err(ProviderError::io("write", &record_path))?;
        self.watch(id, &record);
        Ok(())
    }

    /// Who the instance's process runs as, with names looked up in the image's own account
    /// files (read inside the mounted root, never through a symlink out of it).
    fn process_user(
        &self,
        rootfs: &Path,
        spec: &InstanceSpec,
        image: &crate::image::ImageConfig,
    ) -> Result<crate::user::ProcessUser, String> {
        // Without a user to look up, the default needs no account files.
        let wanted = spec.user.is_some() || image.user.is_some();
        let read = |path: &str| -> Result<Option<String>, String> {
            if !wanted {
                return Ok(None);
            }
            mounts::read_in_root(rootfs, path, crate::user::ACCOUNT_FILE_CAP)
                .map_err(|e| format!("the image's {path}: {e}"))
        };
        let passwd = read("/etc/passwd")?;
        let group = read("/etc/group")?;
        let minimal = crate::user::minimal_accounts(spec.user.as_deref(), image.user.as_deref());
        crate::user::resolve(
            spec.user.as_deref(),
            image.user.as_deref(),
            crate::user::Accounts {
                passwd: passwd.as_deref(),
                group: group.as_deref(),
                minimal: passwd.as_deref() == Some(minimal.passwd.as_str()),
            },
        )
    }

    /// The seccomp filter for an instance whose bounding set is `caps`: the host's profile
    /// converted, or `None` when the spec says `unconfined`.
    fn seccomp(
        &self,
        spec: &InstanceSpec,
        caps: &HashSet<oci_spec::runtime::Capability>,
    ) -> Result<Option<oci_spec::runtime::LinuxSeccomp>, String> {
        if spec.seccomp == kiln_spec::Seccomp::Unconfined {
            return Ok(None);
        }
        let path = &self.cfg.seccomp_profile;
        let json = std::fs::read(path).map_err(|e| {
            format!(
                "no seccomp allowlist for a sealed instance: {}: {e}; install it (apt-get \
                 install -y {}) or weaken the spec explicitly with [service] seccomp = \
                 \"unconfined\"",
                path.display(),
                seccomp::HOST_PROFILE_PACKAGE
            )
        })?;
        let host = seccomp::Host::this().ok_or_else(|| {
            format!(
                "no seccomp architecture names for {}: set [service] seccomp = \"unconfined\"",
                std::env::consts::ARCH
            )
        })?;
        seccomp::from_profile(&json, &host, caps)
            .map(Some)
            .map_err(|e| format!("the seccomp profile {}: {e}", path.display()))
    }

    /// Starts the drift watches of an instance (once).
    fn watch(&self, id: &InstanceId, record: &InstanceRecord) {
        let Some(watcher) = &self.watcher else {
            return;
        };
        if watcher.is_watched(id) {
            return;
        }
        let dir = self.dir(id);
        let with_trees: Vec<(CachedLayer, PathBuf, layers::Tree)> = record
            .cached_layers()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(digest, root)| {
                let tree = self.layers.tree(&digest, root).ok()?;
                // The copy as its record says (a record older than eviction names none).
                let root = layers::root_inode(&tree);
                let dir = self.layers.locate(&digest, Some(root)).0;
                Some((CachedLayer { digest, root }, dir, tree))
            })
            .collect();
        watcher.watch_instance(
            id,
            WatchedInstance {
                upper: dir.join("upper"),
                bundle: dir.join("bundle"),
                mount_points: bundle::mount_points(&record.mount_destinations()),
                layers: with_trees.iter().map(|(c, _, _)| c.clone()).collect(),
                config_digest: record.config_digest(),
            },
            with_trees,
        );
    }

    /// Starts the health monitor of a running instance.
    fn start_health(
        &self,
        record: &InstanceRecord,
        alive: Liveness,
        started: tokio::time::Instant,
    ) -> (watch::Receiver<Health>, Option<AbortHandle>) {
        let Some(h) = &record.health else {
            let (_tx, rx) = watch::channel(Health::Unknown);
            return (rx, None);
        };
        let check = HealthCheck::from(h);
        let prober = prober_for(&check, record.addr());
        let (tx, rx) = watch::channel(Health::Starting);
        let task = tokio::spawn(monitor(
            HealthMachine::new(check, started),
            prober,
            alive,
            tx,
        ));
        (rx, Some(task.abort_handle()))
    }

    /// Adopts an instance a previous kiln process left: drift watches, and a health monitor
    /// if its process still runs.
    async fn adopt(&self, id: &InstanceId, record: &InstanceRecord) -> Result<(), ProviderError> {
        if self.lock_live().contains_key(id) {
            return Ok(());
        }
        self.watch(id, record);
        let state = self
            .runtime
            .state(id.as_str())
            .await
            .map_err(|f| self.runtime_err(id, f))?;
        let identity = state
            .filter(|s| s.status == "running")
            .and_then(|s| ProcIdentity::of(s.pid));
        let (health, task) = match identity {
            Some(ident) => {
                let alive: Liveness = Arc::new(move || ident.alive());
                // An adopted instance may have been healthy for hours: no start period.
                let started = tokio::time::Instant::now()
                    .checked_sub(Duration::from_secs(86_400))
                    .unwrap_or_else(tokio::time::Instant::now);
                self.start_health(record, alive, started)
            }
            None => {
                let (_tx, rx) = watch::channel(if self.dir(id).join("started").exists() {
                    Health::Failed
                } else {
                    Health::Unknown
                });
                (rx, None)
            }
        };
        self.lock_live().entry(id.clone()).or_insert(Live {
            health,
            health_task: task,
            exit: None,
        });
        Ok(())
    }

    /// Whether the process runs, per the runtime; with its pid.
    async fn running_pid(&self, id: &InstanceId) -> Result<Option<u32>, ProviderError> {
        let state = self
            .runtime
            .state(id.as_str())
            .await
            .map_err(|f| self.runtime_err(id, f))?;
        Ok(state
            .filter(|s| s.status == "running" || s.status == "created" || s.status == "paused")
            .map(|s| s.pid))
    }

    /// Waits up to `limit` for the instance's process to be gone.
    async fn wait_gone(&self, id: &InstanceId, limit: Duration) -> Result<bool, ProviderError> {
        let exit = self.lock_live().get(id).and_then(|l| l.exit.clone());
        if let Some(mut exit) = exit {
            return Ok(tokio::time::timeout(limit, exit.wait_for(Option::is_some))
                .await
                .is_ok());
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.running_pid(id).await? {
                None => return Ok(true),
                Some(pid) if ProcIdentity::of(pid).is_none() => return Ok(true),
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn exit_code(&self, id: &InstanceId) -> Option<Option<i32>> {
        if let Some(code) = self
            .lock_live()
            .get(id)
            .and_then(|l| l.exit.as_ref().and_then(|e| *e.borrow()))
        {
            return Some(code);
        }
        let text = fs::read_to_string(self.dir(id).join("exit")).ok()?;
        Some(text.trim().parse().ok())
    }

    /// The full drift check of one instance: upper dir, config digest, layers, vanished.
    async fn drift_findings(
        &self,
        id: &InstanceId,
        record: &InstanceRecord,
        verified_layers: &mut HashMap<(Digest, Option<u64>), layers::Changes>,
    ) -> Result<Vec<DriftFinding>, ProviderError> {
        let dir = self.dir(id);
        let upper = dir.join("upper");
        let mut findings: Vec<DriftFinding> =
            scan_upper(&upper, &bundle::mount_points(&record.mount_destinations()))
                .map_err(ProviderError::io("scan", &upper))?
                .into_iter()
                .map(|path| DriftFinding::Write { path })
                .collect();
        findings.extend(config_finding(&dir.join("bundle"), &record.config_digest()));
        for (layer, root) in record.cached_layers().unwrap_or_default() {
            let key = (layer.clone(), root);
            let changes = match verified_layers.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c = self.layers.verify(&layer, root)?;
                    verified_layers.insert(key, c.clone());
                    c
                }
            };
            for (path, change) in changes {
                findings.push(DriftFinding::Layer {
                    layer: layer.clone(),
                    path,
                    change,
                });
            }
        }
        let obs = self.observe(id).await?;
        if obs.state == InstanceState::Vanished {
            findings.push(DriftFinding::Vanished {
                what: "process (exited or removed without kiln stopping it)".to_owned(),
            });
        } else if obs.state == InstanceState::Running {
            let rootfs = dir.join("bundle/rootfs");
            let mounted = self
                .mounter
                .mounts_under(&rootfs)
                .map(|m| m.contains(&rootfs))
                .unwrap_or(true);
            if !mounted {
                findings.push(DriftFinding::Vanished {
                    what: format!("root filesystem mount {}", rootfs.display()),
                });
            }
        }
        Ok(findings)
    }

    fn publish(&self, id: &InstanceId, findings: Vec<DriftFinding>) -> Option<DriftReport> {
        match &self.watcher {
            Some(w) => {
                w.publish(id, findings.clone());
            }
            None if !findings.is_empty() => {
                let _ = self.drift_tx.send(DriftReport {
                    instance: id.clone(),
                    findings: findings.clone(),
                    at: SystemTime::now(),
                });
            }
            None => {}
        }
        let mut findings = findings;
        findings.sort_by_key(ToString::to_string);
        findings.dedup();
        (!findings.is_empty()).then(|| DriftReport {
            instance: id.clone(),
            findings,
            at: SystemTime::now(),
        })
    }

    /// One pass of the periodic rescan over every instance this process holds.
    async fn rescan(&self) {
        let ids: Vec<InstanceId> = self.lock_live().keys().cloned().collect();
        let mut verified = HashMap::new();
        for id in ids {
            let _ = self.log_files(&id).rotate_if_needed();
            let Ok(record) = self.record(&id) else {
                continue;
            };
            match self.drift_findings(&id, &record, &mut verified).await {
                Ok(findings) => {
                    self.publish(&id, findings);
                }
                Err(e) => tracing::warn!(instance = %id, error = %e, "drift rescan failed"),
            }
        }
    }

    /// Removes the evicted layer copies no instance record names any more. A failure is only
    /// logged: the copies wait for the next destroy or start, and nothing runs from them.
    fn sweep_layers(&self) {
        let instances = self.cfg.state.join("instances");
        let Ok(entries) = fs::read_dir(&instances) else {
            return;
        };
        let mut in_use = InUse::default();
        for entry in entries.flatten() {
            let path = entry.path().join("instance.json");
            if !path.exists() {
                continue;
            }
            let Ok(layers) = InstanceRecord::read(&path).and_then(|r| {
                r.cached_layers().map_err(|e| ProviderError::Record {
                    path: path.clone(),
                    message: e.to_string(),
                })
            }) else {
                // A record that cannot be read may name any copy: keep them all.
                return;
            };
            for (digest, root) in layers {
                match root {
                    Some(root) => in_use.copies.insert(CachedLayer { digest, root }),
                    None => in_use.any_copy_of.insert(digest),
                };
            }
        }
        match self.layers.sweep(&in_use) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "evicted layers no instance runs on removed"),
            Err(e) => tracing::warn!(error = %e, "cannot remove evicted layers"),
        }
    }

    /// Removes an instance's network, mounts and files (the part of destroy that needs no
    /// runtime). The network goes first: its record is what says how to tear it down.
    fn remove_files(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let dir = self.dir(id);
        // A network that cannot be torn down now (a plugin failing its `DEL`) keeps its
        // namespace and record for the next try; everything else, the secrets' tmpfs first
        // of all, goes anyway.
        let detached =
            self.cfg
                .cni
                .detach(id.as_str(), &dir)
                .map_err(|source| ProviderError::Network {
                    id: id.clone(),
                    source,
                });
        let keep = detached.is_err().then(|| network::netns_path(&dir));
        let rootfs = dir.join("bundle/rootfs");
        self.mounter
            .unmount(&rootfs)
            .map_err(|source| ProviderError::Mount {
                op: "unmount",
                target: rootfs.clone(),
                source,
            })?;
        // Anything else mounted below the instance (by hand, or by a runtime that leaked a
        // mount) goes too, deepest first.
        let mut others = self
            .mounter
            .mounts_under(&dir)
            .map_err(ProviderError::io("read mounts under", &dir))?;
        others.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        others.retain(|m| Some(m) != keep.as_ref());
        for m in others {
            self.mounter
                .unmount(&m)
                .map_err(|source| ProviderError::Mount {
                    op: "unmount",
                    target: m.clone(),
                    source,
                })?;
        }
        detached?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProviderError::Io {
                op: "remove",
                path: dir,
                source: e,
            }),
        }
    }
}

/// The size of the tmpfs an instance with secrets has its bundle on: `config.json` (with
/// the seccomp filter, tens of KiB) and the secrets (64 KiB each at most).
const BUNDLE_TMPFS: u64 = 16 << 20;

/// The service's environment plus the secrets exposed in it (text without NUL only: an
/// environment cannot carry anything else).
fn with_exposed_secrets(
    env: &std::collections::BTreeMap<String, String>,
    secrets: &[crate::types::Secret],
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = env.clone();
    for s in secrets.iter().filter(|s| s.expose_env) {
        let value = std::str::from_utf8(s.value.expose())
            .ok()
            .filter(|v| !v.contains('\0'))
            .ok_or_else(|| {
                format!(
                    "secret {} is not text without NUL, so it cannot be in the environment \
                     (expose_env); read it from {}/{}",
                    s.name,
                    crate::types::SECRETS_DIR,
                    s.name
                )
            })?;
        out.insert(s.name.clone(), value.to_owned());
    }
    Ok(out)
}

/// `PORT` in an instance with its own network when the spec names no port.
const DEFAULT_PORT: u16 = 8080;

/// How long an instance directory may exist without its record before `list` takes it for
/// the leftover of a crashed create (a create writes the record last, after unpacking the
/// image's layers, which takes seconds for large images).
const UNRECORDED_GRACE: Duration = Duration::from_secs(15);

/// How long `destroy` waits for an instance's process to go after SIGKILL before it sends
/// SIGKILL again.
const KILL_AGAIN_AFTER: Duration = Duration::from_millis(100);

fn touch(path: &Path) -> Result<(), ProviderError> {
    kiln_durable::write(path, b"").map_err(ProviderError::io("write", path))
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create(&self, spec: InstanceSpec) -> Result<InstanceId, ProviderError> {
        let id = InstanceId::generate(&spec.app);
        if let Err(e) = self.prepare(&id, &spec) {
            if let Some(w) = &self.watcher {
                w.unwatch_instance(&id);
            }
            if let Err(cleanup) = self.remove_files(&id) {
                tracing::warn!(instance = %id, error = %cleanup, "cleanup after a failed create");
            }
            return Err(e);
        }
        let (_tx, health) = watch::channel(Health::Unknown);
        self.lock_live().insert(
            id.clone(),
            Live {
                health,
                health_task: None,
                exit: None,
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &InstanceId) -> Result<(), ProviderError> {
        let record = self.record(id)?;
        let dir = self.dir(id);
        let started = dir.join("started");
        if started.exists() {
            return Err(ProviderError::InvalidState {
                id: id.clone(),
                action: "start",
                state: "started",
            });
        }
        // Not fsynced: it is on the start path, and losing it in a host crash only makes an
        // instance that also lost its process look `created` instead of `vanished`; both are
        // replaced by the controller.
        fs::write(&started, b"").map_err(ProviderError::io("write", &started))?;
        let logs = self.log_files(id);
        let log = logs
            .open_for_instance()
            .map_err(ProviderError::io("open", logs.current()))?;
        let t0 = tokio::time::Instant::now();
        let mut child = self
            .runtime
            .run(id.as_str(), &dir.join("bundle"), &dir.join("pid"), log)
            .map_err(|f| self.runtime_err(id, f))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let exit_file = dir.join("exit");
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => status.code().or_else(|| {
                    std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s)
                }),
                Err(_) => None,
            };
            if let Some(code) = code {
                // The directory may be gone already (destroyed): nothing to record then.
                let _ = kiln_durable::write(&exit_file, code.to_string().as_bytes());
            }
            exit_tx.send_replace(Some(code));
        });
        let exited = exit_rx.clone();
        let alive: Liveness = Arc::new(move || exited.borrow().is_none());
        let (health, task) = self.start_health(&record, alive, t0);
        self.lock_live().insert(
            id.clone(),
            Live {
                health,
                health_task: task,
                exit: Some(exit_rx),
            },
        );
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), ProviderError> {
        self.record(id)?;
        let stopped = self.dir(id).join("stopped");
        touch(&stopped)?;
        if self.wait_gone(id, Duration::ZERO).await? {
            return Ok(());
        }
        self.runtime
            .kill(id.as_str(), "TERM")
            .await
            .map_err(|f| self.runtime_err(id, f))?;
        if self.wait_gone(id, grace).await? {
            return Ok(());
        }
        self.runtime
            .kill(id.as_str(), "KILL")
            .await
            .map_err(|f| self.runtime_err(id, f))?;
        if self.wait_gone(id, Duration::from_secs(10)).await? {
            Ok(())
        } else {
            Err(ProviderError::Runtime {
                id: id.clone(),
                command: format!("{} kill {id} KILL", self.runtime.binary()),
                message: "the process did not exit 10 s after SIGKILL".to_owned(),
            })
        }
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), ProviderError> {
        if let Some(w) = &self.watcher {
            w.unwatch_instance(id);
        }
        let dir = self.dir(id);
        if dir.exists() {
            // Whatever happens next, this exit was kiln's doing, not drift.
            let _ = touch(&dir.join("stopped"));
        }
        let mut first_error = None;
        // `start` returns once `runc run` is spawned, before the container exists, and a kill
        // that finds no container succeeds: right after a start it may come too early, so it
        // is sent again until the process is gone (10 s at most, then `delete --force`).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut killing = true;
        loop {
            if killing && let Err(f) = self.runtime.kill(id.as_str(), "KILL").await {
                first_error.get_or_insert(self.runtime_err(id, f));
                killing = false;
            }
            match self.wait_gone(id, KILL_AGAIN_AFTER).await {
                Ok(true) => break,
                Ok(false) if tokio::time::Instant::now() < deadline => {}
                Ok(false) => break,
                Err(e) => {
                    first_error.get_or_insert(e);
                    break;
                }
            }
        }
        if let Err(f) = self.runtime.delete(id.as_str()).await {
            first_error.get_or_insert(self.runtime_err(id, f));
        }
        self.lock_live().remove(id);
        self.remove_files(id)?;
        self.sweep_layers();
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn observe(&self, id: &InstanceId) -> Result<Observation, ProviderError> {
        let record = self.record(id)?;
        let dir = self.dir(id);
        let pid = self.running_pid(id).await?;
        let exit_code = self.exit_code(id);
        let owned_running = self
            .lock_live()
            .get(id)
            .and_then(|l| l.exit.as_ref().map(|e| e.borrow().is_none()))
            .unwrap_or(false);
        let started = dir.join("started").exists();
        let state = if pid.is_some() {
            InstanceState::Running
        } else if !started {
            InstanceState::Created
        } else if exit_code.is_some() || dir.join("stopped").exists() {
            InstanceState::Exited
        } else if owned_running {
            // Launched; the runtime has not registered it yet.
            InstanceState::Running
        } else {
            InstanceState::Vanished
        };
        let health = match self.lock_live().get(id) {
            Some(l) => *l.health.borrow(),
            None => Health::Unknown,
        };
        let health = match state {
            InstanceState::Exited | InstanceState::Vanished => Health::Failed,
            InstanceState::Created => Health::Unknown,
            InstanceState::Running => health,
        };
        Ok(Observation {
            id: id.clone(),
            image: record.image().map_err(|e| ProviderError::Record {
                path: dir.join("instance.json"),
                message: e.to_string(),
            })?,
            app: record.app.clone(),
            state,
            exit_code: exit_code.flatten(),
            health,
            addr: record.addr(),
            // Only in its own namespace: the host's tables list every host socket.
            listening: match (state, health, pid) {
                (
                    InstanceState::Running,
                    Health::Starting | Health::Unhealthy | Health::Failed,
                    Some(pid),
                ) if record.address.is_some() => network::listening(pid).ok(),
                _ => None,
            },
            pid,
            created: record.created(),
            labels: record.labels.clone(),
        })
    }

    async fn list(&self) -> Result<Vec<Observation>, ProviderError> {
        let instances = self.cfg.state.join("instances");
        let entries = fs::read_dir(&instances).map_err(ProviderError::io("read", &instances))?;
        let mut known = HashSet::new();
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ProviderError::io("read", &instances))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(id) = InstanceId::new(&name) else {
                continue;
            };
            known.insert(name);
            if !entry.path().join("instance.json").exists() {
                // A create that crashed before its record was written: nothing runs from
                // it, so finish the cleanup it never got. A young one may be a create in
                // progress (in this process or another kiln on the same state): leave it.
                let age = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                if age.is_some_and(|a| a > UNRECORDED_GRACE) {
                    self.destroy(&id).await?;
                }
                continue;
            }
            // An instance destroyed while we list (its directory gone between the read_dir
            // and here) is simply no longer there.
            let record = match self.record(&id) {
                Ok(r) => r,
                Err(_) if !instances.join(id.as_str()).exists() => continue,
                Err(e) => return Err(e),
            };
            self.adopt(&id, &record).await?;
            match self.observe(&id).await {
                Ok(o) => out.push(o),
                Err(ProviderError::NotFound(_)) => continue,
                Err(e) if !instances.join(id.as_str()).exists() => {
                    let _ = e;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        // Runtime state with no instance directory is a destroy that crashed after removing
        // the files: remove the rest.
        let containers = self
            .runtime
            .list()
            .await
            .map_err(|f| ProviderError::Runtime {
                id: InstanceId::generate("list"),
                command: f.command,
                message: f.message,
            })?;
        for c in containers {
            if !known.contains(&c.id)
                && let Ok(id) = InstanceId::new(&c.id)
            {
                self.destroy(&id).await?;
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn logs(&self, id: &InstanceId, from: u64) -> Result<LogChunk, ProviderError> {
        self.record(id)?;
        let logs = self.log_files(id);
        let _ = logs.rotate_if_needed();
        logs.read(from)
            .map_err(ProviderError::io("read", logs.current()))
    }

    async fn check_drift(&self, id: &InstanceId) -> Result<Option<DriftReport>, ProviderError> {
        let record = self.record(id)?;
        let findings = self
            .drift_findings(id, &record, &mut HashMap::new())
            .await?;
        Ok(self.publish(id, findings))
    }

    fn drift_events(&self) -> broadcast::Receiver<DriftReport> {
        self.drift_tx.subscribe()
    }

    async fn health(&self, id: &InstanceId) -> Result<watch::Receiver<Health>, ProviderError> {
        if let Some(live) = self.lock_live().get(id) {
            return Ok(live.health.clone());
        }
        let record = self.record(id)?;
        self.adopt(id, &record).await?;
        self.lock_live()
            .get(id)
            .map(|l| l.health.clone())
            .ok_or_else(|| ProviderError::NotFound(id.clone()))
    }

    async fn wait(&self, id: &InstanceId) -> Result<Option<i32>, ProviderError> {
        self.record(id)?;
        let exit = self.lock_live().get(id).and_then(|l| l.exit.clone());
        if let Some(mut exit) = exit {
            let code = exit
                .wait_for(Option::is_some)
                .await
                .map(|c| c.flatten())
                .unwrap_or(None);
            return Ok(code);
        }
        loop {
            if let Some(code) = self.exit_code(id) {
                return Ok(code);
            }
            if self.running_pid(id).await?.is_none() {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl crate::rescan::Rescan for LocalProvider {
    fn interval(&self) -> Duration {
        self.cfg.rescan_interval
    }

    async fn pass(&self) {
        self.rescan().await;
    }
}
