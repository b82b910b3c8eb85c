//! The typed events the ledger records: every kind, with its fields, serialised in one place.
//!
//! An [`Event`] is stored as its kind (`instance.replaced`, the variant's `rename`) and its
//! fields as a JSON object; [`Entry::event`](crate::Entry::event) decodes a stored entry back.
//! These are storage types: the deploy crate's domain types (destroy reasons, verdicts) are
//! mapped to them by the control plane, so changing a domain type never changes this format.
//!
//! **Invariant:** a field is only ever added with `#[serde(default)]`: entries already in a
//! ledger are hashed as written and must keep decoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Something that happened to an app, as the ledger records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data")]
pub enum Event {
    /// A release was recorded (written by [`Ledger::record_release`](crate::Ledger::record_release)
    /// in the same transaction as the release row).
    #[serde(rename = "release.created")]
    ReleaseCreated {
        /// Its number.
        number: u64,
        /// Its image digest.
        image: String,
        /// Who recorded it.
        actor: String,
        /// SHA-256 of the stored release row, so `verify` catches an edited row.
        record_sha256: String,
    },
    /// A rollout of `release` began.
    #[serde(rename = "rollout.started")]
    RolloutStarted {
        /// The release rolled out.
        release: u64,
        /// The release it replaces.
        stable: Option<u64>,
        /// `rolling`, `blue-green` or `canary`.
        strategy: String,
        /// Its image.
        image: String,
    },
    /// A canary step's weights took effect.
    #[serde(rename = "rollout.step_started")]
    StepStarted {
        /// 1-based step.
        step: usize,
        /// Canary weight, percent.
        weight: u8,
    },
    /// A canary step was judged.
    #[serde(rename = "rollout.step_judged")]
    StepJudged {
        /// 1-based step.
        step: usize,
        /// Canary weight, percent.
        weight: u8,
        /// The verdict with its numbers.
        verdict: Verdict,
    },
    /// The rollout waits for `kiln promote`.
    #[serde(rename = "rollout.awaiting_promotion")]
    AwaitingPromotion {
        /// The release waiting (absent in entries written before it was recorded).
        #[serde(default)]
        release: Option<u64>,
        /// Why it waits when it is not manual promotion: an inconclusive canary step, with
        /// the requests seen and needed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// All traffic is on `release`.
    #[serde(rename = "rollout.completed")]
    RolloutCompleted {
        /// The release.
        release: u64,
        /// Why it completed by a shortcut (a first release skips steps, analysis and
        /// promotion), when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Traffic went back to the stable release.
    #[serde(rename = "rollout.aborted")]
    RolloutAborted {
        /// Why, with the numbers.
        reason: String,
    },
    /// The previous release's warm instances were retired.
    #[serde(rename = "rollout.previous_retired")]
    PreviousRetired {
        /// That release.
        release: u64,
    },
    /// `kiln promote` was asked.
    #[serde(rename = "rollout.promote_requested")]
    PromoteRequested {
        /// The release in progress.
        release: u64,
        /// Who asked.
        actor: String,
    },
    /// `kiln abort` was asked.
    #[serde(rename = "rollout.abort_requested")]
    AbortRequested {
        /// The release in progress.
        release: u64,
        /// Who asked.
        actor: String,
    },
    /// The router's weights for the app changed.
    #[serde(rename = "route.changed")]
    RouteChanged {
        /// Percent per release.
        #[serde(deserialize_with = "release_keys")]
        weights: BTreeMap<u64, u32>,
        /// Instances in the table.
        instances: usize,
    },
    /// The app's address could not be bound; retried on each reconcile pass.
    #[serde(rename = "route.unserved")]
    RouteUnserved {
        /// The address.
        listen: String,
        /// Why.
        error: String,
    },
    /// The app's address is served again.
    #[serde(rename = "route.served")]
    RouteServed {
        /// The address.
        listen: String,
    },
    /// An instance was created and started.
    #[serde(rename = "instance.created")]
    InstanceCreated {
        /// Its id.
        instance: String,
        /// Its release.
        release: u64,
    },
    /// Creating or starting an instance failed.
    #[serde(rename = "instance.create_failed")]
    InstanceCreateFailed {
        /// The release.
        release: u64,
        /// The provider's error.
        error: String,
    },
    /// The provider kept failing; creates are retried with backoff (one event per change).
    #[serde(rename = "instance.create_backoff")]
    CreateBackoff {
        /// The release.
        release: u64,
        /// Failures in a row.
        failures: u32,
        /// Milliseconds until the next try.
        retry_in_ms: u64,
        /// The last error.
        error: String,
    },
    /// The deploy policy refused an image: at apply (`release` is `None`: nothing was
    /// recorded), at a cold rollback to `release`, or when an instance of `release` was to be
    /// created (none was; `actor` is `reconciler`).
    #[serde(rename = "policy.refused")]
    PolicyRefused {
        /// The release whose instance was refused; `None` at apply.
        #[serde(default)]
        release: Option<u64>,
        /// The image refused.
        image: String,
        /// Whose policy: `spec` (the release's `[policy]`) or `daemon` (`kiln serve --policy`).
        policy: String,
        /// Each proof missing, as a sentence (`no signature by a trusted key`).
        missing: Vec<String>,
        /// Who asked: the apply's actor, or `reconciler`.
        actor: String,
    },
    /// A failed or drifted instance is being replaced.
    #[serde(rename = "instance.replaced")]
    InstanceReplaced {
        /// Its id.
        instance: String,
        /// Its release.
        release: Option<u64>,
        /// Why.
        cause: Cause,
    },
    /// An instance is being destroyed (scaled down, retired, superseded…).
    #[serde(rename = "instance.destroyed")]
    InstanceDestroyed {
        /// Its id.
        instance: String,
        /// Its release.
        release: Option<u64>,
        /// Why.
        cause: Cause,
    },
    /// Drift was found on an instance.
    #[serde(rename = "drift.detected")]
    DriftDetected {
        /// The instance.
        instance: String,
        /// What changed.
        findings: Vec<String>,
    },
    /// `[deploy.migrate]` started.
    #[serde(rename = "migration.started")]
    MigrationStarted {
        /// The release whose image runs it.
        release: u64,
        /// The command.
        command: Vec<String>,
        /// The schema it migrates to.
        schema: u32,
    },
    /// `[deploy.migrate]` exited 0.
    #[serde(rename = "migration.completed")]
    MigrationCompleted {
        /// The release.
        release: u64,
        /// The schema now live.
        schema: u32,
        /// The oldest schema code may expect.
        compatible_from: u32,
    },
    /// `[deploy.migrate]` failed; the rollout aborts.
    #[serde(rename = "migration.failed")]
    MigrationFailed {
        /// The release.
        release: u64,
        /// Why, with the tail of its output.
        error: String,
    },
    /// `kiln rollback`.
    #[serde(rename = "rollback")]
    Rollback {
        /// The release that was live.
        from: u64,
        /// The release now live (or rolling out).
        to: u64,
        /// A route swap (true) or a new rollout.
        warm: bool,
        /// Who asked.
        actor: String,
        /// Microseconds from the request to the swap.
        #[serde(default)]
        switch_us: Option<u64>,
    },
    /// A rollback past the live schema's compatibility, with `--force`.
    #[serde(rename = "rollback.forced")]
    RollbackForced {
        /// The target release.
        to: u64,
        /// The schema its code expects.
        target_schema: u32,
        /// The schema live.
        live_schema: u32,
        /// Who asked.
        actor: String,
    },
    /// `kiln scale`.
    #[serde(rename = "app.scaled")]
    Scaled {
        /// Replicas before.
        from: u32,
        /// Replicas now.
        to: u32,
        /// Who asked.
        actor: String,
    },
    /// `kiln down`.
    #[serde(rename = "app.down")]
    Down {
        /// Who asked.
        actor: String,
        /// Instances destroyed.
        instances: usize,
        /// Requests still in flight when the drain timed out.
        requests_cut: usize,
    },
    /// The router holds the app's new requests (`kiln pause`, or around a migration).
    #[serde(rename = "app.paused")]
    Paused {
        /// Who asked (`kiln` for a migration's pause).
        actor: String,
        /// A request held longer is answered 503.
        max_hold_ms: u64,
        /// At most this many are held; past it the oldest is answered 503.
        max_held: usize,
        /// Why, when kiln paused it itself (`migration of release 3`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The router forwards the app's requests again (`kiln resume`, maintenance off).
    #[serde(rename = "app.resumed")]
    Resumed {
        /// Who asked.
        actor: String,
        /// Held requests let go.
        released: usize,
        /// Why, when kiln resumed it itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The router answers the app's requests with a maintenance page (`kiln maintenance`).
    #[serde(rename = "app.maintenance")]
    Maintenance {
        /// Who asked.
        actor: String,
        /// The page's message.
        message: String,
        /// The 503's `Retry-After`, in seconds.
        retry_after_s: u64,
    },
    /// The app's rollout document (what a restarted daemon acts on) was stored; written by
    /// [`Ledger::put_rollout`](crate::Ledger::put_rollout) in the same transaction as the
    /// document, so `verify` catches a document edited behind kiln's back.
    #[serde(rename = "rollout.stored")]
    RolloutStored {
        /// SHA-256 (hex) of the document exactly as stored.
        sha256: String,
    },
    /// The daemon made its ledger key and signed its first checkpoint: entries up to here
    /// were taken as they were found.
    #[serde(rename = "ledger.anchored")]
    LedgerAnchored {
        /// The key's fingerprint (`SHA256:…`).
        key: String,
        /// Entries the ledger held before.
        entries: u64,
    },
    /// A daemon was started on a ledger that failed verification because someone said so
    /// (`kiln serve --accept-broken-ledger`); checkpoints before the one signed right after
    /// this entry are set aside.
    #[serde(rename = "ledger.broken_accepted")]
    BrokenAccepted {
        /// What verification found.
        problem: String,
        /// Who started the daemon (user@host).
        actor: String,
        /// The key that signs checkpoints from here on.
        key: String,
        /// The entries whose own check failed (edited, unlinked, out of place), accepted as
        /// they are: `verify` reports them from here on instead of failing.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        entries: Vec<u64>,
    },
    /// A step the git follower took for a commit of the branch it follows (`kiln source`):
    /// `seen` a new commit, then `build`, `test`, `plan`, `apply`, `rollout`, each `passed`,
    /// `failed` (with the output's tail) or, for a plan in manual mode, `waiting`.
    #[serde(rename = "source.step")]
    SourceStep {
        /// The source's name.
        source: String,
        /// The commit, 40 hex digits.
        commit: String,
        /// Its author, `Name <email>`.
        author: String,
        /// The first line of its message.
        summary: String,
        /// `seen`, `build`, `test`, `plan`, `apply` or `rollout`.
        step: String,
        /// `passed`, `failed`, `skipped` or `waiting`.
        result: String,
        /// What the step made or found: an image digest, a release, the plan's changes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// Why it failed: the tail of the output.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
    },
    /// A rollback of a followed app pinned it: `commit` is marked bad and never applied by
    /// the follower again.
    #[serde(rename = "source.pinned")]
    SourcePinned {
        /// The source's name.
        source: String,
        /// The commit rolled back from.
        commit: String,
        /// Its release.
        release: u64,
        /// Who rolled back.
        actor: String,
        /// When following resumes: `new-commit` or `manual` (`kiln sync`).
        resume: String,
    },
    /// A pinned app follows its branch again.
    #[serde(rename = "source.resumed")]
    SourceResumed {
        /// The source's name.
        source: String,
        /// The commit it resumes with.
        commit: String,
        /// Why: `new commit`, or who ran `kiln sync`.
        by: String,
    },
    /// A stored release cannot be decoded; the app is not run until it is fixed or replaced.
    #[serde(rename = "release.corrupt")]
    ReleaseCorrupt {
        /// The release.
        release: u64,
        /// What is wrong, naming the field.
        error: String,
    },
}

/// A map keyed by release number. JSON keys are strings, and a tagged enum's buffered
/// content does not parse them as numbers, so this does.
fn release_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, u32>, D::Error> {
    let raw = BTreeMap::<String, u32>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse()
                .map(|k| (k, v))
                .map_err(|_| serde::de::Error::custom(format!("release number {k:?}")))
        })
        .collect()
}

/// Why an instance was destroyed, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Cause {
    /// Its process ended; `code` 128+N means killed by signal N.
    Exited {
        /// The exit status, when known.
        code: Option<i32>,
    },
    /// It never became healthy within its start period.
    NeverHealthy {
        /// What it listened on instead, when its provider could tell (entries written
        /// before this field have none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listening: Option<String>,
    },
    /// It failed its checks.
    Unhealthy {
        /// What it listened on, when its provider could tell (entries written before this
        /// field have none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listening: Option<String>,
    },
    /// It drifted from its image.
    Drifted {
        /// What changed.
        findings: String,
    },
    /// Its release is neither the new nor the stable one.
    Superseded,
    /// Its release's rollout was aborted.
    Aborted,
    /// More ready instances than replicas.
    ScaledDown {
        /// The replica count.
        replicas: u32,
    },
    /// The previous release's `keep_previous` ended.
    Retired {
        /// How long it stayed warm, in milliseconds.
        kept_ms: u64,
    },
    /// kiln did not create it (no release label).
    Foreign,
}

/// A canary verdict, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// `pass`, `fail` or `inconclusive`.
    pub verdict: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The numbers it was judged on.
    pub metrics: StepMetrics,
}

