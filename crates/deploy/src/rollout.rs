//! The rollout state machine.
//!
//! One function, [`decide`], serves every strategy and also the steady state after a rollout
//! (a completed rollout keeps the replica count, replaces failed and drifted instances and
//! retires the previous release when `keep_previous` expires), so the reconciler and the
//! rollout are the same code.
//!
//! Vocabulary: the rollout moves traffic from the **stable** release (the one live before) to
//! the **new** release. An instance is **ready** when healthy and not drifted. The previous
//! release's instances leave the route but keep running ("warm") so a rollback is one route
//! swap.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use kiln_spec::{CountOrPercent, DeploySpec, OnInconclusive, Promote, Strategy};

use crate::analysis::{Measurement, StepMetrics, Verdict, judge};

/// Milliseconds since the Unix epoch; passed in, never read from a clock here.
pub type Millis = i64;

/// What the user asked for: release `release` of an app, replacing `stable`.
#[derive(Debug, Clone, PartialEq)]
pub struct Goal {
    /// The release being rolled out.
    pub release: u64,
    /// The release live before it, if any.
    pub stable: Option<u64>,
    /// Instances the new release must end with.
    pub replicas: u32,
    /// Strategy and its settings.
    pub deploy: DeploySpec,
}

/// An instance's condition as the planner sees it: its state and health check together
/// (`kiln_runtime::Health` is the health check's own view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Started, not yet passed its health check.
    Starting,
    /// Passing its health check.
    Healthy,
    /// Was healthy, now failing.
    Unhealthy,
    /// Never became healthy within its start period.
    Failed,
    /// The process ended.
    Exited {
        /// Its exit status when the provider knows it; `128 + N` means killed by signal `N`.
        code: Option<i32>,
    },
}

/// One instance as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceObs {
    /// Provider-unique id.
    pub id: String,
    /// The release it runs.
    pub release: u64,
    /// Its health.
    pub health: Condition,
    /// Drift found on it (it must be replaced); `None` when clean.
    pub drift: Option<String>,
}

impl InstanceObs {
    pub(crate) fn ready(&self) -> bool {
        self.health == Condition::Healthy && self.drift.is_none()
    }
    fn dead(&self) -> bool {
        matches!(
            self.health,
            Condition::Failed | Condition::Unhealthy | Condition::Exited { .. }
        )
    }

    /// Why a dead instance is replaced; `None` while it is alive.
    fn death(&self) -> Option<DestroyReason> {
        let release = self.release;
        match self.health {
            Condition::Exited { code } => Some(DestroyReason::Exited { release, code }),
            Condition::Failed => Some(DestroyReason::NeverHealthy { release }),
            Condition::Unhealthy => Some(DestroyReason::Unhealthy { release }),
            Condition::Starting | Condition::Healthy => None,
        }
    }
}

/// The router's table for the app: which instances receive traffic and each release's share.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTarget {
    /// Percent of traffic per release; releases at 0 are reachable only by preview.
    pub weights: BTreeMap<u64, u32>,
    /// Instances in the table.
    pub members: BTreeSet<String>,
}

/// Everything observed about the app at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// Every instance of the app, any release.
    pub instances: Vec<InstanceObs>,
    /// The router's current table.
    pub route: RouteTarget,
    /// For a canary step: the router's measurements since the step started.
    pub metrics: Option<StepMetrics>,
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Moving traffic.
    Progressing,
    /// All traffic on the new release; the state keeps reconciling it.
    Completed {
        /// When the last traffic moved.
        at_ms: Millis,
    },
    /// Traffic back on the stable release; the new release failed.
    Aborted {
        /// When.
        at_ms: Millis,
        /// Why, with the numbers.
        reason: String,
    },
}

