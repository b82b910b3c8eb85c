//! One app behind the router: its published route table, the instances it routes to (and
//! those draining out of it), and its per-release measurements.
//!
//! **API boundary:** this is the control surface the daemon calls. Route changes are
//! serialised by one lock that requests never take; requests read the published table with
//! one atomic load, so a request sees the whole old table or the whole new one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::AppConfig;
use crate::gate::{Gate, GateMode};
use crate::instance::Backend;
use crate::route::{LiveRelease, Published, RouteTable};
use crate::stats::{ReleaseStats, Snapshot};

/// An app: a name, its settings, and where its traffic goes now.
pub struct App {
    config: AppConfig,
    route: ArcSwap<Published>,
    control: Mutex<Control>,
    /// Whether new requests are forwarded, held or answered with a maintenance page.
    pub(crate) gate: Gate,
    /// Second zero of the sliding windows.
    epoch: tokio::time::Instant,
}

/// What only route changes touch.
#[derive(Default)]
struct Control {
    /// Every instance in the published table.
    routed: HashMap<SocketAddr, Arc<Backend>>,
    /// Instances that left the route with requests still in flight.
    retired: HashMap<SocketAddr, Arc<Backend>>,
    /// Measurements of the releases in the published table.
    stats: HashMap<String, Arc<ReleaseStats>>,
}

/// What a route change did to the set of instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteChange {
    /// Instances that entered the route.
    pub added: Vec<SocketAddr>,
    /// Instances that left it: [`App::drain`] each before stopping it.
    pub removed: Vec<SocketAddr>,
}

/// How waiting for an instance to drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// No request is in flight on the instance: it may be stopped.
    Drained,
    /// The drain timeout passed with requests still in flight; stopping it now cuts them.
    TimedOut {
        /// Requests still in flight when the timeout passed.
        in_flight: usize,
    },
    /// The instance is (again) in the route: it must not be stopped.
    StillRouted,
}

impl App {
    /// An app with an empty route table (every request gets 503 until [`App::set_route`]).
    #[must_use]
    pub fn new(config: AppConfig) -> Arc<App> {
        Arc::new(App {
            config,
            route: ArcSwap::from_pointee(Published::new(Vec::new())),
            control: Mutex::new(Control::default()),
            gate: Gate::default(),
            epoch: tokio::time::Instant::now(),
        })
    }

    /// The app's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The app's settings.
    #[must_use]
    pub fn config(&self) -> &AppConfig {
        &self.config
    }

    /// Publishes `table` atomically. Requests already routed finish where they are; every new
    /// request reads the new table. Instances that left the route take no new request and
    /// their idle connections are closed; [`App::drain`] tells when they are safe to stop.
    pub fn set_route(&self, table: &RouteTable) -> RouteChange {
        let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        let control = &mut *control;
        let mut routed = HashMap::new();
        let mut stats = HashMap::new();
        let mut live = Vec::new();
        let mut change = RouteChange::default();
        for release in table.releases() {
            let release_stats = control
                .stats
                .get(&release.name)
                .cloned()
                .unwrap_or_else(|| Arc::new(ReleaseStats::new(release.name.as_str().into())));
            stats.insert(release.name.clone(), Arc::clone(&release_stats));
            let mut healthy = Vec::new();
            for instance in &release.instances {
                let state = match control.routed.get(&instance.addr) {
                    Some(state) => Arc::clone(state),
                    None => {
                        change.added.push(instance.addr);
                        control.retired.remove(&instance.addr).map_or_else(
                            || Arc::new(Backend::new(instance.addr)),
                            |state| {
                                state.restore();
                                state
                            },
                        )
                    }
                };
                if instance.healthy {
                    healthy.push(Arc::clone(&state));
                }
                routed.insert(instance.addr, state);
            }
            live.push(LiveRelease::new(
                release.name.as_str().into(),
                release.weight,
                healthy,
                release_stats,
            ));
        }
        self.route.store(Arc::new(Published::new(live)));
        // Only after the new table is visible: a request that still picks a removed instance
        // from the old table is refused by it and picks again from the new one.
        for (addr, state) in control.routed.drain() {
            if !routed.contains_key(&addr) {
                state.remove();
                change.removed.push(addr);
                control.retired.insert(addr, state);
            }
        }
        control.retired.retain(|_, state| state.outstanding() > 0);
        control.routed = routed;
        control.stats = stats;
        change.removed.sort_unstable();
        tracing::info!(
            app = %self.config.name,
            added = change.added.len(),
            removed = change.removed.len(),
            "route changed"
        );
        change
    }

