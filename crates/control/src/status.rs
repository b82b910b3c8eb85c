//! What the controller reports: `kiln status`, the event log, releases, `kiln verify`,
//! instances and metrics. Reads only; nothing here acts.

use std::sync::{Arc, PoisonError};

use kiln_deploy::Phase;
use kiln_runtime::Observation;

use crate::controller::Controller;
use crate::dto::{AppStatus, InstanceStatus, LiveSchema};
use crate::error::{ControlError, Result};
use crate::reconcile::release_of;

impl Controller {
    /// Every app the controller manages, including those whose stored release is corrupt.
    pub async fn app_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.apps.lock().await.keys().cloned().collect();
        names.extend(self.corrupt_apps().into_keys());
        names.sort();
        names
    }

    /// `kiln status APP`.
    pub async fn status(&self, app: &str) -> Result<AppStatus> {
        let observed = self.last_observed().await?;
        let apps = self.apps.lock().await;
        let Some(a) = apps.get(app) else {
            return Err(match self.corrupt_apps().remove(app) {
                Some(why) => ControlError::Corrupt(why),
                None => ControlError::NotFound(format!("no app named {app} is running")),
            });
        };
        let drift = self.exec.drift_now();
        let now = self.exec.clock.now_ms();
        let instances = observed
            .iter()
            .filter(|o| o.app == app)
            .map(|o| InstanceStatus {
                id: o.id.to_string(),
                release: release_of(o),
                state: o.state.as_str().to_owned(),
                health: o.health.as_str().to_owned(),
                addr: o.addr.to_string(),
                age_ms: u64::try_from(now - crate::clock::millis_since_epoch(o.created))
                    .unwrap_or(0),
                routed: a.route.members.contains(&o.id.to_string()),
                drift: drift.get(&o.id).cloned(),
            })
            .collect();
        // A router process that cannot say how many requests it holds still has the gate
        // the daemon set: status answers without the count rather than not at all.
        let held = self.held(app, &a.gate).await.unwrap_or_else(|e| {
            tracing::warn!(app = %app, error = %e, "gate status without the router's count");
            0
        });
        let gate = crate::pause::gate_status(&a.gate, held);
        let (phase, reason) = match &a.state.phase {
            Phase::Progressing => ("progressing", None),
            Phase::Completed { .. } => ("completed", None),
            Phase::Aborted { reason, .. } => ("aborted", Some(reason.clone())),
        };
        let mut status = AppStatus {
            app: app.to_owned(),
            live: a.live_release(),
            release: a.goal.release,
            stable: a.goal.stable,
            phase: phase.to_owned(),
            reason,
            strategy: a.goal.deploy.strategy.name().to_owned(),
            step: matches!(a.goal.deploy.strategy, kiln_spec::Strategy::Canary { .. })
                .then_some(a.state.step + 1),
            awaiting_promotion: a.state.awaiting_promotion,
            awaiting_decision: a
                .state
                .inconclusive
                .filter(|_| a.state.awaiting_promotion)
                .map(|i| i.to_string()),
            replicas: a.goal.replicas,
            weights: a.route.weights.clone(),
            listen: a.listen.to_string(),
            unserved: a.unserved.clone(),
            image: a.image.to_string(),
            config: {
                let mut config = a.config.clone();
                config.service.env = self.exec.secrets.redacted_env(&config.service.env);
                config
            },
            instances,
            schema: a.schema.map(LiveSchema::from_domain),
            gate,
            source: None,
        };
        drop(apps);
        // After the apps' lock: the source's live commit takes it again.
        status.source = self.source_of(app).await;
        Ok(status)
    }

    /// Events, oldest first.
    pub fn events(
        &self,
        app: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<kiln_ledger::Entry>> {
        Ok(self.exec.ledger().events(app, limit)?)
    }

    /// Every release of `app`.
    /// An app's releases, env values whose names look secret redacted.
    pub fn releases(&self, app: &str) -> Result<Vec<kiln_ledger::Release>> {
        let mut releases = self.exec.ledger().releases(app)?;
        for r in &mut releases {
            self.exec.secrets.redact_config_json(&mut r.body.config);
        }
        Ok(releases)
    }

    /// What `kiln plan` compares with the running release: the fingerprints `secrets`
    /// would have now (read by this daemon, as an apply would) and `env` as `status` shows
    /// it. No value leaves the daemon.
    pub async fn fingerprints(
        &self,
        req: crate::dto::FingerprintRequest,
    ) -> Result<crate::dto::Fingerprints> {
        // The sources a release may name, no more of them than a spec would.
        if req.secrets.len() > MAX_SECRETS {
            return Err(crate::error::ControlError::Invalid(format!(
                "at most {MAX_SECRETS} secrets"
            )));
        }
        for (name, s) in &req.secrets {
            crate::config::check_secret(name, s)
                .map_err(|e| crate::error::ControlError::Invalid(format!("secret {name}: {e}")))?;
        }
        let secrets = self.exec.secrets.clone();
        let (prints, env) =
            tokio::task::spawn_blocking(move || secrets.fingerprints(&req.secrets, &req.env))
                .await
                .map_err(|e| {
                    crate::error::ControlError::Internal(format!("reading secrets: {e}"))
                })??;
        Ok(crate::dto::Fingerprints {
            secrets: prints,
            env,
        })
    }

    /// `kiln verify`.
    pub fn verify(
        &self,
    ) -> Result<std::result::Result<kiln_ledger::VerifyReport, kiln_ledger::VerifyError>> {
        Ok(self.exec.ledger().verify()?)
    }

    /// `kiln history --export`: the whole ledger for auditors ([`kiln_ledger::Ledger::export`]).
    pub fn export_ledger(&self) -> Result<serde_json::Value> {
        let now = self.exec.clock.now_ms();
        let ledger = self.exec.ledger();
        let files = ledger.anchor_files().cloned().ok_or_else(|| {
            crate::error::ControlError::NotFound(
                "this daemon's ledger has no key: nothing to export checkpoints from".to_owned(),
            )
        })?;
        Ok(ledger.export(&files, now)?)
    }

    /// The reconciler's last listing (at most a tick old), or a fresh one before the first.
    /// Status calls read this instead of listing: listing costs a runtime call per request.
    async fn last_observed(&self) -> Result<Vec<Observation>> {
        let cached = Arc::clone(&self.observed.lock().unwrap_or_else(PoisonError::into_inner));
        if cached.is_empty() {
            return Ok(self.exec.provider.list().await?);
        }
        Ok(cached.as_ref().clone())
    }

    /// The instances of `app` (for `kiln logs APP`).
    pub async fn instances(&self, app: &str) -> Result<Vec<String>> {
        Ok(self
            .last_observed()
            .await?
            .into_iter()
            .filter(|o| o.app == app)
            .map(|o| o.id.to_string())
            .collect())
    }

    /// The Prometheus text of every app's router metrics, then the daemon's own
    /// (`metrics.rs`), the instances from the reconciler's last listing.
    pub async fn metrics(&self) -> Result<String> {
        let mut text = self.exec.plane.metrics().await?;
        if let Some(sources) = self.sources.get() {
            text.push_str(
                "# HELP kiln_source_webhook_refused_total Webhook calls refused (bad or missing signature, unknown source).\n\
                 # TYPE kiln_source_webhook_refused_total counter\n",
            );
            text.push_str(&format!(
                "kiln_source_webhook_refused_total {}\n",
                sources.refused()
            ));
        }
        let observed = Arc::clone(&self.observed.lock().unwrap_or_else(PoisonError::into_inner));
        self.exec.metrics.render(&mut text, &observed);
        Ok(text)
    }
}