/// The state of one app's rollout: everything `decide` remembers (the control crate persists it
/// in its own stored form, `doc.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutState {
    /// The release being rolled out.
    pub release: u64,
    /// The release it replaces.
    pub stable: Option<u64>,
    /// Where it is.
    pub phase: Phase,
    /// When it started.
    pub started_ms: Millis,
    /// The last time it made progress, or began to wait for new instances (the progress
    /// deadline counts from here while it waits for them).
    pub last_progress_ms: Millis,
    /// It waits for new instances to become ready: only then does the progress deadline
    /// run. Kept so that the state changes when the waiting starts or ends, not on every
    /// pass spent on a step's pause, a migration or `kiln promote` (each change of state is
    /// a `rollout.stored` entry in the ledger).
    pub waiting_for_instances: bool,
    /// The most new instances seen ready at once (progress = this grows).
    pub best_ready: u32,
    /// Canary: index of the current step.
    pub step: usize,
    /// Canary: when the current step's weights took effect.
    pub step_started_ms: Option<Millis>,
    /// `kiln promote` was asked.
    pub promote_requested: bool,
    /// `kiln abort` was asked, with who/why.
    pub abort_requested: Option<String>,
    /// The last failure of a new instance, for the abort reason.
    pub last_failure: Option<String>,
    /// Waiting for `kiln promote` (manual promotion, or an inconclusive step under
    /// `on_inconclusive = "pause"`), announced once.
    pub awaiting_promotion: bool,
    /// Why the rollout waits for a decision, when the reason is an inconclusive step rather
    /// than manual promotion.
    pub inconclusive: Option<Inconclusive>,
    /// `[deploy.migrate]` ran and exited 0 (or there is none to run). States written before
    /// migrations existed had nothing to run.
    pub migrated: bool,
    /// `[deploy.migrate]` failed, with its output: the rollout aborts.
    pub migration_failed: Option<String>,
}

impl RolloutState {
    /// A rollout of `goal` starting at `now`.
    pub fn start(goal: &Goal, now: Millis) -> RolloutState {
        RolloutState {
            release: goal.release,
            stable: goal.stable,
            phase: Phase::Progressing,
            started_ms: now,
            last_progress_ms: now,
            waiting_for_instances: true,
            best_ready: 0,
            step: 0,
            step_started_ms: None,
            promote_requested: false,
            abort_requested: None,
            last_failure: None,
            awaiting_promotion: false,
            inconclusive: None,
            migrated: goal.deploy.migrate.is_none(),
            migration_failed: None,
        }
    }
}

/// A canary step that, after its extended window, still saw fewer than `min_requests`.
/// `Display`: `step 1 (10%) inconclusive: 3 of 50 requests needed in 90s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inconclusive {
    /// 1-based step.
    pub step: usize,
    /// Its canary weight.
    pub weight: u8,
    /// Canary requests seen over the step.
    pub requests: u64,
    /// `min_requests`.
    pub min_requests: u64,
    /// How long the step ran.
    pub waited_ms: Millis,
}

impl Inconclusive {
    /// The numbers alone: `3 of 50 requests needed in 90s`.
    pub fn numbers(&self) -> String {
        let waited = Duration::from_millis(u64::try_from(self.waited_ms).unwrap_or(0));
        format!(
            "{} of {} requests needed in {}",
            self.requests,
            self.min_requests,
            humane(waited)
        )
    }
}

impl fmt::Display for Inconclusive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {} ({}%) inconclusive: {}",
            self.step,
            self.weight,
            self.numbers()
        )
    }
}

/// Why a rollout completed other than by its strategy's own course.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortcut {
    /// No release was live: blue-green and canary had nothing to compare with or protect,
    /// so all traffic moved once the new instances were healthy.
    FirstRelease,
}

impl fmt::Display for Shortcut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shortcut::FirstRelease => f.write_str("first release: no live release to compare with"),
        }
    }
}

/// What the executor must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start `count` new instances of `release`.
    Create {
        /// Release to instantiate.
        release: u64,
        /// How many.
        count: u32,
    },
    /// Swap the router's table to this one (atomically).
    Route(RouteTarget),
    /// Run `[deploy.migrate]` once in a one-shot instance of `release`, then report the
    /// outcome in the state (`migrated` or `migration_failed`). Repeating it while it runs
    /// must not start a second one.
    Migrate {
        /// The release whose image runs the migration.
        release: u64,
    },
    /// Take `instance` out of the route, let it drain, then stop and destroy it.
    Destroy {
        /// The instance.
        instance: String,
        /// Why, for the event log.
        reason: DestroyReason,
    },
}

/// Why [`decide`] destroys an instance. The first four are replacements (the instance is
/// broken and a new one takes its place); the rest remove an instance that has no place any
/// more. `Display` gives the lowercase text for logs and events; code matches on the variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestroyReason {
    /// The process ended; `code` is its exit status when known (`128 + N`: killed by signal
    /// `N`).
    Exited {
        /// The instance's release.
        release: u64,
        /// Its exit status.
        code: Option<i32>,
    },
    /// It never became healthy within its start period.
    NeverHealthy {
        /// The instance's release.
        release: u64,
    },
    /// It was healthy, then failed its checks.
    Unhealthy {
        /// The instance's release.
        release: u64,
    },
    /// Its file system or configuration drifted from the image.
    Drifted {
        /// The instance's release.
        release: u64,
        /// What drift detection found.
        findings: String,
    },
    /// Its release is neither the one rolled out nor the stable one any more.
    Superseded {
        /// That release.
        release: u64,
    },
    /// Its release's rollout was aborted.
    Aborted {
        /// That release.
        release: u64,
    },
    /// More ready instances than replicas.
    ScaledDown {
        /// The instance's release.
        release: u64,
        /// The replica count.
        replicas: u32,
    },
    /// The previous release's `keep_previous` ended.
    Retired {
        /// That release.
        release: u64,
        /// How long it was kept warm.
        kept: Duration,
    },
}

