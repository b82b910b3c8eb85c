//! The command line as clap sees it: raw flags and arguments, nothing validated beyond their
//! shape. Commands turn these into richer types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Immutable infrastructure in one binary: describe a service once in kiln.toml; kiln builds
/// it into a sealed, reproducible image, tests it, rolls it out as brand-new read-only
/// instances behind its own router, rolls back in milliseconds and replaces drifted instances.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct Global {
    /// Directory holding kiln's state: images, ledger, socket, instances, logs [env:
    /// KILN_STATE] [default: ./.kiln, or /var/lib/kiln as root outside a project once the
    /// kiln service made it]
    ///
    /// Without --state or KILN_STATE, kiln run as root in a directory with no kiln.toml and no
    /// .kiln uses /var/lib/kiln when it exists (the kiln service's state); `kiln doctor`
    /// prints the choice and why.
    #[arg(long = "state", global = true, value_name = "DIR")]
    pub state_flag: Option<PathBuf>,

    /// The state directory commands use, absolute: `crate::state::choose`'s pick from
    /// `state_flag`, `KILN_STATE` and the host, set by `cmd::run` before a command runs.
    #[arg(skip)]
    pub state: PathBuf,

    /// The daemon to talk to: ssh://[user@]host[:port][/remote/state] or unix:///path/kiln.sock
    /// [default: the current context, else --state's socket]
    ///
    /// Over SSH, the system `ssh` runs `kiln dial-stdio` on the host (KILN_REMOTE_BIN names
    /// the remote binary, KILN_SSH_COMMAND the ssh command); images are built here and sent
    /// blob by blob, only those the host lacks.
    #[arg(long, global = true, env = "KILN_HOST", value_name = "URL")]
    pub host: Option<String>,

    /// Print data as JSON on stdout instead of text
    #[arg(long, global = true)]
    pub json: bool,

    /// Print only errors (and log only errors)
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Print more detail, and log more: each -v is one level (info, debug, trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// How log events are written to stderr: `human` lines, or one JSON object per line
    ///
    /// Logs go to stderr at warn level (info for `kiln serve`); -v and -q move that level, and
    /// KILN_LOG sets it per crate (`kiln_proxy=debug,info`). When stderr is the systemd
    /// journal (JOURNAL_STREAM names it), `human` lines start with their syslog priority
    /// (`<3>` error … `<7>` debug) and carry no time: the journal keeps both.
    #[arg(
        long,
        global = true,
        env = "KILN_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Human,
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,

    /// When to use colour (NO_COLOR in the environment means never, unless `always`)
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
}

