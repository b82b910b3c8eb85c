//! Creating instances, in the background: the reconcile pass launches creates and goes on,
//! so no pass (and no API call waiting on the apps lock behind it) waits for a provider
//! that is slow to create — a Docker Engine loading an image, a runtime that hangs.
//!
//! **Invariant:** the planner never over- or under-creates because of a create in flight.
//! `decide` counts the instances a listing shows; [`Creates`] counts the creates that
//! listing cannot show yet: those whose instance has no id yet, or whose id the listing
//! did not contain. A finished create is forgotten once a listing taken after it finished
//! has been seen, whether or not the instance is in it (it may already be gone).
//!
//! Creates run one at a time (`one_at_a_time`), as they did inside the pass: a provider
//! picks ports and names per create and is not asked to do two at once.
//!
//! A provider that keeps failing is retried with exponential backoff per app and release,
//! with one event per change: the first failure, then one each time the wait doubles.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_deploy::Millis;
use kiln_ledger::Event;
use kiln_runtime::{InstanceId, InstanceSpec};

use crate::app::AppCtl;
use crate::config::{ReleaseConfig, SecretConfig};
use crate::error::Result;
use crate::executor::{Executor, lock};

/// The first retry after a failed create; doubled per failure in a row, up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between creates of a release whose provider keeps failing.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Creates of one release that keep failing: when the next may be tried.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    next_ms: Millis,
}

/// One create in flight.
#[derive(Debug)]
struct InFlight {
    app: String,
    release: u64,
    /// The instance, once the provider created it.
    id: Option<InstanceId>,
    /// A listing has shown the instance: the planner counts it from there.
    seen: bool,
    /// The listing number current when it finished (done, failed or abandoned).
    finished_at: Option<u64>,
}

/// The creates in flight and the backoff of failing ones.
#[derive(Default)]
pub(crate) struct Creates {
    next: AtomicU64,
    in_flight: Mutex<BTreeMap<u64, InFlight>>,
    backoff: Mutex<BTreeMap<(String, u64), Backoff>>,
    /// Incremented as each listing of the provider begins.
    listing: AtomicU64,
    one_at_a_time: tokio::sync::Mutex<()>,
    /// Woken as each create finishes.
    finished: tokio::sync::Notify,
}

