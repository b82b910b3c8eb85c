//! How commands talk to the person or program that ran them: data on stdout (text or JSON),
//! progress, errors and log events on stderr, colour only when wanted. Nothing here ever
//! writes a log event to stdout, so `--json` data stays a clean JSON document.
//!
//! Under systemd, when stderr is the journal's stream, log events and the error chain are
//! written in the journal's format (`crate::journal`): a `<N>` priority first, no time.
//!
//! A reader that goes away (`kiln status | head -3`) is not an error: output stops quietly
//! and the command finishes what it was doing (a command may hold an instance it must
//! destroy), so `SIGPIPE` stays ignored, as Rust sets it; streaming commands ask
//! [`Output::stdout_closed`] and end.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::{ColorChoice, Global, LogFormat};

/// Log levels from quietest to loudest, for `-v` to step through.
const LEVELS: [LevelFilter; 5] = [
    LevelFilter::ERROR,
    LevelFilter::WARN,
    LevelFilter::INFO,
    LevelFilter::DEBUG,
    LevelFilter::TRACE,
];

/// The output settings of one run.
pub struct Output {
    /// `--json`: data goes to stdout as JSON.
    pub json: bool,
    /// `-q`: only errors.
    pub quiet: bool,
    /// `-v` count.
    pub verbose: u8,
    /// Whether stderr gets colour.
    pub color: bool,
    /// Whether stderr is the systemd journal's stream.
    journal: bool,
    /// Whether stdout's reader went away (a closed pipe).
    closed: AtomicBool,
}

impl Output {
    pub fn new(g: &Global) -> Output {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let color = match g.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => !no_color && std::io::stderr().is_terminal(),
        };
        Output {
            json: g.json,
            quiet: g.quiet,
            verbose: g.verbose,
            color,
            journal: crate::journal::stderr_is_journal(),
            closed: AtomicBool::new(false),
        }
    }

    /// Nothing but errors, no colour: for work the daemon does on its own (a git source's
    /// build), whose outcome it records itself.
    pub fn silent() -> Output {
        Output {
            json: false,
            quiet: true,
            verbose: 0,
            color: false,
            journal: false,
            closed: AtomicBool::new(false),
        }
    }

    /// The same settings with `-q`.
    pub fn quieter(&self) -> Output {
        Output {
            json: self.json,
            quiet: true,
            verbose: self.verbose,
            color: self.color,
            journal: self.journal,
            closed: AtomicBool::new(self.stdout_closed()),
        }
    }

    /// Installs the process's `tracing` subscriber, so events from every kiln crate (router,
    /// runtime, control plane) reach stderr in `format`. `base` is the level with neither `-v`
    /// nor `-q`; each `-v` is one level louder and `-q` is errors only. `KILN_LOG` (a list of
    /// `target=level` and an optional bare level) sets levels per crate; its bare level, when
    /// it has one, replaces the flags'. `human` becomes the journal's format when stderr is
    /// the journal. Call once, before the command runs.
    pub fn install_logs(&self, format: LogFormat, base: LevelFilter) -> anyhow::Result<()> {
        let level = if self.quiet {
            LevelFilter::ERROR
        } else {
            let base = LEVELS.iter().position(|l| *l == base).unwrap_or(1);
            LEVELS[(base + usize::from(self.verbose)).min(LEVELS.len() - 1)]
        };
        let targets = match std::env::var("KILN_LOG") {
            Ok(filter) if !filter.trim().is_empty() => filter
                .parse::<Targets>()
                .with_context(|| format!("KILN_LOG={filter:?} is not a log filter"))?,
            _ => Targets::new(),
        };
        let targets = match targets.default_level() {
            Some(_) => targets,
            None => targets.with_default(level),
        };
        // The formats are optional layers rather than one boxed layer: a `None` layer costs
        // nothing, and the subscriber keeps one concrete type.
        let (human, journal, json) = match format {
            LogFormat::Human if self.journal => (
                None,
                Some(
                    tracing_subscriber::fmt::layer()
                        .event_format(crate::journal::JournalFormat)
                        .with_ansi(false)
                        .with_writer(std::io::stderr),
                ),
                None,
            ),
            LogFormat::Human => (
                Some(
                    tracing_subscriber::fmt::layer()
                        .compact()
                        .with_target(false)
                        .with_ansi(self.color)
                        .with_writer(std::io::stderr),
                ),
                None,
                None,
            ),
            LogFormat::Json => (
                None,
                None,
                Some(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_ansi(false)
                        .with_writer(std::io::stderr),
                ),
            ),
        };
        tracing_subscriber::registry()
            .with(targets)
            .with(human)
            .with(journal)
            .with(json)
            .try_init()
            .context("cannot install the log subscriber")
    }

    /// A line of human-readable result on stdout (suppressed by `-q`).
    pub fn say(&self, line: &str) {
        if !self.quiet {
            self.print(&format!("{line}\n"));
        }
    }

    /// Text on stdout as it is (data: not suppressed by `-q`).
    pub fn print(&self, text: &str) {
        // Only a closed pipe is expected here; a full disk behind a redirect is not worth a
        // panic either, and the command's own outcome still decides the exit code.
        if let Err(e) = self.write_stdout(text.as_bytes()) {
            tracing::warn!(error = %e, "cannot write to stdout");
        }
    }

    /// A JSON document on stdout.
    pub fn data(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        let mut text = serde_json::to_vec_pretty(value)?;
        text.push(b'\n');
        self.write_stdout(&text)?;
        Ok(())
    }

    /// Whether stdout's reader went away: there is no one left to print for.
    pub fn stdout_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Writes `bytes` to stdout; once its reader has gone, writes nothing more.
    fn write_stdout(&self, bytes: &[u8]) -> std::io::Result<()> {
        if self.stdout_closed() {
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed.store(true, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }

    /// Text that is already formatted for stderr (diagnostics).
    pub fn report(&self, text: &str) {
        let _ignored = std::io::stderr().write_all(text.as_bytes());
    }

    /// The one place an error chain is printed; in the journal, each of its lines at
    /// priority error.
    pub fn error(&self, e: &anyhow::Error) {
        let prefix = if self.color {
            "\x1b[1;31merror\x1b[0m"
        } else {
            "error"
        };
        let line = if self.journal {
            crate::journal::prefix(tracing::Level::ERROR)
        } else {
            String::new()
        };
        let mut msg = format!("{line}{prefix}: {e}");
        for cause in e.chain().skip(1) {
            msg.push_str(&format!("\n{line}  caused by: {cause}"));
        }
        // A closed stderr leaves nowhere to say it: the exit code still does.
        let _ignored = writeln!(std::io::stderr(), "{msg}");
    }
}
