//! [`Engines`]: every provider one kiln state directory may use, seen as one [`Provider`].
//!
//! An app's `[target] provider` says where its instances run, so one daemon can run a
//! `local` app next to a `docker` one. `create` goes to the provider the spec's target
//! names; every other call goes to the provider that holds the instance (a docker instance
//! has its record under `docker/`, a local one under `instances/`). `list` and the drift
//! events merge both.
//!
//! Providers are brought up when first needed, so a host without runc can run docker apps and
//! a host without a Docker Engine can run local ones: the local provider is listed once it
//! created an instance or finds instances on record; the engine is connected at the first
//! docker instance, or at start when docker instances are on record (the engine's address is
//! remembered in `docker/engine`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kiln_spec::ProviderKind;
use tokio::sync::{OnceCell, broadcast, watch};

use crate::docker::{DockerConfig, DockerProvider};
use crate::image::ImageSource;
use crate::local::{LocalConfig, LocalProvider};
use crate::provider::{Provider, ProviderError};
use crate::swarm::{SwarmConfig, SwarmProvider};
use crate::types::{DriftReport, Health, InstanceId, InstanceSpec, LogChunk, Observation};

/// The local provider and the docker provider of one state directory, as one provider.
pub struct Engines {
    state: PathBuf,
    images: Arc<dyn ImageSource>,
    local: Arc<LocalProvider>,
    local_active: AtomicBool,
    docker: OnceCell<Arc<DockerProvider>>,
    swarm: OnceCell<Arc<SwarmProvider>>,
    /// `ADDR:PORT` of the daemon's image registry, which Swarm nodes pull from.
    registry: Arc<std::sync::OnceLock<String>>,
    drift_tx: broadcast::Sender<DriftReport>,
    /// kiln's init binary, for instances whose spec has `init` (both providers).
    init: Option<PathBuf>,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Where the engine's address is remembered, so a restarted kiln adopts docker instances
/// from the engine they run on.
fn engine_file(state: &std::path::Path) -> PathBuf {
    state.join("docker").join("engine")
}

fn has_entries(dir: &std::path::Path, suffix: &str) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| {
        entries.any(|e| {
            e.ok()
                .is_some_and(|e| e.file_name().to_string_lossy().ends_with(suffix))
        })
    })
}

impl Engines {
    /// The providers of `state`: the local one with `runtime`, the docker one connected now
    /// when docker instances are on record; `init` is the binary instances with `init` run
    /// under (kiln itself). Call inside a tokio runtime.
    pub async fn new(
        state: impl Into<PathBuf>,
        runtime: &str,
        images: Arc<dyn ImageSource>,
        init: Option<PathBuf>,
    ) -> Result<Arc<Engines>, ProviderError> {
        let state = state.into();
        let state = std::path::absolute(&state).map_err(ProviderError::io("resolve", &state))?;
        let mut local_cfg = LocalConfig::new(&state, runtime);
        local_cfg.init = init.clone();
        let local = LocalProvider::new(local_cfg, Arc::clone(&images))?;
        let (drift_tx, _) = broadcast::channel(256);
        let engines = Arc::new(Engines {
            local_active: AtomicBool::new(has_entries(&state.join("instances"), "")),
            state,
            images,
            local,
            docker: OnceCell::new(),
            swarm: OnceCell::new(),
            registry: Arc::default(),
            drift_tx,
            init,
        });
        forward(engines.local.drift_events(), engines.drift_tx.clone());
        if has_entries(&engines.state.join("docker"), ".json") {
            engines.docker(None).await?;
        }
        if has_entries(&engines.state.join("swarm"), ".json") {
            engines.swarm(None).await?;
        }
        Ok(engines)
    }

    /// Where Swarm nodes pull kiln's images from: `ADDR:PORT` of the daemon's registry
    /// endpoint. Set once; swarm instances are refused until it is.
    pub fn set_registry(&self, address: String) {
        let _ = self.registry.set(address);
    }

