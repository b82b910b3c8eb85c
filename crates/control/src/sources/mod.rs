//! GitOps: the daemon follows git branches (`kiln source add`). Each source is a repository
//! URL, a branch and the path of a `kiln.toml` in it; on a new commit (a poll every
//! `interval`, or a forge's webhook) the follower fetches it, checks it out into a clean work
//! tree and takes it through the steps a person would: build, test, plan, apply, then waits
//! for the rollout's outcome. Each step is a `source.step` event naming the commit, its
//! author and message; a failed step leaves the live release serving and the next commit is
//! tried normally.
//!
//! `kiln rollback` and the follower agree ([`kiln_deploy::follow`]): a rollback of a release
//! the follower applied marks its commit bad (never applied again, across restarts) and pins
//! the app until a newer commit (`resume = "new-commit"`) or `kiln sync` (`resume =
//! "manual"`). With `sync = "manual"` a planned commit waits for `kiln sync`.
//!
//! Files, under `<state>/sources/`: `sources.json` (the sources, webhook secrets included:
//! the state directory is private), and per source `NAME/memory.json` (what the follower
//! remembers), `NAME/mirror` (the fetched repository) and `NAME/tree` (the checkout).
//!
//! **Security:** the repository's writers are not trusted with the daemon's user unless the
//! source says `trusted`: a followed spec may not name secret sources (a `command` would run
//! as the daemon) nor copy files from outside its checkout (the host's files would be built
//! into an image). Sources are added and removed over the unix socket only.
//!
//! The build and the test are the binary's ([`Pipeline`]): the same code as `kiln build` and
//! `kiln test`.

mod follow;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kiln_deploy::follow::{Memory, Resume, SyncMode};
use serde::{Deserialize, Serialize};

use crate::controller::Controller;
use crate::dto::{ApplyRequest, SourceStatus};
use crate::error::{ControlError, Result};

pub use follow::Follower;

/// The shortest poll interval a source may ask for.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The poll interval when none is given (Argo CD's default is 180 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// How many sources one daemon follows at most.
pub const MAX_SOURCES: usize = 64;

/// Why a test step did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// It failed: the output's tail.
    Failed(String),
    /// A stop signal cut it short: not the commit's fault, tried again.
    Interrupted,
}

/// The build and test steps, as `kiln build` and `kiln test` do them (the binary's).
pub trait Pipeline: Send + Sync {
    /// Builds the spec at `file` into the daemon's store: the image's digest, or why not.
    fn build(&self, spec: &kiln_spec::Spec, file: &Path) -> std::result::Result<String, String>;
    /// Runs the spec's `[image.test]` on `image` and records the attestation: `Err` with the
    /// output's tail when it failed.
    fn test(
        &self,
        spec: &kiln_spec::Spec,
        file: &Path,
        image: &str,
    ) -> std::result::Result<(), StepError>;
}

/// One followed source, as `kiln source add` gives it and `sources.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Its name (`[a-z0-9-]`, as an app's).
    pub name: String,
    /// The repository: a local path, `file://`, `https://` or `ssh://` (or `user@host:path`).
    pub url: String,
    /// The branch followed.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// The spec's path in the repository.
    #[serde(default = "default_path")]
    pub path: String,
    /// Milliseconds between polls.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// `auto` or `manual`.
    #[serde(default = "default_sync")]
    pub sync: String,
    /// `new-commit` or `manual`.
    #[serde(default = "default_resume")]
    pub resume: String,
    /// The repository's writers are trusted with the daemon's user: its spec may name secret
    /// sources and copy from outside the checkout.
    #[serde(default)]
    pub trusted: bool,
    /// The HMAC key a forge signs webhook calls with; never answered back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

fn default_branch() -> String {
    "main".to_owned()
}
fn default_path() -> String {
    "kiln.toml".to_owned()
}
fn default_interval_ms() -> u64 {
    u64::try_from(DEFAULT_INTERVAL.as_millis()).unwrap_or(30_000)
}
fn default_sync() -> String {
    "auto".to_owned()
}
fn default_resume() -> String {
    "new-commit".to_owned()
}

