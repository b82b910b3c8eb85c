//! Rollback decisions: which release `kiln rollback` goes back to, whether it may (same
//! `[route]`, a compatible live schema or `--force`), and the goal, state and route table it
//! starts with.
//!
//! A rollback is decided in two steps because the target release's settings live in the
//! ledger: [`rollback_target`] picks the target from what the controller holds in memory,
//! the controller loads that release, and [`plan_rollback`] checks it and builds the new
//! goal. A **warm** rollback (the target still has ready instances, kept by
//! `keep_previous`) completes at once: its route is [`steady_route`] of the new goal, the
//! same table [`decide`](crate::decide) keeps publishing afterwards. A **cold** one is an
//! ordinary rollout of the target, with the release it leaves as stable.
//!
//! "The previous release" is read from the app's **history**: the releases that became
//! live, oldest first, kept by the controller with [`became_live`]. Release numbers say
//! nothing about it: a release may have been aborted, or never live, and after a rollback
//! the one live before is not `from - 1`.
//!
//! **API boundary:** no ledger, no router, no clock; the controller loads the target release,
//! records the outcome (including a forced rollback) and publishes the route.

use std::error::Error;
use std::fmt;

use kiln_spec::DeploySpec;

use crate::rollout::{Goal, Millis, Observed, Phase, RolloutState, RouteTarget, steady_route};

/// The live database schema a migration left (a domain type; the control crate stores its
/// own serde copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveSchema {
    /// The schema version.
    pub schema: u32,
    /// Releases written for a schema older than this cannot run against it.
    pub compatible_from: u32,
    /// The release whose migration set it.
    pub release: u64,
}

/// `kiln rollback APP [--to N] [--force]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackRequest {
    /// The release to go back to; `None`: the one live before the live one.
    pub to: Option<u64>,
    /// Roll back even across an incompatible live schema (the controller records it).
    pub force: bool,
    /// Who asked, for the records.
    pub actor: String,
}

/// What a rollback does, chosen by [`rollback_target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackTarget {
    /// A rollout is in progress: aborting it is the rollback (stable keeps its instances,
    /// so traffic returns in one swap). The controller sets `abort_requested`.
    AbortRollout {
        /// The release being rolled out.
        from: u64,
        /// Its stable release (or `from` itself when it has none).
        to: u64,
    },
    /// Load release `to` and call [`plan_rollback`].
    Release {
        /// The live release.
        from: u64,
        /// The release to go back to.
        to: u64,
    },
}

/// The release a rollback goes to, as the controller loaded it from the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetRelease {
    /// Its number.
    pub number: u64,
    /// Its `[deploy]`, including `[deploy.migrate]` (the schema its code works with).
    pub deploy: DeploySpec,
    /// Its `[route]` is the live one's: the router can serve it without a restart.
    pub same_route: bool,
}

/// The rollback to carry out, from [`plan_rollback`].
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackPlan {
    /// The new goal: the target release, with the release left behind as stable.
    pub goal: Goal,
    /// The new rollout state: completed at once when warm, progressing otherwise. Never
    /// waiting on a migration: a rollback does not re-run one.
    pub state: RolloutState,
    /// The target had ready instances: the swap is done at once.
    pub warm: bool,
    /// When warm, the table to publish now ([`steady_route`] of the new goal).
    pub route: Option<RouteTarget>,
    /// Set when `--force` overrode an incompatible schema; the controller records it.
    pub forced: Option<ForcedRollback>,
}

/// A rollback `--force` let through an incompatible live schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForcedRollback {
    /// The schema the target release works with.
    pub target_schema: u32,
    /// The live schema.
    pub live_schema: u32,
}

/// Why a rollback is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackRefused {
    /// `--to` a release other than stable while a rollout is in progress.
    InProgress {
        /// The release being rolled out.
        release: u64,
    },
    /// No release is live (the first rollout never completed).
    NoLiveRelease,
    /// No release was live before the live one.
    NoPrevious {
        /// The live release.
        live: u64,
    },
    /// The target is the live release.
    AlreadyLive {
        /// That release.
        release: u64,
    },
    /// The target's `[route]` differs from the live one.
    RouteChanged {
        /// The target.
        release: u64,
    },
    /// The target's code is older than the live schema supports, and no `--force`.
    Schema {
        /// The target.
        release: u64,
        /// The schema the target works with.
        target_schema: u32,
        /// The live schema.
        live_schema: u32,
        /// The release whose migration set it.
        migrated_by: u64,
        /// The oldest schema code may expect and still work with the live one.
        compatible_from: u32,
    },
}

