//! One module per group of commands; [`run`] dispatches.

mod completions;
pub mod context;
pub mod daemon;
pub mod deploy;
pub mod doctor;
pub mod export;
pub mod image;
mod instance;
mod man;
pub mod pause;
pub mod remote;
pub mod router;
pub mod run;
pub mod sign;
mod signals;
pub mod source;
mod spec;
pub mod test;
pub mod verify;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::output::Output;
use crate::state::{self, Need};

/// Runs the command the user asked for.
pub fn run(mut cli: Cli, out: &Output) -> anyhow::Result<ExitCode> {
    // One absolute state directory for everything below: the daemon's socket, the store,
    // instance mounts and the runtime all outlive the current directory's meaning.
    let state_choice = state::choose(cli.global.state_flag.take())?;
    cli.global.state.clone_from(&state_choice.dir);
    if talks_to_daemon(&cli.command) {
        // A malformed --host (or KILN_HOST) is a usage error, as clap's own are.
        if let Some(h) = cli.global.host.as_deref().filter(|h| !h.is_empty())
            && let Err(e) = kiln_control::client::Host::parse(h)
        {
            out.error(&e.into());
            return Ok(ExitCode::from(2));
        }
        remote::choose(cli.global.host.as_deref(), cli.global.json)?;
    }
    // A command that only talks to a daemon elsewhere has no use for the local state.
    let need = match state_need(&cli.command) {
        Some(Need::Existing) if remote::is_remote() => None,
        need => need,
    };
    if let Some(need) = need {
        // Before anything is created: every file from here on is the owner's alone.
        state::private_umask();
        state::prepare(&cli.global.state, need)?;
    }
    match cli.command {
        Command::Validate(args) => spec::validate(&args, out),
        Command::Schema(args) => spec::schema(&args, out),
        Command::Init(args) => spec::init(&args, out),
        Command::Completions(args) => completions::print(&args, out),
        Command::Man(args) => man::write(&args, out),
        Command::Build(args) => image::build(&args, &cli.global.state, out),
        Command::Key(args) => sign::key(&args, out),
        Command::Sign(args) => sign::sign(&args, &cli.global.state, out),
        Command::Images => image::images(&cli.global.state, out),
        Command::Image(args) => image::image(&args, &cli.global.state, out),
        Command::Gc(args) => image::gc(&args, &cli.global.state, out),
        Command::Run(args) => run::run(&args, &cli.global.state, out),
        Command::Test(args) => test::test(&args, &cli.global.state, out),
        Command::Doctor(args) => doctor::doctor(&args, &state_choice, out),
        Command::Serve(args) => daemon::serve(&args, &cli.global.state, out),
        Command::Router(args) => router::router(&args, &cli.global.state, out),
        Command::Up(args) => deploy::up(&args, &cli.global.state, out),
        Command::Plan(args) => deploy::plan(&args, &cli.global.state, out),
        Command::Apply(args) => deploy::apply(&args, &cli.global.state, out),
        Command::Rollback(args) => deploy::rollback(&args, &cli.global.state, out),
        Command::Promote(args) => deploy::promote(&args, &cli.global.state, out),
        Command::Abort(args) => deploy::abort(&args, &cli.global.state, out),
        Command::Scale(args) => deploy::scale(&args, &cli.global.state, out),
        Command::Pause(args) => pause::pause(&args, &cli.global.state, out),
        Command::Resume(args) => pause::resume(&args, &cli.global.state, out),
        Command::Maintenance(args) => pause::maintenance(&args, &cli.global.state, out),
        Command::Status(args) => deploy::status(&args, &cli.global.state, out),
        Command::Source(args) => source::source(&args, &cli.global.state, out),
        Command::Sync(args) => source::sync(&args, &cli.global.state, out),
        Command::History(args) => deploy::history(&args, &cli.global.state, out),
        Command::Verify(args) => verify::verify(&args, &cli.global.state, out),
        Command::Drift(args) => deploy::drift(&args, &cli.global.state, out),
        Command::Logs(args) => deploy::logs(&args, &cli.global.state, out),
        Command::Down(args) => deploy::down(&args, &cli.global.state, out),
        Command::Context(args) => context::context(&args, out),
        Command::Export(args) => export::export(&args, &cli.global.state, out),
        Command::DialStdio => remote::dial_stdio(&cli.global.state),
    }
}

/// Whether a command talks to a daemon (and so to the one `--host` or a context names).
fn talks_to_daemon(command: &Command) -> bool {
    match command {
        Command::Up(_)
        | Command::Plan(_)
        | Command::Apply(_)
        | Command::Rollback(_)
        | Command::Promote(_)
        | Command::Abort(_)
        | Command::Scale(_)
        | Command::Pause(_)
        | Command::Resume(_)
        | Command::Maintenance(_)
        | Command::Status(_)
        | Command::Source(_)
        | Command::Sync(_)
        | Command::History(_)
        | Command::Drift(_)
        | Command::Logs(_)
        | Command::Down(_) => true,
        // With an image it reads the local store.
        Command::Verify(args) => args.image.is_none(),
        Command::Context(args) => matches!(args.command, context::ContextCommand::Show),
        _ => false,
    }
}

/// Whether a command uses the state directory, and whether it may create it. Commands that
/// only talk to a daemon still check it: its socket is where they send their requests.
fn state_need(command: &Command) -> Option<Need> {
    match command {
        Command::Validate(_)
        | Command::Schema(_)
        | Command::Init(_)
        | Command::Completions(_)
        | Command::Man(_)
        | Command::Context(_)
        | Command::Key(_)
        // It reads the store when one is there, and creates nothing.
        | Command::Export(_)
        // It only connects to the daemon's socket, which is private to the daemon's user.
        | Command::DialStdio => None,
        // An export is checked offline, anywhere.
        Command::Verify(args) if args.ledger.ledger_export.is_some() => None,
        Command::Build(_)
        | Command::Images
        | Command::Image(_)
        | Command::Gc(_)
        | Command::Run(_)
        | Command::Test(_)
        | Command::Serve(_)
        | Command::Router(_)
        | Command::Up(_)
        | Command::Plan(_)
        | Command::Apply(_) => Some(Need::Create),
        Command::Doctor(_)
        | Command::Sign(_)
        | Command::Rollback(_)
        | Command::Promote(_)
        | Command::Abort(_)
        | Command::Scale(_)
        | Command::Pause(_)
        | Command::Resume(_)
        | Command::Maintenance(_)
        | Command::Status(_)
        | Command::Source(_)
        | Command::Sync(_)
        | Command::History(_)
        | Command::Verify(_)
        | Command::Drift(_)
        | Command::Logs(_)
        | Command::Down(_) => Some(Need::Existing),
    }
}
