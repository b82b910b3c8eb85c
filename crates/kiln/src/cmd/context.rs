//! `kiln context`: named daemons to talk to, like Docker's contexts. They live in
//! `$XDG_CONFIG_HOME/kiln/contexts.json` (else `~/.config/kiln/contexts.json`), written
//! durably and `0600`, with the current one's name. `default` is the local daemon (the one on
//! `--state`'s socket) and is never stored.
//!
//! Precedence (in `remote::choose`): `--host`/`KILN_HOST` > `KILN_CONTEXT` > the current
//! context > the local daemon.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use kiln_control::client::Host;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::output::Output;

/// `kiln context …`.
#[derive(Debug, Args)]
pub struct ContextArgs {
    #[command(subcommand)]
    pub command: ContextCommand,
}

/// The `kiln context` subcommands.
#[derive(Debug, Subcommand)]
pub enum ContextCommand {
    /// Name a daemon: `--host ssh://[user@]host[:port][/remote/state]` or `unix:///path`
    Create {
        /// The context's name (letters, digits, `.`, `_`, `-`; not `default`)
        name: String,
        /// Where its daemon is
        #[arg(long = "host", value_name = "URL")]
        host: String,
        /// A note shown by `kiln context ls`
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// The kiln binary on the remote (default: `kiln` on its PATH)
        #[arg(long, value_name = "PATH")]
        remote_bin: Option<String>,
    },
    /// List the contexts, marking the current one
    #[command(alias = "list")]
    Ls,
    /// Make a context the current one (`default`: the local daemon)
    Use {
        /// The context's name
        name: String,
    },
    /// Remove a context (not the current one)
    #[command(alias = "remove")]
    Rm {
        /// The context's name
        name: String,
    },
    /// Print the context in effect, and where its daemon is
    Show,
}

/// One named daemon, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredContext {
    /// `ssh://…` or `unix://…`.
    pub host: String,
    /// A note for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The kiln binary on the remote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_bin: Option<String>,
}

/// `contexts.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The current context (none: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, StoredContext>,
}

const DEFAULT: &str = "default";

fn path() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .context("cannot find where contexts live: set HOME or XDG_CONFIG_HOME")?;
            PathBuf::from(home).join(".config")
        }
    };
    Ok(base.join("kiln").join("contexts.json"))
}