impl fmt::Display for RollbackRefused {
    // Without the app's name, which the caller knows and puts in front.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RollbackRefused::InProgress { release } => write!(
                f,
                "a rollout of release {release} is in progress; `kiln abort` it first, \
                 or roll back without --to to abort it"
            ),
            RollbackRefused::NoLiveRelease => f.write_str("no live release to roll back from"),
            RollbackRefused::NoPrevious { live } => {
                write!(f, "no release was live before release {live}")
            }
            RollbackRefused::AlreadyLive { release } => {
                write!(f, "release {release} is already live")
            }
            RollbackRefused::RouteChanged { release } => write!(
                f,
                "release {release} has a different [route]; `kiln down` the app and apply it instead"
            ),
            RollbackRefused::Schema {
                release,
                target_schema,
                live_schema,
                migrated_by,
                compatible_from,
            } => write!(
                f,
                "release {release} works with schema {target_schema}, but the live schema is \
                 {live_schema} (migrated by release {migrated_by}, which works only with code \
                 for schema {compatible_from} or later); rolling back needs a backward \
                 migration first, or --force to roll back anyway (recorded)"
            ),
        }
    }
}

impl Error for RollbackRefused {}

/// The most releases [`became_live`] keeps; a rollback needs only the last few.
pub const HISTORY_LIMIT: usize = 32;

/// Records that `release` took all traffic: a rollout completed, or a warm rollback
/// swapped. Calling it again for the same release changes nothing.
pub fn became_live(history: &mut Vec<u64>, release: u64) {
    if history.last() != Some(&release) {
        history.push(release);
    }
    let over = history.len().saturating_sub(HISTORY_LIMIT);
    history.drain(..over);
}

/// Chooses what `kiln rollback` does, from the app's goal, rollout state and history of live
/// releases (oldest first, kept with [`became_live`]).
pub fn rollback_target(
    goal: &Goal,
    state: &RolloutState,
    history: &[u64],
    req: &RollbackRequest,
) -> Result<RollbackTarget, RollbackRefused> {
    if state.phase == Phase::Progressing {
        if req.to.is_none() || req.to == goal.stable {
            return Ok(RollbackTarget::AbortRollout {
                from: goal.release,
                to: goal.stable.unwrap_or(goal.release),
            });
        }
        return Err(RollbackRefused::InProgress {
            release: goal.release,
        });
    }
    let from = live_release(goal, state).ok_or(RollbackRefused::NoLiveRelease)?;
    let to = match req.to {
        Some(to) => to,
        None => previous(history, from, goal.stable)
            .ok_or(RollbackRefused::NoPrevious { live: from })?,
    };
    if to == from {
        return Err(RollbackRefused::AlreadyLive { release: to });
    }
    Ok(RollbackTarget::Release { from, to })
}

/// The release taking traffic: the rolled-out one once complete, the stable one otherwise.
fn live_release(goal: &Goal, state: &RolloutState) -> Option<u64> {
    match state.phase {
        Phase::Completed { .. } => Some(goal.release),
        Phase::Aborted { .. } | Phase::Progressing => goal.stable,
    }
}

/// The release live before `live`: the latest other entry before `live`'s last one in
/// `history`. A history that does not know (kept only since an upgrade) falls back to
/// `stable`, which was live when the current goal was set.
fn previous(history: &[u64], live: u64, stable: Option<u64>) -> Option<u64> {
    let upto = history
        .iter()
        .rposition(|r| *r == live)
        .unwrap_or(history.len());
    history[..upto]
        .iter()
        .rev()
        .copied()
        .find(|r| *r != live)
        .or(stable.filter(|s| *s != live))
}

/// Checks a rollback from the live release `from` to `target` and builds its goal, state and
/// (when warm) route. `schema` is the live schema, when a migration recorded one.
pub fn plan_rollback(
    goal: &Goal,
    target: &TargetRelease,
    from: u64,
    obs: &Observed,
    schema: Option<LiveSchema>,
    req: &RollbackRequest,
    now: Millis,
) -> Result<RollbackPlan, RollbackRefused> {
    let release = target.number;
    if release == from {
        return Err(RollbackRefused::AlreadyLive { release });
    }
    if !target.same_route {
        return Err(RollbackRefused::RouteChanged { release });
    }
    let mut forced = None;
    if let (Some(live), Some(m)) = (schema, &target.deploy.migrate)
        && m.schema < live.compatible_from
    {
        if !req.force {
            return Err(RollbackRefused::Schema {
                release,
                target_schema: m.schema,
                live_schema: live.schema,
                migrated_by: live.release,
                compatible_from: live.compatible_from,
            });
        }
        forced = Some(ForcedRollback {
            target_schema: m.schema,
            live_schema: live.schema,
        });
    }
    let new = Goal {
        release,
        stable: Some(from),
        replicas: goal.replicas,
        deploy: target.deploy.clone(),
    };
    let warm = obs
        .instances
        .iter()
        .any(|i| i.release == release && i.ready());
    let mut state = RolloutState::start(&new, now);
    // A rollback never re-runs a migration: the target's ran when it was first rolled out,
    // and whether its code fits the live schema was checked above.
    state.migrated = true;
    if warm {
        state.phase = Phase::Completed { at_ms: now };
    }
    let route = warm.then(|| steady_route(&new, obs));
    Ok(RollbackPlan {
        goal: new,
        state,
        warm,
        route,
        forced,
    })
}
