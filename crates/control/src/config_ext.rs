//! Interim: replaced by config.rs's strict decode and full validation when they land.
#![allow(missing_docs)]

use crate::config::ReleaseConfig;

impl ReleaseConfig {
    pub fn decode(value: &serde_json::Value) -> Result<ReleaseConfig, String> {
        serde_json::from_value(value.clone()).map_err(|e| e.to_string())
    }

    pub fn validate(&self) -> Result<(), String> {
        crate::gate::check_replicas(self.service.replicas)
            .map_err(|e| format!("service.replicas: {e}"))?;
        self.route.check()
    }

    pub fn test_required(&self) -> bool {
        false
    }
}
