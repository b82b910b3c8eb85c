//! Deployment logic with no I/O: the rollout state machine shared by the rolling, blue-green
//! and canary strategies, and canary analysis.
//!
//! [`rollout::decide`] is a pure function of (goal, persisted state, observations, now) →
//! (next state, actions, events). The daemon executes the actions (create and destroy
//! instances through a provider, swap the router's table), records the events in the ledger,
//! persists the state, observes again and calls it again. Because the function has no
//! memory beyond the persisted state, a daemon killed at any point and restarted converges
//! by simply calling it again.
//!
//! **API boundary:** no clocks (time is a parameter), no providers, no router, no ledger.

pub mod analysis;
pub mod rollout;

pub use analysis::{StepMetrics, Verdict, Window, judge};
pub use rollout::{
    Action, Decision, DestroyReason, Goal, Health, InstanceObs, Millis, Observed, Phase,
    RolloutEvent, RolloutState, RouteTarget, decide, steady_route,
};