    /// Opens, pauses or closes the app for maintenance. Requests in flight finish either way;
    /// held ones go on when it opens, get the page when it closes for maintenance. Returns
    /// how many held requests were let go.
    pub fn set_gate(&self, mode: GateMode) -> usize {
        let released = self.gate.set(mode.clone());
        tracing::info!(app = %self.config.name, ?mode, released, "gate changed");
        released
    }

    /// What the router does with the app's new requests now.
    #[must_use]
    pub fn gate(&self) -> GateMode {
        self.gate.mode()
    }

    /// Requests the paused gate holds now.
    #[must_use]
    pub fn held(&self) -> usize {
        self.gate.held()
    }

    /// Waits until the instance at `addr` has no request in flight, or the app's drain timeout
    /// passes. An instance the app never routed to, or already drained, is
    /// [`DrainOutcome::Drained`] at once.
    pub fn drain(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> impl Future<Output = DrainOutcome> + Send + 'static {
        let app = Arc::clone(self);
        async move {
            let state = {
                let control = app.control.lock().unwrap_or_else(PoisonError::into_inner);
                if control.routed.contains_key(&addr) {
                    return DrainOutcome::StillRouted;
                }
                control.retired.get(&addr).cloned()
            };
            let Some(state) = state else {
                return DrainOutcome::Drained;
            };
            let outcome = match tokio::time::timeout(app.config.drain_timeout, state.idle()).await {
                Ok(()) => DrainOutcome::Drained,
                Err(_) => DrainOutcome::TimedOut {
                    in_flight: state.outstanding(),
                },
            };
            let mut control = app.control.lock().unwrap_or_else(PoisonError::into_inner);
            if control.routed.contains_key(&addr) {
                return DrainOutcome::StillRouted;
            }
            if outcome == DrainOutcome::Drained {
                control.retired.remove(&addr);
            }
            outcome
        }
    }

    /// Requests in flight on the instance at `addr` (routed or draining).
    #[must_use]
    pub fn in_flight(&self, addr: SocketAddr) -> usize {
        let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        control
            .routed
            .get(&addr)
            .or_else(|| control.retired.get(&addr))
            .map_or(0, |s| s.outstanding())
    }

    /// Starts watching for `release`'s next response: [`App::first_response`] then tells when
    /// it arrived. Call it before [`App::set_route`] to learn how soon after a switch the new
    /// release answered. Returns `false` when `release` is not in the route table.
    pub fn watch_first_response(&self, release: &str) -> bool {
        let stats = {
            let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
            control.stats.get(release).cloned()
        };
        stats.map(|stats| stats.watch_first_response()).is_some()
    }

    /// When the router received the first response head from `release` (for any client)
    /// since the last [`App::watch_first_response`]; `None` until then, or when `release` is
    /// not in the route table.
    #[must_use]
    pub fn first_response(&self, release: &str) -> Option<tokio::time::Instant> {
        let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        control.stats.get(release)?.first_response()
    }

    /// The measurements of `release` over the last `window` (whole seconds, the current one
    /// included, at most [`crate::WINDOW_MAX_SECONDS`]); `None` when the release is not in the
    /// route table.
    #[must_use]
    pub fn snapshot(&self, release: &str, window: Duration) -> Option<Snapshot> {
        let stats = {
            let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
            control.stats.get(release).cloned()
        }?;
        Some(stats.snapshot(
            self.second_at(tokio::time::Instant::now()),
            window.as_secs().max(1),
        ))
    }

    pub(crate) fn current(&self) -> Arc<Published> {
        self.route.load_full()
    }

    /// The stats windows' second that `instant` falls in.
    pub(crate) fn second_at(&self, instant: tokio::time::Instant) -> u64 {
        instant.saturating_duration_since(self.epoch).as_secs()
    }

