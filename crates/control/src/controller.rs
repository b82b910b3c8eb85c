//! The controller: the daemon's conductor. It holds the apps, starts them from the ledger,
//! and turns each API call into a decision of the planner ([`kiln_deploy`]) carried out by
//! the [`Executor`]; the reconcile loop (`reconcile.rs`) does the same on every tick.
//!
//! **Invariant:** state is persisted before actions run, and every action is idempotent, so
//! a controller killed at any point and started again converges by reconciling again.
//!
//! **Invariant:** the daemon enforces its own gates: an apply is validated in full here (the
//! configuration, the tested-image gate), whatever client sent it.
//!
//! **API boundary:** no HTTP here; `api.rs` translates requests into these methods.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kiln_dataplane::{Plane, wire::AppSpec};
use kiln_deploy::{Goal, Phase, RolloutState, RouteTarget};
use kiln_ledger::{Event, Ledger, NewRelease};
use kiln_proxy::{GateMode, RouteTable, WorkersConfig};
use kiln_runtime::{Digest, InstanceId, Observation, Provider};

use crate::app::{AppCtl, daemons_own, router_app};
use crate::clock::{Clock, SystemClock};
use crate::config::ReleaseConfig;
use crate::doc::{AppDoc, StoredGate};
use crate::dto::{ApplyRequest, LiveSchema};
use crate::error::{ControlError, Result};
use crate::executor::Executor;
use crate::gate::Attestations;

/// How long `down` waits for the app's creates in flight before it lists what to destroy (a
/// Docker Engine loading an image takes seconds).
const CREATES_SETTLE: Duration = Duration::from_secs(30);

/// What the controller needs to start.
pub struct ControllerConfig {
    /// The state directory (`--state`).
    pub state_dir: PathBuf,
    /// Where the router runs.
    pub router: RouterChoice,
    /// Where the tested-image gate reads attestations; without it, an apply whose spec has
    /// `[image.test]` is refused.
    pub attestations: Option<Arc<dyn Attestations>>,
    /// The daemon's own deploy policy (`kiln serve --policy`), recorded with each release
    /// applied from now on.
    pub policy: crate::config::PolicyConfig,
}

/// Where the daemon's router runs.
pub enum RouterChoice {
    /// In the daemon's process, on these threads: it stops with the daemon.
    Embedded(WorkersConfig),
    /// A router process serving `<state>/router.sock`, started with this when none answers
    /// (and replaced when it runs another binary); it keeps serving while the daemon is away.
    Process(Option<kiln_dataplane::Spawn>),
}

/// The daemon's controller.
pub struct Controller {
    pub(crate) exec: Executor,
    pub(crate) apps: tokio::sync::Mutex<BTreeMap<String, AppCtl>>,
    /// Apps whose stored release cannot be decoded, with why: not run, reported by name.
    corrupt: Mutex<BTreeMap<String, String>>,
    /// The last listing of the provider, taken by `reconcile` (at most a tick old).
    pub(crate) observed: Mutex<Arc<Vec<Observation>>>,
    attestations: Option<Arc<dyn Attestations>>,
    pub(crate) daemon_policy: crate::config::PolicyConfig,
    /// The git sources followed (`kiln source`), once the daemon starts following them.
    pub(crate) sources: std::sync::OnceLock<Arc<crate::sources::Sources>>,
}

/// Why a running app refuses a new release: a rollout in progress, or another `[route]`.
fn refuse_apply(app: &str, a: &AppCtl, req: &ApplyRequest) -> Result<()> {
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
    Ok(())
}

pub(crate) fn not_running(app: &str) -> ControlError {
    ControlError::NotFound(format!("no app named {app} is running"))
}

impl Controller {
    /// Opens the ledger in `state_dir`, adopts the provider's instances and restores every
    /// app (listeners included) from the ledger.
    pub async fn start(
        cfg: &ControllerConfig,
        provider: Arc<dyn Provider>,
    ) -> Result<Arc<Controller>> {
        Controller::start_with_clock(cfg, provider, Arc::new(SystemClock)).await
    }