impl SourceConfig {
    /// Checks every field; the error names the field and says what is wanted.
    pub fn validate(&self) -> std::result::Result<(), String> {
        crate::gate::check_stored_name(&self.name).map_err(|e| format!("name: {e}"))?;
        kiln_git::validate_url(&self.url).map_err(|e| format!("url: {e}"))?;
        if self.branch.is_empty()
            || self.branch.len() > 200
            || self.branch.starts_with('-')
            || self.branch.contains("..")
            || self
                .branch
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
        {
            return Err(format!("branch: {:?} is not a branch name", self.branch));
        }
        let p = Path::new(&self.path);
        if self.path.is_empty()
            || p.is_absolute()
            || p.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "path: {:?} must be a relative path inside the repository, without `..`",
                self.path
            ));
        }
        if u128::from(self.interval_ms) < MIN_INTERVAL.as_millis() {
            return Err(format!("interval: at least {} s", MIN_INTERVAL.as_secs()));
        }
        self.sync_mode()?;
        self.resume_mode()?;
        if let Some(s) = &self.webhook_secret
            && (s.len() < 16 || s.len() > 1024)
        {
            return Err("webhook secret: 16 to 1024 bytes".to_owned());
        }
        Ok(())
    }

    /// `sync` as the decision takes it.
    pub fn sync_mode(&self) -> std::result::Result<SyncMode, String> {
        match self.sync.as_str() {
            "auto" => Ok(SyncMode::Auto),
            "manual" => Ok(SyncMode::Manual),
            other => Err(format!("sync: {other:?} is not auto or manual")),
        }
    }

    /// `resume` as the decision takes it.
    pub fn resume_mode(&self) -> std::result::Result<Resume, String> {
        match self.resume.as_str() {
            "new-commit" => Ok(Resume::NewCommit),
            "manual" => Ok(Resume::Manual),
            other => Err(format!("resume: {other:?} is not new-commit or manual")),
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms).max(MIN_INTERVAL)
    }
}

/// What a follower keeps across restarts (`NAME/memory.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    /// The app the source's spec names (the last one built).
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    attempted: Option<String>,
    #[serde(default)]
    bad: std::collections::BTreeSet<String>,
    #[serde(default)]
    pinned: Option<String>,
    /// Who pinned it.
    #[serde(default)]
    pinned_by: Option<String>,
    /// A planned commit waiting for `kiln sync` (manual mode).
    #[serde(default)]
    waiting: Option<Waiting>,
    /// What releases rolled back from run ([`release_identity`]): a commit that would
    /// make the same release again is not applied.
    #[serde(default)]
    bad_releases: std::collections::BTreeSet<String>,
    /// The last commit whose plan had no changes: what runs is what it describes.
    #[serde(default)]
    in_sync: Option<String>,
    /// The last step taken, for `kiln status`.
    #[serde(default)]
    last: Option<crate::dto::SourceStep>,
}

impl Stored {
    fn memory(&self) -> Memory {
        Memory {
            attempted: self.attempted.clone(),
            bad: self.bad.clone(),
            pinned: self.pinned.clone(),
        }
    }
}

/// A commit built, tested and planned, waiting for `kiln sync`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Waiting {
    commit: crate::dto::CommitBrief,
    changes: Vec<String>,
    request: ApplyRequest,
}

/// The sources a daemon follows.
pub struct Sources {
    dir: PathBuf,
    pipeline: Arc<dyn Pipeline>,
    followers: tokio::sync::Mutex<BTreeMap<String, Arc<Follower>>>,
    /// Held while a source is added.
    adding: tokio::sync::Mutex<()>,
    /// Webhook calls refused (bad or missing signature, unknown source).
    refused: std::sync::atomic::AtomicU64,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Sources {
    fn list_path(&self) -> PathBuf {
        self.dir.join("sources.json")
    }

    fn save_list(&self, configs: &[SourceConfig]) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(configs)
            .map_err(|e| ControlError::Internal(format!("sources: {e}")))?;
        kiln_durable::write(&self.list_path(), &bytes).map_err(|e| {
            ControlError::Internal(format!("cannot write {}: {e}", self.list_path().display()))
        })
    }