    /// The swarm provider on the manager at `host` (or the one this state directory used
    /// before, or `$DOCKER_HOST`), connected on first use; as for docker, one per state
    /// directory. Swarm instances on record connect it at the first listing.
    pub async fn swarm(&self, host: Option<&str>) -> Result<Arc<SwarmProvider>, ProviderError> {
        let file = self.state.join("swarm").join("engine");
        let remembered = std::fs::read_to_string(&file)
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty());
        let host = host.or(remembered.as_deref());
        let provider = self
            .swarm
            .get_or_try_init(|| async {
                let mut cfg = SwarmConfig::new(&self.state, host.map(str::to_owned));
                cfg.registry = Arc::clone(&self.registry);
                let p = SwarmProvider::connect(cfg, Arc::clone(&self.images)).await?;
                kiln_durable::write(&file, host.unwrap_or_default().as_bytes())
                    .map_err(ProviderError::io("write", &file))?;
                forward(p.drift_events(), self.drift_tx.clone());
                Ok::<_, ProviderError>(p)
            })
            .await?;
        let connected = std::fs::read_to_string(&file).unwrap_or_default();
        if let Some(h) = host
            && h != connected.trim()
        {
            return Err(ProviderError::Engine {
                what: format!("use the Swarm manager at {h}"),
                message: format!(
                    "this state directory's swarm instances are on the manager at {}; one \
                     manager per state directory",
                    connected.trim()
                ),
            });
        }
        Ok(Arc::clone(provider))
    }

    /// The docker provider, connected to `host` (or the engine this state directory used
    /// before, or `$DOCKER_HOST`, or the local socket) on first use. One engine per state
    /// directory: asking for another is an error.
    pub async fn docker(&self, host: Option<&str>) -> Result<Arc<DockerProvider>, ProviderError> {
        let remembered = std::fs::read_to_string(engine_file(&self.state))
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty());
        let host = host.or(remembered.as_deref());
        let provider = self
            .docker
            .get_or_try_init(|| async {
                let mut cfg = DockerConfig::new(&self.state, host.map(str::to_owned));
                cfg.init = self.init.clone();
                let p = DockerProvider::connect(cfg, Arc::clone(&self.images)).await?;
                let file = engine_file(&self.state);
                kiln_durable::write(&file, host.unwrap_or_default().as_bytes())
                    .map_err(ProviderError::io("write", &file))?;
                forward(p.drift_events(), self.drift_tx.clone());
                Ok::<_, ProviderError>(p)
            })
            .await?;
        let connected = std::fs::read_to_string(engine_file(&self.state)).unwrap_or_default();
        if let Some(h) = host
            && !connected.trim().is_empty()
            && connected.trim() != h
        {
            return Err(ProviderError::Engine {
                what: format!("use the engine at {h}"),
                message: format!(
                    "this kiln already runs instances on the engine at {}; one state directory \
                     uses one engine",
                    connected.trim()
                ),
            });
        }
        Ok(Arc::clone(provider))
    }

    /// The local provider (for its paths).
    pub fn local(&self) -> &Arc<LocalProvider> {
        &self.local
    }

    /// The provider that holds `id`.
    fn holder(&self, id: &InstanceId) -> Arc<dyn Provider> {
        if let Some(s) = self.swarm.get()
            && self.state.join("swarm").join(format!("{id}.json")).exists()
        {
            return Arc::clone(s) as Arc<dyn Provider>;
        }
        if let Some(d) = self.docker.get()
            && self
                .state
                .join("docker")
                .join(format!("{id}.json"))
                .exists()
        {
            return Arc::clone(d) as Arc<dyn Provider>;
        }
        Arc::clone(&self.local) as Arc<dyn Provider>
    }
}

/// Passes one provider's drift reports on to the merged channel.
fn forward(mut rx: broadcast::Receiver<DriftReport>, tx: broadcast::Sender<DriftReport>) {
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(report) => {
                    let _ = tx.send(report);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

#[async_trait]
impl Provider for Engines {
    fn name(&self) -> &'static str {
        "engines"
    }

    async fn create(&self, spec: InstanceSpec) -> Result<InstanceId, ProviderError> {
        match spec.target.provider {
            ProviderKind::Local => {
                self.local_active.store(true, Ordering::Relaxed);
                self.local.create(spec).await
            }
            ProviderKind::Docker => {
                let docker = self.docker(spec.target.docker_host.as_deref()).await?;
                docker.create(spec).await
            }
            ProviderKind::Swarm => {
                let swarm = self.swarm(spec.target.docker_host.as_deref()).await?;
                swarm.create(spec).await
            }
        }
    }

    async fn start(&self, id: &InstanceId) -> Result<(), ProviderError> {
        self.holder(id).start(id).await
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), ProviderError> {
        self.holder(id).stop(id, grace).await
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), ProviderError> {
        self.holder(id).destroy(id).await
    }

    async fn observe(&self, id: &InstanceId) -> Result<Observation, ProviderError> {
        self.holder(id).observe(id).await
    }

    async fn list(&self) -> Result<Vec<Observation>, ProviderError> {
        let mut out = Vec::new();
        if self.local_active.load(Ordering::Relaxed) {
            out.extend(self.local.list().await?);
        }
        if let Some(d) = self.docker.get() {
            out.extend(d.list().await?);
        }
        if let Some(s) = self.swarm.get() {
            out.extend(s.list().await?);
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn logs(&self, id: &InstanceId, from: u64) -> Result<LogChunk, ProviderError> {
        self.holder(id).logs(id, from).await
    }

    async fn check_drift(&self, id: &InstanceId) -> Result<Option<DriftReport>, ProviderError> {
        self.holder(id).check_drift(id).await
    }

    fn drift_events(&self) -> broadcast::Receiver<DriftReport> {
        self.drift_tx.subscribe()
    }

    async fn health(&self, id: &InstanceId) -> Result<watch::Receiver<Health>, ProviderError> {
        self.holder(id).health(id).await
    }

    async fn wait(&self, id: &InstanceId) -> Result<Option<i32>, ProviderError> {
        self.holder(id).wait(id).await
    }
}
