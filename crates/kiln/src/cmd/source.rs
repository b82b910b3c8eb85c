//! GitOps from the command line: `kiln source add|list|remove` (the git branches the daemon
//! follows), `kiln sync APP` (apply what waits, or resume a pinned app), and the daemon's
//! side of the follower: [`DaemonPipeline`], the build and test steps, which are `kiln
//! build`'s and `kiln test`'s own code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_control::dto::SourceStatus;
use kiln_control::sources::SourceConfig;
use serde_json::json;

use super::deploy::{block, client};
use crate::output::Output;

/// `kiln source`.
#[derive(Debug, Args)]
pub struct SourceArgs {
    #[command(subcommand)]
    pub command: SourceCommand,
}

/// `kiln source …`.
#[derive(Debug, Subcommand)]
pub enum SourceCommand {
    /// Follow a git branch: each new commit is built, tested, planned and applied
    Add(AddArgs),
    /// The sources followed, with the commit live and the branch's head
    List,
    /// Stop following a source (what it applied keeps running)
    Remove {
        /// The source
        name: String,
    },
}

/// `kiln source add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The source's name
    pub name: String,
    /// The repository: a local path, file://, https:// or ssh:// URL (or user@host:path)
    #[arg(long, value_name = "URL")]
    pub git: String,
    /// The branch to follow
    #[arg(long, default_value = "main")]
    pub branch: String,
    /// The kiln.toml's path in the repository
    #[arg(long, default_value = "kiln.toml", value_name = "PATH")]
    pub path: String,
    /// How often to fetch (a webhook call fetches at once)
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// `auto` applies each new commit; `manual` plans it and waits for `kiln sync`
    #[arg(long, default_value = "auto", value_parser = ["auto", "manual"])]
    pub sync: String,
    /// After a rollback pins the app: `new-commit` resumes on a newer commit, `manual` waits
    /// for `kiln sync`
    #[arg(long, default_value = "new-commit", value_parser = ["new-commit", "manual"])]
    pub resume: String,
    /// A file holding the secret a forge signs webhook calls with
    /// (`POST /v1/sources/NAME/webhook`, `X-Hub-Signature-256`)
    #[arg(long, value_name = "FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Trust the repository's writers with the daemon's user: its kiln.toml may name secret
    /// sources and copy files from outside the repository
    #[arg(long)]
    pub trusted: bool,
}

/// `kiln sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The app a source follows (default: the name in ./kiln.toml)
    pub app: Option<String>,
}

/// Runs `kiln source …`.
pub fn source(args: &SourceArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    match &args.command {
        SourceCommand::Add(a) => add(a, state, out),
        SourceCommand::List => list(state, out),
        SourceCommand::Remove { name } => block(async {
            let v = client(state).delete(&format!("/v1/sources/{name}")).await?;
            if out.json {
                out.data(&v)?;
            } else {
                out.say(&format!(
                    "source {name} removed; what it applied keeps running"
                ));
            }
            Ok(ExitCode::SUCCESS)
        }),
    }
}

