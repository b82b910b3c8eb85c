//! `kiln completions SHELL`.

use std::process::ExitCode;

use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};
use crate::output::Output;

pub fn print(args: &CompletionsArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "kiln", &mut script);
    out.print(&String::from_utf8_lossy(&script));
    Ok(ExitCode::SUCCESS)
}