/// The measurements of one canary step, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The canary release.
    pub canary: Measurement,
    /// The stable release, over the same window.
    pub stable: Measurement,
}

/// What the router measured for one release over a step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Requests that completed.
    pub requests: u64,
    /// Failed ones.
    pub errors: u64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
}

impl Event {
    /// The kind as stored (`instance.replaced`).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::ReleaseCreated { .. } => "release.created",
            Event::RolloutStarted { .. } => "rollout.started",
            Event::StepStarted { .. } => "rollout.step_started",
            Event::StepJudged { .. } => "rollout.step_judged",
            Event::AwaitingPromotion { .. } => "rollout.awaiting_promotion",
            Event::RolloutCompleted { .. } => "rollout.completed",
            Event::RolloutAborted { .. } => "rollout.aborted",
            Event::PreviousRetired { .. } => "rollout.previous_retired",
            Event::PromoteRequested { .. } => "rollout.promote_requested",
            Event::AbortRequested { .. } => "rollout.abort_requested",
            Event::RouteChanged { .. } => "route.changed",
            Event::RouteUnserved { .. } => "route.unserved",
            Event::RouteServed { .. } => "route.served",
            Event::InstanceCreated { .. } => "instance.created",
            Event::InstanceCreateFailed { .. } => "instance.create_failed",
            Event::CreateBackoff { .. } => "instance.create_backoff",
            Event::PolicyRefused { .. } => "policy.refused",
            Event::InstanceReplaced { .. } => "instance.replaced",
            Event::InstanceDestroyed { .. } => "instance.destroyed",
            Event::DriftDetected { .. } => "drift.detected",
            Event::MigrationStarted { .. } => "migration.started",
            Event::MigrationCompleted { .. } => "migration.completed",
            Event::MigrationFailed { .. } => "migration.failed",
            Event::Rollback { .. } => "rollback",
            Event::RollbackForced { .. } => "rollback.forced",
            Event::Scaled { .. } => "app.scaled",
            Event::Down { .. } => "app.down",
            Event::Paused { .. } => "app.paused",
            Event::Resumed { .. } => "app.resumed",
            Event::Maintenance { .. } => "app.maintenance",
            Event::ReleaseCorrupt { .. } => "release.corrupt",
            Event::SourceStep { .. } => "source.step",
            Event::SourcePinned { .. } => "source.pinned",
            Event::SourceResumed { .. } => "source.resumed",
            Event::RolloutStored { .. } => "rollout.stored",
            Event::LedgerAnchored { .. } => "ledger.anchored",
            Event::BrokenAccepted { .. } => "ledger.broken_accepted",
        }
    }

    /// The fields as the JSON object stored beside the kind.
    pub(crate) fn data(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => m
                .remove("data")
                .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new())),
            _ => serde_json::Value::Object(serde_json::Map::new()),
        }
    }

    /// Decodes a stored kind and its data.
    pub fn decode(kind: &str, data: &serde_json::Value) -> Result<Event, serde_json::Error> {
        serde_json::from_value(serde_json::json!({ "kind": kind, "data": data }))
    }

    /// Whether this event is about drift: found, or an instance replaced for it.
    pub fn is_drift(&self) -> bool {
        matches!(
            self,
            Event::DriftDetected { .. }
                | Event::InstanceReplaced {
                    cause: Cause::Drifted { .. },
                    ..
                }
        )
    }
}

