//! Deployment logic with no I/O: the rollout state machine shared by the rolling, blue-green
//! and canary strategies, canary analysis, rollback decisions, and the changes `kiln plan`
//! prints.
//!
//! [`rollout::decide`] is a pure function of (goal, persisted state, observations, now) →
//! (next state, actions, events). The daemon executes the actions (create and destroy
//! instances through a provider, swap the router's table), records the events in the ledger,
//! persists the state, observes again and calls it again. Because the function has no
//! memory beyond the persisted state, a daemon killed at any point and restarted converges
//! by simply calling it again.
//!
//! [`rollback::rollback_target`] and [`rollback::plan_rollback`] decide `kiln rollback`: the
//! target (the release live before, from the app's history of live releases), the route and
//! schema checks, and the new goal and state; a warm rollback's swap is
//! [`rollout::steady_route`], the table `decide` publishes once a rollout completes.
//!
//! [`plan::plan`] lists what `kiln apply` would change (image, configuration key by key,
//! schema and the rollbacks it would block); `kiln plan` prints each [`plan::Change`].
//!
//! [`follow::next`] decides what the git follower does with its branch's head, and
//! [`follow::rolled_back`] what a rollback of a followed app means to it.
//!
//! Reasons are types ([`rollout::DestroyReason`], [`rollback::RollbackRefused`]) whose
//! `Display` is the text for people; callers match on the variants, never on the text.
//!
//! **API boundary:** no clocks (time is a parameter), no providers, no router, no ledger.

pub mod analysis;
pub mod follow;
pub mod plan;
pub mod rollback;
pub mod rollout;

pub use analysis::{Measurement, StepMetrics, Verdict, judge};
pub use plan::{Change, PlanCurrent, PlanNext, config_diff, plan};
pub use rollback::{
    ForcedRollback, HISTORY_LIMIT, LiveSchema, RollbackPlan, RollbackRefused, RollbackRequest,
    RollbackTarget, TargetRelease, became_live, plan_rollback, rollback_target,
};
pub use rollout::{
    Action, Condition, Decision, DestroyReason, Goal, Inconclusive, InstanceObs, Millis, Observed,
    Phase, RolloutEvent, RolloutState, RouteTarget, Shortcut, decide, stable_needed, steady_route,
};