impl DestroyReason {
    /// Whether the instance is destroyed because it is broken (a new one replaces it), as
    /// opposed to having no place in the app any more.
    pub fn is_replacement(&self) -> bool {
        matches!(
            self,
            DestroyReason::Exited { .. }
                | DestroyReason::NeverHealthy { .. }
                | DestroyReason::Unhealthy { .. }
                | DestroyReason::Drifted { .. }
        )
    }

    /// The release of the destroyed instance.
    pub fn release(&self) -> u64 {
        match self {
            DestroyReason::Exited { release, .. }
            | DestroyReason::NeverHealthy { release }
            | DestroyReason::Unhealthy { release }
            | DestroyReason::Drifted { release, .. }
            | DestroyReason::Superseded { release }
            | DestroyReason::Aborted { release }
            | DestroyReason::ScaledDown { release, .. }
            | DestroyReason::Retired { release, .. } => *release,
        }
    }
}

impl fmt::Display for DestroyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestroyReason::Exited { code: None, .. } => f.write_str("exit status unknown"),
            DestroyReason::Exited {
                code: Some(code), ..
            } => match killed_by(*code) {
                Some(signal) => {
                    write!(f, "killed by signal {signal}")?;
                    match signal_name(signal) {
                        Some(name) => write!(f, " ({name})"),
                        None => Ok(()),
                    }
                }
                None => write!(f, "exited with status {code}"),
            },
            DestroyReason::NeverHealthy { .. } => f.write_str("never became healthy"),
            DestroyReason::Unhealthy { .. } => f.write_str("became unhealthy"),
            DestroyReason::Drifted { findings, .. } => write!(f, "drifted: {findings}"),
            DestroyReason::Superseded { release } => {
                write!(f, "release {release} is neither live nor previous")
            }
            DestroyReason::Aborted { release } => write!(f, "release {release} was aborted"),
            DestroyReason::ScaledDown { replicas, .. } => {
                write!(f, "scaled to {replicas} replicas")
            }
            DestroyReason::Retired { release, kept } => {
                write!(f, "release {release} stayed warm for {}", humane(*kept))
            }
        }
    }
}

/// The signal behind an exit status, by the shell and container-runtime convention of
/// reporting death by signal `N` as status `128 + N` (Linux signals are 1 to 64).
fn killed_by(code: i32) -> Option<i32> {
    Some(code - 128).filter(|n| (1..=64).contains(n))
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// Something worth recording in the ledger.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutEvent {
    /// A canary step's weights took effect.
    StepStarted {
        /// 1-based step.
        step: usize,
        /// Canary weight.
        weight: u8,
    },
    /// A canary step was judged.
    StepJudged {
        /// 1-based step.
        step: usize,
        /// Canary weight.
        weight: u8,
        /// The verdict with its numbers.
        verdict: Verdict,
    },
    /// A canary step stayed inconclusive; `then` is what `on_inconclusive` made of it
    /// (`abort` is recorded as a failed [`RolloutEvent::StepJudged`] instead).
    StepInconclusive {
        /// The step and its numbers.
        inconclusive: Inconclusive,
        /// The measurements it had.
        metrics: StepMetrics,
        /// `pause` or `promote`.
        then: OnInconclusive,
    },
    /// Waiting for `kiln promote` (or `kiln abort`).
    AwaitingPromotion {
        /// Why, when it is an inconclusive step rather than manual promotion.
        inconclusive: Option<Inconclusive>,
    },
    /// All traffic is on the new release.
    Completed {
        /// The release.
        release: u64,
        /// Why it got there by a shortcut, if it did.
        shortcut: Option<Shortcut>,
    },
    /// Traffic went back to stable.
    Aborted {
        /// Why.
        reason: String,
    },
    /// The previous release's warm instances were retired.
    PreviousRetired {
        /// That release.
        release: u64,
    },
}