impl Cause {
    /// Whether the instance is replaced (it failed or drifted) rather than simply removed.
    pub fn replaces(&self) -> bool {
        matches!(
            self,
            Cause::Exited { .. }
                | Cause::NeverHealthy { .. }
                | Cause::Unhealthy { .. }
                | Cause::Drifted { .. }
        )
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Exited { code: Some(code) } => match signal_name(*code) {
                Some((n, name)) => write!(f, "killed by signal {n} ({name})"),
                None => write!(f, "exited with status {code}"),
            },
            Cause::Exited { code: None } => f.write_str("exited (status unknown)"),
            Cause::NeverHealthy { listening: None } => f.write_str("never became healthy"),
            Cause::NeverHealthy { listening: Some(l) } => write!(f, "never became healthy: {l}"),
            Cause::Unhealthy { listening: None } => f.write_str("became unhealthy"),
            Cause::Unhealthy { listening: Some(l) } => write!(f, "became unhealthy: {l}"),
            Cause::Drifted { findings } => write!(f, "drifted: {findings}"),
            Cause::Superseded => f.write_str("its release is neither live nor previous"),
            Cause::Aborted => f.write_str("its release was aborted"),
            Cause::ScaledDown { replicas } => write!(f, "scaled to {replicas} replicas"),
            Cause::Retired { kept_ms } => write!(f, "stayed warm for {} s", kept_ms / 1000),
            Cause::Foreign => f.write_str("not created by this kiln"),
        }
    }
}

