//! `kiln pause`, `kiln resume` and `kiln maintenance`: the router's gate for an app, set
//! through the controller so that it is recorded (an event) and survives a restart (the app's
//! document carries it).
//!
//! **Invariant:** the document is persisted before the router's gate changes, as every other
//! state: a daemon killed in between comes back in the mode asked for.

use std::time::Duration;

use kiln_ledger::Event;
use kiln_proxy::GateMode;

use crate::app::AppCtl;
use crate::controller::{Controller, not_running};
use crate::doc::StoredGate;
use crate::dto::GateStatus;
use crate::error::{ControlError, Result};

/// `--max-hold` when none is given.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(30);

/// How many requests a pause holds at most when not told: the oldest is shed past it.
pub const DEFAULT_MAX_HELD: usize = 10_000;

/// The longest a request may be held: longer than any client waits.
const MAX_HOLD_LIMIT: Duration = Duration::from_secs(3600);

/// The longest maintenance message: a sentence or a paragraph, not a page.
const MAX_MESSAGE_BYTES: usize = 4096;

/// What the router does with an app's new requests, as the API reports it (`held` of them
/// held).
pub(crate) fn gate_status(gate: &GateMode, held: usize) -> GateStatus {
    match gate {
        GateMode::Open => GateStatus::Open,
        GateMode::Paused { max_hold, max_held } => GateStatus::Paused {
            max_hold_ms: millis(*max_hold),
            max_held: *max_held,
            held,
        },
        GateMode::Maintenance {
            message,
            retry_after,
        } => GateStatus::Maintenance {
            message: message.to_string(),
            retry_after_s: retry_after.as_secs(),
        },
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Controller {
    /// `kiln pause APP`: the router holds new requests (at most `max_held`, each at most
    /// `max_hold`) while those in flight finish.
    pub async fn pause(
        &self,
        app: &str,
        max_hold: Duration,
        max_held: usize,
        actor: &str,
    ) -> Result<GateStatus> {
        if max_hold.is_zero() || max_hold > MAX_HOLD_LIMIT {
            return Err(ControlError::Invalid(format!(
                "max_hold must be between 1 ms and {} s",
                MAX_HOLD_LIMIT.as_secs()
            )));
        }
        if max_held == 0 {
            return Err(ControlError::Invalid(
                "max_held must be at least 1".to_owned(),
            ));
        }
        let mut apps = self.apps.lock().await;
        let a = apps.get_mut(app).ok_or_else(|| not_running(app))?;
        let event = Event::Paused {
            actor: actor.to_owned(),
            max_hold_ms: millis(max_hold),
            max_held,
            reason: None,
        };
        self.set_gate(app, a, GateMode::Paused { max_hold, max_held }, &event)
            .await?;
        Ok(gate_status(&a.gate, self.held(app, &a.gate).await?))
    }

    /// `kiln resume APP` and `kiln maintenance APP --off`: the router forwards requests again,
    /// the held ones first. Returns how many held requests were let go; an app already open
    /// stays so, and nothing is recorded.
    pub async fn resume(&self, app: &str, actor: &str) -> Result<usize> {
        let mut apps = self.apps.lock().await;
        let a = apps.get_mut(app).ok_or_else(|| not_running(app))?;
        if a.gate == GateMode::Open {
            return Ok(0);
        }
        let held = self.exec.plane.held(app).await?;
        let event = Event::Resumed {
            actor: actor.to_owned(),
            released: held,
            reason: None,
        };
        self.set_gate(app, a, GateMode::Open, &event).await?;
        Ok(held)
    }

    /// `kiln maintenance APP --message …`: the router answers every new request 503 with
    /// `message` and `Retry-After: retry_after`; requests held by a pause get it too.
    pub async fn maintenance(
        &self,
        app: &str,
        message: &str,
        retry_after: Duration,
        actor: &str,
    ) -> Result<GateStatus> {
        let message = message.trim();
        if message.is_empty() || message.len() > MAX_MESSAGE_BYTES {
            return Err(ControlError::Invalid(format!(
                "a maintenance message must have 1 to {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        if message.chars().any(|c| c.is_control() && c != '\n') {
            return Err(ControlError::Invalid(
                "a maintenance message must not hold control characters".to_owned(),
            ));
        }
        let mut apps = self.apps.lock().await;
        let a = apps.get_mut(app).ok_or_else(|| not_running(app))?;
        let event = Event::Maintenance {
            actor: actor.to_owned(),
            message: message.to_owned(),
            retry_after_s: retry_after.as_secs(),
        };
        let mode = GateMode::Maintenance {
            message: message.into(),
            retry_after,
        };
        self.set_gate(app, a, mode, &event).await?;
        Ok(gate_status(&a.gate, self.held(app, &a.gate).await?))
    }

    /// How many of app's requests the router holds (none unless it is paused).
    pub(crate) async fn held(&self, app: &str, gate: &GateMode) -> Result<usize> {
        if matches!(gate, GateMode::Paused { .. }) {
            Ok(self.exec.plane.held(app).await?)
        } else {
            Ok(0)
        }
    }

    /// Persists `mode`, sets it on the router, records `event`.
    pub(crate) async fn set_gate(
        &self,
        app: &str,
        a: &mut AppCtl,
        mode: GateMode,
        event: &Event,
    ) -> Result<()> {
        self.persist_gate(app, a, StoredGate::from_mode(&mode))?;
        self.exec.plane.set_gate(app, &mode).await?;
        a.gate = mode;
        self.exec.record(app, event)
    }
}