    /// The follower of `app`, if a source's spec names it.
    async fn of_app(&self, app: &str) -> Option<Arc<Follower>> {
        self.followers
            .lock()
            .await
            .values()
            .find(|f| f.app().as_deref() == Some(app))
            .cloned()
    }

    /// Webhook calls refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Controller {
    /// Starts following the sources `dir/sources.json` lists (`dir` is `<state>/sources`), building and
    /// testing with `pipeline`, until `stop` says so. Called once, by the daemon.
    pub fn follow_sources(
        self: &Arc<Self>,
        dir: PathBuf,
        pipeline: Arc<dyn Pipeline>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ControlError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let sources = Arc::new(Sources {
            dir,
            pipeline,
            followers: tokio::sync::Mutex::new(BTreeMap::new()),
            adding: tokio::sync::Mutex::new(()),
            refused: std::sync::atomic::AtomicU64::new(0),
            stop,
        });
        let configs: Vec<SourceConfig> = match std::fs::read(sources.list_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ControlError::Corrupt(format!(
                    "{}: {e}: fix or remove it",
                    sources.list_path().display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ControlError::Internal(format!(
                    "cannot read {}: {e}",
                    sources.list_path().display()
                )));
            }
        };
        if self.sources.set(Arc::clone(&sources)).is_err() {
            return Err(ControlError::Internal(
                "sources are followed already".to_owned(),
            ));
        }
        let weak = Arc::downgrade(self);
        let mut followers = sources
            .followers
            .try_lock()
            .map_err(|_| ControlError::Internal("sources are busy".to_owned()))?;
        for config in configs {
            if let Err(why) = config.validate() {
                tracing::error!(source = %config.name, error = %why, "source not followed");
                continue;
            }
            let name = config.name.clone();
            match Follower::open(config, &sources.dir) {
                Ok(f) => {
                    f.clone().spawn(weak.clone(), Arc::clone(&sources));
                    followers.insert(name, f);
                }
                Err(e) => {
                    tracing::error!(source = %name, error = %e, "source not followed");
                }
            }
        }
        Ok(())
    }

    fn sources(&self) -> Result<&Arc<Sources>> {
        self.sources.get().ok_or_else(|| {
            ControlError::Conflict("this daemon does not follow git sources".to_owned())
        })
    }

    /// `kiln source add`: validates, stores and starts following (a first fetch at once).
    pub async fn add_source(self: &Arc<Self>, config: SourceConfig) -> Result<SourceStatus> {
        config.validate().map_err(ControlError::Invalid)?;
        let sources = Arc::clone(self.sources()?);
        // One add at a time (a fetch may take a while; other calls go on meanwhile).
        let _adding = sources.adding.lock().await;
        {
            let followers = sources.followers.lock().await;
            if followers.contains_key(&config.name) {
                return Err(ControlError::Conflict(format!(
                    "a source named {} exists: `kiln source remove {}` first",
                    config.name, config.name
                )));
            }
            if followers.len() >= MAX_SOURCES {
                return Err(ControlError::Invalid(format!(
                    "at most {MAX_SOURCES} sources"
                )));
            }
        }
        let f = Follower::open(config, &sources.dir)?;
        // A URL or branch that cannot be fetched is said now, not found later in a log.
        if let Err(e) = f.first_look(&sources).await {
            f.retire().await;
            return Err(e);
        }
        let mut followers = sources.followers.lock().await;
        let mut list: Vec<SourceConfig> = followers.values().map(|f| f.config.clone()).collect();
        list.push(f.config.clone());
        sources.save_list(&list)?;
        f.clone().spawn(Arc::downgrade(self), Arc::clone(&sources));
        followers.insert(f.config.name.clone(), Arc::clone(&f));
        drop(followers);
        Ok(self.source_status(&f, &sources).await)
    }

