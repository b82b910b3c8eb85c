//! `kiln router`: the router as a process of its own, fed by the daemon over
//! `<state>/router.sock`. `kiln serve` starts one when none runs; started while one runs, it
//! takes that one's sockets and apps over and the old one exits without refusing a
//! connection (how kiln's binary is upgraded under load).
//!
//! SIGINT or SIGTERM stops it (a second one at once); SIGHUP opens its access log's file anew,
//! for logrotate's `postrotate` (`kill -HUP $(cat <state>/router.pid)`).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use super::daemon::{RouterArgs, raise_open_file_limit};
use super::signals::StopSignals;
use crate::output::Output;

/// `kiln router`.
#[derive(Debug, Args)]
pub struct RouterCmdArgs {
    #[command(flatten)]
    pub router: RouterArgs,
}

pub fn router(args: &RouterCmdArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    raise_open_file_limit();
    let rt = super::instance::tokio_runtime()?;
    rt.block_on(async {
        let mut signals = StopSignals::new()?;
        // SIGHUP reopens the access log (logrotate's `postrotate`); it never stops the router,
        // as its default action would.
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot handle SIGHUP")?;
        let (reopen, reopen_access_log) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                reopen.send_replace(());
            }
        });
        // The first signal stops it as a handover would (connections finish their
        // requests); a second one stops it at once.
        let (count, counted) = tokio::sync::watch::channel(0_u32);
        tokio::spawn(async move {
            loop {
                signals.recv().await;
                count.send_modify(|n| *n += 1);
            }
        });
        let signalled = |n: u32| {
            let mut counted = counted.clone();
            async move {
                let _ = counted.wait_for(|c| *c >= n).await;
            }
        };
        let cfg = kiln_dataplane::RouterConfig {
            state: state.to_owned(),
            workers: args.router.workers(),
            access_log: args.router.access_log(),
            reopen_access_log,
        };
        tokio::select! {
            served = kiln_dataplane::run(cfg, signalled(1)) => {
                served?;
                out.say("kiln router stopped");
            }
            () = signalled(2) => out.say("kiln router stopped without waiting"),
        }
        Ok(ExitCode::SUCCESS)
    })
}
