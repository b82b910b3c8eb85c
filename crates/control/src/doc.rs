//! The app's document as the ledger's rollout table stores it: its own serde types, so the
//! planner's `RolloutState` can change without silently changing what is on disk, and a
//! document written by an older kiln keeps decoding.

use kiln_deploy::{Goal, Inconclusive, Millis, Phase, RolloutState};
use serde::{Deserialize, Serialize};

use crate::dto::LiveSchema;

/// The per-app document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct AppDoc {
    pub release: u64,
    pub stable: Option<u64>,
    pub replicas: u32,
    pub state: StoredState,
    /// The database schema the last successful migration left.
    #[serde(default)]
    pub schema: Option<LiveSchema>,
    /// The releases that became live, oldest first (absent in documents written before).
    #[serde(default)]
    pub history: Vec<u64>,
    /// Paused or in maintenance (absent when open, and in documents written before).
    #[serde(default, skip_serializing_if = "StoredGate::is_open")]
    pub gate: StoredGate,
}

/// The router's gate as stored: what a restarted daemon sets again.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub(crate) enum StoredGate {
    #[default]
    Open,
    Paused {
        max_hold_ms: u64,
        max_held: usize,
    },
    Maintenance {
        message: String,
        retry_after_s: u64,
    },
}

impl StoredGate {
    fn is_open(&self) -> bool {
        *self == StoredGate::Open
    }

    pub fn from_mode(mode: &kiln_proxy::GateMode) -> StoredGate {
        match mode {
            kiln_proxy::GateMode::Open => StoredGate::Open,
            kiln_proxy::GateMode::Paused { max_hold, max_held } => StoredGate::Paused {
                max_hold_ms: u64::try_from(max_hold.as_millis()).unwrap_or(u64::MAX),
                max_held: *max_held,
            },
            kiln_proxy::GateMode::Maintenance {
                message,
                retry_after,
            } => StoredGate::Maintenance {
                message: message.to_string(),
                retry_after_s: retry_after.as_secs(),
            },
        }
    }

    pub fn into_mode(self) -> kiln_proxy::GateMode {
        match self {
            StoredGate::Open => kiln_proxy::GateMode::Open,
            StoredGate::Paused {
                max_hold_ms,
                max_held,
            } => kiln_proxy::GateMode::Paused {
                max_hold: std::time::Duration::from_millis(max_hold_ms),
                max_held,
            },
            StoredGate::Maintenance {
                message,
                retry_after_s,
            } => kiln_proxy::GateMode::Maintenance {
                message: message.into(),
                retry_after: std::time::Duration::from_secs(retry_after_s),
            },
        }
    }
}

impl AppDoc {
    /// The document of an app with `goal` in `state`.
    pub fn new(
        goal: &Goal,
        state: &RolloutState,
        schema: Option<kiln_deploy::LiveSchema>,
        history: &[u64],
        gate: StoredGate,
    ) -> AppDoc {
        AppDoc {
            release: goal.release,
            stable: goal.stable,
            replicas: goal.replicas,
            state: StoredState::from(state),
            schema: schema.map(LiveSchema::from_domain),
            history: history.to_vec(),
            gate,
        }
    }
}

/// `RolloutState` as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredState {
    release: u64,
    stable: Option<u64>,
    phase: StoredPhase,
    started_ms: Millis,
    last_progress_ms: Millis,
    /// States written before it was kept: it starts again at the next pass that waits.
    #[serde(default)]
    waiting_for_instances: bool,
    best_ready: u32,
    step: usize,
    step_started_ms: Option<Millis>,
    promote_requested: bool,
    abort_requested: Option<String>,
    last_failure: Option<String>,
    awaiting_promotion: bool,
    /// Why it awaits a decision, when a canary step was inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inconclusive: Option<StoredInconclusive>,
    /// States written before migrations existed had nothing to run.
    #[serde(default = "yes")]
    migrated: bool,
    #[serde(default)]
    migration_failed: Option<String>,
}

/// `Phase` as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
enum StoredPhase {
    Progressing,
    Completed { at_ms: Millis },
    Aborted { at_ms: Millis, reason: String },
}

/// `Inconclusive` as stored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct StoredInconclusive {
    step: usize,
    weight: u8,
    requests: u64,
    min_requests: u64,
    waited_ms: Millis,
}

impl From<Inconclusive> for StoredInconclusive {
    fn from(i: Inconclusive) -> StoredInconclusive {
        StoredInconclusive {
            step: i.step,
            weight: i.weight,
            requests: i.requests,
            min_requests: i.min_requests,
            waited_ms: i.waited_ms,
        }
    }
}