impl RolloutEvent {
    /// The ledger event kind.
    pub fn kind(&self) -> &'static str {
        match self {
            RolloutEvent::StepStarted { .. } => "rollout.step_started",
            RolloutEvent::StepJudged { .. } | RolloutEvent::StepInconclusive { .. } => {
                "rollout.step_judged"
            }
            RolloutEvent::AwaitingPromotion { .. } => "rollout.awaiting_promotion",
            RolloutEvent::Completed { .. } => "rollout.completed",
            RolloutEvent::Aborted { .. } => "rollout.aborted",
            RolloutEvent::PreviousRetired { .. } => "rollout.previous_retired",
        }
    }
}

/// The result of one [`decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The state to persist before acting.
    pub state: RolloutState,
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// What to record.
    pub events: Vec<RolloutEvent>,
}

/// An inconclusive canary step may run this many times its pause before it fails.
pub const INCONCLUSIVE_LIMIT: u32 = 3;

/// Decides the next actions. Pure: same inputs, same output.
pub fn decide(goal: &Goal, state: &RolloutState, obs: &Observed, now: Millis) -> Decision {
    let mut d = Decision {
        state: state.clone(),
        actions: Vec::new(),
        events: Vec::new(),
    };
    let split = Split::of(goal, obs);

    // Failed and drifted new instances are replaced whatever the phase.
    for i in &split.new {
        if let Some(reason) = i.death() {
            d.state.last_failure = Some(format!(
                "instance {} of release {} {reason}",
                i.id, i.release
            ));
            d.actions.push(Action::Destroy {
                instance: i.id.clone(),
                reason,
            });
        }
    }
    // Instances of releases that are neither new nor stable have no place any more.
    for i in &split.other {
        d.actions.push(Action::Destroy {
            instance: i.id.clone(),
            reason: DestroyReason::Superseded { release: i.release },
        });
    }

    match state.phase.clone() {
        Phase::Aborted { .. } => aborted(goal, &split, obs, &mut d),
        Phase::Completed { at_ms } => completed(goal, &split, obs, at_ms, now, &mut d),
        Phase::Progressing => {
            if let Some(who) = &state.abort_requested {
                abort(goal, &split, obs, now, format!("aborted by {who}"), &mut d);
            } else if let Some(why) = &state.migration_failed {
                abort(
                    goal,
                    &split,
                    obs,
                    now,
                    format!("migration failed: {why}"),
                    &mut d,
                );
            } else if !state.migrated {
                // The migration runs before any instance of the new release exists; its
                // duration is not a lack of progress.
                d.state.waiting_for_instances = false;
                d.actions.push(Action::Migrate {
                    release: goal.release,
                });
            } else {
                progressing(goal, &split, obs, now, &mut d);
            }
        }
    }
    d
}

/// The app's instances sorted by role.
struct Split<'a> {
    new: Vec<&'a InstanceObs>,
    stable: Vec<&'a InstanceObs>,
    other: Vec<&'a InstanceObs>,
}

impl<'a> Split<'a> {
    fn of(goal: &Goal, obs: &'a Observed) -> Split<'a> {
        let mut s = Split {
            new: Vec::new(),
            stable: Vec::new(),
            other: Vec::new(),
        };
        let mut all: Vec<&InstanceObs> = obs.instances.iter().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        for i in all {
            if i.release == goal.release {
                s.new.push(i);
            } else if Some(i.release) == goal.stable {
                s.stable.push(i);
            } else {
                s.other.push(i);
            }
        }
        s
    }

    /// New instances that count toward the replica target (alive and clean).
    fn new_live(&self) -> u32 {
        count(self.new.iter().filter(|i| !i.dead() && i.drift.is_none()))
    }

    fn new_ready(&self) -> Vec<&'a InstanceObs> {
        self.new.iter().copied().filter(|i| i.ready()).collect()
    }

    fn stable_ready(&self) -> Vec<&'a InstanceObs> {
        self.stable.iter().copied().filter(|i| i.ready()).collect()
    }
}

fn count<'a>(it: impl Iterator<Item = &'a &'a InstanceObs>) -> u32 {
    u32::try_from(it.count()).unwrap_or(u32::MAX)
}

/// A route with `new` and `stable` members and weights proportional to the given shares.
fn route(
    goal: &Goal,
    new: &[&InstanceObs],
    new_w: u32,
    stable: &[&InstanceObs],
    stable_w: u32,
) -> RouteTarget {
    let mut r = RouteTarget::default();
    if !new.is_empty() || new_w > 0 {
        r.weights.insert(goal.release, new_w);
    }
    if let Some(s) = goal.stable
        && (!stable.is_empty() || stable_w > 0)
    {
        r.weights.insert(s, stable_w);
    }
    r.members = new.iter().chain(stable).map(|i| i.id.clone()).collect();
    r
}

