//! The reconcile loop: observe the provider, ask the planner ([`kiln_deploy::decide`]) what
//! to do, persist the app's document and events, then let the executor act.
//!
//! **Invariant:** the app's document is persisted before actions run, so a controller killed
//! between the two decides the same again when it restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use kiln_deploy::{
    Action, Condition as Planned, InstanceObs, Measurement, Observed, RolloutEvent, StepMetrics,
    decide,
};
use kiln_ledger::{Cause, Event};
use kiln_runtime::{Health, InstanceState, Observation};

use crate::app::{AppCtl, RELEASE_LABEL, ROLE_LABEL, daemons_own, release_name};
use crate::clock::millis_since_epoch;
use crate::controller::Controller;
use crate::error::Result;
use crate::executor::Why;

/// How often the reconciler looks at every app.
pub const TICK: Duration = Duration::from_millis(100);

/// How long an instance may stay only *created* (never started). The reconciler creates and
/// starts within one tick and lists between ticks, so a created instance in a listing was
/// left by a controller killed in between and will never start by itself; the grace only
/// absorbs clock and file-system noise.
const CREATED_LIMIT_MS: i64 = 2_000;

/// One app's instances as the planner sees them, and where each listens.
pub(crate) struct AppView {
    pub observed: Observed,
    /// Instance id → (address, release).
    pub addrs: BTreeMap<String, (SocketAddr, u64)>,
    /// Instance id → (address, what it listens on when the provider read it).
    pub seen: BTreeMap<String, (SocketAddr, Option<Vec<SocketAddr>>)>,
}

