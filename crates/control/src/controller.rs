//! The controller: the daemon's one owner of state. It holds the ledger, the provider and
//! the router, and runs the reconciler — observe the provider, ask the rollout state machine
//! ([`kiln_deploy::decide`]) what to do, persist its state and events, then act.
//!
//! **Invariant:** state is persisted before actions run, and every action is idempotent
//! (create is guarded by observation, destroy and route swaps can repeat), so a controller
//! killed at any point and started again converges by reconciling again.
//!
//! **API boundary:** no HTTP here; `api.rs` translates requests into these methods.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use kiln_deploy::{
    Action, Goal, Health as DHealth, InstanceObs, Millis, Observed, Phase, RolloutEvent,
    RolloutState, RouteTarget, StepMetrics, Window, decide,
};
use kiln_ledger::{Ledger, NewRelease};
use kiln_proxy::{AppConfig, ListenerConfig, RouteTable, Workers, WorkersConfig};
use kiln_runtime::{
    Digest, Health, InstanceId, InstanceSpec, InstanceState, Observation, Provider,
};
use serde::{Deserialize, Serialize};

use crate::config::ReleaseConfig;

/// The label that records which release an instance runs.
pub const RELEASE_LABEL: &str = "kiln.release";

/// How often the reconciler looks at every app.
pub const TICK: Duration = Duration::from_millis(100);

/// What can go wrong in a controller call; `api.rs` maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such app (or release).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what is happening (a rollout in progress, a lock).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] kiln_ledger::Error),
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] kiln_runtime::ProviderError),
    /// The router refused a listener or a table.
    #[error("router: {0}")]
    Router(String),
}

type Result<T> = std::result::Result<T, ControlError>;

/// The per-app document kept in the ledger's rollout table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AppDoc {
    release: u64,
    stable: Option<u64>,
    replicas: u32,
    state: RolloutState,
    /// The database schema the last successful migration left.
    #[serde(default)]
    schema: Option<LiveSchema>,
}

/// The schema a migration left live, and the oldest schema code may expect and still work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSchema {
    /// The schema version.
    pub schema: u32,
    /// Releases written for a schema older than this cannot run against it.
    pub compatible_from: u32,
    /// The release whose migration set it.
    pub release: u64,
}

/// The label that marks a migration's one-shot instance (not part of any release's count).
pub const ROLE_LABEL: &str = "kiln.role";

/// A migration's progress, shared between its task and the reconciler.
#[derive(Debug, Clone)]
enum Migration {
    Running,
    Done(std::result::Result<(), String>),
}

/// One app the controller runs.
struct AppCtl {
    proxy: Arc<kiln_proxy::App>,
    listen: SocketAddr,
    goal: Goal,
    config: ReleaseConfig,
    image: Digest,
    state: RolloutState,
    /// The table last published to the router.
    route: RouteTarget,
    /// The live database schema, when migrations set one.
    schema: Option<LiveSchema>,
    /// Why the router does not serve the app's address (it could not be bound when the
    /// daemon restarted); each reconcile pass tries again.
    unserved: Option<String>,
}

struct ListenerHandle {
    apps: Vec<Arc<kiln_proxy::App>>,
    /// The PEM files (certificate, key) its apps share, if it terminates TLS.
    tls: Option<(PathBuf, PathBuf)>,
    /// Served on every router thread; dropping it stops the listener.
    serving: kiln_proxy::Serving,
    /// A copy of its listening socket: the next listener for the address is built on it, so
    /// the socket stays open across the change (no connection refused).
    socket: std::net::TcpListener,
}

/// What the controller needs to start.
pub struct ControllerConfig {
    /// The state directory (`--state`).
    pub state_dir: PathBuf,
    /// The router's threads (`--router-threads`, `--router-pin`).
    pub router: WorkersConfig,
}

/// The daemon's controller.
pub struct Controller {
    ledger: Mutex<Ledger>,
    provider: Arc<dyn Provider>,
    apps: tokio::sync::Mutex<BTreeMap<String, AppCtl>>,
    listeners: tokio::sync::Mutex<BTreeMap<SocketAddr, ListenerHandle>>,
    /// The router's threads, which serve every listener.
    router: Workers,
    drift: Arc<Mutex<BTreeMap<InstanceId, String>>>,
    migrations: Arc<Mutex<BTreeMap<String, Migration>>>,
    /// The last listing of the provider, taken by `reconcile` (at most a tick old).
    observed: Mutex<Arc<Vec<Observation>>>,
    destroying: Arc<Mutex<BTreeSet<InstanceId>>>,
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn release_name(n: u64) -> String {
    format!("r{n}")
}

/// A release's status line for `kiln status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub id: String,
    /// Release it runs.
    pub release: Option<u64>,
    /// created / running / exited / vanished.
    pub state: String,
    /// unknown / starting / healthy / unhealthy / failed.
    pub health: String,
    /// Where it listens.
    pub addr: String,
    /// Age in milliseconds.
    pub age_ms: u64,
    /// Whether it is in the route.
    pub routed: bool,
    /// Drift found, if any.
    pub drift: Option<String>,
}

/// `kiln status APP` as data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppStatus {
    /// The app.
    pub app: String,
    /// The release taking traffic (after a completed rollout: the rolled-out one).
    pub live: Option<u64>,
    /// The release being (or last) rolled out.
    pub release: u64,
    /// The release before it.
    pub stable: Option<u64>,
    /// progressing / completed / aborted.
    pub phase: String,
    /// Why it aborted.
    pub reason: Option<String>,
    /// The strategy of the release being rolled out.
    pub strategy: String,
    /// Canary: 1-based step.
    pub step: Option<usize>,
    /// Waiting for `kiln promote`.
    pub awaiting_promotion: bool,
    /// Desired instances.
    pub replicas: u32,
    /// Percent of traffic per release.
    pub weights: BTreeMap<u64, u32>,
    /// Where the router listens.
    pub listen: String,
    /// Why the router does not serve `listen` (the address could not be bound when the daemon
    /// started); retried on each reconcile pass.
    pub unserved: Option<String>,
    /// The image of the release being rolled out.
    pub image: String,
    /// Its runtime configuration.
    pub config: ReleaseConfig,
    /// Every instance.
    pub instances: Vec<InstanceStatus>,
    /// The live database schema, when migrations set one.
    #[serde(default)]
    pub schema: Option<LiveSchema>,
}

