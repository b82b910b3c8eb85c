//! An app's gate: whether the router forwards its new requests (open), holds them (paused),
//! or answers them itself (maintenance).
//!
//! **Hot path:** an open gate costs a request one atomic load ([`Gate::is_open`]); the lock
//! is taken only while the gate is closed.
//!
//! **Invariant:** a held request is never forgotten: it goes on when the gate opens (or
//! changes to maintenance, which then answers it), or is shed with a 503 when it has waited
//! `max_hold`, or when `max_held` newer ones push it out (the oldest first). The mode is
//! changed and read under one lock, so a request that finds the gate paused is queued before
//! a resume can empty the queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// What the router does with an app's new requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GateMode {
    /// Forward them.
    #[default]
    Open,
    /// Hold them (requests in flight finish) until the gate opens again.
    Paused {
        /// A request held longer than this is answered 503.
        max_hold: Duration,
        /// At most this many are held; a newer one pushes the oldest out with a 503.
        max_held: usize,
    },
    /// Answer every one 503 with `message` and `Retry-After`.
    Maintenance {
        /// For people: the body of the 503 (in HTML for browsers).
        message: Arc<str>,
        /// The `Retry-After` the 503 carries.
        retry_after: Duration,
    },
}

/// What a request that met a closed gate gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Forward it (the gate opened while it was held, or was open).
    Forward,
    /// Answer 503: it waited `max_hold`, or newer requests pushed it out of the queue.
    Shed,
    /// Answer the maintenance page.
    Maintenance {
        message: Arc<str>,
        retry_after: Duration,
    },
}

/// How a hold ends, as its queue tells the held request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// Look at the gate again.
    Recheck,
    /// Shed: pushed out by newer requests.
    Shed,
}

/// The requests held, oldest first (no I/O, no clock: the waiters time themselves).
#[derive(Default)]
pub(crate) struct HoldQueue {
    waiting: VecDeque<oneshot::Sender<Release>>,
}

impl HoldQueue {
    /// Queues one more request; when `max_held` are already waiting, the oldest is shed.
    fn push(&mut self, max_held: usize) -> oneshot::Receiver<Release> {
        if self.waiting.len() >= max_held {
            // Those that gave up (timed out, or their client left) hold no place.
            self.waiting.retain(|w| !w.is_closed());
        }
        while self.waiting.len() >= max_held.max(1) {
            if let Some(oldest) = self.waiting.pop_front() {
                let _gone = oldest.send(Release::Shed);
            }
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.push_back(tx);
        rx
    }

    /// Lets every held request look at the gate again; returns how many still waited.
    fn release_all(&mut self) -> usize {
        self.waiting
            .drain(..)
            .map(|w| w.send(Release::Recheck))
            .filter(Result::is_ok)
            .count()
    }

    /// Requests waiting now (not counting those that gave up).
    fn len(&self) -> usize {
        self.waiting.iter().filter(|w| !w.is_closed()).count()
    }
}

/// An app's gate.
#[derive(Default)]
pub(crate) struct Gate {
    /// Set while the mode is not [`GateMode::Open`]: what the request path reads.
    closed: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    mode: GateMode,
    held: HoldQueue,
}

impl Gate {
    /// Whether requests go straight through: one atomic load.
    #[inline]
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// The current mode.
    pub(crate) fn mode(&self) -> GateMode {
        self.lock().mode.clone()
    }