    pub(crate) fn all_stats(&self) -> Vec<Arc<ReleaseStats>> {
        let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = control.stats.values().cloned().collect();
        all.sort_by(|a, b| a.release.cmp(&b.release));
        all
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::route::RouteRelease;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn app(drain: Duration) -> Arc<App> {
        let mut config = AppConfig::new("shop");
        config.drain_timeout = drain;
        App::new(config)
    }

    fn table(releases: Vec<RouteRelease>) -> RouteTable {
        RouteTable::new(releases).unwrap()
    }

    fn acquire(app: &App, port: u16) -> crate::instance::InFlight {
        let table = app.current();
        let instance = table
            .releases
            .iter()
            .flat_map(|r| r.healthy.iter())
            .find(|i| i.addr == addr(port))
            .unwrap();
        instance.acquire().unwrap()
    }

    #[test]
    fn route_changes_report_added_and_removed_instances() {
        let app = app(Duration::from_secs(1));
        let change = app.set_route(&table(vec![RouteRelease::new(
            "r1",
            1,
            &[addr(1), addr(2)],
        )]));
        assert_eq!(change.added, [addr(1), addr(2)]);
        assert!(change.removed.is_empty());
        let change = app.set_route(&table(vec![RouteRelease::new(
            "r2",
            1,
            &[addr(2), addr(3)],
        )]));
        assert_eq!(change.added, [addr(3)]);
        assert_eq!(change.removed, [addr(1)]);
        assert!(app.snapshot("r1", Duration::from_secs(1)).is_none());
        assert_eq!(
            app.snapshot("r2", Duration::from_secs(1)).unwrap().requests,
            0
        );
    }

    #[test]
    fn a_first_response_watch_needs_a_routed_release() {
        let app = app(Duration::from_secs(30));
        assert!(!app.watch_first_response("r1"));
        app.set_route(&table(vec![RouteRelease::new("r1", 1, &[addr(1)])]));
        assert!(app.watch_first_response("r1"));
        assert_eq!(app.first_response("r1"), None);
        let at = tokio::time::Instant::now();
        app.all_stats().pop().unwrap().saw_response(at);
        assert_eq!(app.first_response("r1"), Some(at));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_in_flight_requests() {
        let app = app(Duration::from_secs(30));
        app.set_route(&table(vec![RouteRelease::new("r1", 1, &[addr(1)])]));
        let request = acquire(&app, 1);
        assert_eq!(app.drain(addr(1)).await, DrainOutcome::StillRouted);
        app.set_route(&table(vec![RouteRelease::new("r2", 1, &[addr(2)])]));
        let drain = tokio::spawn(app.drain(addr(1)));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!drain.is_finished(), "a request is still in flight");
        assert_eq!(app.in_flight(addr(1)), 1);
        drop(request);
        assert_eq!(drain.await.unwrap(), DrainOutcome::Drained);
        // Drained instances are forgotten; asking again is still an immediate yes.
        assert_eq!(app.drain(addr(1)).await, DrainOutcome::Drained);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_after_the_drain_timeout() {
        let app = app(Duration::from_secs(5));
        app.set_route(&table(vec![RouteRelease::new("r1", 1, &[addr(1)])]));
        let _stuck = acquire(&app, 1);
        app.set_route(&RouteTable::empty());
        let started = tokio::time::Instant::now();
        assert_eq!(
            app.drain(addr(1)).await,
            DrainOutcome::TimedOut { in_flight: 1 }
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_routed_again_while_draining_is_not_drained() {
        let app = app(Duration::from_secs(30));
        app.set_route(&table(vec![RouteRelease::new("r1", 1, &[addr(1)])]));
        let request = acquire(&app, 1);
        app.set_route(&RouteTable::empty());
        let drain = tokio::spawn(app.drain(addr(1)));
        tokio::task::yield_now().await;
        let change = app.set_route(&table(vec![RouteRelease::new("r1", 1, &[addr(1)])]));
        assert_eq!(change.added, [addr(1)]);
        // The re-added instance keeps counting the request that was in flight.
        assert_eq!(app.in_flight(addr(1)), 1);
        drop(request);
        assert_eq!(drain.await.unwrap(), DrainOutcome::StillRouted);
    }
}
