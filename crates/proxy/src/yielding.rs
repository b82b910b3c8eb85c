//! A busy router thread lets the processes it serves run.
//!
//! Under heavy load a router thread always has work, so it never sleeps, and the kernel lets
//! it run a whole time slice (about 3 ms, rounded up to the 4 ms tick at 250 Hz) before the
//! other threads on its core get a turn. What waits meanwhile is what the router serves: the
//! clients and the instances on the same host, whose next requests and replies the router is
//! about to need. Their requests wait a time slice, and the router's tail latency shows it.
//!
//! So a router thread calls `sched_yield` at the end of a batch once [`HOLD_LIMIT`] of wall
//! time has passed since its last yield: whatever else is runnable on its core runs now, and
//! the thread gets the core back after it. When nothing else is runnable the call returns at
//! once (about a microsecond, at most once per [`HOLD_LIMIT`]). Wall time, not time on the
//! core, so a thread waking from a sleep longer than the limit yields at its first batch:
//! cheap, and simpler than asking the kernel whether the thread was switched out (tried:
//! `/proc/thread-self/schedstat` turns; it helped less, p99 2.1 ms against 1.4 ms at 1
//! thread, because wake-up preemptions count as turns while the load generator still waits).
//!
//! Only unpinned router threads do this ([`crate::Workers`] decides). A thread pinned to its
//! core cannot continue on another core while the thread it yielded to runs, and measured
//! here a pinned thread that yielded doubled its p99 (1.1 ms to 2.2 ms at 2 threads), where an
//! unpinned one that yielded halved it (4.4 ms to 2.1 ms at 2 threads, 3.5 ms to 1.4 ms at 1).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How long a router thread may run before it offers its core to others.
const HOLD_LIMIT: Duration = Duration::from_millis(1);

thread_local! {
    /// When a watched thread last yielded; `None` on threads that never yield.
    static LAST_YIELD: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Makes the calling thread yield once per [`HOLD_LIMIT`] of running.
pub(crate) fn watch_this_thread() {
    LAST_YIELD.with(|last| last.set(Some(Instant::now())));
}

/// Yields if this thread is watched and has run [`HOLD_LIMIT`] since it last did.
pub(crate) fn after_batch() {
    LAST_YIELD.with(|last| {
        let Some(then) = last.get() else { return };
        let now = Instant::now();
        if now.duration_since(then) >= HOLD_LIMIT {
            std::thread::yield_now();
            last.set(Some(now));
        }
    });
}
