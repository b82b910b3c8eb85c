//! One source's follower: the loop (poll or webhook), and the steps it takes a commit
//! through. One pass at a time per source; a pass never holds a lock across a step.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kiln_deploy::follow::{self as decide, Next, SyncMode};
use kiln_ledger::Event;

use super::{SourceConfig, Sources, Stored, Waiting, in_repo, lock, nap};
use crate::controller::Controller;
use crate::dto::{ApplyRequest, CommitBrief, SourceStatus, SourceStep};
use crate::error::{ControlError, Result};

/// How much of a failed step's output is kept (in the event and in `kiln status`).
const OUTPUT_TAIL: usize = 4096;
/// How often a pass looks at a rollout it started.
const ROLLOUT_POLL: Duration = Duration::from_millis(250);

/// One followed source.
pub struct Follower {
    pub(super) config: SourceConfig,
    dir: PathBuf,
    stored: Mutex<Stored>,
    /// What `kiln status` shows of the moment: the branch's head, the step running, the
    /// last fetch's error.
    live: Mutex<Live>,
    wake: tokio::sync::Notify,
    /// One pass at a time (a poll, a webhook, `kiln sync`).
    pass: tokio::sync::Mutex<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct Live {
    latest: Option<kiln_git::Commit>,
    busy: Option<String>,
    error: Option<String>,
}

/// How a commit's steps ended.
enum Outcome {
    /// Applied and rolled out, or nothing to change.
    Done,
    /// Waiting for `kiln sync`.
    Waiting,
    /// A step failed (recorded).
    Failed,
}

impl Follower {
    /// The follower of `config`, with what it remembered (`memory.json`).
    pub(super) fn open(config: SourceConfig, sources_dir: &Path) -> Result<Arc<Follower>> {
        let dir = sources_dir.join(&config.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ControlError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let stored = match std::fs::read(dir.join("memory.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ControlError::Corrupt(format!(
                    "{}: {e}: fix or remove it (the source forgets its pins)",
                    dir.join("memory.json").display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => {
                return Err(ControlError::Internal(format!(
                    "cannot read {}: {e}",
                    dir.join("memory.json").display()
                )));
            }
        };
        let (stop, _) = tokio::sync::watch::channel(false);
        Ok(Arc::new(Follower {
            config,
            dir,
            stored: Mutex::new(stored),
            live: Mutex::new(Live::default()),
            wake: tokio::sync::Notify::new(),
            pass: tokio::sync::Mutex::new(()),
            stop,
        }))
    }

    /// Starts the loop: a pass at once, then one per interval or webhook call.
    pub(super) fn spawn(self: Arc<Self>, c: Weak<Controller>, sources: Arc<Sources>) {
        tokio::spawn(async move {
            let mut mine = self.stop.subscribe();
            let mut daemon = sources.stop.clone();
            loop {
                if *mine.borrow() || *daemon.borrow() {
                    return;
                }
                let Some(controller) = c.upgrade() else {
                    return;
                };
                if let Err(e) = self.poll(&controller, &sources).await {
                    tracing::warn!(source = %self.config.name, error = %e, "source pass failed");
                }
                drop(controller);
                tokio::select! {
                    () = nap(self.config.interval(), &self.wake, &mut mine) => {}
                    _ = daemon.changed() => {}
                }
            }
        });
    }

    pub(super) fn stop(&self) {
        let _ = self.stop.send(true);
        self.wake.notify_one();
    }

    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// The actor the ledger records for what this source applies.
    pub(super) fn actor(&self) -> String {
        format!("source:{}", self.config.name)
    }

    pub(super) fn app(&self) -> Option<String> {
        lock(&self.stored).app.clone()
    }

    /// What `kiln status` and `kiln source list` show (the controller adds the live commit).
    pub(super) fn status(&self) -> SourceStatus {
        let stored = lock(&self.stored).clone();
        let live = lock(&self.live);
        SourceStatus {
            name: self.config.name.clone(),
            url: kiln_git::redact(&self.config.url),
            branch: self.config.branch.clone(),
            path: self.config.path.clone(),
            interval_ms: self.config.interval_ms,
            sync: self.config.sync.clone(),
            resume: self.config.resume.clone(),
            trusted: self.config.trusted,
            webhook: self.config.webhook_secret.is_some(),
            app: stored.app.clone(),
            latest: live.latest.as_ref().map(brief),
            live_commit: None,
            differs: false,
            pinned: stored.pinned.as_ref().map(|c| {
                format!(
                    "commit {} was rolled back{}; {}",
                    short(c),
                    stored
                        .pinned_by
                        .as_ref()
                        .map(|by| format!(" by {by}"))
                        .unwrap_or_default(),
                    match self.config.resume.as_str() {
                        "manual" => "`kiln sync` resumes following",
                        _ => "a newer commit resumes following",
                    }
                )
            }),
            bad: stored.bad.iter().cloned().collect(),
            waiting: stored.waiting.as_ref().map(|w| crate::dto::SourceWaiting {
                commit: w.commit.clone(),
                image: w.request.image.clone(),
                changes: w.changes.clone(),
            }),
            busy: live.busy.clone(),
            error: live.error.clone(),
            last: stored.last.clone(),
            webhook_refused: 0,
        }
    }

    fn save(&self, stored: &Stored) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(stored)
            .map_err(|e| ControlError::Internal(format!("source memory: {e}")))?;
        let path = self.dir.join("memory.json");
        kiln_durable::write(&path, &bytes)
            .map_err(|e| ControlError::Internal(format!("cannot write {}: {e}", path.display())))
    }

    /// Changes what the follower remembers, durably.
    fn remember(&self, change: impl FnOnce(&mut Stored)) -> Result<()> {
        let mut stored = lock(&self.stored);
        let mut next = stored.clone();
        change(&mut next);
        self.save(&next)?;
        *stored = next;
        Ok(())
    }

    /// A rollback away from `commit` (release `release`): marked bad, the app pinned.
    pub(super) fn pin(&self, c: &Controller, app: &str, commit: &str, release: u64, actor: &str) {
        let saved = self.remember(|s| {
            let mut m = s.memory();
            decide::rolled_back(&mut m, commit);
            s.bad = m.bad;
            s.pinned = m.pinned;
            s.pinned_by = Some(actor.to_owned());
            s.waiting = None;
        });
        if let Err(e) = saved {
            tracing::error!(source = %self.config.name, error = %e, "the rollback's pin is not remembered");
        }
        let event = Event::SourcePinned {
            source: self.config.name.clone(),
            commit: commit.to_owned(),
            release,
            actor: actor.to_owned(),
            resume: self.config.resume.clone(),
        };
        if let Err(e) = c.exec.record(app, &event) {
            tracing::error!(source = %self.config.name, error = %e, "cannot record the pin");
        }
    }

    /// A poll (or a webhook's wake-up): fetch, then decide about the head.
    async fn poll(&self, c: &Arc<Controller>, sources: &Sources) -> Result<()> {
        let _one = self.pass.lock().await;
        let head = self.fetch().await?;
        let resume = self.config.resume_mode().map_err(ControlError::Invalid)?;
        let memory = lock(&self.stored).memory();
        match decide::next(&memory, &head.id, resume) {
            Next::Idle => Ok(()),
            Next::Hold(why) => {
                self.step(c, &head, "seen", "skipped", Some(why.to_string()), None);
                self.remember(|s| s.attempted = Some(head.id.clone()))
            }
            Next::Run { resumes } => {
                if resumes {
                    self.resume(c, &head, "a new commit")?;
                }
                let apply =
                    self.config.sync_mode().map_err(ControlError::Invalid)? == SyncMode::Auto;
                self.take(c, sources, &head, apply).await
            }
        }
    }

    /// `kiln sync`: apply what waits for it, or take the head through the steps now.
    pub(super) async fn sync(
        &self,
        c: &Arc<Controller>,
        sources: &Sources,
        actor: &str,
    ) -> Result<serde_json::Value> {
        let _one = self.pass.lock().await;
        let head = self.fetch().await?;
        let memory = lock(&self.stored).memory();
        let resumes = match decide::sync(&memory, &head.id) {
            Err(why) => {
                return Err(ControlError::Conflict(format!(
                    "commit {} is the branch's head: {why}",
                    short(&head.id)
                )));
            }
            Ok(Next::Run { resumes }) => resumes,
            Ok(_) => false,
        };
        if resumes {
            self.resume(c, &head, &format!("`kiln sync` by {actor}"))?;
        }
        let waiting = lock(&self.stored).waiting.clone();
        let outcome = match waiting {
            Some(w) if w.commit.id == head.id => {
                let app = self.app().unwrap_or_default();
                self.apply(c, &head, &app, w.request).await?
            }
            _ => self.steps(c, sources, &head, true).await?,
        };
        self.remember(|s| s.attempted = Some(head.id.clone()))?;
        Ok(serde_json::json!({
            "source": self.config.name,
            "commit": head.id,
            "result": match outcome {
                Outcome::Done => "applied",
                Outcome::Waiting => "waiting",
                Outcome::Failed => "failed",
            },
            "last": lock(&self.stored).last,
        }))
    }

    fn resume(&self, c: &Controller, head: &kiln_git::Commit, by: &str) -> Result<()> {
        self.remember(|s| {
            s.pinned = None;
            s.pinned_by = None;
        })?;
        if let Some(app) = self.app() {
            let event = Event::SourceResumed {
                source: self.config.name.clone(),
                commit: head.id.clone(),
                by: by.to_owned(),
            };
            c.exec.record(&app, &event)?;
        }
        Ok(())
    }

    /// Fetches the branch: its head, also shown by `kiln status`.
    async fn fetch(&self) -> Result<kiln_git::Commit> {
        let (url, branch, mirror) = (
            self.config.url.clone(),
            self.config.branch.clone(),
            self.dir.join("mirror"),
        );
        let fetched = tokio::task::spawn_blocking(move || kiln_git::fetch(&url, &branch, &mirror))
            .await
            .map_err(|e| ControlError::Internal(format!("fetch: {e}")))?;
        let mut live = lock(&self.live);
        match fetched {
            Ok(head) => {
                live.latest = Some(head.clone());
                live.error = None;
                Ok(head)
            }
            Err(e) => {
                let why = format!("fetch: {e}");
                live.error = Some(why.clone());
                Err(ControlError::Invalid(why))
            }
        }
    }

    /// Takes `head` through the steps and remembers it was decided about, whatever came of it.
    async fn take(
        &self,
        c: &Arc<Controller>,
        sources: &Sources,
        head: &kiln_git::Commit,
        apply: bool,
    ) -> Result<()> {
        let outcome = self.steps(c, sources, head, apply).await;
        lock(&self.live).busy = None;
        self.remember(|s| s.attempted = Some(head.id.clone()))?;
        outcome.map(|_| ())
    }

    /// Check out, build, test, plan, then apply (or wait for `kiln sync`).
    async fn steps(
        &self,
        c: &Arc<Controller>,
        sources: &Sources,
        head: &kiln_git::Commit,
        apply: bool,
    ) -> Result<Outcome> {
        self.busy("checkout");
        let tree = self.dir.join("tree");
        let (mirror, id, dest) = (self.dir.join("mirror"), head.id.clone(), tree.clone());
        let checked = tokio::task::spawn_blocking(move || kiln_git::checkout(&mirror, &id, &dest))
            .await
            .map_err(|e| ControlError::Internal(format!("checkout: {e}")))?;
        if let Err(e) = checked {
            self.step(
                c,
                head,
                "seen",
                "failed",
                None,
                Some(format!("checkout: {e}")),
            );
            return Ok(Outcome::Failed);
        }
        let file = tree.join(&self.config.path);
        let spec = match read_spec(&file, &tree) {
            Ok(spec) => spec,
            Err(why) => {
                self.step(c, head, "build", "failed", None, Some(why));
                return Ok(Outcome::Failed);
            }
        };
        let app = spec.name.to_string();
        if self.app().as_deref() != Some(app.as_str()) {
            self.remember(|s| s.app = Some(app.clone()))?;
        }
        self.step(
            c,
            head,
            "seen",
            "passed",
            Some(self.config.branch.clone()),
            None,
        );
        if !self.config.trusted
            && let Err(why) = untrusted_refusal(&spec, &tree)
        {
            self.step(c, head, "build", "failed", None, Some(why));
            return Ok(Outcome::Failed);
        }
        // Build.
        self.busy("build");
        let pipeline = Arc::clone(&sources.pipeline);
        let (s, f) = (spec.clone(), file.clone());
        let built = tokio::task::spawn_blocking(move || pipeline.build(&s, &f))
            .await
            .map_err(|e| ControlError::Internal(format!("build: {e}")))?;
        let image = match built {
            Ok(image) => image,
            Err(why) => {
                self.step(c, head, "build", "failed", None, Some(why));
                return Ok(Outcome::Failed);
            }
        };
        self.step(c, head, "build", "passed", Some(image.clone()), None);
        // Test.
        if spec.image.test.is_some() {
            self.busy("test");
            let pipeline = Arc::clone(&sources.pipeline);
            let (s, f, i) = (spec.clone(), file.clone(), image.clone());
            let tested = tokio::task::spawn_blocking(move || pipeline.test(&s, &f, &i))
                .await
                .map_err(|e| ControlError::Internal(format!("test: {e}")))?;
            if let Err(output) = tested {
                self.step(c, head, "test", "failed", Some(image.clone()), Some(output));
                return Ok(Outcome::Failed);
            }
            self.step(c, head, "test", "passed", Some(image.clone()), None);
        }
        // Plan.
        self.busy("plan");
        let text = std::fs::read(&file).unwrap_or_default();
        let request = ApplyRequest {
            image: image.clone(),
            config: crate::config::ReleaseConfig::from_spec(&spec),
            spec_digest: kiln_runtime::Digest::of(&text).to_string(),
            source_commit: Some(head.id.clone()),
            actor: self.actor(),
        };
        let changes = match c.plan_changes(&app, &spec, &request).await {
            Ok(changes) => changes,
            Err(e) => {
                self.step(c, head, "plan", "failed", None, Some(e.to_string()));
                return Ok(Outcome::Failed);
            }
        };
        if changes.is_empty() {
            self.step(
                c,
                head,
                "plan",
                "passed",
                Some("no changes".to_owned()),
                None,
            );
            self.remember(|s| s.waiting = None)?;
            return Ok(Outcome::Done);
        }
        let listed = changes.join("; ");
        if !apply {
            self.step(c, head, "plan", "waiting", Some(listed), None);
            let waiting = Waiting {
                commit: brief(head),
                changes,
                request,
            };
            self.remember(|s| s.waiting = Some(waiting))?;
            return Ok(Outcome::Waiting);
        }
        self.step(c, head, "plan", "passed", Some(listed), None);
        self.apply(c, head, &app, request).await
    }

    /// Applies `request` and waits for its rollout's outcome.
    async fn apply(
        &self,
        c: &Arc<Controller>,
        head: &kiln_git::Commit,
        app: &str,
        request: ApplyRequest,
    ) -> Result<Outcome> {
        self.busy("apply");
        self.remember(|s| s.waiting = None)?;
        let release = match c.apply(app, request).await {
            Ok(r) => r.number,
            Err(e) => {
                self.step(c, head, "apply", "failed", None, Some(e.to_string()));
                return Ok(Outcome::Failed);
            }
        };
        self.step(
            c,
            head,
            "apply",
            "passed",
            Some(format!("release {release}")),
            None,
        );
        self.busy("rollout");
        let mut stop = self.stop.subscribe();
        loop {
            let status = c.status(app).await?;
            if status.release != release {
                // Another release replaced it (a rollback, an apply): not this pass's to judge.
                return Ok(Outcome::Done);
            }
            match status.phase.as_str() {
                "completed" => {
                    self.step(
                        c,
                        head,
                        "rollout",
                        "passed",
                        Some(format!("release {release} is live")),
                        None,
                    );
                    return Ok(Outcome::Done);
                }
                "aborted" => {
                    let why = status.reason.unwrap_or_else(|| "aborted".to_owned());
                    self.step(
                        c,
                        head,
                        "rollout",
                        "failed",
                        Some(format!("release {release}")),
                        Some(why),
                    );
                    return Ok(Outcome::Failed);
                }
                _ => {}
            }
            tokio::select! {
                () = tokio::time::sleep(ROLLOUT_POLL) => {}
                _ = stop.changed() => return Ok(Outcome::Done),
            }
        }
    }

    fn busy(&self, step: &str) {
        lock(&self.live).busy = Some(step.to_owned());
    }

    /// Records a step: a `source.step` event on the app (once one is known), the log, and
    /// `kiln status`'s last step.
    fn step(
        &self,
        c: &Controller,
        head: &kiln_git::Commit,
        step: &str,
        result: &str,
        detail: Option<String>,
        output: Option<String>,
    ) {
        let output = output.map(|o| tail(&o, OUTPUT_TAIL));
        match result {
            "failed" => {
                tracing::warn!(source = %self.config.name, commit = %head.id, step, output = ?output, "source step failed")
            }
            _ => {
                tracing::info!(source = %self.config.name, commit = %head.id, step, result, detail = ?detail, "source step")
            }
        }
        let last = SourceStep {
            commit: brief(head),
            step: step.to_owned(),
            result: result.to_owned(),
            detail: detail.clone(),
            output: output.clone(),
        };
        if let Err(e) = self.remember(|s| s.last = Some(last)) {
            tracing::error!(source = %self.config.name, error = %e, "cannot remember the step");
        }
        let Some(app) = self.app() else {
            return;
        };
        let event = Event::SourceStep {
            source: self.config.name.clone(),
            commit: head.id.clone(),
            author: head.author.clone(),
            summary: head.summary.clone(),
            step: step.to_owned(),
            result: result.to_owned(),
            detail,
            output,
        };
        if let Err(e) = c.exec.record(&app, &event) {
            tracing::error!(source = %self.config.name, error = %e, "cannot record the step");
        }
    }
}

fn brief(c: &kiln_git::Commit) -> CommitBrief {
    CommitBrief {
        id: c.id.clone(),
        author: c.author.clone(),
        summary: c.summary.clone(),
        time: c.time,
    }
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// The last `max` bytes of `s`, at a character boundary.
fn tail(s: &str, max: usize) -> String {
    let s = s.trim_end();
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

/// The checkout's spec, validated; the diagnostics when it is not valid.
fn read_spec(file: &Path, tree: &Path) -> std::result::Result<kiln_spec::Spec, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", in_repo(file, tree)))?;
    let dir = file.parent().unwrap_or(tree);
    kiln_spec::Spec::parse(&text, &in_repo(file, tree), dir).map_err(|report| report.render(false))
}

/// Why a spec from a source not `trusted` may not be built by the daemon: secret sources
/// (read, or run, as the daemon's user) or a copy from outside the checkout.
fn untrusted_refusal(spec: &kiln_spec::Spec, tree: &Path) -> std::result::Result<(), String> {
    if !spec.service.secrets.is_empty() {
        return Err(
            "[service.secrets] names secret sources, which the daemon reads (or runs) as its \
             own user: a source must be added with --trusted to use them"
                .to_owned(),
        );
    }
    let root = tree
        .canonicalize()
        .map_err(|e| format!("cannot read the checkout: {e}"))?;
    for copy in &spec.image.copies {
        let from = copy
            .from
            .canonicalize()
            .map_err(|e| format!("[[image.copy]] from {}: {e}", in_repo(&copy.from, tree)))?;
        if !from.starts_with(&root) {
            return Err(format!(
                "[[image.copy]] from {} is outside the repository: a source must be added \
                 with --trusted to copy the host's files",
                in_repo(&copy.from, tree)
            ));
        }
    }
    Ok(())
}
