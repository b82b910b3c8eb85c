//! `kiln`: the command-line entry point. It parses arguments, runs one command, prints the
//! error chain once and maps the outcome to an exit code (0 ok, 1 failure, 2 usage).

mod cli;
mod cmd;
mod output;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's allocator, as in `kiln-router`: the daemon's router allocates
/// a little per request, and mimalloc's thread-local free lists make that cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let out = output::Output::new(&cli.global);
    match cmd::run(cli, &out) {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            ExitCode::FAILURE
        }
    }
}