    /// The sources a daemon's `--sources` file declares: each added (on a task of its own,
    /// retried every interval until its first look works), or replaced when it is followed
    /// with another configuration. Sources the file does not name are left alone.
    pub async fn declare_sources(self: &Arc<Self>, configs: Vec<SourceConfig>) {
        for config in configs {
            let c = Arc::clone(self);
            tokio::spawn(async move {
                let Ok(sources) = c.sources().map(Arc::clone) else {
                    return;
                };
                let mut stop = sources.stop.clone();
                let name = config.name.clone();
                let current = sources
                    .followers
                    .lock()
                    .await
                    .get(&name)
                    .map(|f| f.config.clone());
                match current {
                    Some(same) if same == config => return,
                    Some(_) => {
                        tracing::info!(source = %name, "the sources file changed this source: replacing it");
                        if let Err(e) = c.remove_source(&name).await {
                            tracing::error!(source = %name, error = %e, "cannot replace the source");
                            return;
                        }
                    }
                    None => {}
                }
                loop {
                    match c.add_source(config.clone()).await {
                        Ok(_) => {
                            tracing::info!(source = %name, "following the source the sources file declares");
                            return;
                        }
                        Err(e) => {
                            tracing::error!(source = %name, error = %e, "cannot follow the source yet; trying again")
                        }
                    }
                    tokio::select! {
                        () = tokio::time::sleep(config.interval()) => {}
                        _ = stop.changed() => return,
                    }
                }
            });
        }
    }

    /// `kiln source remove`: stops following; what it applied keeps running.
    pub async fn remove_source(&self, name: &str) -> Result<()> {
        let sources = self.sources()?;
        let mut followers = sources.followers.lock().await;
        let Some(f) = followers.remove(name) else {
            return Err(ControlError::NotFound(format!("no source named {name}")));
        };
        let list: Vec<SourceConfig> = followers.values().map(|f| f.config.clone()).collect();
        sources.save_list(&list)?;
        drop(followers);
        f.retire().await;
        Ok(())
    }

    /// `kiln source list`.
    pub async fn list_sources(&self) -> Result<Vec<SourceStatus>> {
        let sources = self.sources()?;
        let followers: Vec<Arc<Follower>> =
            sources.followers.lock().await.values().cloned().collect();
        let mut out = Vec::new();
        for f in followers {
            out.push(self.source_status(&f, sources).await);
        }
        Ok(out)
    }

    /// The source following `app`, for `kiln status`; `None` when none does.
    pub(crate) async fn source_of(&self, app: &str) -> Option<SourceStatus> {
        let sources = self.sources.get()?;
        let f = sources.of_app(app).await?;
        Some(self.source_status(&f, sources).await)
    }

    async fn source_status(&self, f: &Follower, sources: &Sources) -> SourceStatus {
        let mut s = f.status();
        s.webhook_refused = sources.refused();
        if let Some(app) = &s.app {
            s.live_commit = self.live_commit(app).await;
        }
        let in_sync = f.in_sync();
        s.differs = match (&s.latest, &s.live_commit) {
            (Some(latest), live) => {
                live.as_deref() != Some(latest.id.as_str())
                    && in_sync.as_deref() != Some(latest.id.as_str())
            }
            (None, _) => false,
        };
        s
    }

    /// The source commit of `app`'s live release.
    async fn live_commit(&self, app: &str) -> Option<String> {
        let live = self
            .apps
            .lock()
            .await
            .get(app)
            .and_then(|a| a.live_release())?;
        let release = self.exec.ledger().release(app, live).ok()??;
        release.body.source_commit
    }

    /// `kiln sync APP`: applies the commit waiting in manual mode, or takes the branch's head
    /// through the steps now (ending a pin), unless a rollback marked it bad.
    pub async fn sync(self: &Arc<Self>, app: &str, actor: &str) -> Result<serde_json::Value> {
        let sources = Arc::clone(self.sources()?);
        let f = sources.of_app(app).await.ok_or_else(|| {
            ControlError::NotFound(format!("no source follows {app}: `kiln source list`"))
        })?;
        // On a task of its own: a client that goes away does not cut a sync short.
        let (c, actor) = (Arc::clone(self), actor.to_owned());
        tokio::spawn(async move { f.sync(&c, &sources, &actor).await })
            .await
            .map_err(|e| ControlError::Internal(format!("sync: {e}")))?
    }

