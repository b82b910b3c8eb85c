//! The controller's clock, injected so that every timeline (drift → replaced, a progress
//! deadline, `keep_previous`) can be tested on tokio's paused time without sleeping.

use std::time::SystemTime;

use kiln_deploy::Millis;

/// Where the controller reads the time.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;
}

/// The system's wall clock: what the daemon uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        millis_since_epoch(SystemTime::now())
    }
}

/// Wall-clock time at creation, advanced by tokio's clock: under
/// `#[tokio::test(start_paused = true)]` it moves only when the test advances time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base_ms: Millis,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading the wall-clock time now, then advancing with tokio's time.
    pub fn new() -> TokioClock {
        TokioClock {
            base_ms: SystemClock.now_ms(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> TokioClock {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> Millis {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.base_ms.saturating_add(elapsed)
    }
}

/// Milliseconds from the Unix epoch to `t` (0 before it).
pub fn millis_since_epoch(t: SystemTime) -> Millis {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