/// `--color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// Colour when writing to a terminal and NO_COLOR is unset
    Auto,
    /// Always colour
    Always,
    /// Never colour
    Never,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Time, level, message and key=value fields; coloured as `--color` says (in the journal:
    /// `<priority>`, message and fields)
    Human,
    /// One JSON object per line: timestamp, level, message, fields and target
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a kiln.toml and report every problem with its line and column
    Validate(SpecFile),
    /// Print the JSON Schema of kiln.toml (for editor completion and checks)
    Schema(SchemaArgs),
    /// Write a commented starter kiln.toml (never overwrites)
    Init(InitArgs),
    /// Print a shell completion script
    Completions(CompletionsArgs),
    /// Write the manual pages (roff): kiln.1 and one per command, kiln-apply.1 …
    #[command(hide = true)]
    Man(ManArgs),
    /// Build the [image] section into a reproducible OCI image and tag it NAME:latest
    Build(crate::cmd::image::BuildArgs),
    /// Make a signing key (ed25519, OpenSSH format): `kiln key generate [PATH]`
    Key(crate::cmd::sign::KeyArgs),
    /// Sign an image and its attestations with an ed25519 key (attached as OCI referrers)
    Sign(crate::cmd::sign::SignArgs),
    /// List the images in the store
    Images,
    /// Inspect, export or import images
    Image(crate::cmd::image::ImageArgs),
    /// Remove image blobs that no tag (or retained release) refers to
    Gc(crate::cmd::image::GcArgs),
    /// Run one instance of an image in the foreground; Ctrl-C stops and destroys it
    Run(crate::cmd::run::RunArgs),
    /// Run the spec's [image.test] against an image and record a test attestation
    Test(crate::cmd::test::TestArgs),
    /// Check that this host can run instances and say what to install or change
    Doctor(crate::cmd::doctor::DoctorArgs),
    /// Run the daemon: API on <state>/kiln.sock, the reconciler, and a router process it feeds
    /// (which keeps serving while the daemon restarts)
    Serve(crate::cmd::daemon::ServeArgs),
    /// Run the router alone, fed by the daemon on <state>/router.sock (`kiln serve` starts one
    /// when none runs); run while one runs, it takes its sockets over and the old one exits
    /// without refusing a connection
    Router(crate::cmd::router::RouterCmdArgs),
    /// Build, test and roll out the spec with a daemon (started in-process if none runs)
    ///
    /// Ctrl-C (or SIGTERM) while it tests or rolls out stops what it started and exits 130
    /// (143); with a daemon that was already running, the rollout goes on there. Once the app
    /// is up, Ctrl-C stops following; with a daemon `up` started, it stops the app and that
    /// daemon (Ctrl-C again leaves the app running), and exits 0.
    Up(crate::cmd::deploy::UpArgs),
    /// Show what `kiln apply` would change (exit 2 with --detailed-exitcode when something would)
    Plan(crate::cmd::deploy::PlanArgs),
    /// Build (unless --image), record a new release and roll it out
    Apply(crate::cmd::deploy::ApplyArgs),
    /// Return to the previous release (a route swap when it is still warm)
    Rollback(crate::cmd::deploy::RollbackArgs),
    /// Advance a blue-green or canary rollout waiting for a person (skips remaining steps)
    Promote(crate::cmd::deploy::AppArg),
    /// Abort a rollout: all traffic back to the stable release
    Abort(crate::cmd::deploy::AppArg),
    /// Change the number of instances of the live release
    Scale(crate::cmd::deploy::ScaleArgs),
    /// Hold an app's new requests in the router while those in flight finish (e.g. around a
    /// migration); past --max-hold, or past --max-held waiting, the oldest get 503
    Pause(crate::cmd::pause::PauseArgs),
    /// Let a paused app's requests through again, the held ones first
    Resume(crate::cmd::deploy::AppArg),
    /// Answer an app's requests with 503 and a message (HTML for browsers) and Retry-After;
    /// --off restores traffic
    Maintenance(crate::cmd::pause::MaintenanceArgs),
    /// Releases, route weights, instances with health and age, rollout progress
    Status(crate::cmd::deploy::AppArg),
    /// The git branches the daemon follows: each new commit built, tested, planned, applied
    Source(crate::cmd::source::SourceArgs),
    /// Apply the commit a followed app's source holds (sync = manual), or resume a pinned app
    Sync(crate::cmd::source::SyncArgs),
    /// The ledger's events (releases, traffic changes, drift, replacements, rollbacks)
    History(crate::cmd::deploy::HistoryArgs),
    /// Check the ledger's hash chain end to end, its rollout documents and its signed
    /// checkpoints (exit 1 naming the first bad or missing entry), or with IMAGE what the
    /// image carries and whether it passes the deploy policy
    Verify(crate::cmd::verify::VerifyArgs),
    /// Drift found on instances and what was done about it
    Drift(crate::cmd::deploy::AppArg),
    /// Print an app's (or one instance's) output
    Logs(crate::cmd::deploy::LogsArgs),
    /// Stop an app: destroy its instances and stop routing it
    Down(crate::cmd::deploy::AppArg),
    /// Name daemons to talk to (like Docker contexts): create, ls, use, rm, show
    Context(crate::cmd::context::ContextArgs),
    /// Print the spec for another system: `kiln export kubernetes` writes its manifests
    Export(crate::cmd::export::ExportArgs),
    /// Join the daemon's socket to stdin and stdout (what `--host ssh://…` runs on the host)
    #[command(hide = true)]
    DialStdio,
}

/// Which spec file to read.
#[derive(Debug, Args)]
pub struct SpecFile {
    /// The spec file
    #[arg(
        short = 'f',
        long = "file",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub file: PathBuf,
}

/// `kiln schema`.
#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Print the Markdown reference of every key instead of the JSON Schema
    #[arg(long)]
    pub markdown: bool,
}

/// `kiln init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write the starter spec
    #[arg(
        short = 'f',
        long = "file",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub file: PathBuf,

    /// The app's name (default: derived from the directory name)
    #[arg(long)]
    pub name: Option<String>,
}

/// `kiln completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to print completions for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `kiln man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The directory to write the pages to (created when missing; pages there are replaced)
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
}