fn add(a: &AddArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let webhook_secret = match &a.webhook_secret_file {
        Some(file) => {
            let s = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the webhook secret {}", file.display()))?;
            Some(s.trim().to_owned())
        }
        None => None,
    };
    // A git URL given as a relative path means the one here, not the daemon's directory.
    let url = match Path::new(&a.git) {
        p if !a.git.contains("://") && !is_scp_like(&a.git) && p.exists() => std::path::absolute(p)
            .with_context(|| format!("cannot resolve {}", p.display()))?
            .display()
            .to_string(),
        _ => a.git.clone(),
    };
    let config = SourceConfig {
        name: a.name.clone(),
        url,
        branch: a.branch.clone(),
        path: a.path.clone(),
        interval_ms: u64::try_from(a.interval.as_millis()).unwrap_or(u64::MAX),
        sync: a.sync.clone(),
        resume: a.resume.clone(),
        trusted: a.trusted,
        webhook_secret,
    };
    if let Err(why) = config.validate() {
        anyhow::bail!("kiln source add {}: {why}", a.name);
    }
    block(async {
        let v = client(state)
            .post("/v1/sources", &serde_json::to_value(&config)?)
            .await?;
        if out.json {
            out.data(&v)?;
        } else {
            let s: SourceStatus = serde_json::from_value(v)?;
            out.say(&format!(
                "following {} {} ({}), every {}; sync {}, resume on {}",
                s.url,
                s.branch,
                s.path,
                humantime::format_duration(Duration::from_millis(s.interval_ms)),
                s.sync,
                s.resume
            ));
            if let Some(e) = &s.error {
                out.say(&format!("  first fetch: {e}"));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One `[[source]]` of a `kiln serve --sources` file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSource {
    name: String,
    git: String,
    #[serde(default = "main_branch")]
    branch: String,
    #[serde(default = "spec_path")]
    path: String,
    #[serde(default = "thirty_seconds")]
    interval: String,
    #[serde(default = "auto")]
    sync: String,
    #[serde(default = "new_commit")]
    resume: String,
    #[serde(default)]
    webhook_secret_file: Option<PathBuf>,
    #[serde(default)]
    trusted: bool,
}

fn main_branch() -> String {
    "main".to_owned()
}
fn spec_path() -> String {
    "kiln.toml".to_owned()
}
fn thirty_seconds() -> String {
    "30s".to_owned()
}
fn auto() -> String {
    "auto".to_owned()
}
fn new_commit() -> String {
    "new-commit".to_owned()
}

/// `kiln serve --sources FILE`'s sources (`[[source]]` tables), each checked as `kiln source
/// add` checks it; a relative path (a local repository, a webhook secret file) is the file's
/// directory's. The error names the file, and the source or the line and column.
pub fn load_file(file: &Path) -> anyhow::Result<Vec<SourceConfig>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        source: Vec<FileSource>,
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the sources file {}", file.display()))?;
    let doc: Doc = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid sources file {}:\n{e}", file.display()))?;
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut out: Vec<SourceConfig> = Vec::new();
    for s in doc.source {
        let at = |what: String| format!("{} source {}: {what}", file.display(), s.name);
        let interval = humantime::parse_duration(&s.interval)
            .map_err(|e| anyhow::anyhow!(at(format!("interval: {e}"))))?;
        let webhook_secret = match &s.webhook_secret_file {
            Some(f) => {
                let f = dir.join(f);
                let v = std::fs::read_to_string(&f).with_context(|| {
                    at(format!("cannot read the webhook secret {}", f.display()))
                })?;
                Some(v.trim().to_owned())
            }
            None => None,
        };
        let url =
            if !s.git.contains("://") && !is_scp_like(&s.git) && Path::new(&s.git).is_relative() {
                dir.join(&s.git).display().to_string()
            } else {
                s.git.clone()
            };
        let config = SourceConfig {
            name: s.name.clone(),
            url,
            branch: s.branch,
            path: s.path,
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            sync: s.sync,
            resume: s.resume,
            trusted: s.trusted,
            webhook_secret,
        };
        config.validate().map_err(|why| anyhow::anyhow!(at(why)))?;
        if out.iter().any(|c| c.name == config.name) {
            anyhow::bail!(at("named twice".to_owned()));
        }
        out.push(config);
    }
    Ok(out)
}

/// `user@host:path`, git's scp-like syntax.
fn is_scp_like(url: &str) -> bool {
    match url.split_once(':') {
        Some((host, _)) => host.contains('@') && !host.contains('/'),
        None => false,
    }
}

fn list(state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    block(async {
        let v = client(state).get("/v1/sources").await?;
        if out.json {
            out.data(&v)?;
            return Ok(ExitCode::SUCCESS);
        }
        let all: Vec<SourceStatus> = serde_json::from_value(v)?;
        if all.is_empty() {
            out.say("no sources are followed; add one with `kiln source add NAME --git URL`");
        }
        for s in &all {
            print_source(s, out);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// A source as `kiln source list` and `kiln status` show it.
pub fn print_source(s: &SourceStatus, out: &Output) {
    out.say(&format!(
        "source {}: {} {} ({}), sync {}, resume on {}{}",
        s.name,
        s.url,
        s.branch,
        s.path,
        s.sync,
        s.resume,
        if s.trusted { ", trusted" } else { "" }
    ));
    let short = |c: &str| c.get(..12).unwrap_or(c).to_owned();
    let live = s.live_commit.as_deref().map_or("none".to_owned(), short);
    match &s.latest {
        Some(l) => out.say(&format!(
            "  live commit {live}; latest {} {:?} by {}{}",
            short(&l.id),
            l.summary,
            l.author,
            if s.differs { " (differs)" } else { " (live)" }
        )),
        None => out.say(&format!("  live commit {live}; branch not fetched yet")),
    }
    if let Some(p) = &s.pinned {
        out.say(&format!("  pinned: {p}"));
    }
    if let Some(w) = &s.waiting {
        out.say(&format!(
            "  waiting for `kiln sync`: commit {} ({}), {} change(s): `kiln plan {}` lists them",
            short(&w.commit.id),
            w.commit.summary,
            w.changes.len(),
            s.app.as_deref().unwrap_or("APP")
        ));
    }
    if let Some(b) = &s.busy {
        out.say(&format!("  now: {b}"));
    }
    if let Some(last) = &s.last {
        out.say(&format!(
            "  last step: {} {} for {}{}",
            last.step,
            last.result,
            short(&last.commit.id),
            last.detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ));
        if let Some(o) = &last.output {
            for line in o
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                out.say(&format!("    | {line}"));
            }
        }
    }
    if let Some(e) = &s.error {
        out.say(&format!("  fetch failed: {e}"));
    }
    if s.webhook_refused > 0 {
        out.say(&format!("  webhook calls refused: {}", s.webhook_refused));
    }
}

/// Runs `kiln sync APP`.
pub fn sync(args: &SyncArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = super::deploy::app_name(args.app.as_deref())?;
    block(async {
        let v = client(state)
            .post(&format!("/v1/apps/{app}/sync"), &json!({}))
            .await?;
        if out.json {
            out.data(&v)?;
        }
        let result = v["result"].as_str().unwrap_or("?");
        let commit = v["commit"].as_str().unwrap_or("?");
        if !out.json {
            out.say(&format!(
                "{app}: commit {} {result}",
                commit.get(..12).unwrap_or(commit)
            ));
        }
        if result == "failed" {
            let last: Option<kiln_control::dto::SourceStep> =
                serde_json::from_value(v["last"].clone()).ok();
            if let Some(l) = last {
                anyhow::bail!(
                    "{app}: commit {}: {} failed{}",
                    commit.get(..12).unwrap_or(commit),
                    l.step,
                    l.output.map(|o| format!(":\n{o}")).unwrap_or_default()
                );
            }
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `kiln plan APP`: the plan of the commit a followed app's source holds for `kiln sync`.
pub fn waiting_plan(app: &str, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    block(async {
        let v = client(state).get(&format!("/v1/apps/{app}/plan")).await?;
        if out.json {
            out.data(&v)?;
            return Ok(ExitCode::SUCCESS);
        }
        let waiting: Option<kiln_control::dto::SourceWaiting> =
            serde_json::from_value(v["waiting"].clone())?;
        match waiting {
            None => out.say(&format!("{app}: no commit waits for `kiln sync`")),
            Some(w) => {
                out.say(&format!(
                    "{app}: commit {} ({:?} by {}) waits for `kiln sync {app}`; applying it would:",
                    w.commit.id.get(..12).unwrap_or(&w.commit.id),
                    w.commit.summary,
                    w.commit.author
                ));
                for c in &w.changes {
                    out.say(&format!("  {c}"));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The follower's build and test steps in the daemon: `kiln build`'s and `kiln test`'s code,
/// on the daemon's store.
pub struct DaemonPipeline {
    /// The state directory.
    pub state: PathBuf,
}

impl kiln_control::sources::Pipeline for DaemonPipeline {
    fn build(&self, spec: &kiln_spec::Spec, file: &Path) -> Result<String, String> {
        super::image::build_spec(spec, file, None, &self.state, &Output::silent())
            .map(|built| built.digest.to_string())
            .map_err(|e| format!("{e:#}"))
    }

    fn test(
        &self,
        spec: &kiln_spec::Spec,
        file: &Path,
        image: &str,
    ) -> Result<(), kiln_control::sources::StepError> {
        use kiln_control::sources::StepError;
        match super::test::run_tests(spec, file, image, &self.state) {
            Ok(t) if t.passed => Ok(()),
            Ok(t) => Err(StepError::Failed(format!(
                "image {} failed its tests:\n{}",
                t.digest.short(),
                t.failures.join("\n")
            ))),
            Err(e) if e.downcast_ref::<super::signals::Interrupted>().is_some() => {
                Err(StepError::Interrupted)
            }
            Err(e) => Err(StepError::Failed(format!("{e:#}"))),
        }
    }
}