fn set_route(obs: &Observed, target: RouteTarget, d: &mut Decision) {
    if obs.route != target {
        d.actions.push(Action::Route(target));
    }
}

/// Creates instances of the new release up to `want` live ones.
fn top_up(goal: &Goal, split: &Split<'_>, want: u32, d: &mut Decision) {
    let live = split.new_live();
    if want > live {
        d.actions.push(Action::Create {
            release: goal.release,
            count: want - live,
        });
    }
}

/// Replaces drifted new instances once a clean replacement is ready.
fn retire_drifted(split: &Split<'_>, d: &mut Decision) {
    let spare = split.new_ready().len();
    for i in split
        .new
        .iter()
        .filter(|i| i.drift.is_some() && !i.dead())
        .take(spare)
    {
        d.actions.push(Action::Destroy {
            instance: i.id.clone(),
            reason: DestroyReason::Drifted {
                release: i.release,
                findings: i.drift.clone().unwrap_or_default(),
            },
        });
    }
}

fn progressing(goal: &Goal, split: &Split<'_>, obs: &Observed, now: Millis, d: &mut Decision) {
    let ready = u32::try_from(split.new_ready().len()).unwrap_or(u32::MAX);
    if ready > d.state.best_ready {
        d.state.best_ready = ready;
        d.state.last_progress_ms = now;
    }
    let waiting_for_instances = match &goal.deploy.strategy {
        Strategy::Rolling => rolling(goal, split, obs, now, d),
        // With nothing live there is nothing to compare a canary with, nor to keep serving
        // during a preview: steps, analysis and promotion would only delay the first release.
        Strategy::BlueGreen { .. } | Strategy::Canary { .. } if goal.stable.is_none() => {
            first_release(goal, split, obs, now, d)
        }
        Strategy::BlueGreen { promote } => blue_green(goal, split, obs, *promote, now, d),
        Strategy::Canary {
            promote,
            steps,
            analysis,
            scale_stable,
        } => {
            let canary = Canary {
                promote: *promote,
                steps,
                analysis,
                scale_stable: *scale_stable,
            };
            canary.run(goal, split, obs, now, d)
        }
    };
    // Time spent waiting on a pause or on `kiln promote` is not a lack of progress: the
    // deadline counts from when the waiting for instances began.
    if waiting_for_instances && !d.state.waiting_for_instances {
        d.state.last_progress_ms = now;
    }
    d.state.waiting_for_instances = waiting_for_instances;
    let deadline = millis(goal.deploy.progress_deadline);
    if d.state.phase == Phase::Progressing
        && waiting_for_instances
        && now - d.state.last_progress_ms > deadline
    {
        let why = d.state.last_failure.clone().unwrap_or_else(|| {
            format!("{ready} of {} new instances became healthy", goal.replicas)
        });
        let reason = format!(
            "progress deadline {} exceeded: {why}",
            humane(goal.deploy.progress_deadline)
        );
        d.actions.clear();
        abort(goal, split, obs, now, reason, d);
    }
}

/// Rolling: replace instances a few at a time. Returns whether it waits on instances.
fn rolling(goal: &Goal, split: &Split<'_>, obs: &Observed, now: Millis, d: &mut Decision) -> bool {
    let r = goal.replicas;
    let surge = goal.deploy.max_surge.resolve(r, true);
    let unavailable = goal.deploy.max_unavailable.resolve(r, false);
    let new_ready = split.new_ready();
    let ready = u32::try_from(new_ready.len()).unwrap_or(u32::MAX);
    let stable_routed: Vec<&InstanceObs> = split
        .stable_ready()
        .into_iter()
        .filter(|i| obs.route.members.contains(&i.id))
        .collect();
    // Keep enough stable instances in the route that (new ready + stable kept) never falls
    // below replicas - max_unavailable; a new instance in, a stable one out.
    let floor = r.saturating_sub(unavailable).saturating_sub(ready);
    let keep = usize::try_from(floor)
        .unwrap_or(usize::MAX)
        .min(stable_routed.len());
    let kept = &stable_routed[..keep];
    let new_in: Vec<&InstanceObs> = new_ready.iter().copied().take(r as usize).collect();
    let (nw, sw) = shares(new_in.len(), kept.len());
    set_route(obs, route(goal, &new_in, nw, kept, sw), d);

    // Start new instances within the surge: (stable kept + new live) ≤ replicas + surge.
    let live = split.new_live();
    let room = (r + surge).saturating_sub(u32::try_from(keep).unwrap_or(u32::MAX) + live);
    let want = live + r.saturating_sub(live).min(room);
    top_up(goal, split, want, d);
    retire_drifted(split, d);

    if ready >= r && keep == 0 {
        complete(goal, now, d);
        return false;
    }
    true
}