impl From<StoredInconclusive> for Inconclusive {
    fn from(i: StoredInconclusive) -> Inconclusive {
        Inconclusive {
            step: i.step,
            weight: i.weight,
            requests: i.requests,
            min_requests: i.min_requests,
            waited_ms: i.waited_ms,
        }
    }
}

fn yes() -> bool {
    true
}

impl From<&RolloutState> for StoredState {
    fn from(s: &RolloutState) -> StoredState {
        StoredState {
            release: s.release,
            stable: s.stable,
            phase: match &s.phase {
                Phase::Progressing => StoredPhase::Progressing,
                Phase::Completed { at_ms } => StoredPhase::Completed { at_ms: *at_ms },
                Phase::Aborted { at_ms, reason } => StoredPhase::Aborted {
                    at_ms: *at_ms,
                    reason: reason.clone(),
                },
            },
            started_ms: s.started_ms,
            last_progress_ms: s.last_progress_ms,
            waiting_for_instances: s.waiting_for_instances,
            best_ready: s.best_ready,
            step: s.step,
            step_started_ms: s.step_started_ms,
            promote_requested: s.promote_requested,
            abort_requested: s.abort_requested.clone(),
            last_failure: s.last_failure.clone(),
            awaiting_promotion: s.awaiting_promotion,
            inconclusive: s.inconclusive.map(StoredInconclusive::from),
            migrated: s.migrated,
            migration_failed: s.migration_failed.clone(),
        }
    }
}

impl From<StoredState> for RolloutState {
    fn from(s: StoredState) -> RolloutState {
        RolloutState {
            release: s.release,
            stable: s.stable,
            phase: match s.phase {
                StoredPhase::Progressing => Phase::Progressing,
                StoredPhase::Completed { at_ms } => Phase::Completed { at_ms },
                StoredPhase::Aborted { at_ms, reason } => Phase::Aborted { at_ms, reason },
            },
            started_ms: s.started_ms,
            last_progress_ms: s.last_progress_ms,
            waiting_for_instances: s.waiting_for_instances,
            best_ready: s.best_ready,
            step: s.step,
            step_started_ms: s.step_started_ms,
            promote_requested: s.promote_requested,
            abort_requested: s.abort_requested,
            last_failure: s.last_failure,
            awaiting_promotion: s.awaiting_promotion,
            inconclusive: s.inconclusive.map(Inconclusive::from),
            migrated: s.migrated,
            migration_failed: s.migration_failed,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A document as an earlier kiln wrote it (before migrations and history existed).
    const WRITTEN_BEFORE: &str = r#"{"release":2,"stable":1,"replicas":2,"state":{"release":2,"stable":1,"phase":{"phase":"completed","at_ms":1700000000000},"started_ms":1699999990000,"last_progress_ms":1700000000000,"best_ready":2,"step":0,"step_started_ms":null,"promote_requested":false,"abort_requested":null,"last_failure":null,"awaiting_promotion":false}}"#;

    #[test]
    fn a_document_written_before_decodes_and_keeps_its_form() {
        let doc: AppDoc = serde_json::from_str(WRITTEN_BEFORE).unwrap();
        let state = RolloutState::from(doc.state.clone());
        assert_eq!(
            state.phase,
            Phase::Completed {
                at_ms: 1_700_000_000_000
            }
        );
        assert!(state.migrated);
        assert!(doc.history.is_empty());
        assert_eq!(doc.gate, StoredGate::Open);
        // Stored again, the same fields come back (plus the ones added since).
        let again = serde_json::to_value(StoredState::from(&state)).unwrap();
        let before: serde_json::Value = serde_json::from_str(WRITTEN_BEFORE).unwrap();
        for (k, v) in before["state"].as_object().unwrap() {
            assert_eq!(&again[k], v, "{k}");
        }
    }

    #[test]
    fn a_rollout_awaiting_a_decision_keeps_why_across_a_restart() {
        let goal = Goal {
            release: 2,
            stable: Some(1),
            replicas: 2,
            deploy: kiln_spec::DeploySpec {
                strategy: kiln_spec::Strategy::Rolling,
                max_surge: kiln_spec::CountOrPercent::Count(1),
                max_unavailable: kiln_spec::CountOrPercent::Count(0),
                progress_deadline: std::time::Duration::from_secs(60),
                keep_previous: std::time::Duration::from_secs(60),
                migrate: None,
            },
        };
        let mut state = RolloutState::start(&goal, 1_000);
        state.awaiting_promotion = true;
        state.inconclusive = Some(Inconclusive {
            step: 1,
            weight: 10,
            requests: 3,
            min_requests: 50,
            waited_ms: 15_000,
        });
        let json = serde_json::to_string(&StoredState::from(&state)).unwrap();
        let back: StoredState = serde_json::from_str(&json).unwrap();
        assert_eq!(RolloutState::from(back), state);
    }
}