impl Controller {
    /// Runs the reconciler until `stop` resolves: a pass every [`TICK`], and drift reports
    /// recorded as they arrive. It listens for drift from the moment it is called, before the
    /// returned future is first polled, so no report sent after this call is missed.
    pub fn run(
        self: Arc<Self>,
        stop: impl std::future::Future<Output = ()>,
    ) -> impl std::future::Future<Output = ()> {
        let mut drift = self.exec.provider.drift_events();
        async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    report = drift.recv() => {
                        if let Ok(report) = report
                            && let Err(e) = self.record_drift(&report).await
                        {
                            tracing::error!(instance = %report.instance, error = %e, "cannot record drift");
                        }
                    }
                    _ = tick.tick() => {
                        if let Err(e) = self.reconcile().await {
                            tracing::error!(error = %e, "reconcile pass failed");
                        }
                    }
                }
            }
        }
    }

    /// One pass of the reconciler over every app. An app whose pass fails is logged and
    /// retried on the next pass; it never stops the others. Its duration, failed or not, goes
    /// to `kiln_reconcile_seconds`.
    pub async fn reconcile(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let pass = self.reconcile_pass().await;
        self.exec.metrics.reconcile_pass(started.elapsed());
        pass
    }

    async fn reconcile_pass(&self) -> Result<()> {
        // Listed before taking the apps lock, so API calls never wait on the runtime. Creates
        // in flight that this listing cannot show yet are counted by `Creates` (create.rs).
        let listing = self.exec.creates.listing_begins();
        let observed = self.exec.provider.list().await?;
        *self.observed.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(observed.clone());
        {
            let listed: BTreeSet<_> = observed.iter().map(|o| &o.id).collect();
            self.exec.creates.listing_shows(listing, &listed);
            self.exec.metrics.retain_instances(&listed);
            self.exec
                .destroying
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|id| listed.contains(id));
        }
        let mut apps = self.apps.lock().await;
        if self.exec.plane.take_resync() {
            self.resync(&mut apps).await;
        }
        for (name, a) in apps.iter_mut() {
            if a.unserved.is_some() {
                self.serve_again(name, a).await?;
            }
            if let Err(e) = self.tick(name, a, &observed).await {
                tracing::error!(app = %name, error = %e, "reconcile of app failed");
            }
        }
        Ok(())
    }

    /// Feeds a router process that is not the one fed so far every app: one that took over
    /// from the last (a handover) has their tables already; one started after a crash gets
    /// them on this pass.
    async fn resync(&self, apps: &mut BTreeMap<String, AppCtl>) {
        for (name, a) in apps.iter_mut() {
            match self.serve(name, &a.spec, &a.gate).await {
                Ok(true) => {}
                // Nothing kept there to stand for: the table is published on this pass.
                Ok(false) => {
                    a.route = kiln_deploy::RouteTarget::default();
                    a.adopted_until = None;
                }
                Err(e) => {
                    a.adopted_until = None;
                    tracing::warn!(app = %name, error = %e, "the new router cannot serve the app yet");
                    a.route = kiln_deploy::RouteTarget::default();
                    a.unserved = Some(e.to_string());
                }
            }
        }
        let names = apps.keys().cloned().collect();
        if let Err(e) = self.exec.plane.retain_apps(names).await {
            tracing::warn!(error = %e, "the new router keeps apps this daemon does not run");
        }
    }

    /// Tries again to serve the address of an app whose address could not be bound.
    async fn serve_again(&self, name: &str, a: &mut AppCtl) -> Result<()> {
        match self.serve(name, &a.spec, &a.gate).await {
            Ok(had_table) => {
                if !had_table {
                    a.route = kiln_deploy::RouteTarget::default();
                }
                a.unserved = None;
                let listen = a.config.route.listen.to_string();
                self.exec.record(name, &Event::RouteServed { listen })?;
            }
            Err(e) => a.unserved = Some(e.to_string()),
        }
        Ok(())
    }

    /// Observe → decide → persist → act, for one app.
    pub(crate) async fn tick(&self, name: &str, a: &mut AppCtl, all: &[Observation]) -> Result<()> {
        let now = self.exec.clock.now_ms();
        self.fold_migration(name, a).await?;
        let view = self.observe(name, a, all).await?;
        let d = decide(&a.goal, &a.state, &view.observed, now);
        // A release that became live joins the history in the same write as the state that
        // says so: a restart must not forget it (rollback returns along the history).
        let mut history = a.history.clone();
        for e in &d.events {
            if let RolloutEvent::Completed { release, .. } = e {
                kiln_deploy::became_live(&mut history, *release);
            }
        }
        if d.state != a.state || history != a.history {
            a.history = history;
            self.persist(name, a, &d.state)?;
            a.state = d.state.clone();
        }
        let strategy = a.goal.deploy.strategy.name();
        self.exec
            .record_rollout(name, &d.events, a.goal.release, strategy)?;
        let drift = self.exec.drift_now();
        // Destroys go last: an instance leaves the route (this pass's route change) before
        // its drain starts, so the drain does not find it still routed.
        let (destroys, others): (Vec<Action>, Vec<Action>) = d
            .actions
            .into_iter()
            .partition(|a| matches!(a, Action::Destroy { .. }));
        for action in others.into_iter().chain(destroys) {
            match action {
                Action::Migrate { release } => {
                    self.pause_for_migration(name, a, release).await?;
                    self.exec.migrate(name, a, release)?;
                }
                Action::Create { release, count } if release != a.goal.release => {
                    self.create_other(name, a, release, count)?;
                }
                Action::Create { release, count } => self.exec.create(name, a, release, count)?,
                // The table a router kept across a daemon restart stands until the app's
                // instances have been judged again (or for `ADOPTION` at most): one made
                // from the first verdicts would leave the rest out.
                Action::Route(_) if adopting(a, &view.observed, now) => {}
                // Its address is not served: there is no table to publish to until it is.
                Action::Route(_) if a.unserved.is_some() => {}
                Action::Route(target) => self.exec.publish(name, a, target, &view.addrs).await?,
                Action::Destroy { instance, reason } => {
                    let found = view.addrs.get(&instance).map(|(addr, _)| *addr);
                    let id = kiln_runtime::InstanceId::new(&instance);
                    if let (Ok(id), Some(addr)) = (id, found) {
                        let why = Why::of(&reason, drift.get(&id), view.seen.get(&instance));
                        self.exec.destroy(name, a, id, addr, why)?;
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

    /// Creates instances of a release other than the goal's (a canary's `scale_stable`
    /// restoring the stable release after an abort) from that release's own image and
    /// configuration. `create` reads both from the app before it returns (what runs in the
    /// background owns its copies), so the app holds them only for that call.
    fn create_other(&self, name: &str, a: &mut AppCtl, release: u64, count: u32) -> Result<()> {
        let (mut config, mut image) = self.load_release(name, release)?;
        std::mem::swap(&mut a.config, &mut config);
        std::mem::swap(&mut a.image, &mut image);
        let created = self.exec.create(name, a, release, count);
        std::mem::swap(&mut a.config, &mut config);
        std::mem::swap(&mut a.image, &mut image);
        created
    }

    /// The app's instances (not the one-shots, not those being destroyed) for the planner,
    /// and the router's measurements of the current canary step.
    pub(crate) async fn observe(
        &self,
        name: &str,
        a: &AppCtl,
        all: &[Observation],
    ) -> Result<AppView> {
        let now = self.exec.clock.now_ms();
        let destroying = self.exec.destroying_now();
        let drift = self.exec.drift_now();
        let mut instances = Vec::new();
        let mut addrs = BTreeMap::new();
        let mut seen = BTreeMap::new();
        let mine = all
            .iter()
            .filter(|o| o.app == name && !destroying.contains(&o.id))
            .filter(|o| !o.labels.contains_key(ROLE_LABEL));
        for o in mine {
            let Some(release) = release_of(o) else {
                // An instance kiln did not label is not kiln's: remove it.
                let why = Why {
                    release: None,
                    cause: Cause::Foreign,
                };
                self.exec.destroy(name, a, o.id.clone(), o.addr, why)?;
                continue;
            };
            addrs.insert(o.id.to_string(), (o.addr, release));
            seen.insert(o.id.to_string(), (o.addr, o.listening.clone()));
            instances.push(InstanceObs {
                id: o.id.to_string(),
                release,
                health: planned_health(o, now),
                drift: drift.get(&o.id).cloned(),
            });
        }
        let observed = Observed {
            instances,
            route: a.route.clone(),
            metrics: self.step_metrics(name, a, now).await?,
        };
        Ok(AppView {
            observed,
            addrs,
            seen,
        })
    }

    /// With `[deploy.migrate] pause`, the router holds the app's new requests from the start
    /// of its migration: only when the migration is about to start and the app is open (a
    /// person's pause or maintenance is theirs).
    async fn pause_for_migration(&self, name: &str, a: &mut AppCtl, release: u64) -> Result<()> {
        let wanted = a.config.deploy.migrate.as_ref().is_some_and(|m| m.pause);
        if !wanted || self.exec.migrating(name) || a.gate != kiln_proxy::GateMode::Open {
            return Ok(());
        }
        let (max_hold, max_held) = (
            crate::pause::DEFAULT_MAX_HOLD,
            crate::pause::DEFAULT_MAX_HELD,
        );
        let event = Event::Paused {
            actor: "kiln".to_owned(),
            max_hold_ms: u64::try_from(max_hold.as_millis()).unwrap_or(u64::MAX),
            max_held,
            reason: Some(format!("migration of release {release}")),
        };
        self.set_gate(
            name,
            a,
            kiln_proxy::GateMode::Paused { max_hold, max_held },
            &event,
        )
        .await
    }

    /// Lets the held requests go once a migration with `pause` ended, whatever its outcome,
    /// if the app is still paused (a pause made during it ends with it).
    async fn resume_after_migration(
        &self,
        name: &str,
        a: &mut AppCtl,
        release: u64,
        ok: bool,
    ) -> Result<()> {
        let paused = matches!(a.gate, kiln_proxy::GateMode::Paused { .. });
        if !paused || !a.config.deploy.migrate.as_ref().is_some_and(|m| m.pause) {
            return Ok(());
        }
        let event = Event::Resumed {
            actor: "kiln".to_owned(),
            released: self.held(name, &a.gate).await?,
            reason: Some(format!(
                "migration of release {release} {}",
                if ok { "completed" } else { "failed" }
            )),
        };
        self.set_gate(name, a, kiln_proxy::GateMode::Open, &event)
            .await
    }

    /// Moves a finished migration's outcome into the rollout state (and the live schema).
    async fn fold_migration(&self, name: &str, a: &mut AppCtl) -> Result<()> {
        let Some(outcome) = self.exec.take_migration(name) else {
            return Ok(());
        };
        let release = a.goal.release;
        self.resume_after_migration(name, a, release, outcome.is_ok())
            .await?;
        match outcome {
            Ok(()) => {
                a.state.migrated = true;
                if let Some(m) = &a.config.deploy.migrate {
                    a.schema = Some(kiln_deploy::LiveSchema {
                        schema: m.schema,
                        compatible_from: m.compatible_from,
                        release,
                    });
                    let event = Event::MigrationCompleted {
                        release,
                        schema: m.schema,
                        compatible_from: m.compatible_from,
                    };
                    self.exec.record(name, &event)?;
                }
            }
            Err(error) => {
                a.state.migration_failed = Some(error.clone());
                self.exec
                    .record(name, &Event::MigrationFailed { release, error })?;
            }
        }
        let state = a.state.clone();
        self.persist(name, a, &state)
    }

    /// Records drift found on an instance (once per instance) for the next pass to act on.
    /// An instance that only vanished gets no drift event of its own: its replacement's
    /// event names the drift, so a `docker rm -f` is one event. Drift on an instance that is
    /// not the daemon's (`kiln test`'s, `kiln run`'s: [`daemons_own`]) is not recorded: that
    /// command removing its instance is no change behind kiln's back.
    pub(crate) async fn record_drift(&self, report: &kiln_runtime::DriftReport) -> Result<()> {
        // Its own destroy removes its files: that is no drift.
        if self.exec.destroying_now().contains(&report.instance) {
            return Ok(());
        }
        let observed = self.exec.provider.observe(&report.instance).await;
        if let Ok(o) = &observed
            && !daemons_own(&o.labels)
        {
            return Ok(());
        }
        // Counted on an instance known to be the daemon's (not one of `kiln test`'s that its
        // command removed), whether or not this report is its first (a later one adds
        // findings) or only says it vanished.
        if observed.is_ok() {
            self.exec
                .metrics
                .drift_findings(&report.instance, &report.findings);
        }
        let findings: Vec<String> = report.findings.iter().map(ToString::to_string).collect();
        let first = self
            .exec
            .drift
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(report.instance.clone(), findings.join("; "))
            .is_none();
        let vanished = report
            .findings
            .iter()
            .all(|f| matches!(f, kiln_runtime::DriftFinding::Vanished { .. }));
        if !first || vanished {
            return Ok(());
        }
        let Ok(o) = observed else {
            return Ok(());
        };
        let instance = report.instance.to_string();
        self.exec
            .record(&o.app, &Event::DriftDetected { instance, findings })
    }
}

/// How long after a daemon starts the table a router kept for an app may stand while its
/// instances are being judged again.
pub(crate) const ADOPTION_MS: kiln_deploy::Millis = 10_000;

/// Whether the router's kept table still stands: the daemon has just started, and some of
/// the app's instances have no health verdict yet. Ends for good the first time it is not.
fn adopting(a: &mut AppCtl, observed: &kiln_deploy::Observed, now: kiln_deploy::Millis) -> bool {
    let Some(until) = a.adopted_until else {
        return false;
    };
    let judging = observed
        .instances
        .iter()
        .any(|i| i.health == Planned::Starting);
    if judging && now < until {
        return true;
    }
    a.adopted_until = None;
    false
}

/// The release an instance runs, from its label.
pub(crate) fn release_of(o: &Observation) -> Option<u64> {
    o.labels.get(RELEASE_LABEL).and_then(|v| v.parse().ok())
}

/// An instance's health as the planner sees it.
pub(crate) fn planned_health(o: &Observation, now: kiln_deploy::Millis) -> Planned {
    let stuck =
        o.state == InstanceState::Created && now - millis_since_epoch(o.created) > CREATED_LIMIT_MS;
    match (o.state, o.health) {
        _ if stuck => Planned::Failed,
        (InstanceState::Exited | InstanceState::Vanished, _) => {
            Planned::Exited { code: o.exit_code }
        }
        (_, Health::Healthy) => Planned::Healthy,
        (_, Health::Unhealthy) => Planned::Unhealthy,
        (_, Health::Failed) => Planned::Failed,
        (_, Health::Unknown | Health::Starting) => Planned::Starting,
    }
}

/// The router's measurements of the canary and stable releases since the step started.
impl Controller {
    async fn step_metrics(
        &self,
        name: &str,
        a: &AppCtl,
        now: kiln_deploy::Millis,
    ) -> Result<Option<StepMetrics>> {
        let Some(started) = a.state.step_started_ms else {
            return Ok(None);
        };
        if a.unserved.is_some() {
            return Ok(None);
        }
        let window = Duration::from_millis(u64::try_from(now - started).unwrap_or(0).max(1000));
        let mut measured = [None, None];
        for (slot, release) in measured
            .iter_mut()
            .zip([Some(a.goal.release), a.goal.stable])
        {
            let Some(r) = release else { continue };
            // No decision is made on measurements the router could not give.
            *slot = self
                .exec
                .plane
                .snapshot(name, &release_name(r), window)
                .await?;
        }
        let [canary, stable] = measured.map(|s| {
            s.map_or(
                Measurement {
                    requests: 0,
                    errors: 0,
                    p99_ms: 0.0,
                },
                |s| Measurement {
                    requests: s.requests,
                    errors: s.errors,
                    p99_ms: s.p99.as_secs_f64() * 1000.0,
                },
            )
        });
        Ok(Some(StepMetrics { canary, stable }))
    }
}