    /// [`Controller::start`] reading the time from `clock`.
    pub async fn start_with_clock(
        cfg: &ControllerConfig,
        provider: Arc<dyn Provider>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Controller>> {
        let mut ledger = Ledger::open(&cfg.state_dir.join("ledger.db"))?;
        // This daemon is the only writer of its state directory: older locks are stale.
        ledger.clear_locks()?;
        // The ledger key the daemon's start checked the ledger with (`Ledger::start`) signs
        // its checkpoints from here on; `verify` checks them.
        let anchor = kiln_ledger::AnchorFiles::in_state(&cfg.state_dir);
        if let Some(notary) = kiln_ledger::Notary::load(&anchor)? {
            ledger.attach_notary(notary);
        }
        // Only an app with secrets needs the key: a state where it cannot be made still runs
        // the others.
        let key = match crate::secrets::SecretKey::load_or_create(&cfg.state_dir) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!(error = %e, "no secrets key: apps with [service.secrets] cannot be applied");
                None
            }
        };
        let plane = match &cfg.router {
            RouterChoice::Embedded(workers) => {
                Plane::Embedded(kiln_dataplane::LocalPlane::start(*workers)?)
            }
            RouterChoice::Process(spawn) => Plane::Process(
                kiln_dataplane::RemotePlane::attach(
                    &kiln_dataplane::socket(&cfg.state_dir),
                    spawn.clone(),
                    &kiln_dataplane::binary_identity(),
                )
                .await?,
            ),
        };
        let secrets = crate::secrets::Secrets::new(key);
        let c = Arc::new(Controller {
            exec: Executor::new(
                provider,
                ledger,
                clock,
                secrets,
                Arc::new(plane),
                cfg.attestations.clone(),
            ),
            apps: tokio::sync::Mutex::new(BTreeMap::new()),
            corrupt: Mutex::new(BTreeMap::new()),
            observed: Mutex::new(Arc::new(Vec::new())),
            attestations: cfg.attestations.clone(),
            daemon_policy: cfg.policy.clone(),
            sources: std::sync::OnceLock::new(),
        });
        let names = c.exec.ledger().apps()?;
        for name in names {
            // One app that cannot be restored is reported by name; it never keeps the
            // others (or the daemon) from starting.
            if let Err(e) = c.restore(&name).await {
                tracing::error!(app = %name, error = %e, "app not restored; it is not run");
                c.corrupt().insert(name.clone(), e.to_string());
            }
        }
        // A router process that outlived a daemon serves what that daemon gave it: not the
        // apps this one does not run.
        let running: Vec<String> = c.apps.lock().await.keys().cloned().collect();
        c.exec.plane.retain_apps(running).await?;
        // Drift that happened while no daemon was watching is found by a full check now.
        let own = c.exec.provider.list().await?;
        for o in own.into_iter().filter(|o| daemons_own(&o.labels)) {
            if let Ok(Some(report)) = c.exec.provider.check_drift(&o.id).await
                && let Err(e) = c.record_drift(&report).await
            {
                tracing::error!(instance = %o.id, error = %e, "cannot record drift");
            }
        }
        Ok(c)
    }

    /// Reads an app's document and release from the ledger and starts serving it. A release
    /// that does not decode is recorded and reported as corrupt; the app is not run from it.
    async fn restore(&self, name: &str) -> Result<()> {
        let doc = self.exec.ledger().rollout(name)?;
        let Some(doc) = doc else { return Ok(()) };
        if doc.get("down").and_then(serde_json::Value::as_bool) == Some(true) {
            return Ok(());
        }
        let doc: AppDoc = serde_json::from_value(doc).map_err(|e| {
            ControlError::Corrupt(format!("stored state of app {name} is unreadable: {e}"))
        })?;
        let (config, image) = match self.load_release(name, doc.release) {
            Ok(loaded) => loaded,
            Err(ControlError::Corrupt(why)) => {
                tracing::error!(app = %name, release = doc.release, "{why}; the app is not run");
                let event = Event::ReleaseCorrupt {
                    release: doc.release,
                    error: why.clone(),
                };
                self.exec.record(name, &event)?;
                self.corrupt().insert(name.to_owned(), why);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let goal = Goal {
            release: doc.release,
            stable: doc.stable,
            replicas: doc.replicas,
            deploy: config.deploy_spec(),
        };
        // An address that cannot be bound now (another process took it while the daemon
        // was down) must not keep every other app down: the app is managed, and its
        // address is tried again on each reconcile pass.
        let spec = router_app(name, &config);
        // Paused or in maintenance before the restart: so again before any request arrives.
        let gate = doc.gate.clone().into_mode();
        let route = &config.route;
        let (unserved, adopted) = match self.serve(name, &spec, &gate).await {
            Ok(had_table) => (None, had_table),
            Err(e) => {
                tracing::warn!(app = %name, error = %e, "address not served; retrying on each reconcile pass");
                let listen = route.listen.to_string();
                let error = e.to_string();
                self.exec
                    .record(name, &Event::RouteUnserved { listen, error })?;
                (Some(e.to_string()), false)
            }
        };
        let app = AppCtl {
            spec,
            gate,
            adopted_until: adopted
                .then(|| self.exec.clock.now_ms() + crate::reconcile::ADOPTION_MS),
            listen: config.route.listen,
            goal,
            image,
            state: doc.state.into(),
            history: doc.history,
            route: RouteTarget::default(),
            schema: doc.schema.map(LiveSchema::into_domain),
            unserved,
            config,
        };
        self.apps.lock().await.insert(name.to_owned(), app);
        Ok(())
    }

    /// Has the router serve app `name` as `spec` with `gate` (a router process that already
    /// does keeps its table). Returns whether the router already routed the app somewhere.
    pub(crate) async fn serve(&self, name: &str, spec: &AppSpec, gate: &GateMode) -> Result<bool> {
        let had_table = self.exec.plane.put_app(spec.clone()).await?;
        self.exec.plane.set_gate(name, gate).await?;
        Ok(had_table)
    }

    fn corrupt(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.corrupt.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Release `number` of `app`, decoded strictly: anything unknown or malformed is
    /// [`ControlError::Corrupt`] naming the release and the field.
    pub(crate) fn load_release(&self, app: &str, number: u64) -> Result<(ReleaseConfig, Digest)> {
        let release = self
            .exec
            .ledger()
            .release(app, number)?
            .ok_or_else(|| ControlError::NotFound(format!("{app} has no release {number}")))?;
        let corrupt =
            |e: String| ControlError::Corrupt(format!("release {app}#{number} is corrupt: {e}"));
        let config =
            ReleaseConfig::decode(&release.body.config).map_err(|e| corrupt(e.to_string()))?;
        let image = Digest::parse(&release.body.image).map_err(|e| corrupt(e.to_string()))?;
        Ok((config, image))
    }

    /// Refuses an image that the spec's or the daemon's policy forbids, recording why:
    /// an apply (`release` `None`: nothing is recorded), or a cold rollback to `release`.
    pub(crate) async fn enforce_policy(
        &self,
        app: &str,
        image: &Digest,
        config: &ReleaseConfig,
        release: Option<u64>,
        actor: &str,
    ) -> Result<()> {
        let (image, config, attestations) =
            (image.clone(), config.clone(), self.attestations.clone());
        let checked = tokio::task::spawn_blocking(move || {
            crate::policy::enforce(&image, &config, attestations.as_deref())
        })
        .await
        .map_err(|e| ControlError::Internal(format!("checking the deploy policy: {e}")))?;
        let Err(refusal) = checked else {
            return Ok(());
        };
        self.exec.record(
            app,
            &Event::PolicyRefused {
                release,
                image: refusal.image.to_string(),
                policy: refusal.policy.to_owned(),
                missing: refusal.missing.clone(),
                actor: actor.to_owned(),
            },
        )?;
        Err(ControlError::Forbidden(refusal.to_string()))
    }

    /// Records a new release of `app` and starts rolling it out.
    pub async fn apply(&self, app: &str, mut req: ApplyRequest) -> Result<kiln_ledger::Release> {
        let image = crate::gate::check_apply(app, &req, self.attestations.as_deref())?;
        // The daemon's policy is the daemon's: whatever a client sent in its place.
        req.config.daemon_policy = self.daemon_policy.clone();
        self.enforce_policy(app, &image, &req.config, None, &req.actor)
            .await?;
        // What would refuse it anyway is said before a secret's command runs for nothing
        // (and said again below, under the lock that makes it hold).
        if let Some(a) = self.apps.lock().await.get(app) {
            refuse_apply(app, a, &req)?;
        }
        // The daemon reads every secret now (a command may take seconds: off the runtime's
        // threads) and records its fingerprint, whatever the client sent.
        let secrets = if req.config.service.secrets.is_empty() {
            Vec::new()
        } else {
            let (s, mut refs) = (
                self.exec.secrets.clone(),
                req.config.service.secrets.clone(),
            );
            let read = tokio::task::spawn_blocking(move || {
                s.read_for_apply(&mut refs).map(|values| (refs, values))
            })
            .await
            .map_err(|e| ControlError::Internal(format!("reading secrets: {e}")))??;
            req.config.service.secrets = read.0;
            read.1
        };
        let mut apps = self.apps.lock().await;
        let (stable, fresh) = match apps.get(app) {
            Some(a) => {
                refuse_apply(app, a, &req)?;
                (a.live_release(), None)
            }
            None => {
                // A new app's name follows the spec's rule; an existing one keeps the name it
                // was recorded with.
                crate::gate::check_app_name(app)?;
                (None, Some(self.bind_new(app, &req.config, &apps).await?))
            }
        };
        let (schema, history, gate) = apps
            .get(app)
            .map(|a| {
                let gate = StoredGate::from_mode(&a.gate);
                (a.schema, a.history.clone(), gate)
            })
            .unwrap_or_default();
        let started = self.start_rollout(app, &req, stable, schema, &history, gate);
        let (release, goal, state) = match started {
            Ok(started) => started,
            Err(e) => {
                if fresh.is_some()
                    && let Err(undo) = self.exec.plane.remove_app(app).await
                {
                    tracing::error!(app = %app, error = %undo, "apply failed, and unbinding its address too");
                }
                return Err(e);
            }
        };
        self.exec.forget(app);
        self.exec.secrets.keep(app, release.number, secrets);
        match (fresh, apps.get_mut(app)) {
            (_, Some(a)) => {
                a.goal = goal;
                a.config = req.config;
                a.image = image;
                a.state = state;
            }
            (Some(spec), None) => {
                let app_ctl = AppCtl {
                    spec,
                    gate: GateMode::Open,
                    adopted_until: None,
                    listen: req.config.route.listen,
                    goal,
                    config: req.config,
                    image,
                    state,
                    history,
                    route: RouteTarget::default(),
                    schema: None,
                    unserved: None,
                };
                apps.insert(app.to_owned(), app_ctl);
                self.corrupt().remove(app);
            }
            (None, None) => return Err(not_running(app)),
        }
        Ok(release)
    }

    /// Binds a new app's address before anything is recorded, so an address that another
    /// process holds, or a host another app on it claims, fails the apply here rather than
    /// at the next daemon start.
    async fn bind_new(
        &self,
        app: &str,
        config: &ReleaseConfig,
        apps: &BTreeMap<String, AppCtl>,
    ) -> Result<AppSpec> {
        let route = &config.route;
        // An app waiting for its address (taken while the daemon was down) keeps its claim.
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
        let spec = router_app(app, config);
        self.serve(app, &spec, &GateMode::Open).await?;
        Ok(spec)
    }

    /// Records `req` as the app's next release and its rollout as started: the release, the
    /// app's document, the event.
    fn start_rollout(
        &self,
        app: &str,
        req: &ApplyRequest,
        stable: Option<u64>,
        schema: Option<kiln_deploy::LiveSchema>,
        history: &[u64],
        gate: StoredGate,
    ) -> Result<(kiln_ledger::Release, Goal, RolloutState)> {
        let now = self.exec.clock.now_ms();
        let holder = format!("apply by {}", req.actor);
        let config =
            serde_json::to_value(&req.config).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let release = {
            let mut ledger = self.exec.ledger();
            ledger.lock(app, &holder, now)?;
            let new = NewRelease {
                image: req.image.clone(),
                config,
                spec_digest: req.spec_digest.clone(),
                source_commit: req.source_commit.clone(),
                actor: req.actor.clone(),
            };
            let recorded = ledger.record_release(app, new, now);
            ledger.unlock(app, &holder)?;
            let release = recorded?;
            // Every release is signed into a checkpoint; one that cannot be written leaves
            // the release recorded and the next checkpoint covers it.
            if let Err(e) = ledger.checkpoint(now) {
                tracing::error!(app = %app, error = %e, "no ledger checkpoint for the release");
            }
            release
        };
        let goal = Goal {
            release: release.number,
            stable,
            replicas: req.config.service.replicas,
            deploy: req.config.deploy_spec(),
        };
        let state = RolloutState::start(&goal, now);
        self.put_doc(app, &goal, &state, schema, history, gate)?;
        let event = Event::RolloutStarted {
            release: goal.release,
            stable: goal.stable,
            strategy: goal.deploy.strategy.name().to_owned(),
            image: req.image.clone(),
        };
        self.exec.record(app, &event)?;
        Ok((release, goal, state))
    }

    /// Persists the app's document with `state`.
    pub(crate) fn persist(&self, app: &str, a: &AppCtl, state: &RolloutState) -> Result<()> {
        let gate = StoredGate::from_mode(&a.gate);
        self.put_doc(app, &a.goal, state, a.schema, &a.history, gate)
    }

    /// Persists the app's document with the router's gate to be `gate`.
    pub(crate) fn persist_gate(&self, app: &str, a: &AppCtl, gate: StoredGate) -> Result<()> {
        self.put_doc(app, &a.goal, &a.state, a.schema, &a.history, gate)
    }

    fn put_doc(
        &self,
        app: &str,
        goal: &Goal,
        state: &RolloutState,
        schema: Option<kiln_deploy::LiveSchema>,
        history: &[u64],
        gate: StoredGate,
    ) -> Result<()> {
        let doc = AppDoc::new(goal, state, schema, history, gate);
        let value = serde_json::to_value(&doc).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let now = self.exec.clock.now_ms();
        self.exec.ledger().put_rollout(app, &value, now)?;
        Ok(())
    }

    /// Signs the ledger's head into a checkpoint when it moved since the last one (the
    /// daemon calls it periodically and when it stops).
    pub fn checkpoint(&self) -> Result<()> {
        let now = self.exec.clock.now_ms();
        self.exec.ledger().checkpoint(now)?;
        Ok(())
    }

    /// `kiln promote APP`.
    pub async fn promote(&self, app: &str, actor: &str) -> Result<()> {
        self.request(
            app,
            "promote",
            |s| s.promote_requested = true,
            |release| Event::PromoteRequested {
                release,
                actor: actor.to_owned(),
            },
        )
        .await
    }

    /// `kiln abort APP`.
    pub async fn abort(&self, app: &str, actor: &str) -> Result<()> {
        let who = actor.to_owned();
        self.request(
            app,
            "abort",
            move |s| s.abort_requested = Some(who),
            |release| Event::AbortRequested {
                release,
                actor: actor.to_owned(),
            },
        )
        .await
    }

    async fn request(
        &self,
        app: &str,
        what: &str,
        change: impl FnOnce(&mut RolloutState),
        event: impl FnOnce(u64) -> Event,
    ) -> Result<()> {
        let mut apps = self.apps.lock().await;
        let a = apps.get_mut(app).ok_or_else(|| not_running(app))?;
        if a.state.phase != Phase::Progressing {
            return Err(ControlError::Conflict(format!(
                "{app} has no rollout in progress to {what}"
            )));
        }
        let mut state = a.state.clone();
        change(&mut state);
        self.persist(app, a, &state)?;
        a.state = state;
        self.exec.record(app, &event(a.goal.release))
    }

    /// `kiln scale APP N`.
    pub async fn scale(&self, app: &str, replicas: u32, actor: &str) -> Result<()> {
        crate::gate::check_replicas(replicas)
            .map_err(|e| ControlError::Invalid(format!("{e}; use `kiln down {app}` to stop it")))?;
        let mut apps = self.apps.lock().await;
        let a = apps.get_mut(app).ok_or_else(|| not_running(app))?;
        let from = a.goal.replicas;
        a.goal.replicas = replicas;
        let state = a.state.clone();
        self.persist(app, a, &state)?;
        let actor = actor.to_owned();
        self.exec.record(
            app,
            &Event::Scaled {
                from,
                to: replicas,
                actor,
            },
        )
    }

    /// `kiln down APP`: stops routing, lets the requests in flight finish, destroys every
    /// instance and forgets the app (its releases and events stay in the ledger).
    pub async fn down(&self, app: &str, actor: &str) -> Result<usize> {
        let removed = self.apps.lock().await.remove(app);
        let was_corrupt = self.corrupt().remove(app).is_some();
        self.exec.secrets.forget(app);
        let a = match removed {
            Some(a) => Some(a),
            None if was_corrupt => None,
            None => return Err(not_running(app)),
        };
        // Out of the route now; served until its instances drained (new requests get 503),
        // then no more. The router's part never keeps an app up: one it does not serve (its
        // address was taken) has nothing to empty, and one a router cannot be told about is
        // left out of it when the next router is fed (`retain_apps`).
        if a.is_some()
            && let Err(e) = self.exec.plane.set_route(app, &RouteTable::empty()).await
        {
            tracing::warn!(app = %app, error = %e, "the router's table of the app not emptied");
        }
        let now = self.exec.clock.now_ms();
        self.exec
            .ledger()
            .put_rollout(app, &serde_json::json!({"down": true}), now)?;
        // The app is out of `apps`, so no pass starts another create of it; the ones already
        // begun finish first, or the listing below would miss what they make.
        if !self.exec.creates_settled(app, CREATES_SETTLE).await {
            tracing::warn!(app = %app, "creates still running after {CREATES_SETTLE:?}: an instance they make may be left");
        }
        // A create that began before the app went may have read its secrets again.
        self.exec.secrets.forget(app);
        let mine: Vec<Observation> = self
            .exec
            .provider
            .list()
            .await?
            .into_iter()
            .filter(|o| o.app == app && daemons_own(&o.labels))
            .collect();
        let plane = a.as_ref().map(|_| (Arc::clone(&self.exec.plane), app));
        let grace = a
            .as_ref()
            .map_or(Duration::from_secs(10), |a| a.stop_grace());
        let requests_cut = stop_all(&self.exec.provider, plane, &mine, grace).await;
        if a.is_some()
            && let Err(e) = self.exec.plane.remove_app(app).await
        {
            tracing::warn!(app = %app, error = %e, "the router still serves the app's address");
        }
        let requests_cut = requests_cut?;
        self.exec.forget(app);
        let instances = mine.len();
        let actor = actor.to_owned();
        self.exec.record(
            app,
            &Event::Down {
                actor,
                instances,
                requests_cut,
            },
        )?;
        Ok(instances)
    }

    /// An instance's log from byte `from`.
    pub async fn logs(&self, instance: &str, from: u64) -> Result<kiln_runtime::LogChunk> {
        let id = InstanceId::new(instance).map_err(|e| ControlError::Invalid(e.to_string()))?;
        Ok(self.exec.provider.logs(&id, from).await?)
    }

    /// The daemon stops. An embedded router stops every listener and waits for the requests
    /// they serve to finish (each app's `drain_timeout` at most); a router process keeps
    /// serving. Instances keep running: a restarted daemon adopts them.
    pub async fn shutdown(&self) {
        self.exec.plane.shutdown().await;
    }

    /// The store images are sent to (`blobs.rs`), behind the tested-image gate's.
    pub(crate) fn image_store(&self) -> Option<Arc<dyn crate::blobs::ImageStore>> {
        self.attestations.clone().and_then(|a| a.image_store())
    }

    /// The names of the apps whose stored release is corrupt, with why.
    pub(crate) fn corrupt_apps(&self) -> BTreeMap<String, String> {
        self.corrupt().clone()
    }
}

/// Drains, stops and destroys `instances`, all at once: each lets its requests in flight
/// finish (`drain_timeout` at most), then has its own `grace` to exit, so stopping an app
/// takes as long as its slowest instance, not their sum. Returns how many requests were cut;
/// the first destroy that failed is the error, once every instance had its turn.
async fn stop_all(
    provider: &Arc<dyn Provider>,
    plane: Option<(Arc<Plane>, &str)>,
    instances: &[Observation],
    grace: Duration,
) -> Result<usize> {
    let mut stopping = tokio::task::JoinSet::new();
    for o in instances {
        let provider = Arc::clone(provider);
        let plane = plane
            .as_ref()
            .map(|(p, app)| (Arc::clone(p), (*app).to_owned()));
        let (id, addr) = (o.id.clone(), o.addr);
        stopping.spawn(async move {
            let cut = match plane {
                Some((plane, app)) => match crate::executor::drain(&plane, &app, addr).await {
                    kiln_proxy::DrainOutcome::TimedOut { in_flight } => in_flight,
                    _ => 0,
                },
                None => 0,
            };
            let _stopped = provider.stop(&id, grace).await;
            provider.destroy(&id).await.map(|()| cut)
        });
    }
    let mut cut = 0;
    let mut failed = None;
    for outcome in stopping.join_all().await {
        match outcome {
            Ok(n) => cut += n,
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(cut),
    }
}