/// A first release (blue-green or canary with no live release): new instances take all
/// traffic as they become ready; complete once `replicas` are. Returns whether it waits on
/// instances.
fn first_release(
    goal: &Goal,
    split: &Split<'_>,
    obs: &Observed,
    now: Millis,
    d: &mut Decision,
) -> bool {
    let r = goal.replicas;
    top_up(goal, split, r, d);
    retire_drifted(split, d);
    let ready = split.new_ready();
    let serving = &ready[..ready.len().min(r as usize)];
    let weight = if serving.is_empty() { 0 } else { 100 };
    set_route(obs, route(goal, serving, weight, &[], 0), d);
    if u32::try_from(serving.len()).unwrap_or(u32::MAX) >= r {
        complete_by(goal, now, Some(Shortcut::FirstRelease), d);
        return false;
    }
    true
}

/// Blue-green: a full new set beside the live one, then one switch.
fn blue_green(
    goal: &Goal,
    split: &Split<'_>,
    obs: &Observed,
    promote: Promote,
    now: Millis,
    d: &mut Decision,
) -> bool {
    let r = goal.replicas;
    top_up(goal, split, r, d);
    let green = split.new_ready();
    let blue = split.stable_ready();
    let all_green = u32::try_from(green.len()).unwrap_or(u32::MAX) >= r;
    if all_green && (promote == Promote::Auto || d.state.promote_requested) {
        set_route(obs, route(goal, &green, 100, &[], 0), d);
        complete(goal, now, d);
        return false;
    }
    // Green is in the table at weight 0: reachable by the preview header only.
    set_route(obs, route(goal, &green, 0, &blue, 100), d);
    if all_green {
        await_promotion(d);
        return false;
    }
    true
}

/// Announces, once, that the rollout waits for `kiln promote`.
fn await_promotion(d: &mut Decision) {
    if !d.state.awaiting_promotion {
        d.state.awaiting_promotion = true;
        d.events
            .push(RolloutEvent::AwaitingPromotion { inconclusive: None });
    }
}

/// A canary strategy's settings, borrowed from the goal.
struct Canary<'g> {
    promote: Promote,
    steps: &'g [kiln_spec::CanaryStep],
    analysis: &'g kiln_spec::Analysis,
    scale_stable: bool,
}

