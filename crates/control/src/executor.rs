//! The executor: carries out what the planner decided. It owns the provider and the event
//! sink (the ledger), and does each action — create, migrate, destroy, publish a route — and
//! records what happened as typed events.
//!
//! **Invariant:** every action is idempotent (a create is counted by `Creates` until a
//! listing shows it, a destroy by the `destroying` set, a migration by the `migrations` map),
//! so a controller killed at any point and started again converges by reconciling again.
//!
//! **Invariant:** an event that cannot be recorded is an error returned to the action that
//! needed it, never dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kiln_deploy::{DestroyReason, RolloutEvent, RouteTarget, Verdict};
use kiln_ledger::{Cause, Event, Ledger};
use kiln_proxy::RouteTable;
use kiln_runtime::{InstanceId, Provider};

use crate::app::{AppCtl, release_name};
use crate::clock::Clock;
use crate::error::{ControlError, Result};
use crate::oneshot::run_once;

/// How much of a failed migration's output its event keeps.
const MIGRATION_OUTPUT: usize = 500;

/// A migration's progress, shared between its task and the reconciler.
#[derive(Debug, Clone)]
pub(crate) enum Migration {
    Running,
    Done(std::result::Result<(), String>),
}

/// Carries out actions and records events. Cheap to clone: background tasks (creates,
/// destroys, migrations) carry a clone.
#[derive(Clone)]
pub(crate) struct Executor {
    pub provider: Arc<dyn Provider>,
    ledger: Arc<Mutex<Ledger>>,
    pub clock: Arc<dyn Clock>,
    /// Drift found per instance (a summary of the findings), until it is destroyed.
    pub drift: Arc<Mutex<BTreeMap<InstanceId, String>>>,
    /// Instances being drained and destroyed in the background.
    pub destroying: Arc<Mutex<BTreeSet<InstanceId>>>,
    migrations: Arc<Mutex<BTreeMap<String, Migration>>>,
    /// Creates in flight and their backoff (`create.rs`).
    pub(crate) creates: Arc<crate::create::Creates>,
    /// Secrets' values for the instances of the releases applied (`secrets.rs`).
    pub(crate) secrets: crate::secrets::Secrets,
    /// The router: in this process, or a router process the daemon feeds.
    pub plane: Arc<kiln_dataplane::Plane>,
    /// What images carry, for the deploy policy checked before each create (`policy.rs`).
    pub(crate) attestations: Option<Arc<dyn crate::gate::Attestations>>,
    /// The daemon's own metrics (`metrics.rs`).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// Waits for the router to have no request in flight on the instance at `addr`. A router
/// that cannot say (a router process being replaced, or one that no longer serves the app)
/// has nothing of it in flight that a wait here would let finish.
pub(crate) async fn drain(
    plane: &kiln_dataplane::Plane,
    app: &str,
    addr: SocketAddr,
) -> kiln_proxy::DrainOutcome {
    plane.drain(app, addr).await.unwrap_or_else(|e| {
        tracing::warn!(app = %app, instance = %addr, error = %e, "drain not confirmed by the router");
        kiln_proxy::DrainOutcome::Drained
    })
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Executor {
    pub fn new(
        provider: Arc<dyn Provider>,
        ledger: Ledger,
        clock: Arc<dyn Clock>,
        secrets: crate::secrets::Secrets,
        plane: Arc<kiln_dataplane::Plane>,
        attestations: Option<Arc<dyn crate::gate::Attestations>>,
    ) -> Executor {
        Executor {
            attestations,
            secrets,
            plane,
            provider,
            ledger: Arc::new(Mutex::new(ledger)),
            clock,
            drift: Arc::default(),
            destroying: Arc::default(),
            migrations: Arc::default(),
            creates: Arc::default(),
            metrics: Arc::default(),
        }
    }

    /// Drift found per instance, as it is now.
    pub fn drift_now(&self) -> BTreeMap<InstanceId, String> {
        lock(&self.drift).clone()
    }

    /// The instances being destroyed, as they are now.
    pub fn destroying_now(&self) -> BTreeSet<InstanceId> {
        lock(&self.destroying).clone()
    }

    /// The ledger, for reads and for records that are not events (releases, documents).
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// Records `event` about `app` now.
    pub fn record(&self, app: &str, event: &Event) -> Result<()> {
        let now = self.clock.now_ms();
        self.ledger().append(app, event, now)?;
        Ok(())
    }

    /// Records a decision's events, of a rollout with `strategy`; each is counted in the
    /// metrics once recorded (the planner emits an outcome or a verdict once).
    pub fn record_rollout(
        &self,
        app: &str,
        events: &[RolloutEvent],
        release: u64,
        strategy: &'static str,
    ) -> Result<()> {
        for e in events {
            self.record(app, &rollout_event(e, release))?;
            self.metrics.rollout_event(strategy, e);
        }
        Ok(())
    }

    /// Swaps the router's table to `target` (one atomic swap), recording a weight change.
    pub async fn publish(
        &self,
        app: &str,
        a: &mut AppCtl,
        target: RouteTarget,
        addrs: &BTreeMap<String, (SocketAddr, u64)>,
    ) -> Result<()> {
        let mut releases = Vec::new();
        for (release, weight) in &target.weights {
            let members: Vec<SocketAddr> = target
                .members
                .iter()
                .filter_map(|m| addrs.get(m))
                .filter(|(_, r)| r == release)
                .map(|(addr, _)| *addr)
                .collect();
            releases.push(kiln_proxy::RouteRelease::new(
                release_name(*release),
                *weight,
                &members,
            ));
        }
        let table = RouteTable::new(releases).map_err(|e| ControlError::Router(e.to_string()))?;
        let changed = target.weights != a.route.weights;
        self.plane.set_route(app, &table).await?;
        let event = Event::RouteChanged {
            weights: target.weights.clone(),
            instances: target.members.len(),
        };
        a.route = target;
        if changed {
            self.record(app, &event)?;
        }
        Ok(())
    }

    /// Starts `[deploy.migrate]` in a one-shot instance of `release`, unless one runs.
    pub fn migrate(&self, app: &str, a: &AppCtl, release: u64) -> Result<()> {
        let Some(m) = a.config.deploy.migrate.clone() else {
            return Ok(());
        };
        if lock(&self.migrations).contains_key(app) {
            return Ok(());
        }
        let mut spec = a.instance_spec(
            app,
            release,
            Some((crate::app::MIGRATION_ROLE, m.command.clone())),
        );
        // Read in the migration's task, off the reconciler's pass: a command may take seconds,
        // and a failure there is the migration's, recorded once like any other.
        let (secrets, refs) = (self.secrets.clone(), a.config.service.secrets.clone());
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(a.config.deploy.progress_deadline_ms);
        let event = Event::MigrationStarted {
            release,
            command: m.command,
            schema: m.schema,
        };
        // Recorded before it is marked running: a failed record leaves nothing that would
        // keep the next pass from trying again.
        self.record(app, &event)?;
        lock(&self.migrations).insert(app.to_owned(), Migration::Running);
        let provider = Arc::clone(&self.provider);
        let migrations = Arc::clone(&self.migrations);
        let name = app.to_owned();
        let app_name = app.to_owned();
        // A migration's instance runs the release's image like any other: the policy is
        // checked before it is created.
        let policy = (!(a.config.policy.is_empty() && a.config.daemon_policy.is_empty()))
            .then(|| a.config.clone());
        let exec = self.clone();
        tokio::spawn(async move {
            if let Some(config) = policy
                && let Err(refusal) = exec.check_policy(&spec.image, config).await
            {
                let event = Event::PolicyRefused {
                    release: Some(release),
                    image: refusal.image.to_string(),
                    policy: refusal.policy.to_owned(),
                    missing: refusal.missing.clone(),
                    actor: "reconciler".to_owned(),
                };
                if let Err(e) = exec.record(&name, &event) {
                    tracing::error!(app = %name, release, error = %e, "cannot record a policy refusal");
                }
                lock(&migrations).insert(name, Migration::Done(Err(refusal.to_string())));
                return;
            }
            let read = if refs.is_empty() {
                Ok(Vec::new())
            } else {
                tokio::task::spawn_blocking(move || secrets.for_instance(&app_name, release, &refs))
                    .await
                    .unwrap_or_else(|e| {
                        Err(ControlError::Internal(format!("reading secrets: {e}")))
                    })
            };
            let outcome = match read {
                Ok(values) => {
                    spec.secrets = values.clone();
                    let ran = run_once(
                        provider.as_ref(),
                        spec,
                        deadline,
                        MIGRATION_OUTPUT,
                        std::future::pending(),
                    )
                    .await;
                    // Judged by its exit: a migration that ran and exited 0 changed the
                    // database, whether or not its instance could be removed afterwards.
                    match ran {
                        Ok(one) => {
                            if let Some(e) = &one.destroy_error {
                                tracing::warn!(instance = %one.id, error = %e, "migration instance not removed");
                            }
                            // Its output goes into the ledger, for good: no secret value
                            // it printed (a DSN, say) goes with it.
                            one.failure()
                                .map_or(Ok(()), |f| Err(crate::secrets::scrub(&f, &values)))
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            lock(&migrations).insert(name, Migration::Done(outcome));
        });
        Ok(())
    }

    /// Forgets what was running or failing for `app`: a new goal (apply, rollback) or `down`
    /// starts it afresh, without a stale migration outcome or a create backoff.
    pub fn forget(&self, app: &str) {
        self.creates.forget(app);
        let mut m = lock(&self.migrations);
        if matches!(m.get(app), Some(Migration::Done(_))) {
            m.remove(app);
        }
    }

    /// Whether a migration of `app` runs or has finished unread.
    pub fn migrating(&self, app: &str) -> bool {
        lock(&self.migrations).contains_key(app)
    }

    /// A finished migration's outcome, once (`None` while none finished).
    pub fn take_migration(&self, app: &str) -> Option<std::result::Result<(), String>> {
        let mut m = lock(&self.migrations);
        match m.get(app) {
            Some(Migration::Done(_)) => match m.remove(app) {
                Some(Migration::Done(outcome)) => Some(outcome),
                _ => None,
            },
            _ => None,
        }
    }

    /// Records why `id` goes, then drains, stops and destroys it in the background.
    pub fn destroy(
        &self,
        app: &str,
        a: &AppCtl,
        id: InstanceId,
        addr: SocketAddr,
        why: Why,
    ) -> Result<()> {
        if !lock(&self.destroying).insert(id.clone()) {
            return Ok(());
        }
        let instance = id.to_string();
        let event = if why.cause.replaces() {
            Event::InstanceReplaced {
                instance,
                release: why.release,
                cause: why.cause,
            }
        } else {
            Event::InstanceDestroyed {
                instance,
                release: why.release,
                cause: why.cause,
            }
        };
        if let Err(e) = self.record(app, &event) {
            // Not destroyed, so a later pass decides again and records it then.
            lock(&self.destroying).remove(&id);
            return Err(e);
        }
        let provider = Arc::clone(&self.provider);
        let plane = Arc::clone(&self.plane);
        let name = app.to_owned();
        let destroying = Arc::clone(&self.destroying);
        let drift = Arc::clone(&self.drift);
        let grace = a.stop_grace();
        tokio::spawn(async move {
            // The route that leaves it out was published in the same pass; a drain that
            // still finds it routed waits for that change a little before it gives up.
            let mut outcome = drain(&plane, &name, addr).await;
            for _ in 0..20 {
                if outcome != kiln_proxy::DrainOutcome::StillRouted {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                outcome = drain(&plane, &name, addr).await;
            }
            if outcome == kiln_proxy::DrainOutcome::StillRouted {
                // Not destroyed: let a later decision see it again.
                lock(&destroying).remove(&id);
                return;
            }
            let _stopped = provider.stop(&id, grace).await;
            let mut wait = Duration::from_secs(1);
            for attempt in 1..=5 {
                match provider.destroy(&id).await {
                    Ok(()) => {
                        lock(&drift).remove(&id);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(instance = %id, error = %e, attempt, "destroy failed");
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                }
            }
            // The id stays in `destroying` until a listing no longer shows it (`reconcile`
            // prunes it), so neither a listing taken before the destroy finished nor one that
            // kept failing brings it back into a decision (and into a second event).
        });
        Ok(())
    }
}

/// Why an instance is destroyed, for its event.
pub(crate) struct Why {
    pub release: Option<u64>,
    pub cause: Cause,
}

impl Why {
    /// The planner's reason as the ledger records it. A dead instance with drift on record
    /// was removed or broken behind kiln's back: the drift is its cause, in one event.
    ///
    /// `seen` is the instance as last observed: where it is reached and, when its provider
    /// could tell, what it listened on, which a failed health check's event reports.
    pub fn of(
        reason: &DestroyReason,
        drift: Option<&String>,
        seen: Option<&(SocketAddr, Option<Vec<SocketAddr>>)>,
    ) -> Why {
        let listening = seen.and_then(|(addr, l)| Some(listening_note(*addr, l.as_deref()?)));
        let cause = match (reason, drift) {
            (r, Some(findings)) if r.is_replacement() => Cause::Drifted {
                findings: findings.clone(),
            },
            (DestroyReason::Exited { code, .. }, _) => Cause::Exited { code: *code },
            (DestroyReason::NeverHealthy { .. }, _) => Cause::NeverHealthy { listening },
            (DestroyReason::Unhealthy { .. }, _) => Cause::Unhealthy { listening },
            (DestroyReason::Drifted { findings, .. }, _) => Cause::Drifted {
                findings: findings.clone(),
            },
            (DestroyReason::Superseded { .. }, _) => Cause::Superseded,
            (DestroyReason::Aborted { .. }, _) => Cause::Aborted,
            (DestroyReason::ScaledDown { replicas, .. }, _) => Cause::ScaledDown {
                replicas: *replicas,
            },
            (DestroyReason::Retired { kept, .. }, _) => Cause::Retired {
                kept_ms: u64::try_from(kept.as_millis()).unwrap_or(u64::MAX),
            },
        };
        Why {
            release: Some(reason.release()),
            cause,
        }
    }
}

/// What an instance that never became healthy at `addr` listened on, said so that the
/// mistake is plain: nothing, the loopback of its own namespace, or another port.
pub(crate) fn listening_note(addr: SocketAddr, listening: &[SocketAddr]) -> String {
    let serves = |l: &SocketAddr| {
        l.port() == addr.port() && (l.ip().is_unspecified() || l.ip() == addr.ip())
    };
    if listening.is_empty() {
        return format!("it listens on no TCP port (checked at {addr})");
    }
    let list = listening
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if listening.iter().any(serves) {
        format!("it listens on {list}, so its health check itself fails")
    } else if listening.iter().all(|l| l.ip().is_loopback()) {
        format!(
            "it listens on {list} only, its own loopback, not on {addr}: listen on 0.0.0.0 \
             (all addresses) and $PORT"
        )
    } else {
        format!("it listens on {list}, not on {addr}: listen on $PORT ([service] port)")
    }
}

/// A rollout decision's event as the ledger records it.
fn rollout_event(e: &RolloutEvent, release: u64) -> Event {
    match e {
        RolloutEvent::StepStarted { step, weight } => Event::StepStarted {
            step: *step,
            weight: *weight,
        },
        RolloutEvent::StepJudged {
            step,
            weight,
            verdict,
        } => Event::StepJudged {
            step: *step,
            weight: *weight,
            verdict: verdict_record(verdict),
        },
        RolloutEvent::StepInconclusive {
            inconclusive,
            metrics,
            then,
        } => Event::StepJudged {
            step: inconclusive.step,
            weight: inconclusive.weight,
            verdict: kiln_ledger::Verdict {
                reason: Some(format!(
                    "{}; on_inconclusive = \"{}\"",
                    inconclusive.numbers(),
                    then.as_str()
                )),
                ..verdict_record(&Verdict::Inconclusive { metrics: *metrics })
            },
        },
        RolloutEvent::AwaitingPromotion { inconclusive } => Event::AwaitingPromotion {
            release: Some(release),
            reason: inconclusive.map(|i| i.to_string()),
        },
        RolloutEvent::Completed { release, shortcut } => Event::RolloutCompleted {
            release: *release,
            reason: shortcut.map(|s| s.to_string()),
        },
        RolloutEvent::Aborted { reason } => Event::RolloutAborted {
            reason: reason.clone(),
        },
        RolloutEvent::PreviousRetired { release } => Event::PreviousRetired { release: *release },
    }
}

fn verdict_record(v: &Verdict) -> kiln_ledger::Verdict {
    let (name, metrics, reason) = match v {
        Verdict::Pass { metrics } => ("pass", metrics, None),
        Verdict::Inconclusive { metrics } => ("inconclusive", metrics, None),
        Verdict::Fail { metrics, reason } => ("fail", metrics, Some(reason.clone())),
    };
    let window = |w: &kiln_deploy::Measurement| kiln_ledger::Measurement {
        requests: w.requests,
        errors: w.errors,
        p99_ms: w.p99_ms,
    };
    kiln_ledger::Verdict {
        verdict: name.to_owned(),
        reason,
        metrics: kiln_ledger::StepMetrics {
            canary: window(&metrics.canary),
            stable: window(&metrics.stable),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_never_healthy_instance_is_told_where_it_listens() {
        let at: SocketAddr = "10.209.0.7:8080".parse().unwrap();
        let note = |l: &[&str]| {
            let l: Vec<SocketAddr> = l.iter().map(|a| a.parse().unwrap()).collect();
            listening_note(at, &l)
        };
        assert_eq!(
            note(&[]),
            "it listens on no TCP port (checked at 10.209.0.7:8080)"
        );
        assert_eq!(
            note(&["127.0.0.1:8080"]),
            "it listens on 127.0.0.1:8080 only, its own loopback, not on 10.209.0.7:8080: \
             listen on 0.0.0.0 (all addresses) and $PORT"
        );
        assert_eq!(
            note(&["0.0.0.0:80", "127.0.0.1:9000"]),
            "it listens on 0.0.0.0:80, 127.0.0.1:9000, not on 10.209.0.7:8080: listen on \
             $PORT ([service] port)"
        );
        assert_eq!(
            note(&["[::]:8080"]),
            "it listens on [::]:8080, so its health check itself fails"
        );
    }
}