/// What `apply` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// Manifest digest of a built (and, if the spec asks, tested) image.
    pub image: String,
    /// The runtime configuration.
    pub config: ReleaseConfig,
    /// Digest of the spec text.
    pub spec_digest: String,
    /// Git commit of the spec's tree.
    pub source_commit: Option<String>,
    /// Who applies.
    pub actor: String,
}

/// What a rollback did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackOutcome {
    /// The release that was live.
    pub from: u64,
    /// The release now live (or rolling out).
    pub to: u64,
    /// Whether the target was warm (a route swap) or is rolled out anew.
    pub warm: bool,
    /// Microseconds from the request to the route swap (warm only).
    pub switch_us: Option<u64>,
}

impl Controller {
    /// Opens the ledger in `state_dir`, adopts the provider's instances and restores every
    /// app (listeners included) from the ledger.
    pub async fn start(
        cfg: &ControllerConfig,
        provider: Arc<dyn Provider>,
    ) -> Result<Arc<Controller>> {
        let mut ledger = Ledger::open(&cfg.state_dir.join("ledger.db"))?;
        // This daemon is the only writer of its state directory: older locks are stale.
        ledger.clear_locks()?;
        let c = Arc::new(Controller {
            ledger: Mutex::new(ledger),
            provider,
            apps: tokio::sync::Mutex::new(BTreeMap::new()),
            listeners: tokio::sync::Mutex::new(BTreeMap::new()),
            router: Workers::start(cfg.router).map_err(|e| {
                ControlError::Router(format!("cannot start the router's threads: {e}"))
            })?,
            drift: Arc::new(Mutex::new(BTreeMap::new())),
            migrations: Arc::new(Mutex::new(BTreeMap::new())),
            observed: Mutex::new(Arc::new(Vec::new())),
            destroying: Arc::new(Mutex::new(BTreeSet::new())),
        });
        c.restore().await?;
        // Drift that happened while no daemon was watching is found by a full check now.
        for o in c.provider.list().await? {
            if let Ok(Some(report)) = c.provider.check_drift(&o.id).await {
                c.record_drift(&report).await;
            }
        }
        Ok(c)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads every app's document from the ledger and starts serving it.
    async fn restore(&self) -> Result<()> {
        let names = self.ledger().apps()?;
        for name in names {
            let doc = self.ledger().rollout(&name)?;
            let Some(doc) = doc else { continue };
            if doc.get("down").and_then(serde_json::Value::as_bool) == Some(true) {
                continue;
            }
            let doc: AppDoc = serde_json::from_value(doc).map_err(|e| {
                ControlError::Invalid(format!("stored state of app {name} is unreadable: {e}"))
            })?;
            let release = self.ledger().release(&name, doc.release)?.ok_or_else(|| {
                ControlError::NotFound(format!(
                    "release {} of {name} is not in the ledger",
                    doc.release
                ))
            })?;
            let config: ReleaseConfig = serde_json::from_value(release.body.config.clone())
                .map_err(|e| {
                    ControlError::Invalid(format!("release {name}#{}: {e}", doc.release))
                })?;
            let image = Digest::parse(&release.body.image)
                .map_err(|e| ControlError::Invalid(e.to_string()))?;
            let goal = Goal {
                release: doc.release,
                stable: doc.stable,
                replicas: doc.replicas,
                deploy: config.deploy_spec(),
            };
            // An address that cannot be bound now (another process took it while the daemon
            // was down) must not keep every other app down: the app is managed, and its
            // address is tried again on each reconcile pass.
            let proxy = router_app(&name, &config);
            let unserved = match self
                .attach(
                    config.route.listen,
                    Arc::clone(&proxy),
                    config.route.tls.clone(),
                )
                .await
            {
                Ok(()) => None,
                Err(e) => {
                    eprintln!("kiln: app {name}: {e}; retrying on each reconcile pass");
                    self.ledger().append(
                        &name,
                        "route.unserved",
                        &serde_json::json!({
                            "listen": config.route.listen.to_string(),
                            "error": e.to_string(),
                        }),
                        now_ms(),
                    )?;
                    Some(e.to_string())
                }
            };
            self.apps.lock().await.insert(
                name,
                AppCtl {
                    proxy,
                    listen: config.route.listen,
                    goal,
                    config,
                    image,
                    state: doc.state,
                    route: RouteTarget::default(),
                    schema: doc.schema,
                    unserved,
                },
            );
        }
        Ok(())
    }

    /// Serves `app` on `listen`, rebinding the address's listener with the apps that share
    /// it. The new listener is bound (with `SO_REUSEPORT`) before the old one stops, so no
    /// connection is refused during the change.
    async fn attach(
        &self,
        listen: SocketAddr,
        app: Arc<kiln_proxy::App>,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Result<()> {
        let mut listeners = self.listeners.lock().await;
        let mut apps: Vec<Arc<kiln_proxy::App>> = Vec::new();
        if let Some(h) = listeners.get(&listen) {
            apps = h.apps.clone();
            apps.retain(|a| a.name() != app.name());
            // One socket has one TLS configuration: an app may not switch it under the others.
            if !apps.is_empty() && h.tls != tls {
                let others: Vec<&str> = apps.iter().map(|a| a.name()).collect();
                return Err(ControlError::Invalid(format!(
                    "{} cannot share {listen} with {}: their [route] tls differs (apps on one \
                     address terminate TLS with the same files, or none do)",
                    app.name(),
                    others.join(", ")
                )));
            }
        }
        apps.push(app);
        self.rebind(&mut listeners, listen, apps, tls).await
    }

    async fn detach(&self, listen: SocketAddr, name: &str) -> Result<()> {
        let mut listeners = self.listeners.lock().await;
        let Some(h) = listeners.get(&listen) else {
            return Ok(());
        };
        let apps: Vec<Arc<kiln_proxy::App>> = h
            .apps
            .iter()
            .filter(|a| a.name() != name)
            .cloned()
            .collect();
        if apps.is_empty() {
            if let Some(h) = listeners.remove(&listen) {
                h.serving.stop();
            }
            return Ok(());
        }
        let tls = h.tls.clone();
        self.rebind(&mut listeners, listen, apps, tls).await
    }

    async fn rebind(
        &self,
        listeners: &mut BTreeMap<SocketAddr, ListenerHandle>,
        listen: SocketAddr,
        apps: Vec<Arc<kiln_proxy::App>>,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Result<()> {
        let mut cfg = ListenerConfig::new(listen);
        cfg.reuse_port = true;
        cfg.tls = tls
            .clone()
            .map(|(cert, key)| kiln_proxy::TlsFiles { cert, key });
        let listener = match listeners.get(&listen).map(|h| h.socket.try_clone()) {
            Some(socket) => {
                let socket = socket.map_err(|e| ControlError::Router(e.to_string()))?;
                kiln_proxy::Listener::bind_to(cfg, apps.clone(), socket).await
            }
            None => kiln_proxy::Listener::bind(cfg, apps.clone()).await,
        }
        .map_err(|e| ControlError::Router(e.to_string()))?;
        let socket = listener
            .socket_copy()
            .map_err(|e| ControlError::Router(e.to_string()))?;
        let serving = self
            .router
            .serve(listener)
            .map_err(|e| ControlError::Router(e.to_string()))?;
        let handle = ListenerHandle {
            apps,
            tls,
            serving,
            socket,
        };
        if let Some(old) = listeners.insert(listen, handle) {
            old.serving.stop();
        }
        Ok(())
    }

    /// Records a new release of `app` and starts rolling it out.
    pub async fn apply(&self, app: &str, req: ApplyRequest) -> Result<kiln_ledger::Release> {
        let image = Digest::parse(&req.image).map_err(|e| ControlError::Invalid(e.to_string()))?;
        req.config.route.check().map_err(ControlError::Invalid)?;
        let now = now_ms();
        let mut apps = self.apps.lock().await;
        let (stable, existing_listen) = match apps.get(app) {
            Some(a) => {
                if a.state.phase == Phase::Progressing {
                    return Err(ControlError::Conflict(format!(
                        "a rollout of {app} release {} is in progress; wait for it, or `kiln abort {app}`",
                        a.goal.release
                    )));
                }
                if a.config.route != req.config.route {
                    return Err(ControlError::Invalid(format!(
                        "[route] of {app} changed; `kiln down {app}` first to move it (a running app keeps its listener)"
                    )));
                }
                (live_release(a), Some(a.listen))
            }
            None => (None, None),
        };
        // A new app's address is bound before anything is recorded, so an address that
        // another process holds, or a host another app on it claims, fails the apply here
        // rather than the next daemon start.
        let fresh = match existing_listen {
            Some(_) => None,
            None => {
                let route = &req.config.route;
                // An app waiting for its address (taken while the daemon was down) keeps its
                // claim: the address is only checked against the apps it serves.
                if let Some((waiting, _)) = apps
                    .iter()
                    .find(|(_, a)| a.listen == route.listen && a.unserved.is_some())
                {
                    return Err(ControlError::Conflict(format!(
                        "{} is {waiting}'s, which waits to be served there; `kiln down {waiting}` \
                         first, or free the address",
                        route.listen
                    )));
                }
                let proxy = router_app(app, &req.config);
                self.attach(route.listen, Arc::clone(&proxy), route.tls.clone())
                    .await?;
                Some(proxy)
            }
        };
        let schema = apps.get(app).and_then(|a| a.schema);
        let started = self.start_rollout(app, &req, stable, schema, now);
        let (release, goal, state) = match started {
            Ok(started) => started,
            Err(e) => {
                if fresh.is_some()
                    && let Err(undo) = self.detach(req.config.route.listen, app).await
                {
                    eprintln!("kiln: apply of {app} failed, and unbinding its address too: {undo}");
                }
                return Err(e);
            }
        };
        if let Some(proxy) = fresh {
            apps.insert(
                app.to_owned(),
                AppCtl {
                    proxy,
                    listen: req.config.route.listen,
                    goal,
                    config: req.config,
                    image,
                    state,
                    route: RouteTarget::default(),
                    schema: None,
                    unserved: None,
                },
            );
        } else if let Some(a) = apps.get_mut(app) {
            a.goal = goal;
            a.config = req.config;
            a.image = image;
            a.state = state;
        }
        Ok(release)
    }

    /// Records `req` as the app's next release and its rollout as started: the release, the
    /// app's document, the event.
    fn start_rollout(
        &self,
        app: &str,
        req: &ApplyRequest,
        stable: Option<u64>,
        schema: Option<LiveSchema>,
        now: i64,
    ) -> Result<(kiln_ledger::Release, Goal, RolloutState)> {
        let holder = format!("apply by {}", req.actor);
        let release = {
            let mut ledger = self.ledger();
            ledger.lock(app, &holder, now)?;
            let recorded = ledger.record_release(
                app,
                NewRelease {
                    image: req.image.clone(),
                    config: serde_json::to_value(&req.config)
                        .map_err(|e| ControlError::Invalid(e.to_string()))?,
                    spec_digest: req.spec_digest.clone(),
                    source_commit: req.source_commit.clone(),
                    actor: req.actor.clone(),
                },
                now,
            );
            ledger.unlock(app, &holder)?;
            recorded?
        };
        let goal = Goal {
            release: release.number,
            stable,
            replicas: req.config.service.replicas,
            deploy: req.config.deploy_spec(),
        };
        let state = RolloutState::start(&goal, now);
        self.persist(app, &goal, &state, schema)?;
        self.ledger().append(
            app,
            "rollout.started",
            &serde_json::json!({
                "release": goal.release,
                "stable": goal.stable,
                "strategy": goal.deploy.strategy.name(),
                "image": req.image,
            }),
            now,
        )?;
        Ok((release, goal, state))
    }

    fn persist(
        &self,
        app: &str,
        goal: &Goal,
        state: &RolloutState,
        schema: Option<LiveSchema>,
    ) -> Result<()> {
        let doc = AppDoc {
            release: goal.release,
            stable: goal.stable,
            replicas: goal.replicas,
            state: state.clone(),
            schema,
        };
        let value = serde_json::to_value(&doc).map_err(|e| ControlError::Invalid(e.to_string()))?;
        self.ledger().put_rollout(app, &value, now_ms())?;
        Ok(())
    }

    /// One pass of the reconciler over every app.
    pub async fn reconcile(&self) -> Result<()> {
        // Listed before taking the apps lock, so API calls never wait on the runtime; only
        // this loop creates instances, so the listing cannot miss one half-created.
        let observed = self.provider.list().await?;
        *self.observed.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(observed.clone());
        let mut apps = self.apps.lock().await;
        {
            let listed: BTreeSet<&InstanceId> = observed.iter().map(|o| &o.id).collect();
            self.destroying
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|id| listed.contains(id));
        }
        let names: Vec<String> = apps.keys().cloned().collect();
        for name in names {
            if let Some(a) = apps.get_mut(&name) {
                if a.unserved.is_some() {
                    self.serve_again(&name, a).await?;
                }
                self.tick(&name, a, &observed).await?;
            }
        }
        Ok(())
    }

    /// Tries again to serve the address of an app whose address could not be bound.
    async fn serve_again(&self, name: &str, a: &mut AppCtl) -> Result<()> {
        let route = &a.config.route;
        match self
            .attach(route.listen, Arc::clone(&a.proxy), route.tls.clone())
            .await
        {
            Ok(()) => {
                a.unserved = None;
                self.ledger().append(
                    name,
                    "route.served",
                    &serde_json::json!({"listen": route.listen.to_string()}),
                    now_ms(),
                )?;
            }
            Err(e) => a.unserved = Some(e.to_string()),
        }
        Ok(())
    }

    /// Observe → decide → persist → act, for one app.
    async fn tick(&self, name: &str, a: &mut AppCtl, all: &[Observation]) -> Result<()> {
        let now = now_ms();
        let destroying = self
            .destroying
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let drift = self
            .drift
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mine: Vec<&Observation> = all
            .iter()
            .filter(|o| o.app == name && !destroying.contains(&o.id))
            // One-shot instances (migrations, `kiln run`, `kiln test`) are not part of any
            // release's count, and not the reconciler's to remove.
            .filter(|o| !o.labels.contains_key(ROLE_LABEL))
            .collect();
        self.fold_migration(name, a, now)?;
        let addrs: BTreeMap<String, SocketAddr> =
            mine.iter().map(|o| (o.id.to_string(), o.addr)).collect();
        let mut instances = Vec::new();
        for o in &mine {
            let Some(release) = release_of(o) else {
                // An instance kiln did not label is not kiln's: remove it.
                self.destroy(
                    name,
                    a,
                    o.id.clone(),
                    o.addr,
                    "not created by this kiln".into(),
                    None,
                );
                continue;
            };
            instances.push(InstanceObs {
                id: o.id.to_string(),
                release,
                health: health_of(o),
                drift: drift.get(&o.id).cloned(),
            });
        }
        let metrics = a.state.step_started_ms.map(|started| {
            let window = Duration::from_millis(u64::try_from(now - started).unwrap_or(0).max(1000));
            let snap = |release: Option<u64>| {
                release
                    .and_then(|r| a.proxy.snapshot(&release_name(r), window))
                    .map_or(
                        Window {
                            requests: 0,
                            errors: 0,
                            p99_ms: 0.0,
                        },
                        |s| Window {
                            requests: s.requests,
                            errors: s.errors,
                            p99_ms: s.p99.as_secs_f64() * 1000.0,
                        },
                    )
            };
            StepMetrics {
                canary: snap(Some(a.goal.release)),
                stable: snap(a.goal.stable),
            }
        });
        let releases_of: BTreeMap<String, u64> = instances
            .iter()
            .map(|i| (i.id.clone(), i.release))
            .collect();
        let obs = Observed {
            instances,
            route: a.route.clone(),
            metrics,
        };
        let d = decide(&a.goal, &a.state, &obs, now);
        if d.state != a.state {
            self.persist(name, &a.goal, &d.state, a.schema)?;
            a.state = d.state.clone();
        }
        for e in &d.events {
            let data = serde_json::to_value(e).unwrap_or_default();
            self.ledger().append(name, e.kind(), &data, now)?;
        }
        for action in d.actions {
            match action {
                Action::Migrate { release } => self.migrate(name, a, release),
                Action::Create { release, count } => {
                    for _ in 0..count {
                        self.create(name, a, release).await;
                    }
                }
                Action::Route(target) => {
                    let weights = target.weights.clone();
                    if weights != a.route.weights {
                        let _ = self.ledger().append(
                            name,
                            "route.changed",
                            &serde_json::json!({"weights": weights, "instances": target.members.len()}),
                            now,
                        );
                    }
                    self.publish(a, target, &addrs, &releases_of)?;
                }
                Action::Destroy { instance, reason } => {
                    if let (Ok(id), Some(addr)) = (InstanceId::new(&instance), addrs.get(&instance))
                    {
                        let release = obs
                            .instances
                            .iter()
                            .find(|i| i.id == instance)
                            .map(|i| i.release);
                        self.destroy(name, a, id, *addr, reason, release);
                    }
                }
            }
        }
        if matches!(
            d.events.last(),
            Some(RolloutEvent::Completed { .. } | RolloutEvent::Aborted { .. })
        ) {
            a.state.awaiting_promotion = false;
        }
        Ok(())
    }

    async fn create(&self, name: &str, a: &AppCtl, release: u64) {
        let mut spec = InstanceSpec {
            image: a.image.clone(),
            app: name.to_owned(),
            env: a.config.service.env.clone(),
            writable: a.config.service.writable.clone(),
            memory: a.config.service.memory,
            cpus: a.config.service.cpus,
            stop_grace: Duration::from_millis(a.config.service.stop_grace_ms),
            health: Some(a.config.health()),
            port: None,
            container_port: Some(a.config.service.port),
            command: None,
            labels: BTreeMap::new(),
            target: a.config.target(),
        };
        spec.labels
            .insert(RELEASE_LABEL.to_owned(), release.to_string());
        let outcome = match self.provider.create(spec).await {
            Ok(id) => match self.provider.start(&id).await {
                Ok(()) => Ok(id),
                Err(e) => {
                    let _ = self.provider.destroy(&id).await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        let now = now_ms();
        let (kind, data) = match outcome {
            Ok(id) => (
                "instance.created",
                serde_json::json!({"instance": id.to_string(), "release": release}),
            ),
            Err(e) => (
                "instance.create_failed",
                serde_json::json!({"release": release, "error": e.to_string()}),
            ),
        };
        // A failure to record is retried by the next tick's observation; nothing to undo.
        let _ = self.ledger().append(name, kind, &data, now);
    }

    /// Swaps the router's table to `target` (one atomic swap).
    fn publish(
        &self,
        a: &mut AppCtl,
        target: RouteTarget,
        addrs: &BTreeMap<String, SocketAddr>,
        releases_of: &BTreeMap<String, u64>,
    ) -> Result<()> {
        let mut releases = Vec::new();
        for (release, weight) in &target.weights {
            let members: Vec<SocketAddr> = target
                .members
                .iter()
                .filter(|m| releases_of.get(*m) == Some(release))
                .filter_map(|m| addrs.get(m).copied())
                .collect();
            releases.push(kiln_proxy::Release::new(
                release_name(*release),
                *weight,
                &members,
            ));
        }
        let table = RouteTable::new(releases).map_err(|e| ControlError::Router(e.to_string()))?;
        a.proxy.set_route(&table);
        a.route = target;
        Ok(())
    }

    /// Moves a finished migration's outcome into the rollout state (and the live schema).
    fn fold_migration(&self, name: &str, a: &mut AppCtl, now: Millis) -> Result<()> {
        let done = {
            let mut m = self
                .migrations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match m.get(name) {
                Some(Migration::Done(_)) => m.remove(name),
                _ => None,
            }
        };
        let Some(Migration::Done(outcome)) = done else {
            return Ok(());
        };
        let release = a.goal.release;
        match outcome {
            Ok(()) => {
                a.state.migrated = true;
                if let Some(m) = &a.config.deploy.migrate {
                    a.schema = Some(LiveSchema {
                        schema: m.schema,
                        compatible_from: m.compatible_from,
                        release,
                    });
                    self.ledger().append(
                        name,
                        "migration.completed",
                        &serde_json::json!({"release": release, "schema": m.schema, "compatible_from": m.compatible_from}),
                        now,
                    )?;
                }
            }
            Err(why) => {
                self.ledger().append(
                    name,
                    "migration.failed",
                    &serde_json::json!({"release": release, "error": why}),
                    now,
                )?;
                a.state.migration_failed = Some(why);
            }
        }
        self.persist(name, &a.goal, &a.state, a.schema)
    }

    /// Starts `[deploy.migrate]` in a one-shot instance of `release`, unless one runs.
    fn migrate(&self, name: &str, a: &AppCtl, release: u64) {
        let Some(m) = a.config.deploy.migrate.clone() else {
            return;
        };
        {
            let mut running = self
                .migrations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if running.contains_key(name) {
                return;
            }
            running.insert(name.to_owned(), Migration::Running);
        }
        let mut labels = BTreeMap::new();
        labels.insert(RELEASE_LABEL.to_owned(), release.to_string());
        labels.insert(ROLE_LABEL.to_owned(), "migration".to_owned());
        let spec = InstanceSpec {
            image: a.image.clone(),
            app: name.to_owned(),
            env: a.config.service.env.clone(),
            writable: a.config.service.writable.clone(),
            memory: a.config.service.memory,
            cpus: a.config.service.cpus,
            stop_grace: Duration::from_millis(a.config.service.stop_grace_ms),
            health: None,
            port: None,
            container_port: Some(a.config.service.port),
            command: Some(m.command.clone()),
            labels,
            target: a.config.target(),
        };
        let deadline = Duration::from_millis(a.config.deploy.progress_deadline_ms);
        let provider = Arc::clone(&self.provider);
        let migrations = Arc::clone(&self.migrations);
        let app = name.to_owned();
        let _ = self.ledger().append(
            name,
            "migration.started",
            &serde_json::json!({"release": release, "command": m.command, "schema": m.schema}),
            now_ms(),
        );
        tokio::spawn(async move {
            let outcome = run_once(provider.as_ref(), spec, deadline).await;
            migrations
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(app, Migration::Done(outcome));
        });
    }

    /// Drains, stops and destroys an instance in the background.
    fn destroy(
        &self,
        name: &str,
        a: &AppCtl,
        id: InstanceId,
        addr: SocketAddr,
        reason: String,
        release: Option<u64>,
    ) {
        {
            let mut d = self
                .destroying
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !d.insert(id.clone()) {
                return;
            }
        }
        let provider = Arc::clone(&self.provider);
        let proxy = Arc::clone(&a.proxy);
        let destroying = Arc::clone(&self.destroying);
        let drift = Arc::clone(&self.drift);
        let grace = Duration::from_millis(a.config.service.stop_grace_ms);
        let app = name.to_owned();
        let event =
            serde_json::json!({"instance": id.to_string(), "release": release, "reason": reason});
        let kind = if reason.contains("drifted") || reason.contains("failed") {
            "instance.replaced"
        } else {
            "instance.destroyed"
        };
        let _ = self.ledger().append(&app, kind, &event, now_ms());
        tokio::spawn(async move {
            let outcome = proxy.drain(addr).await;
            if outcome != kiln_proxy::DrainOutcome::StillRouted {
                let _ = provider.stop(&id, grace).await;
                let _ = provider.destroy(&id).await;
            }
            drift
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            if outcome == kiln_proxy::DrainOutcome::StillRouted {
                // Not destroyed: let a later decision see it again.
                destroying
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
            }
            // Otherwise the id stays in `destroying` until a listing no longer shows it
            // (`reconcile` prunes it), so a listing taken before the destroy finished cannot
            // bring it back into a decision.
        });
    }
}

/// The release an instance runs, from its label.
fn release_of(o: &Observation) -> Option<u64> {
    o.labels.get(RELEASE_LABEL).and_then(|v| v.parse().ok())
}

/// How long an instance may stay only *created* (never started). The reconciler creates and
/// starts within one tick and lists between ticks, so a created instance in a listing was
/// left by a controller killed in between and will never start by itself; the grace only
/// absorbs clock and file-system noise.
const CREATED_LIMIT: Duration = Duration::from_secs(2);

fn health_of(o: &Observation) -> DHealth {
    let stuck = o.state == InstanceState::Created
        && SystemTime::now()
            .duration_since(o.created)
            .is_ok_and(|age| age > CREATED_LIMIT);
    match (o.state, o.health) {
        _ if stuck => DHealth::Failed,
        (InstanceState::Exited | InstanceState::Vanished, _) => DHealth::Failed,
        (_, Health::Healthy) => DHealth::Healthy,
        (_, Health::Unhealthy) => DHealth::Unhealthy,
        (_, Health::Failed) => DHealth::Failed,
        (_, Health::Unknown | Health::Starting) => DHealth::Starting,
    }
}

/// The release live now: the rolled-out one once complete, the stable one otherwise.
fn live_release(a: &AppCtl) -> Option<u64> {
    match a.state.phase {
        Phase::Completed { .. } => Some(a.goal.release),
        Phase::Aborted { .. } | Phase::Progressing => a.goal.stable,
    }
}

impl Controller {
    /// Runs the reconciler until `stop` resolves: a pass every [`TICK`], and drift reports
    /// recorded as they arrive.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut drift = self.provider.drift_events();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                report = drift.recv() => {
                    if let Ok(report) = report {
                        self.record_drift(&report).await;
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.reconcile().await {
                        eprintln!("kiln: reconcile: {e}");
                    }
                }
            }
        }
    }

    async fn record_drift(&self, report: &kiln_runtime::DriftReport) {
        let findings: Vec<String> = report.findings.iter().map(ToString::to_string).collect();
        let summary = findings.join("; ");
        let first = self
            .drift
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(report.instance.clone(), summary.clone())
            .is_none();
        if !first {
            return;
        }
        let app = match self.provider.observe(&report.instance).await {
            Ok(o) => o.app,
            Err(_) => return,
        };
        let _ = self.ledger().append(
            &app,
            "drift.detected",
            &serde_json::json!({"instance": report.instance.to_string(), "findings": findings}),
            now_ms(),
        );
    }

    /// Every app the controller runs.
    pub async fn app_names(&self) -> Vec<String> {
        self.apps.lock().await.keys().cloned().collect()
    }

    /// `kiln status APP`.
    pub async fn status(&self, app: &str) -> Result<AppStatus> {
        let observed = self.last_observed().await?;
        let apps = self.apps.lock().await;
        let a = apps
            .get(app)
            .ok_or_else(|| ControlError::NotFound(format!("no app named {app} is running")))?;
        let drift = self
            .drift
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let now = SystemTime::now();
        let instances = observed
            .iter()
            .filter(|o| o.app == app)
            .map(|o| InstanceStatus {
                id: o.id.to_string(),
                release: release_of(o),
                state: o.state.as_str().to_owned(),
                health: o.health.as_str().to_owned(),
                addr: o.addr.to_string(),
                age_ms: now
                    .duration_since(o.created)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                routed: a.route.members.contains(&o.id.to_string()),
                drift: drift.get(&o.id).cloned(),
            })
            .collect();
        let (phase, reason) = match &a.state.phase {
            Phase::Progressing => ("progressing", None),
            Phase::Completed { .. } => ("completed", None),
            Phase::Aborted { reason, .. } => ("aborted", Some(reason.clone())),
        };
        Ok(AppStatus {
            app: app.to_owned(),
            live: live_release(a),
            release: a.goal.release,
            stable: a.goal.stable,
            phase: phase.to_owned(),
            reason,
            strategy: a.goal.deploy.strategy.name().to_owned(),
            step: matches!(a.goal.deploy.strategy, kiln_spec::Strategy::Canary { .. })
                .then_some(a.state.step + 1),
            awaiting_promotion: a.state.awaiting_promotion,
            replicas: a.goal.replicas,
            weights: a.route.weights.clone(),
            listen: a.listen.to_string(),
            unserved: a.unserved.clone(),
            image: a.image.to_string(),
            config: a.config.clone(),
            instances,
            schema: a.schema,
        })
    }

    /// `kiln rollback APP [--to N]`: a route swap when the target's instances are warm,
    /// otherwise a new rollout of the target's image and configuration. Never rebuilds.
    pub async fn rollback(
        &self,
        app: &str,
        to: Option<u64>,
        force: bool,
        actor: &str,
    ) -> Result<RollbackOutcome> {
        let started = std::time::Instant::now();
        let mut apps = self.apps.lock().await;
        // The reconciler's last listing: a rollback must not wait for the runtime.
        let observed: Arc<Vec<Observation>> =
            Arc::clone(&self.observed.lock().unwrap_or_else(PoisonError::into_inner));
        let a = apps
            .get_mut(app)
            .ok_or_else(|| ControlError::NotFound(format!("no app named {app} is running")))?;
        let now = now_ms();
        if a.state.phase == Phase::Progressing {
            // Rolling back an unfinished rollout is aborting it: stable still has its
            // instances, so traffic returns in one swap.
            if to.is_none() || to == a.goal.stable {
                a.state.abort_requested = Some(format!("rollback by {actor}"));
                let from = a.goal.release;
                let target = a.goal.stable.unwrap_or(from);
                self.tick(app, a, &observed).await?;
                self.ledger().append(
                    app,
                    "rollback",
                    &serde_json::json!({"from": from, "to": target, "warm": true, "actor": actor}),
                    now,
                )?;
                return Ok(RollbackOutcome {
                    from,
                    to: target,
                    warm: true,
                    switch_us: Some(micros(started)),
                });
            }
            return Err(ControlError::Conflict(format!(
                "a rollout of {app} release {} is in progress; `kiln abort {app}` first",
                a.goal.release
            )));
        }
        let from = live_release(a).ok_or_else(|| {
            ControlError::Conflict(format!("{app} has no live release to roll back from"))
        })?;
        let target = match to {
            Some(n) => n,
            None => {
                let previous = if from == a.goal.release {
                    a.goal.stable
                } else {
                    None
                };
                previous
                    .or_else(|| from.checked_sub(1).filter(|n| *n > 0))
                    .ok_or_else(|| {
                        ControlError::Conflict(format!("{app} has no release before {from}"))
                    })?
            }
        };
        if target == from {
            return Err(ControlError::Invalid(format!(
                "release {target} of {app} is already live"
            )));
        }
        let release = self
            .ledger()
            .release(app, target)?
            .ok_or_else(|| ControlError::NotFound(format!("{app} has no release {target}")))?;
        let config: ReleaseConfig = serde_json::from_value(release.body.config.clone())
            .map_err(|e| ControlError::Invalid(format!("release {app}#{target}: {e}")))?;
        if config.route != a.config.route {
            return Err(ControlError::Invalid(format!(
                "release {target} of {app} has a different [route]; `kiln down {app}` and apply it instead"
            )));
        }
        if let (Some(live), Some(m)) = (a.schema, &config.deploy.migrate)
            && m.schema < live.compatible_from
        {
            {
                if !force {
                    return Err(ControlError::Conflict(format!(
                        "release {target} of {app} works with schema {}, but the live schema is {} \
                         (migrated by release {}, which works only with code for schema {} or later); \
                         rolling back needs a backward migration first, or --force to roll back anyway (recorded)",
                        m.schema, live.schema, live.release, live.compatible_from
                    )));
                }
                self.ledger().append(
                    app,
                    "rollback.forced",
                    &serde_json::json!({"to": target, "target_schema": m.schema, "live_schema": live.schema, "actor": actor}),
                    now,
                )?;
            }
        }
        let image =
            Digest::parse(&release.body.image).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let warm = observed.iter().any(|o| {
            o.app == app && release_of(o) == Some(target) && health_of(o) == DHealth::Healthy
        });
        let goal = Goal {
            release: target,
            stable: Some(from),
            replicas: a.goal.replicas,
            deploy: config.deploy_spec(),
        };
        let mut state = RolloutState::start(&goal, now);
        if warm {
            state.phase = Phase::Completed { at_ms: now };
        }
        self.persist(app, &goal, &state, a.schema)?;
        a.goal = goal;
        a.config = config;
        a.image = image;
        a.state = state;
        if warm {
            // The swap itself, here and now: all traffic to the target's ready instances.
            // The next tick's steady state computes this same table and tops up replicas.
            let ready: Vec<&Observation> = observed
                .iter()
                .filter(|o| o.app == app && release_of(o) == Some(target))
                .filter(|o| health_of(o) == DHealth::Healthy)
                .take(a.goal.replicas as usize)
                .collect();
            let mut route = RouteTarget::default();
            route.weights.insert(target, 100);
            route.members = ready.iter().map(|o| o.id.to_string()).collect();
            let addrs = ready.iter().map(|o| (o.id.to_string(), o.addr)).collect();
            let releases_of = ready.iter().map(|o| (o.id.to_string(), target)).collect();
            self.publish(a, route, &addrs, &releases_of)?;
        } else {
            self.tick(app, a, &observed).await?;
        }
        let switch_us = warm.then(|| micros(started));
        self.ledger().append(
            app,
            "rollback",
            &serde_json::json!({"from": from, "to": target, "warm": warm, "actor": actor, "switch_us": switch_us}),
            now,
        )?;
        Ok(RollbackOutcome {
            from,
            to: target,
            warm,
            switch_us,
        })
    }

    /// `kiln promote APP`.
    pub async fn promote(&self, app: &str, actor: &str) -> Result<()> {
        self.request(app, actor, "promote", |s| s.promote_requested = true)
            .await
    }

    /// `kiln abort APP`.
    pub async fn abort(&self, app: &str, actor: &str) -> Result<()> {
        let who = actor.to_owned();
        self.request(app, actor, "abort", move |s| s.abort_requested = Some(who))
            .await
    }

    async fn request(
        &self,
        app: &str,
        actor: &str,
        what: &str,
        change: impl FnOnce(&mut RolloutState),
    ) -> Result<()> {
        let mut apps = self.apps.lock().await;
        let a = apps
            .get_mut(app)
            .ok_or_else(|| ControlError::NotFound(format!("no app named {app} is running")))?;
        if a.state.phase != Phase::Progressing {
            return Err(ControlError::Conflict(format!(
                "{app} has no rollout in progress to {what}"
            )));
        }
        change(&mut a.state);
        self.persist(app, &a.goal, &a.state, a.schema)?;
        self.ledger().append(
            app,
            &format!("rollout.{what}_requested"),
            &serde_json::json!({"release": a.goal.release, "actor": actor}),
            now_ms(),
        )?;
        Ok(())
    }

    /// `kiln scale APP N`.
    pub async fn scale(&self, app: &str, replicas: u32, actor: &str) -> Result<()> {
        if replicas == 0 || replicas > 1000 {
            return Err(ControlError::Invalid(format!(
                "replicas must be between 1 and 1000, got {replicas}; use `kiln down {app}` to stop it"
            )));
        }
        let mut apps = self.apps.lock().await;
        let a = apps
            .get_mut(app)
            .ok_or_else(|| ControlError::NotFound(format!("no app named {app} is running")))?;
        let before = a.goal.replicas;
        a.goal.replicas = replicas;
        self.persist(app, &a.goal, &a.state, a.schema)?;
        self.ledger().append(
            app,
            "app.scaled",
            &serde_json::json!({"from": before, "to": replicas, "actor": actor}),
            now_ms(),
        )?;
        Ok(())
    }

    /// `kiln down APP`: stops routing, destroys every instance, forgets the app (its
    /// releases and events stay in the ledger).
    pub async fn down(&self, app: &str, actor: &str) -> Result<usize> {
        let a = self
            .apps
            .lock()
            .await
            .remove(app)
            .ok_or_else(|| ControlError::NotFound(format!("no app named {app} is running")))?;
        a.proxy.set_route(&RouteTable::empty());
        self.detach(a.listen, app).await?;
        self.ledger()
            .put_rollout(app, &serde_json::json!({"down": true}), now_ms())?;
        let mine: Vec<Observation> = self
            .provider
            .list()
            .await?
            .into_iter()
            .filter(|o| o.app == app)
            .collect();
        // The requests in flight finish first (`drain_timeout` at most), as they do when a
        // rollout retires an instance.
        let mut draining = tokio::task::JoinSet::new();
        for o in &mine {
            draining.spawn(a.proxy.drain(o.addr));
        }
        let cut: usize = draining
            .join_all()
            .await
            .into_iter()
            .map(|outcome| match outcome {
                kiln_proxy::DrainOutcome::TimedOut { in_flight } => in_flight,
                _ => 0,
            })
            .sum();
        let grace = Duration::from_millis(a.config.service.stop_grace_ms);
        for o in &mine {
            let _ = self.provider.stop(&o.id, grace).await;
            self.provider.destroy(&o.id).await?;
        }
        let n = mine.len();
        self.ledger().append(
            app,
            "app.down",
            &serde_json::json!({"actor": actor, "instances": n, "requests_cut": cut}),
            now_ms(),
        )?;
        Ok(n)
    }

    /// Events, oldest first.
    pub fn events(
        &self,
        app: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<kiln_ledger::Event>> {
        Ok(self.ledger().events(app, limit)?)
    }

    /// Every release of `app`.
    pub fn releases(&self, app: &str) -> Result<Vec<kiln_ledger::Release>> {
        Ok(self.ledger().releases(app)?)
    }

    /// `kiln verify`.
    pub fn verify(
        &self,
    ) -> Result<std::result::Result<kiln_ledger::VerifyReport, kiln_ledger::VerifyError>> {
        Ok(self.ledger().verify()?)
    }

    /// An instance's log from byte `from`.
    pub async fn logs(&self, instance: &str, from: u64) -> Result<kiln_runtime::LogChunk> {
        let id = InstanceId::new(instance).map_err(|e| ControlError::Invalid(e.to_string()))?;
        Ok(self.provider.logs(&id, from).await?)
    }

    /// The reconciler's last listing (at most a tick old), or a fresh one before the first.
    /// Status calls read this instead of listing: listing costs a runtime call per request.
    async fn last_observed(&self) -> Result<Vec<Observation>> {
        let cached = Arc::clone(&self.observed.lock().unwrap_or_else(PoisonError::into_inner));
        if cached.is_empty() {
            return Ok(self.provider.list().await?);
        }
        Ok(cached.as_ref().clone())
    }

    /// The instances of `app` (for `kiln logs APP`).
    pub async fn instances(&self, app: &str) -> Result<Vec<String>> {
        Ok(self
            .last_observed()
            .await?
            .into_iter()
            .filter(|o| o.app == app)
            .map(|o| o.id.to_string())
            .collect())
    }

    /// The Prometheus text of every app's router metrics.
    pub async fn metrics(&self) -> String {
        let apps: Vec<Arc<kiln_proxy::App>> = self
            .apps
            .lock()
            .await
            .values()
            .map(|a| Arc::clone(&a.proxy))
            .collect();
        kiln_proxy::render_prometheus(&apps)
    }

    /// Stops every listener and waits for the requests they are serving to finish (each
    /// app's `drain_timeout` at most). Instances keep running: a restarted daemon adopts them.
    pub async fn shutdown(&self) {
        let mut draining = tokio::task::JoinSet::new();
        for (_, h) in std::mem::take(&mut *self.listeners.lock().await) {
            // Spawned, so that every listener stops accepting now, not in turn.
            draining.spawn(h.serving.drain());
        }
        draining.join_all().await;
    }
}

/// The router's side of an app, as its release's `[route]` configures it.
fn router_app(name: &str, config: &ReleaseConfig) -> Arc<kiln_proxy::App> {
    let route = &config.route;
    let mut app = AppConfig::new(name);
    app.hosts = route.hosts.clone();
    app.sticky = if route.sticky {
        kiln_proxy::Sticky::Cookie
    } else {
        kiln_proxy::Sticky::Off
    };
    app.request_timeout = Duration::from_millis(route.request_timeout_ms);
    app.drain_timeout = Duration::from_millis(route.drain_timeout_ms);
    app.max_body_bytes = route.max_body_bytes;
    app.max_header_bytes = usize::try_from(route.max_header_bytes).unwrap_or(usize::MAX);
    app.preview_header = route
        .preview_header
        .as_deref()
        .and_then(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).ok());
    kiln_proxy::App::new(app)
}

fn micros(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Runs a one-shot instance to completion: `Ok` when it exits 0, else why, with the tail of
/// its output. The instance is destroyed either way.
async fn run_once(
    provider: &dyn Provider,
    spec: InstanceSpec,
    deadline: Duration,
) -> std::result::Result<(), String> {
    let id = provider.create(spec).await.map_err(|e| e.to_string())?;
    let outcome = async {
        provider.start(&id).await.map_err(|e| e.to_string())?;
        match tokio::time::timeout(deadline, provider.wait(&id)).await {
            Ok(Ok(Some(0))) => Ok(()),
            Ok(Ok(code)) => {
                let out = provider
                    .logs(&id, 0)
                    .await
                    .map(|c| c.data)
                    .unwrap_or_default();
                let text = String::from_utf8_lossy(&out);
                let start = text.len().saturating_sub(500);
                let tail = text.get(start..).unwrap_or(&text);
                Err(format!(
                    "exit {}: {}",
                    code.map_or("unknown".to_owned(), |c| c.to_string()),
                    tail.trim()
                ))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("did not finish within {deadline:?}")),
        }
    }
    .await;
    let _ = provider.stop(&id, Duration::from_secs(1)).await;
    let _ = provider.destroy(&id).await;
    outcome
}
