//! One source's follower: the loop (poll or webhook), and the steps it takes a commit
//! through. One pass at a time per source (the `pass` lock, held for the whole pass: a
//! poll, a webhook's wake-up or `kiln sync`); what the follower remembers is changed under
//! its own short lock, so a rollback pins the app while a pass runs, and the pass looks
//! again before it applies.

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
    /// A step failed (recorded); the commit is not tried again.
    Failed,
    /// Cut short (the daemon or the source stopping, someone else's rollout in progress):
    /// the commit is tried again on the next pass.
    Retry,
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

    /// The last commit whose plan found nothing to change.
    pub(super) fn in_sync(&self) -> Option<String> {
        lock(&self.stored).in_sync.clone()
    }

    /// Stops following: the pass running (if any) ends at its next step, then what the
    /// source kept (mirror, checkout, memory) is removed, so a source added again under the
    /// same name starts afresh.
    pub(super) async fn retire(&self) {
        self.stop();
        let _one = self.pass.lock().await;
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(source = %self.config.name, error = %e, "the removed source's files stay");
        }
    }

    /// A first look, for `kiln source add` to say at once what is wrong (the URL, the
    /// branch, the spec, an app another source follows) and to bind the source to its app
    /// before anything else happens to it.
    pub(super) async fn first_look(&self, sources: &Sources) -> Result<()> {
        let _one = self.pass.lock().await;
        let head = self.fetch().await?;
        let spec = self.prepare(&head.id).await?.map_err(|(_, why)| {
            ControlError::Invalid(format!("commit {}: {why}", short(&head.id)))
        })?;
        self.claim(sources, spec.name.as_str())
            .await
            .map_err(ControlError::Invalid)
    }

    /// Checks `commit` out and reads its spec, refusing what an untrusted source may not
    /// do: the spec, or the step that failed and why.
    async fn prepare(
        &self,
        commit: &str,
    ) -> Result<std::result::Result<kiln_spec::Spec, (&'static str, String)>> {
        let (mirror, id, dest) = (
            self.dir.join("mirror"),
            commit.to_owned(),
            self.dir.join("tree"),
        );
        let (path, trusted) = (self.config.path.clone(), self.config.trusted);
        tokio::task::spawn_blocking(move || {
            kiln_git::checkout(&mirror, &id, &dest)
                .map_err(|e| ("seen", format!("checkout: {e}")))?;
            let spec = read_spec(&dest, &path).map_err(|why| ("build", why))?;
            if !trusted {
                untrusted_refusal(&spec, &dest).map_err(|why| ("build", why))?;
            }
            Ok(spec)
        })
        .await
        .map_err(|e| ControlError::Internal(format!("checkout: {e}")))
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
    /// Held in memory even when it cannot be saved; what the release ran is marked bad too,
    /// so a commit that changes nothing it is made of (a README) does not bring it back.
    pub(super) fn pin(
        &self,
        c: &Controller,
        app: &str,
        (commit, release, identity): (&str, u64, &str),
        actor: &str,
    ) {
        let mut stored = lock(&self.stored);
        let mut m = stored.memory();
        decide::rolled_back(&mut m, commit);
        stored.bad = m.bad;
        stored.pinned = m.pinned;
        stored.pinned_by = Some(actor.to_owned());
        if !identity.is_empty() {
            stored.bad_releases.insert(identity.to_owned());
        }
        stored.waiting = None;
        if let Err(e) = self.save(&stored) {
            tracing::error!(source = %self.config.name, error = %e, "the rollback's pin is held but not saved: a restart forgets it");
        }
        drop(stored);
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
                let apply =
                    self.config.sync_mode().map_err(ControlError::Invalid)? == SyncMode::Auto;
                self.take(c, sources, &head, apply, resumes).await
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
                self.apply(c, &head, &app, w.request, Some(actor)).await
            }
            _ => self.steps(c, sources, &head, true, false).await,
        };
        lock(&self.live).busy = None;
        let outcome = outcome?;
        if !matches!(outcome, Outcome::Retry) {
            self.remember(|s| s.attempted = Some(head.id.clone()))?;
        }
        Ok(serde_json::json!({
            "source": self.config.name,
            "commit": head.id,
            "result": match outcome {
                Outcome::Done => "applied",
                Outcome::Waiting => "waiting",
                Outcome::Failed => "failed",
                Outcome::Retry => "interrupted",
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
        resumes: bool,
    ) -> Result<()> {
        let outcome = self.steps(c, sources, head, apply, resumes).await;
        lock(&self.live).busy = None;
        match outcome? {
            Outcome::Retry => Ok(()),
            _ => self.remember(|s| s.attempted = Some(head.id.clone())),
        }
    }

    /// Check out, build, test, plan, then apply (or wait for `kiln sync`); `resumes` ends the
    /// app's pin when the commit is applied.
    async fn steps(
        &self,
        c: &Arc<Controller>,
        sources: &Sources,
        head: &kiln_git::Commit,
        apply: bool,
        resumes: bool,
    ) -> Result<Outcome> {
        let pinned_before = lock(&self.stored).pinned.clone();
        self.busy("checkout");
        let spec = match self.prepare(&head.id).await? {
            Ok(spec) => spec,
            Err((step, why)) => {
                self.step(c, head, step, "failed", None, Some(why));
                return Ok(Outcome::Failed);
            }
        };
        let tree = self.dir.join("tree");
        let file = tree.join(&self.config.path);
        let app = spec.name.to_string();
        // A source follows one app: the first its spec names. Another app's name in a later
        // commit, or an app another source follows, is refused, never taken over.
        if let Err(why) = self.claim(sources, &app).await {
            self.step(c, head, "build", "failed", None, Some(why));
            return Ok(Outcome::Failed);
        }
        let branch = Some(self.config.branch.clone());
        self.step(c, head, "seen", "passed", branch, None);
        // Build.
        self.busy("build");
        let pipeline = Arc::clone(&sources.pipeline);
        let (s, f) = (spec.clone(), file.clone());
        let built = tokio::task::spawn_blocking(move || pipeline.build(&s, &f))
            .await
            .map_err(|e| ControlError::Internal(format!("build: {e}")))?;
        if self.stopping(sources) {
            return Ok(Outcome::Retry);
        }
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
            match tested {
                Ok(()) => {}
                Err(super::StepError::Interrupted) => return Ok(Outcome::Retry),
                Err(_) if self.stopping(sources) => return Ok(Outcome::Retry),
                Err(super::StepError::Failed(output)) => {
                    let detail = Some(image.clone());
                    self.step(c, head, "test", "failed", detail, Some(output));
                    return Ok(Outcome::Failed);
                }
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
            let detail = Some("no changes".to_owned());
            self.step(c, head, "plan", "passed", detail, None);
            self.remember(|s| {
                s.waiting = None;
                s.in_sync = Some(head.id.clone());
            })?;
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
        // A rollback while this commit was built and tested stands.
        let identity = super::release_identity(&image, &request.config);
        if let Some(why) = self.held_now(&head.id, &identity, pinned_before.as_deref()) {
            self.step(c, head, "apply", "skipped", Some(why), None);
            return Ok(Outcome::Failed);
        }
        if self.stopping(sources) {
            return Ok(Outcome::Retry);
        }
        if resumes {
            self.resume(c, head, "a new commit")?;
        }
        self.apply(c, head, &app, request, None).await
    }

    /// Why `commit` (making the release `identity`) may not be applied now: a rollback
    /// marked it, or that very release, bad, or pinned the app since the pass decided (when
    /// it was `pinned_before`).
    fn held_now(
        &self,
        commit: &str,
        identity: &str,
        pinned_before: Option<&str>,
    ) -> Option<String> {
        let now = lock(&self.stored);
        if now.bad.contains(commit) || now.pinned.as_deref() != pinned_before {
            return Some("a rollback pinned the app while this commit was built".to_owned());
        }
        if now.bad_releases.contains(identity) {
            return Some(
                "it makes the same release (image and configuration) as one rolled back from"
                    .to_owned(),
            );
        }
        None
    }

    /// Whether the daemon or this source is stopping.
    fn stopping(&self, sources: &Sources) -> bool {
        *self.stop.borrow() || *sources.stop.borrow()
    }

    /// Binds this source to `app`, unless it follows another or another source follows it.
    async fn claim(&self, sources: &Sources, app: &str) -> std::result::Result<(), String> {
        if let Some(bound) = self.app()
            && bound != app
        {
            return Err(format!(
                "this commit names app {app}, but source {} follows app {bound}: add another source for {app}",
                self.config.name
            ));
        }
        let followers = sources.followers.lock().await;
        let other = followers
            .values()
            .find(|f| f.config.name != self.config.name && f.app().as_deref() == Some(app))
            .map(|f| f.config.name.clone());
        drop(followers);
        if let Some(other) = other {
            return Err(format!(
                "app {app} is followed by source {other}: one source per app"
            ));
        }
        self.remember(|s| s.app = Some(app.to_owned()))
            .map_err(|e| e.to_string())
    }

    /// Applies `request` and waits for its rollout's outcome.
    async fn apply(
        &self,
        c: &Arc<Controller>,
        head: &kiln_git::Commit,
        app: &str,
        request: ApplyRequest,
        synced_by: Option<&str>,
    ) -> Result<Outcome> {
        self.busy("apply");
        let release = match c.apply(app, request).await {
            Ok(r) => r.number,
            // Someone else's rollout in progress: this commit's turn comes on a later pass.
            Err(ControlError::Conflict(why)) if why.contains("in progress") => {
                self.step(c, head, "apply", "waiting", None, Some(why));
                return Ok(Outcome::Retry);
            }
            Err(e) => {
                self.step(c, head, "apply", "failed", None, Some(e.to_string()));
                return Ok(Outcome::Failed);
            }
        };
        self.remember(|s| s.waiting = None)?;
        let detail = match synced_by {
            Some(by) => format!("release {release}, `kiln sync` by {by}"),
            None => format!("release {release}"),
        };
        self.step(c, head, "apply", "passed", Some(detail), None);
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
                    let detail = Some(format!("release {release} is live"));
                    self.step(c, head, "rollout", "passed", detail, None);
                    return Ok(Outcome::Done);
                }
                "aborted" => {
                    let why = status.reason.unwrap_or_else(|| "aborted".to_owned());
                    let detail = Some(format!("release {release}"));
                    self.step(c, head, "rollout", "failed", detail, Some(why));
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

/// The largest spec file a source may hold.
const MAX_SPEC: u64 = 1 << 20;

/// The checkout's spec (at `path` in the repository), read without following a link out of
/// the checkout, validated; the diagnostics when it is not valid. Blocking.
fn read_spec(tree: &Path, path: &str) -> std::result::Result<kiln_spec::Spec, String> {
    let root = tree
        .canonicalize()
        .map_err(|e| format!("cannot read the checkout: {e}"))?;
    let file = root.join(path);
    let real = file
        .canonicalize()
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if !real.starts_with(&root) {
        return Err(format!("{path} is a link out of the repository"));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("cannot read {path}: {e}"))?;
    if !meta.is_file() || meta.len() > MAX_SPEC {
        return Err(format!(
            "{path} is not a regular file of at most {} KiB",
            MAX_SPEC / 1024
        ));
    }
    let text = std::fs::read_to_string(&real).map_err(|e| format!("cannot read {path}: {e}"))?;
    let dir = real.parent().unwrap_or(&root);
    kiln_spec::Spec::parse(&text, path, dir).map_err(|report| report.render(false))
}

/// Whether `path` (as the spec resolved it) is inside the checkout `root`, links resolved.
fn inside(path: &Path, root: &Path) -> bool {
    path.canonicalize().is_ok_and(|p| p.starts_with(root))
}

/// Why a spec from a source not `trusted` may not be built, tested or applied by the
/// daemon: everything that would reach the host beyond the sealed instance kiln makes of a
/// checkout's files. The repository's writers could otherwise read the daemon's files into
/// an image (a base or copy outside the checkout, a closure, TLS files), run a program as
/// the daemon (secret commands, an OCI runtime of their choosing) or weaken the seal.
/// Every reason is listed, one per line.
fn untrusted_refusal(spec: &kiln_spec::Spec, tree: &Path) -> std::result::Result<(), String> {
    let root = tree
        .canonicalize()
        .map_err(|e| format!("cannot read the checkout: {e}"))?;
    let mut why = Vec::new();
    if !spec.service.secrets.is_empty() {
        why.push(
            "[service.secrets] names secret sources the daemon reads (or runs) as its own user"
                .to_owned(),
        );
    }
    for copy in &spec.image.copies {
        if !inside(&copy.from, &root) {
            why.push(format!(
                "[[image.copy]] from {} is outside the repository",
                in_repo(&copy.from, &root)
            ));
        }
        if copy.closure {
            why.push(format!(
                "[[image.copy]] from {} copies its libraries from the host (closure)",
                in_repo(&copy.from, &root)
            ));
        }
    }
    match &spec.image.base {
        kiln_spec::BaseImage::Scratch => {}
        kiln_spec::BaseImage::Oci { path, .. }
        | kiln_spec::BaseImage::DockerArchive(path)
        | kiln_spec::BaseImage::Rootfs(path) => {
            if !inside(path, &root) {
                why.push(format!(
                    "[image] base {} is outside the repository",
                    in_repo(path, &root)
                ));
            }
        }
    }
    let t = &spec.target;
    if t.runtime.contains('/') {
        why.push(format!(
            "[target] runtime {:?} is a program path",
            t.runtime
        ));
    }
    if t.docker_host.is_some() || t.registry.is_some() {
        why.push("[target] docker_host or registry names a host".to_owned());
    }
    if spec.route.tls.is_some() {
        why.push("[route.tls] names the host's certificate and key files".to_owned());
    }
    let s = &spec.service;
    if s.user.as_deref().is_some_and(|u| {
        u.split(':')
            .next()
            .is_some_and(|u| u == "root" || u.parse::<u32>() == Ok(0))
    }) {
        why.push("[service] user is root".to_owned());
    }
    if s.seccomp == kiln_spec::Seccomp::Unconfined {
        why.push("[service] seccomp is unconfined".to_owned());
    }
    if s.network == kiln_spec::Network::Host {
        why.push("[service] network is the host's".to_owned());
    }
    if s.allow_dangerous_capabilities {
        why.push("[service] allows dangerous capabilities".to_owned());
    }
    if why.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the source is not trusted with the daemon's user (`kiln source add --trusted` if its writers are):\n  {}",
        why.join("\n  ")
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A checkout holding `hello` and `link -> /etc`, and a minimal spec copying `hello`
    /// with `service` lines in `[service]` and `tail` after it.
    fn checkout(service: &str, tail: &str) -> (tempfile::TempDir, std::result::Result<(), String>) {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("hello"), b"\x7fELF").unwrap();
        std::os::unix::fs::symlink("/etc", tree.join("link")).unwrap();
        let text = format!(
            "name = \"web\"\n\n[image]\nentrypoint = [\"/hello\"]\n\n[[image.copy]]\nfrom = \"hello\"\nto = \"/hello\"\n\n\
             [service]\nport = 8080\n{service}\n\n[route]\nlisten = \"127.0.0.1:8080\"\n\n{tail}"
        );
        std::fs::write(tree.join("kiln.toml"), text).unwrap();
        let result = read_spec(&tree, "kiln.toml").and_then(|spec| untrusted_refusal(&spec, &tree));
        (dir, result)
    }

    #[test]
    fn a_spec_within_its_checkout_is_taken() {
        let (_dir, result) = checkout("", "");
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn what_reaches_the_host_is_refused_each_named() {
        for (service, tail, says) in [
            (
                "",
                "[[image.copy]]\nfrom = \"/etc/hostname\"\nto = \"/x\"\nallow_outside = true\n",
                "outside the repository",
            ),
            (
                "",
                "[[image.copy]]\nfrom = \"link\"\nto = \"/x\"\nallow_outside = true\n",
                "outside the repository",
            ),
            ("", "[target]\nruntime = \"/tmp/pwn\"\n", "program path"),
            ("user = \"root\"", "", "user is root"),
            ("network = \"host\"", "", "network is the host's"),
            ("seccomp = \"unconfined\"", "", "seccomp is unconfined"),
        ] {
            let (_dir, result) = checkout(service, tail);
            let why = result.expect_err(tail);
            assert!(why.contains(says), "{service}{tail}: {why}");
            assert!(why.contains("--trusted"), "{why}");
        }
    }

    #[test]
    fn a_spec_that_links_out_of_the_checkout_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", tree.join("kiln.toml")).unwrap();
        let why = read_spec(&tree, "kiln.toml").unwrap_err();
        assert!(why.contains("link out of the repository"), "{why}");
        std::fs::create_dir(tree.join("dir")).unwrap();
        let why = read_spec(&tree, "dir").unwrap_err();
        assert!(why.contains("not a regular file"), "{why}");
    }
}
