//! One upstream instance as the router tracks it: its outstanding requests (for
//! least-outstanding selection and for draining) and its pool of keep-alive connections.
//!
//! A `Backend` outlives route tables: the same address keeps the same state across
//! swaps, so a request started under an old table is still counted when the instance is
//! drained after leaving the new one.
//!
//! **Invariant:** a request is counted (`InFlight`) before it uses an instance, and it only
//! uses the instance if the instance was not removed at that moment. Removal sets `removed`
//! and then reads the count; acquisition bumps the count and then reads `removed`; both use
//! sequentially consistent atomics, so at least one side sees the other and a drain can never
//! report "no request in flight" while a request is about to start.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::upstream::{Connection, ExchangeError};

/// The most idle connections kept per instance and pool shard; more are closed when released.
const MAX_IDLE: usize = 512;

/// How many shards an instance's idle pool has. A connection's socket is registered with the
/// I/O driver of the runtime that opened it, and its writes wait for that thread's flusher;
/// with one single-threaded runtime per router thread (`Workers`), a connection used by a
/// request on another thread would have its readiness delivered, and its requests sent, by
/// that other thread: a cross-thread wake-up per read (measured, with hyper's connection
/// tasks: the two-thread router was slower than the one-thread one). So each thread returns
/// connections to, and takes them from, its own shard; threads beyond this many share shards,
/// which is correct (an unsent request is discarded under the socket's lock), only slower.
const POOL_SHARDS: usize = 16;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's pool shard, assigned on first use.
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % POOL_SHARDS;
}

fn shard() -> usize {
    SHARD.with(|shard| *shard)
}

/// One instance as the router tracks it, by address: its outstanding requests, whether it
/// left the route, and its idle connections.
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    outstanding: AtomicUsize,
    removed: AtomicBool,
    /// Woken when `outstanding` drops to zero while removed.
    idle_notify: Notify,
    /// Keep-alive connections not in use, by pool shard.
    idle: [Mutex<Vec<Connection>>; POOL_SHARDS],
}

impl Backend {
    pub(crate) fn new(addr: SocketAddr) -> Backend {
        Backend {
            addr,
            outstanding: AtomicUsize::new(0),
            removed: AtomicBool::new(false),
            idle_notify: Notify::new(),
            idle: std::array::from_fn(|_| Mutex::new(Vec::new())),
        }
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a request against this instance, unless the instance has left the route.
    pub(crate) fn acquire(self: &Arc<Self>) -> Option<InFlight> {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight {
            instance: Arc::clone(self),
        };
        if self.removed.load(Ordering::SeqCst) {
            // Dropping the guard undoes the count (and wakes a drain if it was the last).
            return None;
        }
        Some(guard)
    }

    /// Marks the instance as out of the route and closes its idle connections, so that the
    /// instance sees only the requests already in flight.
    pub(crate) fn remove(&self) {
        self.removed.store(true, Ordering::SeqCst);
        self.clear_idle();
    }

    /// Closes every idle connection.
    pub(crate) fn clear_idle(&self) {
        for shard in &self.idle {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// Puts the instance back into a route (a rollback can re-add an instance being drained).
    pub(crate) fn restore(&self) {
        self.removed.store(false, Ordering::SeqCst);
        // A drain waiting on this instance must learn that it is routed again.
        self.idle_notify.notify_waiters();
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Waits until no request is in flight, or the instance is routed again. Returns at once
    /// when either holds.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle_notify.notified();
            tokio::pin!(notified);
            // Register before reading the count so a wake-up between the two is not lost.
            notified.as_mut().enable();
            if self.outstanding.load(Ordering::SeqCst) == 0 || !self.is_removed() {
                return;
            }
            notified.await;
        }
    }

    /// A connection to the instance: an idle pooled one if any is still open, else a new one
    /// made before `deadline`. `Ok(None)` when a new one could not be made (nothing was sent).
    /// With `probe`, a pooled connection is also asked whether the instance closed it (a
    /// system call), for requests that cannot be replayed once sent.
    pub(crate) async fn connection(
        &self,
        deadline: Instant,
        probe: bool,
    ) -> Result<Option<Connection>, ExchangeError> {
        if let Some(shard) = self.idle.get(shard()) {
            loop {
                let pooled = shard.lock().unwrap_or_else(PoisonError::into_inner).pop();
                let Some(mut conn) = pooled else { break };
                if conn.is_reusable() && (!probe || conn.probe_open()) {
                    return Ok(Some(conn));
                }
            }
        }
        // Connecting is the rare path and its future is large: boxed, it does not inflate
        // every request's future.
        Box::pin(Connection::open(self.addr, deadline)).await
    }

    /// Returns a connection whose last exchange completed cleanly.
    pub(crate) fn release(&self, mut conn: Connection) {
        conn.set_reused();
        if self.is_removed() {
            return;
        }
        let Some(shard) = self.idle.get(shard()) else {
            return;
        };
        let mut idle = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

/// One request counted against an instance until it is dropped (when the response body ends,
/// the client goes away, or an upgraded tunnel closes).
pub(crate) struct InFlight {
    instance: Arc<Backend>,
}

impl InFlight {
    pub(crate) fn instance(&self) -> &Arc<Backend> {
        &self.instance
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let before = self.instance.outstanding.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.instance.removed.load(Ordering::SeqCst) {
            self.instance.idle_notify.notify_waiters();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn instance() -> Arc<Backend> {
        Arc::new(Backend::new("127.0.0.1:9".parse().unwrap()))
    }

    #[test]
    fn a_removed_instance_takes_no_new_request() {
        let i = instance();
        let held = i.acquire().unwrap();
        assert_eq!(i.outstanding(), 1);
        i.remove();
        assert!(i.acquire().is_none());
        assert_eq!(
            i.outstanding(),
            1,
            "a refused acquisition must not leak a count"
        );
        drop(held);
        assert_eq!(i.outstanding(), 0);
        i.restore();
        assert!(i.acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_resolves_when_the_last_request_ends() {
        let i = instance();
        let a = i.acquire().unwrap();
        let b = i.acquire().unwrap();
        i.remove();
        let waiter = tokio::spawn({
            let i = Arc::clone(&i);
            async move { i.idle().await }
        });
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one request is still in flight");
        drop(b);
        waiter.await.unwrap();
        assert_eq!(i.outstanding(), 0);
    }
}
