//! One module per group of commands; [`run`] dispatches.

mod completions;
pub mod daemon;
pub mod deploy;
pub mod doctor;
pub mod image;
mod instance;
pub mod run;
mod signals;
mod spec;
pub mod test;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::output::Output;

/// Runs the command the user asked for.
pub fn run(mut cli: Cli, out: &Output) -> anyhow::Result<ExitCode> {
    // One absolute state directory for everything below: the daemon's socket, the store,
    // instance mounts and the runtime all outlive the current directory's meaning.
    cli.global.state = std::path::absolute(&cli.global.state).map_err(|e| {
        anyhow::anyhow!("cannot resolve --state {}: {e}", cli.global.state.display())
    })?;
    match cli.command {
        Command::Validate(args) => spec::validate(&args, out),
        Command::Schema(args) => spec::schema(&args, out),
        Command::Init(args) => spec::init(&args, out),
        Command::Completions(args) => completions::print(&args),
        Command::Build(args) => image::build(&args, &cli.global.state, out),
        Command::Images => image::images(&cli.global.state, out),
        Command::Image(args) => image::image(&args, &cli.global.state, out),
        Command::Gc(args) => image::gc(&args, &cli.global.state, out),
        Command::Run(args) => run::run(&args, &cli.global.state, out),
        Command::Test(args) => test::test(&args, &cli.global.state, out),
        Command::Doctor(args) => doctor::doctor(&args, &cli.global.state, out),
        Command::Serve(args) => daemon::serve(&args, &cli.global.state, out),
        Command::Up(args) => deploy::up(&args, &cli.global.state, out),
        Command::Plan(args) => deploy::plan(&args, &cli.global.state, out),
        Command::Apply(args) => deploy::apply(&args, &cli.global.state, out),
        Command::Rollback(args) => deploy::rollback(&args, &cli.global.state, out),
        Command::Promote(args) => deploy::promote(&args, &cli.global.state, out),
        Command::Abort(args) => deploy::abort(&args, &cli.global.state, out),
        Command::Scale(args) => deploy::scale(&args, &cli.global.state, out),
        Command::Status(args) => deploy::status(&args, &cli.global.state, out),
        Command::History(args) => deploy::history(&args, &cli.global.state, out),
        Command::Verify => deploy::verify(&cli.global.state, out),
        Command::Drift(args) => deploy::drift(&args, &cli.global.state, out),
        Command::Logs(args) => deploy::logs(&args, &cli.global.state, out),
        Command::Down(args) => deploy::down(&args, &cli.global.state, out),
    }
}