impl Canary<'_> {
    /// Shift traffic in steps, judge each step, abort on a failed verdict. Returns whether it
    /// waits on instances.
    fn run(
        &self,
        goal: &Goal,
        split: &Split<'_>,
        obs: &Observed,
        now: Millis,
        d: &mut Decision,
    ) -> bool {
        let r = goal.replicas;
        let last = self.steps.len().saturating_sub(1);
        if d.state.promote_requested && d.state.step < last {
            // `kiln promote` skips the remaining steps (and settles an inconclusive one).
            d.state.step = last;
            d.state.step_started_ms = None;
            d.state.awaiting_promotion = false;
            d.state.inconclusive = None;
        }
        let Some(step) = self.steps.get(d.state.step).copied() else {
            complete(goal, now, d);
            return false;
        };
        let weight = u32::from(step.weight);
        let need = if weight >= 100 {
            r
        } else {
            CountOrPercent::Percent(step.weight).resolve(r, true).max(1)
        };
        top_up(goal, split, need, d);
        retire_drifted(split, d);
        let canaries = split.new_ready();
        let stable = split.stable_ready();
        if u32::try_from(canaries.len()).unwrap_or(u32::MAX) < need {
            // Hold the previous step's table until this step's canaries are ready.
            return true;
        }
        let canaries = &canaries[..need as usize];
        if weight >= 100 {
            set_route(obs, route(goal, canaries, 100, &[], 0), d);
            complete(goal, now, d);
            return false;
        }
        let stable = if self.scale_stable {
            scale_stable_to(goal, split, &stable, 100 - weight, d)
        } else {
            stable
        };
        let table = route(goal, canaries, weight, &stable, 100 - weight);
        let n = d.state.step + 1;
        if d.state.awaiting_promotion {
            // Every judged step passed (or one was inconclusive); the next move waits for a
            // person.
            set_route(obs, table, d);
            return false;
        }
        let Some(started) = d.state.step_started_ms else {
            set_route(obs, table, d);
            d.state.step_started_ms = Some(now);
            d.events.push(RolloutEvent::StepStarted {
                step: n,
                weight: step.weight,
            });
            return false;
        };
        set_route(obs, table, d);
        let Some(pause) = step.pause else {
            // A step without a pause holds until `kiln promote`.
            return false;
        };
        let pause_ms = millis(pause);
        let ran = now - started;
        if ran < pause_ms {
            return false;
        }
        let metrics = obs.metrics.unwrap_or(StepMetrics {
            canary: Measurement {
                requests: 0,
                errors: 0,
                p99_ms: 0.0,
            },
            stable: Measurement {
                requests: 0,
                errors: 0,
                p99_ms: 0.0,
            },
        });
        let verdict = match judge(self.analysis, metrics) {
            // Too few requests yet: the step extends, up to its limit.
            Verdict::Inconclusive { .. }
                if ran < pause_ms.saturating_mul(i64::from(INCONCLUSIVE_LIMIT)) =>
            {
                return false;
            }
            Verdict::Inconclusive { metrics } => {
                let inconclusive = Inconclusive {
                    step: n,
                    weight: step.weight,
                    requests: metrics.canary.requests,
                    min_requests: self.analysis.min_requests,
                    waited_ms: ran,
                };
                match self.analysis.on_inconclusive {
                    OnInconclusive::Abort => Verdict::Fail {
                        metrics,
                        reason: format!(
                            "inconclusive: {} requests in {}, fewer than min_requests = {}",
                            metrics.canary.requests,
                            humane(Duration::from_millis(u64::try_from(ran).unwrap_or(0))),
                            self.analysis.min_requests
                        ),
                    },
                    then @ OnInconclusive::Pause => {
                        d.events.push(RolloutEvent::StepInconclusive {
                            inconclusive,
                            metrics,
                            then,
                        });
                        d.state.awaiting_promotion = true;
                        d.state.inconclusive = Some(inconclusive);
                        d.events.push(RolloutEvent::AwaitingPromotion {
                            inconclusive: Some(inconclusive),
                        });
                        return false;
                    }
                    then @ OnInconclusive::Promote => {
                        d.events.push(RolloutEvent::StepInconclusive {
                            inconclusive,
                            metrics,
                            then,
                        });
                        self.advance(last, d);
                        return false;
                    }
                }
            }
            v => v,
        };
        d.events.push(RolloutEvent::StepJudged {
            step: n,
            weight: step.weight,
            verdict: verdict.clone(),
        });
        match verdict {
            Verdict::Fail { reason, .. } => {
                let reason = format!("aborted at step {n} ({}%): {reason}", step.weight);
                abort(goal, split, obs, now, reason, d);
            }
            _ => self.advance(last, d),
        }
        false
    }

    /// After a step passed: the next step, or (before the last under manual promotion) a
    /// wait for `kiln promote`.
    fn advance(&self, last: usize, d: &mut Decision) {
        let next = d.state.step + 1;
        if next == last && self.promote == Promote::Manual && !d.state.promote_requested {
            await_promotion(d);
            return;
        }
        d.state.step = next;
        d.state.step_started_ms = None;
    }
}

/// The stable instances a canary route with `stable_weight` percent needs under
/// `scale_stable`: that share of `replicas`, rounded up, at least 1 while it has weight.
pub fn stable_needed(replicas: u32, stable_weight: u32) -> u32 {
    if stable_weight == 0 {
        return 0;
    }
    let share = u8::try_from(stable_weight.min(100)).unwrap_or(100);
    CountOrPercent::Percent(share)
        .resolve(replicas, true)
        .max(1)
}

/// `scale_stable`: keeps the stable instances the route needs at `stable_weight` (lowest ids
/// first) and scales the rest down; returns the kept ones. Nothing is scaled down while fewer
/// than needed are ready, so a route never loses capacity it needs.
fn scale_stable_to<'a>(
    goal: &Goal,
    split: &Split<'a>,
    ready: &[&'a InstanceObs],
    stable_weight: u32,
    d: &mut Decision,
) -> Vec<&'a InstanceObs> {
    let keep = stable_needed(goal.replicas, stable_weight) as usize;
    if ready.len() < keep {
        return ready.to_vec();
    }
    let kept = ready[..keep].to_vec();
    for i in split.stable.iter().filter(|i| !kept.contains(i)) {
        d.actions.push(Action::Destroy {
            instance: i.id.clone(),
            reason: DestroyReason::ScaledDown {
                release: i.release,
                replicas: u32::try_from(keep).unwrap_or(u32::MAX),
            },
        });
    }
    kept
}

