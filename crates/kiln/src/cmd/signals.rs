//! Ctrl-C and SIGTERM for the commands that run until stopped (`serve`, `up`, `run`).

use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGINT and SIGTERM, caught from the moment this is made: a signal that arrives before
/// anyone waits is kept for the next `recv`, instead of killing the process with the default
/// action (tokio's `ctrl_c()` installs its handler only when first polled). Made before a
/// command tells its user that Ctrl-C may be pressed.
pub struct StopSignals {
    int: Signal,
    term: Signal,
}

/// Which signal asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Stop {
    /// A shell's status for a command the signal ended: 128 + its number.
    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
        })
    }
}

/// Work cut short by a stop signal, as an error: what made it stops cleanly, and the command
/// exits with [`Stop::exit_code`].
#[derive(Debug)]
pub struct Interrupted(pub Stop);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Stop::Interrupt => "interrupted (SIGINT)",
            Stop::Terminate => "interrupted (SIGTERM)",
        })
    }
}

impl std::error::Error for Interrupted {}

impl StopSignals {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM. Cancel-safe: a signal is not lost by a `select!`
    /// that drops this future.
    pub async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.int.recv() => Stop::Interrupt,
            _ = self.term.recv() => Stop::Terminate,
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn send(signal: &str) {
        let pid = std::process::id().to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, pid.as_str()])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {signal} {pid}");
    }

    /// A signal sent after `new` and before anyone waits is kept, and does not kill the
    /// process (if it did, this test binary would die).
    #[tokio::test]
    async fn a_signal_before_anyone_waits_is_kept() {
        let mut signals = StopSignals::new().expect("signal handlers");
        send("-INT");
        let stop = tokio::time::timeout(Duration::from_secs(10), signals.recv()).await;
        assert_eq!(stop.ok(), Some(Stop::Interrupt));
        send("-TERM");
        let stop = tokio::time::timeout(Duration::from_secs(10), signals.recv()).await;
        assert_eq!(stop.ok(), Some(Stop::Terminate));
        assert_eq!(Stop::Interrupt.exit_code(), ExitCode::from(130));
        assert_eq!(Stop::Terminate.exit_code(), ExitCode::from(143));
    }
}