    /// Requests held now.
    pub(crate) fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Sets the mode; returns how many held requests were let go to look again (on open or
    /// maintenance: they are forwarded, or get the maintenance page).
    pub(crate) fn set(&self, mode: GateMode) -> usize {
        let mut inner = self.lock();
        self.closed.store(mode != GateMode::Open, Ordering::Release);
        let released = match mode {
            GateMode::Paused { max_held, .. } => {
                // A smaller bound sheds the oldest now.
                while inner.held.waiting.len() > max_held.max(1) {
                    if let Some(oldest) = inner.held.waiting.pop_front() {
                        let _gone = oldest.send(Release::Shed);
                    }
                }
                0
            }
            GateMode::Open | GateMode::Maintenance { .. } => inner.held.release_all(),
        };
        inner.mode = mode;
        released
    }

    /// What a request that found the gate closed gets; waits while the gate is paused.
    pub(crate) async fn admit(&self) -> Admission {
        loop {
            let (rx, max_hold) = {
                let mut inner = self.lock();
                match &inner.mode {
                    GateMode::Open => return Admission::Forward,
                    GateMode::Maintenance {
                        message,
                        retry_after,
                    } => {
                        return Admission::Maintenance {
                            message: Arc::clone(message),
                            retry_after: *retry_after,
                        };
                    }
                    &GateMode::Paused { max_hold, max_held } => {
                        (inner.held.push(max_held), max_hold)
                    }
                }
            };
            match tokio::time::timeout(max_hold, rx).await {
                // The gate changed, or the queue was dropped with its app: look again.
                Ok(Ok(Release::Recheck) | Err(_)) => {}
                Ok(Ok(Release::Shed)) | Err(_) => return Admission::Shed,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn paused(max_hold_s: u64, max_held: usize) -> GateMode {
        GateMode::Paused {
            max_hold: Duration::from_secs(max_hold_s),
            max_held,
        }
    }

    fn spawn_admit(gate: &Arc<Gate>) -> tokio::task::JoinHandle<Admission> {
        let gate = Arc::clone(gate);
        tokio::spawn(async move { gate.admit().await })
    }

    /// Lets spawned tasks run up to their next wait.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn an_open_gate_is_one_flag() {
        let gate = Gate::default();
        assert!(gate.is_open());
        gate.set(paused(30, 10));
        assert!(!gate.is_open());
        gate.set(GateMode::Open);
        assert!(gate.is_open());
    }

    #[test]
    fn a_full_queue_sheds_its_oldest() {
        let mut queue = HoldQueue::default();
        let mut first = queue.push(2);
        let mut second = queue.push(2);
        let mut third = queue.push(2);
        assert_eq!(first.try_recv(), Ok(Release::Shed));
        assert!(second.try_recv().is_err(), "still held");
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.release_all(), 2);
        assert_eq!(second.try_recv(), Ok(Release::Recheck));
        assert_eq!(third.try_recv(), Ok(Release::Recheck));
    }

    #[test]
    fn those_that_gave_up_hold_no_place() {
        let mut queue = HoldQueue::default();
        let gone = queue.push(2);
        let mut kept = queue.push(2);
        drop(gone);
        let _newest = queue.push(2);
        assert!(
            kept.try_recv().is_err(),
            "the place freed by the one gone is taken"
        );
        assert_eq!(queue.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_go_on_when_the_gate_opens() {
        let gate = Arc::new(Gate::default());
        gate.set(paused(30, 100));
        let held: Vec<_> = (0..3).map(|_| spawn_admit(&gate)).collect();
        settle().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(gate.held(), 3);
        assert!(held.iter().all(|h| !h.is_finished()));
        assert_eq!(gate.set(GateMode::Open), 3);
        for h in held {
            assert_eq!(h.await.unwrap(), Admission::Forward);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_held_past_max_hold_is_shed() {
        let gate = Arc::new(Gate::default());
        gate.set(paused(5, 100));
        let start = tokio::time::Instant::now();
        let first = spawn_admit(&gate);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let second = spawn_admit(&gate);
        assert_eq!(first.await.unwrap(), Admission::Shed);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(!second.is_finished(), "the newer one waits on");
        gate.set(GateMode::Open);
        assert_eq!(second.await.unwrap(), Admission::Forward);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_bound_the_oldest_is_shed_at_once() {
        let gate = Arc::new(Gate::default());
        gate.set(paused(30, 2));
        let oldest = spawn_admit(&gate);
        settle().await;
        let rest: Vec<_> = (0..2).map(|_| spawn_admit(&gate)).collect();
        settle().await;
        assert!(oldest.is_finished());
        assert_eq!(oldest.await.unwrap(), Admission::Shed);
        gate.set(GateMode::Open);
        for h in rest {
            assert_eq!(h.await.unwrap(), Admission::Forward);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn maintenance_answers_held_and_new_requests() {
        let gate = Arc::new(Gate::default());
        gate.set(paused(30, 10));
        let held = spawn_admit(&gate);
        settle().await;
        let maintenance = GateMode::Maintenance {
            message: "back soon".into(),
            retry_after: Duration::from_secs(60),
        };
        assert_eq!(gate.set(maintenance.clone()), 1);
        let expected = Admission::Maintenance {
            message: "back soon".into(),
            retry_after: Duration::from_secs(60),
        };
        assert_eq!(held.await.unwrap(), expected);
        assert_eq!(gate.admit().await, expected);
        assert_eq!(gate.mode(), maintenance);
    }
}