fn load() -> anyhow::Result<(PathBuf, File)> {
    let path = path()?;
    match std::fs::read(&path) {
        Ok(bytes) => {
            let file = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a kiln contexts file", path.display()))?;
            Ok((path, file))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((path, File::default())),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save(path: &std::path::Path, file: &File) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut bytes = serde_json::to_vec_pretty(file)?;
    bytes.push(b'\n');
    // The umask decides the temp file's mode; the hosts and users in it are the user's own.
    kiln_durable::write(path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    anyhow::ensure!(
        ok,
        "invalid context name {name:?}: letters, digits, `.`, `_` and `-`, starting with a \
         letter or digit, at most 64"
    );
    Ok(())
}

/// The context in effect when no `--host` is given: `KILN_CONTEXT`, else the current one;
/// `None` for `default`. An unknown name is an error naming where it came from.
pub fn selected() -> anyhow::Result<Option<(String, StoredContext)>> {
    let from_env = std::env::var("KILN_CONTEXT").ok().filter(|v| !v.is_empty());
    // Without KILN_CONTEXT, a missing file means no context: never an error.
    let (path, file) = match load() {
        Ok(x) => x,
        Err(e) if from_env.is_none() && path().is_err() => {
            tracing::debug!(error = %e, "no contexts file");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let (name, source) = match (from_env, &file.current) {
        (Some(n), _) => (n, "KILN_CONTEXT"),
        (None, Some(n)) => (n.clone(), "the current context"),
        (None, None) => return Ok(None),
    };
    if name == DEFAULT {
        return Ok(None);
    }
    let ctx = file.contexts.get(&name).cloned().with_context(|| {
        format!(
            "{source} is {name:?}, which {} does not hold: `kiln context ls` lists them",
            path.display()
        )
    })?;
    Ok(Some((name, ctx)))
}

/// `kiln context …`.
pub fn context(args: &ContextArgs, out: &Output) -> anyhow::Result<ExitCode> {
    match &args.command {
        ContextCommand::Create {
            name,
            host,
            description,
            remote_bin,
        } => {
            check_name(name)?;
            anyhow::ensure!(
                name != DEFAULT,
                "`default` is the local daemon and cannot be created"
            );
            let parsed = Host::parse(host)?;
            let (path, mut file) = load()?;
            anyhow::ensure!(
                !file.contexts.contains_key(name),
                "context {name} exists already: `kiln context rm {name}` first"
            );
            file.contexts.insert(
                name.clone(),
                StoredContext {
                    host: parsed.to_string(),
                    description: description.clone(),
                    remote_bin: remote_bin.clone(),
                },
            );
            save(&path, &file)?;
            if out.json {
                out.data(&json!({"name": name, "host": parsed.to_string()}))?;
            } else {
                out.say(&format!(
                    "context {name} created ({parsed}); `kiln context use {name}` makes it current"
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        ContextCommand::Ls => {
            let (_, file) = load()?;
            let current = effective_name(&file);
            let mut rows = vec![json!({
                "name": DEFAULT,
                "host": "local (--state's kiln.sock)",
                "description": "the daemon on this machine",
                "current": current == DEFAULT,
            })];
            for (name, c) in &file.contexts {
                rows.push(json!({
                    "name": name,
                    "host": c.host,
                    "description": c.description,
                    "remote_bin": c.remote_bin,
                    "current": current == *name,
                }));
            }
            if out.json {
                out.data(&json!(rows))?;
                return Ok(ExitCode::SUCCESS);
            }
            out.print(&format!(
                "  {:<16} {:<40} {}\n",
                "NAME", "HOST", "DESCRIPTION"
            ));
            for r in &rows {
                out.print(&format!(
                    "{} {:<16} {:<40} {}\n",
                    if r["current"] == true { "*" } else { " " },
                    r["name"].as_str().unwrap_or(""),
                    r["host"].as_str().unwrap_or(""),
                    r["description"].as_str().unwrap_or("")
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        ContextCommand::Use { name } => {
            let (path, mut file) = load()?;
            if name == DEFAULT {
                file.current = None;
            } else {
                anyhow::ensure!(
                    file.contexts.contains_key(name),
                    "no context named {name}: `kiln context ls` lists them"
                );
                file.current = Some(name.clone());
            }
            save(&path, &file)?;
            if out.json {
                out.data(&json!({"current": name}))?;
            } else {
                out.say(&format!("current context: {name}"));
            }
            Ok(ExitCode::SUCCESS)
        }
        ContextCommand::Rm { name } => {
            anyhow::ensure!(name != DEFAULT, "`default` cannot be removed");
            let (path, mut file) = load()?;
            anyhow::ensure!(
                file.contexts.contains_key(name),
                "no context named {name}: `kiln context ls` lists them"
            );
            anyhow::ensure!(
                file.current.as_deref() != Some(name.as_str()),
                "context {name} is the current one: `kiln context use default` first"
            );
            file.contexts.remove(name);
            save(&path, &file)?;
            if out.json {
                out.data(&json!({"removed": name}))?;
            } else {
                out.say(&format!("context {name} removed"));
            }
            Ok(ExitCode::SUCCESS)
        }
        ContextCommand::Show => {
            let (name, host, source) = match super::remote::target() {
                super::remote::Target::Local => {
                    (DEFAULT.to_owned(), "local".to_owned(), "default".to_owned())
                }
                super::remote::Target::Remote { host, source, .. } => {
                    let name = source
                        .strip_prefix("context ")
                        .map_or_else(|| "(--host)".to_owned(), str::to_owned);
                    (name, host.to_string(), source.clone())
                }
            };
            if out.json {
                out.data(&json!({"name": name, "host": host, "source": source}))?;
            } else {
                out.print(&format!("{name}\t{host}\n"));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The context `ls` marks: `KILN_CONTEXT`, else the current one, else `default`.
fn effective_name(file: &File) -> String {
    std::env::var("KILN_CONTEXT")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| file.current.clone())
        .unwrap_or_else(|| DEFAULT.to_owned())
}