fn complete(goal: &Goal, now: Millis, d: &mut Decision) {
    complete_by(goal, now, None, d);
}

fn complete_by(goal: &Goal, now: Millis, shortcut: Option<Shortcut>, d: &mut Decision) {
    d.state.phase = Phase::Completed { at_ms: now };
    d.state.awaiting_promotion = false;
    d.state.inconclusive = None;
    d.events.push(RolloutEvent::Completed {
        release: goal.release,
        shortcut,
    });
}

fn abort(
    goal: &Goal,
    split: &Split<'_>,
    obs: &Observed,
    now: Millis,
    reason: String,
    d: &mut Decision,
) {
    d.state.phase = Phase::Aborted {
        at_ms: now,
        reason: reason.clone(),
    };
    d.state.awaiting_promotion = false;
    d.state.inconclusive = None;
    d.events.push(RolloutEvent::Aborted { reason });
    aborted(goal, split, obs, d);
}

/// After an abort: all traffic on stable (warm instances included), new instances destroyed;
/// under `scale_stable`, stable scaled back up to `replicas`.
fn aborted(goal: &Goal, split: &Split<'_>, obs: &Observed, d: &mut Decision) {
    let stable = split.stable_ready();
    set_route(obs, route(goal, &[], 0, &stable, 100), d);
    if let (Some(s), Strategy::Canary { scale_stable, .. }) = (goal.stable, &goal.deploy.strategy)
        && *scale_stable
    {
        let live = count(split.stable.iter().filter(|i| !i.dead()));
        if goal.replicas > live {
            d.actions.push(Action::Create {
                release: s,
                count: goal.replicas - live,
            });
        }
    }
    for i in &split.new {
        if !i.dead() {
            d.actions.push(Action::Destroy {
                instance: i.id.clone(),
                reason: DestroyReason::Aborted {
                    release: goal.release,
                },
            });
        }
    }
}

/// The table of the steady state after a rollout: all traffic to the goal release's ready
/// instances, at most `replicas` of them, lowest ids first; while none is ready, its healthy
/// drifted ones. A warm rollback publishes this same table at once, so the next [`decide`]
/// finds nothing to change.
pub fn steady_route(goal: &Goal, obs: &Observed) -> RouteTarget {
    steady(goal, &Split::of(goal, obs))
}

fn steady(goal: &Goal, split: &Split<'_>) -> RouteTarget {
    let mut ready = split.new_ready();
    if ready.is_empty() {
        // Drift in a layer every instance shares marks them all at once. Rather than fail
        // every request until a replacement is up, the healthy drifted instances serve until
        // a clean one is ready; `retire_drifted` then takes them out one per clean instance.
        ready = split
            .new
            .iter()
            .copied()
            .filter(|i| i.health == Condition::Healthy)
            .collect();
    }
    let r = ready.len().min(goal.replicas as usize);
    route(goal, &ready[..r], 100, &[], 0)
}

/// The steady state: all traffic on the new release, replicas kept, failures and drift
/// replaced, the previous release retired after `keep_previous`.
fn completed(
    goal: &Goal,
    split: &Split<'_>,
    obs: &Observed,
    at_ms: Millis,
    now: Millis,
    d: &mut Decision,
) {
    set_route(obs, steady(goal, split), d);
    top_up(goal, split, goal.replicas, d);
    retire_drifted(split, d);
    // Scale down: ready instances beyond the replica count, newest ids last.
    for i in split.new_ready().iter().skip(goal.replicas as usize) {
        d.actions.push(Action::Destroy {
            instance: i.id.clone(),
            reason: DestroyReason::ScaledDown {
                release: i.release,
                replicas: goal.replicas,
            },
        });
    }
    if now - at_ms >= millis(goal.deploy.keep_previous) && !split.stable.is_empty() {
        for i in &split.stable {
            d.actions.push(Action::Destroy {
                instance: i.id.clone(),
                reason: DestroyReason::Retired {
                    release: i.release,
                    kept: goal.deploy.keep_previous,
                },
            });
        }
        if let Some(s) = goal.stable {
            d.events.push(RolloutEvent::PreviousRetired { release: s });
        }
    }
}

/// Percent shares for two counts, summing to 100 (or 0 when both are empty).
fn shares(a: usize, b: usize) -> (u32, u32) {
    let total = a + b;
    if total == 0 {
        return (0, 0);
    }
    let wa = u32::try_from((a * 100 + total / 2) / total).unwrap_or(100);
    (wa, 100 - wa)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn humane(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_millis() != 0 || secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}