    /// `kiln plan APP`: the plan of the commit waiting for `kiln sync`.
    pub async fn waiting_plan(&self, app: &str) -> Result<serde_json::Value> {
        let sources = self.sources()?;
        let f = sources.of_app(app).await.ok_or_else(|| {
            ControlError::NotFound(format!("no source follows {app}: `kiln source list`"))
        })?;
        let s = f.status();
        Ok(serde_json::json!({
            "app": app,
            "source": s.name,
            "waiting": s.waiting,
            "latest": s.latest,
        }))
    }

    /// A forge's push notification for source `name`: with a valid signature, a fetch at
    /// once. Every refusal looks alike (and is counted), so a caller learns nothing of which
    /// sources exist.
    pub async fn source_webhook(
        &self,
        name: &str,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<()> {
        let refused = || {
            ControlError::Unauthorized(
                "the signature does not verify (X-Hub-Signature-256)".to_owned(),
            )
        };
        let Some(sources) = self.sources.get() else {
            return Err(refused());
        };
        let f = sources.followers.lock().await.get(name).cloned();
        let key = f.as_ref().and_then(|f| f.config.webhook_secret.clone());
        // The MAC is computed whether or not the source exists and has a key, so how long
        // a refusal takes says nothing of which sources there are.
        let verified = webhook::verify(
            key.as_deref().unwrap_or(webhook::NO_KEY).as_bytes(),
            signature,
            body,
        );
        match (verified && key.is_some(), f) {
            (true, Some(f)) => {
                f.wake();
                Ok(())
            }
            _ => {
                sources
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(source = %name, "webhook call refused: its signature does not verify");
                Err(refused())
            }
        }
    }

    /// A rollback of `app` away from `from` (by `actor`): if the source following it applied
    /// that release, its commit is marked bad and the app pinned, before the rollback answers.
    pub(crate) async fn notice_rollback(&self, app: &str, from: u64, actor: &str) {
        let Some(sources) = self.sources.get() else {
            return;
        };
        let Some(f) = sources.of_app(app).await else {
            return;
        };
        let release = match self.exec.ledger().release(app, from) {
            Ok(Some(r)) => r,
            _ => return,
        };
        if release.body.actor != f.actor() {
            return;
        }
        let Some(commit) = release.body.source_commit else {
            return;
        };
        let identity = serde_json::from_value::<crate::config::ReleaseConfig>(release.body.config)
            .map(|config| release_identity(&release.body.image, &config))
            .unwrap_or_default();
        f.pin(self, app, (&commit, from, &identity), actor);
    }
}

/// What a release runs, as one string: its image and its configuration as a spec makes it
/// (the daemon's policy and the secrets' fingerprints, which the daemon adds, left out).
pub(crate) fn release_identity(image: &str, config: &crate::config::ReleaseConfig) -> String {
    let mut config = config.clone();
    config.daemon_policy = Default::default();
    for s in config.service.secrets.values_mut() {
        s.fingerprint = None;
    }
    let json = serde_json::to_vec(&config).unwrap_or_default();
    let mut bytes = image.as_bytes().to_vec();
    bytes.push(0);
    bytes.extend_from_slice(&json);
    kiln_runtime::Digest::of(&bytes).to_string()
}

/// `path`'s display with the source's checkout dir shown as the repository's.
fn in_repo(path: &Path, tree: &Path) -> String {
    path.strip_prefix(tree)
        .map_or_else(|_| path.display().to_string(), |p| p.display().to_string())
}

/// Sleeps `d`, or less when woken or stopped.
async fn nap(
    d: Duration,
    wake: &tokio::sync::Notify,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = wake.notified() => {}
        _ = stop.changed() => {}
    }
}

/// Locks a std mutex, poisoned or not (what it guards stays consistent: plain data).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
