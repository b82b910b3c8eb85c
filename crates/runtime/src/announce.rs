//! What the engine providers (docker, swarm) announced of each instance's drift, so a
//! finding is announced once however many checks find it again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::types::{DriftFinding, DriftReport, InstanceId};

/// The drift announced per instance, and where announcements go.
pub(crate) struct Announcer {
    reported: Mutex<HashMap<InstanceId, Vec<DriftFinding>>>,
    tx: broadcast::Sender<DriftReport>,
}

impl Announcer {
    pub(crate) fn new() -> Announcer {
        Announcer {
            reported: Mutex::new(HashMap::new()),
            tx: broadcast::channel(256).0,
        }
    }

    /// Every announcement from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<DriftReport> {
        self.tx.subscribe()
    }

    /// Announces `findings` when they hold something not announced before, unless `quiet`
    /// (an instance kiln is destroying); returns them as a report (or `None` when clean).
    pub(crate) fn publish(
        &self,
        id: &InstanceId,
        findings: Vec<DriftFinding>,
        quiet: bool,
    ) -> Option<DriftReport> {
        let mut findings = findings;
        findings.sort_by_key(ToString::to_string);
        findings.dedup();
        if findings.is_empty() {
            return None;
        }
        let report = DriftReport {
            instance: id.clone(),
            findings: findings.clone(),
            at: SystemTime::now(),
        };
        let new = {
            let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            let before = reported.entry(id.clone()).or_default();
            let new = findings.iter().any(|f| !before.contains(f));
            *before = findings;
            new
        };
        if new && !quiet {
            let _ = self.tx.send(report.clone());
        }
        Some(report)
    }

    /// Forgets a destroyed instance.
    pub(crate) fn forget(&self, id: &InstanceId) {
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}