/// The signal an exit status of 128+N names, for the signals that end processes.
fn signal_name(code: i32) -> Option<(i32, &'static str)> {
    let n = code.checked_sub(128)?;
    let name = match n {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return None,
    };
    Some((n, name))
}

impl std::fmt::Display for Event {
    /// One line for `kiln history`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::ReleaseCreated {
                number,
                image,
                actor,
                ..
            } => {
                write!(f, "release {number} ({image}) by {actor}")
            }
            Event::RolloutStarted {
                release,
                stable,
                strategy,
                ..
            } => match stable {
                Some(s) => write!(f, "release {release} replacing {s} ({strategy})"),
                None => write!(f, "release {release} ({strategy})"),
            },
            Event::StepStarted { step, weight } => write!(f, "step {step}: {weight}%"),
            Event::StepJudged {
                step,
                weight,
                verdict,
            } => {
                write!(f, "step {step} ({weight}%): {}", verdict.verdict)?;
                if let Some(r) = &verdict.reason {
                    write!(f, ": {r}")?;
                }
                write!(
                    f,
                    " (canary {} requests, {} errors, p99 {:.1} ms)",
                    verdict.metrics.canary.requests,
                    verdict.metrics.canary.errors,
                    verdict.metrics.canary.p99_ms
                )
            }
            Event::AwaitingPromotion { reason: None, .. } => {
                f.write_str("waiting for `kiln promote`")
            }
            Event::AwaitingPromotion {
                reason: Some(why), ..
            } => write!(
                f,
                "awaiting a decision, `kiln promote` or `kiln abort`: {why}"
            ),
            Event::RolloutCompleted {
                release,
                reason: None,
            } => write!(f, "release {release} is live"),
            Event::RolloutCompleted {
                release,
                reason: Some(why),
            } => write!(f, "release {release} is live ({why})"),
            Event::RolloutAborted { reason } => f.write_str(reason),
            Event::PreviousRetired { release } => write!(f, "release {release} retired"),
            Event::PromoteRequested { release, actor } => {
                write!(f, "promote release {release} by {actor}")
            }
            Event::AbortRequested { release, actor } => {
                write!(f, "abort release {release} by {actor}")
            }
            Event::RouteChanged { weights, instances } => {
                let w: Vec<String> = weights.iter().map(|(r, w)| format!("r{r} {w}%")).collect();
                write!(f, "{} over {instances} instance(s)", w.join(", "))
            }
            Event::RouteUnserved { listen, error } => write!(f, "{listen} not served: {error}"),
            Event::RouteServed { listen } => write!(f, "{listen} served"),
            Event::InstanceCreated { instance, release } => {
                write!(f, "{instance} of release {release}")
            }
            Event::InstanceCreateFailed { release, error } => {
                write!(f, "release {release}: {error}")
            }
            Event::PolicyRefused {
                release,
                image,
                policy,
                missing,
                actor,
            } => {
                let what = match release {
                    Some(r) => format!("an instance of release {r}"),
                    None => "the apply".to_owned(),
                };
                write!(
                    f,
                    "{what} refused by the {policy} policy ({actor}): {image}: {}",
                    missing.join("; ")
                )
            }
            Event::CreateBackoff {
                release,
                failures,
                retry_in_ms,
                error,
            } => write!(
                f,
                "release {release}: {failures} failure(s) in a row, next try in {retry_in_ms} ms: {error}"
            ),
            Event::InstanceReplaced {
                instance, cause, ..
            }
            | Event::InstanceDestroyed {
                instance, cause, ..
            } => write!(f, "{instance} {cause}"),
            Event::DriftDetected { instance, findings } => {
                write!(f, "{instance}: {}", findings.join("; "))
            }
            Event::MigrationStarted {
                release,
                command,
                schema,
            } => write!(
                f,
                "release {release} to schema {schema}: {}",
                command.join(" ")
            ),
            Event::MigrationCompleted {
                release, schema, ..
            } => {
                write!(f, "release {release}: schema {schema}")
            }
            Event::MigrationFailed { release, error } => write!(f, "release {release}: {error}"),
            Event::Rollback {
                from,
                to,
                warm,
                actor,
                switch_us,
            } => {
                write!(f, "{from} → {to} by {actor}")?;
                match (warm, switch_us) {
                    (true, Some(us)) => write!(f, " (warm, {us} µs)"),
                    (true, None) => f.write_str(" (warm)"),
                    (false, _) => f.write_str(" (rolled out again)"),
                }
            }
            Event::RollbackForced {
                to,
                target_schema,
                live_schema,
                actor,
            } => write!(
                f,
                "to {to} (schema {target_schema}) over live schema {live_schema}, forced by {actor}"
            ),
            Event::Scaled { from, to, actor } => write!(f, "{from} → {to} by {actor}"),
            Event::Down {
                actor,
                instances,
                requests_cut,
            } => write!(
                f,
                "by {actor}: {instances} instance(s) destroyed, {requests_cut} request(s) cut"
            ),
            Event::ReleaseCorrupt { release, error } => {
                write!(f, "release {release} is corrupt: {error}")
            }
            Event::SourceStep {
                source,
                commit,
                author,
                summary,
                step,
                result,
                detail,
                output,
            } => {
                let short = commit.get(..12).unwrap_or(commit);
                write!(f, "{source} {short} {step} {result}")?;
                if step == "seen" {
                    write!(f, ": {summary:?} by {author}")?;
                }
                if let Some(d) = detail {
                    write!(f, " ({d})")?;
                }
                match output
                    .as_deref()
                    .and_then(|o| o.lines().rfind(|l| !l.trim().is_empty()))
                {
                    Some(last) => write!(f, ": {}", last.trim()),
                    None => Ok(()),
                }
            }
            Event::SourcePinned {
                source,
                commit,
                release,
                actor,
                resume,
            } => write!(
                f,
                "{source} pinned by {actor}'s rollback: commit {} (release {release}) marked bad; resumes on {resume}",
                commit.get(..12).unwrap_or(commit)
            ),
            Event::SourceResumed { source, commit, by } => write!(
                f,
                "{source} follows its branch again at {} ({by})",
                commit.get(..12).unwrap_or(commit)
            ),
            Event::Paused {
                actor,
                max_hold_ms,
                max_held,
                reason,
            } => {
                write!(
                    f,
                    "by {actor}: requests held (at most {max_held}, {} s each)",
                    max_hold_ms / 1000
                )?;
                reason.as_ref().map_or(Ok(()), |r| write!(f, " for {r}"))
            }
            Event::Resumed {
                actor,
                released,
                reason,
            } => {
                write!(f, "by {actor}: {released} held request(s) let go")?;
                reason.as_ref().map_or(Ok(()), |r| write!(f, " after {r}"))
            }
            Event::Maintenance {
                actor,
                message,
                retry_after_s,
            } => write!(
                f,
                "by {actor}: 503 {message:?}, retry after {retry_after_s} s"
            ),
            Event::RolloutStored { sha256 } => write!(f, "rollout document sha256:{sha256}"),
            Event::LedgerAnchored { key, entries } => {
                write!(
                    f,
                    "ledger key {key} made; {entries} earlier entries taken as found"
                )
            }
            Event::BrokenAccepted {
                problem,
                actor,
                key,
                ..
            } => write!(
                f,
                "broken ledger accepted by {actor} (key {key}): {problem}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_stored_form() {
        let events = [
            Event::AwaitingPromotion {
                release: Some(2),
                reason: None,
            },
            Event::AwaitingPromotion {
                release: Some(2),
                reason: Some("step 1 (10%) inconclusive: 0 of 50 requests needed in 3s".into()),
            },
            Event::RolloutCompleted {
                release: 1,
                reason: Some("first release: no live release to compare with".into()),
            },
            Event::InstanceReplaced {
                instance: "i1".into(),
                release: Some(3),
                cause: Cause::Exited { code: Some(137) },
            },
            Event::Down {
                actor: "a".into(),
                instances: 2,
                requests_cut: 0,
            },
            Event::Paused {
                actor: "a".into(),
                max_hold_ms: 30_000,
                max_held: 10_000,
                reason: Some("migration of release 2".into()),
            },
            Event::Resumed {
                actor: "a".into(),
                released: 3,
                reason: None,
            },
            Event::Maintenance {
                actor: "a".into(),
                message: "back at 10:00".into(),
                retry_after_s: 300,
            },
            Event::PolicyRefused {
                release: None,
                image: "sha256:00".into(),
                policy: "daemon".into(),
                missing: vec!["no signature by a trusted key".into()],
                actor: "uid 0".into(),
            },
        ];
        for e in events {
            let back = Event::decode(e.kind(), &e.data()).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn entries_written_before_typed_events_still_decode() {
        // Rollout events used to carry their own `event` tag inside the data.
        let old = serde_json::json!({"event": "awaiting_promotion"});
        assert_eq!(
            Event::decode("rollout.awaiting_promotion", &old).unwrap(),
            Event::AwaitingPromotion {
                release: None,
                reason: None
            }
        );
    }

    #[test]
    fn entries_written_before_reasons_decode_and_keep_their_form() {
        let old = serde_json::json!({"release": 2});
        let e = Event::decode("rollout.completed", &old).unwrap();
        assert_eq!(
            e,
            Event::RolloutCompleted {
                release: 2,
                reason: None
            }
        );
        // Stored again without a reason, the same bytes: the hash chain of old entries holds.
        assert_eq!(e.data(), old);
        let old = serde_json::json!({"release": 2});
        let e = Event::decode("rollout.awaiting_promotion", &old).unwrap();
        assert_eq!(e.data(), old);
    }

    #[test]
    fn a_sigkilled_instance_names_the_signal() {
        let c = Cause::Exited { code: Some(137) };
        assert_eq!(c.to_string(), "killed by signal 9 (SIGKILL)");
        assert_eq!(
            Cause::Exited { code: Some(3) }.to_string(),
            "exited with status 3"
        );
    }
}