impl Creates {
    /// Called as a listing begins; returns its number.
    pub fn listing_begins(&self) -> u64 {
        self.listing.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Called with what listing `n` showed: creates it shows are counted by the planner from
    /// now on; those finished before it began are forgotten.
    pub fn listing_shows(&self, n: u64, listed: &BTreeSet<&InstanceId>) {
        lock(&self.in_flight).retain(|_, c| {
            if c.id.as_ref().is_some_and(|id| listed.contains(id)) {
                c.seen = true;
            }
            c.finished_at.is_none_or(|f| f >= n)
        });
    }

    /// Creates of `release` of `app` the planner cannot see yet.
    fn unseen(&self, app: &str, release: u64) -> u32 {
        let n = lock(&self.in_flight)
            .values()
            .filter(|c| c.app == app && c.release == release && !c.seen)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn backing_off(&self, app: &str, release: u64, now: Millis) -> bool {
        lock(&self.backoff)
            .get(&(app.to_owned(), release))
            .is_some_and(|b| now < b.next_ms)
    }

    fn finish(&self, ticket: u64) {
        let now = self.listing.load(Ordering::SeqCst);
        if let Some(c) = lock(&self.in_flight).get_mut(&ticket) {
            c.finished_at = Some(now);
        }
        self.finished.notify_waiters();
    }

    /// Whether a create of `app` is running or waiting for its turn.
    fn busy(&self, app: &str) -> bool {
        lock(&self.in_flight)
            .values()
            .any(|c| c.app == app && c.finished_at.is_none())
    }

    /// Forgets `app`'s backoff (a new goal, or `down`).
    pub fn forget(&self, app: &str) {
        lock(&self.backoff).retain(|(a, _), _| a != app);
    }
}

impl Executor {
    /// Launches creates of `release` until `count` more than the listing shows are on their
    /// way; returns at once.
    pub fn create(&self, app: &str, a: &AppCtl, release: u64, count: u32) -> Result<()> {
        let launch = count.saturating_sub(self.creates.unseen(app, release));
        if launch == 0 || self.creates.backing_off(app, release, self.clock.now_ms()) {
            return Ok(());
        }
        for _ in 0..launch {
            let ticket = self.creates.next.fetch_add(1, Ordering::SeqCst);
            let entry = InFlight {
                app: app.to_owned(),
                release,
                id: None,
                seen: false,
                finished_at: None,
            };
            lock(&self.creates.in_flight).insert(ticket, entry);
            let exec = self.clone();
            let spec = a.instance_spec(app, release, None);
            let secrets = a.config.service.secrets.clone();
            let app = app.to_owned();
            let policy = (!(a.config.policy.is_empty() && a.config.daemon_policy.is_empty()))
                .then(|| a.config.clone());
            tokio::spawn(async move {
                exec.create_in_background(ticket, &app, release, spec, &secrets, policy)
                    .await;
                exec.creates.finish(ticket);
            });
        }
        Ok(())
    }

    /// Waits until no create of `app` is in flight (for at most `limit`), so that a listing
    /// shows every instance they made: `down` would otherwise miss an instance whose create
    /// had begun but not yet recorded it, and leave it running. Whether they all finished.
    pub async fn creates_settled(&self, app: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let finished = self.creates.finished.notified();
            tokio::pin!(finished);
            // Registered before the check, so a create finishing in between still wakes it.
            finished.as_mut().enable();
            if !self.creates.busy(app) {
                return true;
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return false;
            }
        }
    }

    async fn create_in_background(
        &self,
        ticket: u64,
        app: &str,
        release: u64,
        mut spec: InstanceSpec,
        secrets: &BTreeMap<String, SecretConfig>,
        policy: Option<ReleaseConfig>,
    ) {
        let _turn = self.creates.one_at_a_time.lock().await;
        // A create queued behind one that failed waits out the backoff like the next pass.
        if self.creates.backing_off(app, release, self.clock.now_ms()) {
            return;
        }
        // The image is checked again before each instance of it starts: what it carries may
        // have changed since the apply (a signature removed, a store replaced).
        if let Some(config) = policy
            && let Err(refusal) = self.check_policy(&spec.image, config).await
        {
            let first = Event::PolicyRefused {
                release: Some(release),
                image: refusal.image.to_string(),
                policy: refusal.policy.to_owned(),
                missing: refusal.missing.clone(),
                actor: "reconciler".to_owned(),
            };
            if let Err(e) = self.create_failed(app, release, &refusal.to_string(), first) {
                tracing::error!(app = %app, release, error = %e, "cannot record a policy refusal");
            }
            return;
        }
        // Read here, off the reconciler's pass and the runtime's threads: a secret's
        // command may take seconds. Nothing to read, nothing to wait for.
        let read = if secrets.is_empty() {
            Ok(Ok(Vec::new()))
        } else {
            let (s, app, secrets) = (self.secrets.clone(), app.to_owned(), secrets.clone());
            tokio::task::spawn_blocking(move || s.for_instance(&app, release, &secrets)).await
        };
        let created = match read {
            Ok(Ok(values)) => {
                spec.secrets = values;
                self.provider.create(spec).await.map_err(|e| e.to_string())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("reading secrets: {e}")),
        };
        let outcome = match created {
            Ok(id) => {
                if let Some(c) = lock(&self.creates.in_flight).get_mut(&ticket) {
                    c.id = Some(id.clone());
                }
                match self.provider.start(&id).await {
                    Ok(()) => Ok(id),
                    Err(e) => {
                        // Nothing to keep of an instance that did not start.
                        let _undone = self.provider.destroy(&id).await;
                        Err(e.to_string())
                    }
                }
            }
            Err(e) => Err(e),
        };
        let recorded = match outcome {
            Ok(id) => {
                lock(&self.creates.backoff).remove(&(app.to_owned(), release));
                let instance = id.to_string();
                self.record(app, &Event::InstanceCreated { instance, release })
            }
            Err(error) => {
                let first = Event::InstanceCreateFailed {
                    release,
                    error: error.clone(),
                };
                self.create_failed(app, release, &error, first)
            }
        };
        if let Err(e) = recorded {
            // The instance exists (or not) as the provider says; the next pass sees it.
            tracing::error!(app = %app, release, error = %e, "cannot record a create");
        }
    }

    /// The deploy policies `config` recorded, checked against what `image` carries now.
    pub(crate) async fn check_policy(
        &self,
        image: &kiln_runtime::Digest,
        config: ReleaseConfig,
    ) -> std::result::Result<(), crate::policy::Refusal> {
        let (owned, attestations) = (image.clone(), self.attestations.clone());
        let checked = tokio::task::spawn_blocking(move || {
            crate::policy::enforce(&owned, &config, attestations.as_deref())
        })
        .await;
        checked.unwrap_or_else(|e| {
            Err(crate::policy::Refusal {
                policy: "daemon",
                image: image.clone(),
                missing: vec![format!("the policy check failed: {e}")],
            })
        })
    }

    /// Backs the release's creates off and records the failure: the first one in a row as
    /// `first`, later ones only when the wait doubles, so a provider that keeps failing gives
    /// a few events an hour, not ten a second.
    fn create_failed(&self, app: &str, release: u64, error: &str, first: Event) -> Result<()> {
        let now = self.clock.now_ms();
        let b = {
            let mut all = lock(&self.creates.backoff);
            let b = all.entry((app.to_owned(), release)).or_insert(Backoff {
                failures: 0,
                next_ms: now,
            });
            b.failures = b.failures.saturating_add(1);
            let wait = backoff_delay(b.failures);
            b.next_ms = now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            *b
        };
        let error = error.to_owned();
        if b.failures == 1 {
            return self.record(app, &first);
        }
        if backoff_delay(b.failures) > backoff_delay(b.failures - 1) {
            let retry_in_ms = u64::try_from(b.next_ms - now).unwrap_or(0);
            let failures = b.failures;
            let event = Event::CreateBackoff {
                release,
                failures,
                retry_in_ms,
                error,
            };
            return self.record(app, &event);
        }
        Ok(())
    }
}

/// The wait after `failures` failed creates in a row.
fn backoff_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap() {
        let waits: Vec<u64> = (1..=10)
            .map(|n| u64::try_from(backoff_delay(n).as_millis()).unwrap_or(0))
            .collect();
        assert_eq!(
            waits,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
    }

    #[test]
    fn a_create_counts_until_a_listing_shows_it_then_until_one_after_it_finished() {
        let c = Creates::default();
        let id = InstanceId::new("web-1").unwrap();
        let ticket = 7;
        let entry = InFlight {
            app: "web".into(),
            release: 2,
            id: None,
            seen: false,
            finished_at: None,
        };
        lock(&c.in_flight).insert(ticket, entry);
        let none = BTreeSet::new();
        let n = c.listing_begins();
        c.listing_shows(n, &none);
        assert_eq!(
            c.unseen("web", 2),
            1,
            "no id yet: the planner cannot see it"
        );
        if let Some(e) = lock(&c.in_flight).get_mut(&ticket) {
            e.id = Some(id.clone());
        }
        // Listed while still starting: from now on the planner counts it.
        let n = c.listing_begins();
        c.listing_shows(n, &[&id].into_iter().collect());
        assert_eq!(c.unseen("web", 2), 0);
        c.finish(ticket);
        // A listing that began before it finished keeps it; the next one forgets it.
        c.listing_shows(n, &none);
        assert_eq!(lock(&c.in_flight).len(), 1);
        let n = c.listing_begins();
        c.listing_shows(n, &none);
        assert!(lock(&c.in_flight).is_empty());
        assert_eq!(c.unseen("web", 2), 0);
    }
}
