//! `kiln man --dir DIR` (hidden: for packagers): the manual pages, generated from the same
//! clap definition as `--help`, so they cannot drift from the binary. `kiln.1`, then one page
//! per command and nested command (`kiln-apply.1`, `kiln-image-export.1`…); hidden commands
//! get none.

use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use serde_json::json;

use crate::cli::{Cli, ManArgs};
use crate::output::Output;

pub fn write(args: &ManArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the man page directory {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write the man pages to {}", dir.display()))?;
    // The pages written are the visible commands': list them back from the same definition.
    let mut pages = vec![];
    pages_of(&Cli::command(), "kiln", &mut pages);
    pages.sort();
    if out.json {
        out.data(&json!({ "dir": dir, "pages": pages }))?;
    } else {
        out.say(&format!(
            "wrote {} man pages to {}",
            pages.len(),
            dir.display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The file names `generate_to` gives `cmd` (named `name`) and its visible commands.
fn pages_of(cmd: &clap::Command, name: &str, pages: &mut Vec<String>) {
    pages.push(format!("{name}.1"));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages_of(sub, &format!("{name}-{}", sub.get_name()), pages);
    }
}
