//! `kiln`: the command-line entry point. It parses arguments, installs the log subscriber, runs
//! one command, prints the error chain once and maps the outcome to an exit code (0 ok,
//! 1 failure, 2 usage).

mod carried;
mod cli;
mod cmd;
mod init;
mod journal;
mod output;
mod state;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

/// mimalloc rather than glibc's allocator, as in `kiln-router`: the daemon's router allocates
/// a little per request, and mimalloc's thread-local free lists make that cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A machine image's init (issue 21): the kernel runs `/init` from the initramfs as
    // process 1. Both checked, so running a copy named `/init` by hand is still the CLI.
    if std::env::args_os().next().is_some_and(|a| a == "/init")
        && rustix::process::getpid().is_init()
    {
        kiln_machine::guest::main();
    }
    // The init of an instance (`kiln_runtime::types::INIT_ARG`): before clap, so nothing in
    // the app's environment (`KILN_*` included) can change or break it.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == kiln_runtime::types::INIT_ARG)
    {
        return init::run(std::env::args_os().skip(2));
    }
    let cli = cli::Cli::parse();
    let out = output::Output::new(&cli.global);
    match run(cli, &out) {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            ExitCode::FAILURE
        }
    }
}

/// Installs the log subscriber, then runs the command.
fn run(cli: cli::Cli, out: &output::Output) -> anyhow::Result<ExitCode> {
    // The daemon's log is its record of what it did, so it logs at info; other commands print
    // their own progress and log only what went wrong.
    let base = match cli.command {
        cli::Command::Serve(_) | cli::Command::Router(_) => LevelFilter::INFO,
        _ => LevelFilter::WARN,
    };
    out.install_logs(cli.global.log_format, base)?;
    cmd::run(cli, out)
}
