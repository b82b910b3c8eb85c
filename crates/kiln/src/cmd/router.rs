//! `kiln router`: the router as a process of its own, fed by the daemon over
//! `<state>/router.sock`. `kiln serve` starts one when none runs; started while one runs, it
//! takes that one's sockets and apps over and the old one exits without refusing a
//! connection (how kiln's binary is upgraded under load).

use std::path::Path;
use std::process::ExitCode;

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
        let cfg = kiln_dataplane::RouterConfig {
            state: state.to_owned(),
            workers: args.router.workers(),
        };
        kiln_dataplane::run(cfg, async move {
            signals.recv().await;
        })
        .await?;
        out.say("kiln router stopped");
        Ok(ExitCode::SUCCESS)
    })
}
