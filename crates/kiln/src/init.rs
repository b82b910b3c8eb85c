//! `kiln instance-init -- ARGV…`: the init an instance with `[service] init` runs as PID 1
//! (kiln's own static binary, bound read-only at `/.kiln/init`).
//!
//! The kernel delivers to a PID namespace's init only the signals it has a handler for, so an
//! app that is PID 1 and never installed one (busybox httpd, most shells and interpreters)
//! ignores SIGTERM and waits out `stop_grace`; and nobody reaps the orphans it leaves. This
//! init spawns the app, passes the signals a stop or an operator sends on to it, reaps every
//! child the namespace gives it, and exits with the app's status (128 + the signal when a
//! signal ended it). Once it exits the kernel kills what is left in the namespace.
//!
//! It runs as the instance's user, under seccomp and no new privileges: it needs nothing but
//! `rt_sigaction`, `clone`/`execve`, `wait4` and `kill` on its own children. It reads no
//! configuration and no environment of its own (the app's environment may hold anything, so
//! it runs before the command line is parsed), and it logs nothing but why it could not start
//! the app.

use std::ffi::OsString;
use std::process::ExitCode;

use rustix::process::{Pid, Signal, WaitOptions, WaitStatus};
use tokio::signal::unix::{SignalKind, signal};

/// The signals passed on to the app: those a stop, a terminal or an operator sends. SIGCHLD
/// is the init's own; SIGKILL and SIGSTOP cannot be caught.
const FORWARDED: [Signal; 8] = [
    Signal::TERM,
    Signal::INT,
    Signal::HUP,
    Signal::QUIT,
    Signal::USR1,
    Signal::USR2,
    Signal::WINCH,
    Signal::ALARM,
];

/// The exit status when the app cannot be started: 127 when it does not exist, else 126, as
/// a shell says.
fn spawn_failure(e: &std::io::Error) -> u8 {
    if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

/// Runs `argv` (what follows `--`) under the init; returns its exit status.
pub fn run(args: impl Iterator<Item = OsString>) -> ExitCode {
    let mut args = args.skip_while(|a| a != "--").skip(1);
    let Some(program) = args.next() else {
        eprintln!("kiln init: usage: kiln instance-init -- PROGRAM [ARG…]");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln init: cannot start: {e}");
            return ExitCode::from(126);
        }
    };
    runtime.block_on(supervise(program, args.collect()))
}

async fn supervise(program: OsString, args: Vec<OsString>) -> ExitCode {
    // Every handler is installed before the app exists, so no signal (nor the app's own
    // exit) can fall between its start and the first wait.
    let child_exited = signal(SignalKind::child());
    let forwarded: Result<Vec<_>, _> = FORWARDED
        .iter()
        .map(|s| signal(SignalKind::from_raw(s.as_raw())).map(|stream| (*s, stream)))
        .collect();
    let (mut child_exited, forwarded) = match (child_exited, forwarded) {
        (Ok(c), Ok(f)) => (c, f),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("kiln init: cannot handle signals: {e}");
            return ExitCode::from(126);
        }
    };
    let child = match std::process::Command::new(&program).args(&args).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("kiln init: cannot run {}: {e}", program.to_string_lossy());
            return ExitCode::from(spawn_failure(&e));
        }
    };
    let app = Pid::from_child(&child);
    for (sig, mut stream) in forwarded {
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                // ESRCH: the app is already gone, and its exit is about to be reaped.
                let _ = rustix::process::kill_process(app, sig);
            }
        });
    }
    loop {
        // Whatever else exited by now is reaped with it; the rest dies with the namespace.
        if let Some(status) = reap(app) {
            return ExitCode::from(exit_code(status));
        }
        if child_exited.recv().await.is_none() {
            return ExitCode::from(126);
        }
    }
}

/// Reaps every child that has exited (the app and any orphan the namespace handed to the
/// init); the app's status when it was among them.
fn reap(app: Pid) -> Option<WaitStatus> {
    let mut app_status = None;
    while let Ok(Some((pid, status))) = rustix::process::wait(WaitOptions::NOHANG) {
        if pid == app {
            app_status = Some(status);
        }
    }
    app_status
}

/// The app's exit code, or 128 + the signal that ended it, as a shell reports it.
fn exit_code(status: WaitStatus) -> u8 {
    match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + (sig & 0x7f)).unwrap_or(255),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_127_as_in_a_shell() {
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(spawn_failure(&missing), 127);
        assert_eq!(spawn_failure(&denied), 126);
    }
}