/// The most secrets one fingerprint request may name.
const MAX_SECRETS: usize = 256;

/// What `kiln plan` compares a spec with: the app's release as its status shows it, or,
/// after an aborted rollout, the live release among `releases` (the daemon's policy left
/// out: the daemon records it at apply, it is no change a spec makes).
pub fn plan_current(
    s: &AppStatus,
    releases: &[kiln_ledger::Release],
) -> serde_json::Result<kiln_deploy::PlanCurrent> {
    let live = s
        .live
        .filter(|l| s.phase == "aborted" && *l != s.release)
        .and_then(|l| releases.iter().find(|r| r.number == l));
    if let Some(r) = live {
        let config: crate::config::ReleaseConfig = serde_json::from_value(r.body.config.clone())?;
        return Ok(kiln_deploy::PlanCurrent {
            release: r.number,
            live: s.live,
            image: r.body.image.clone(),
            config: serde_json::to_value(crate::config::ReleaseConfig {
                daemon_policy: Default::default(),
                ..config
            })?,
            schema: s.schema.map(LiveSchema::into_domain),
        });
    }
    Ok(kiln_deploy::PlanCurrent {
        release: s.release,
        live: s.live,
        image: s.image.clone(),
        config: serde_json::to_value(crate::config::ReleaseConfig {
            daemon_policy: Default::default(),
            ..s.config.clone()
        })?,
        schema: s.schema.map(LiveSchema::into_domain),
    })
}

/// What `kiln plan` compares with it: the release `spec` would make of `image` and `config`.
pub fn plan_next(
    spec: &kiln_spec::Spec,
    image: &str,
    config: &crate::config::ReleaseConfig,
) -> serde_json::Result<kiln_deploy::PlanNext> {
    Ok(kiln_deploy::PlanNext {
        app: spec.name.to_string(),
        image: image.to_owned(),
        config: serde_json::to_value(config)?,
        replicas: spec.service.replicas,
        strategy: spec.deploy.strategy.name().to_owned(),
        listen: spec.route.listen.to_string(),
        migrate: spec.deploy.migrate.clone(),
    })
}

impl Controller {
    /// What applying `req` (made from `spec`) to `app` would change, as `kiln plan` lists it.
    pub async fn plan_changes(
        &self,
        app: &str,
        spec: &kiln_spec::Spec,
        req: &crate::dto::ApplyRequest,
    ) -> Result<Vec<String>> {
        let mut config = req.config.clone();
        // Secrets and secret-looking env values as a release shows them (fingerprints,
        // redactions), so an unchanged one is no change.
        let prints = self
            .fingerprints(crate::dto::FingerprintRequest {
                secrets: config.service.secrets.clone(),
                env: config.service.env.clone(),
            })
            .await?;
        for (name, s) in &mut config.service.secrets {
            s.fingerprint = prints.secrets.get(name).cloned();
        }
        config.service.env = prints.env;
        let current = match self.status(app).await {
            Ok(s) => Some(s),
            Err(ControlError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let internal = |e: serde_json::Error| ControlError::Internal(format!("plan: {e}"));
        let releases = match &current {
            Some(s) if s.phase == "aborted" => self.releases(app)?,
            _ => Vec::new(),
        };
        let current = current
            .as_ref()
            .map(|s| plan_current(s, &releases))
            .transpose()
            .map_err(internal)?;
        let next = plan_next(spec, &req.image, &config).map_err(internal)?;
        Ok(kiln_deploy::plan(current.as_ref(), &next)
            .iter()
            .map(ToString::to_string)
            .collect())
    }
}
