//! How commands talk to the person or program that ran them: data on stdout (text or JSON),
//! progress and errors on stderr, colour only when wanted.

use std::io::{IsTerminal, Write};

use crate::cli::{ColorChoice, Global};

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
        }
    }

    /// A line of human-readable result on stdout (suppressed by `-q`).
    pub fn say(&self, line: &str) {
        if !self.quiet {
            println!("{line}");
        }
    }

    /// A JSON document on stdout.
    pub fn data(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut stdout, value)?;
        writeln!(stdout)?;
        Ok(())
    }

    /// Text that is already formatted for stderr (diagnostics).
    pub fn report(&self, text: &str) {
        eprint!("{text}");
    }

    /// The one place an error chain is printed.
    pub fn error(&self, e: &anyhow::Error) {
        let prefix = if self.color {
            "\x1b[1;31merror\x1b[0m"
        } else {
            "error"
        };
        let mut msg = format!("{prefix}: {e}");
        for cause in e.chain().skip(1) {
            msg.push_str(&format!("\n  caused by: {cause}"));
        }
        eprintln!("{msg}");
    }
}
