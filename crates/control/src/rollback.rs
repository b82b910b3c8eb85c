//! `kiln rollback`: the planner ([`kiln_deploy::rollback_target`], [`plan_rollback`])
//! decides; this loads the target release and carries the decision out.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use kiln_deploy::{
    RollbackPlan, RollbackRefused, RollbackRequest, RollbackTarget, TargetRelease, plan_rollback,
    rollback_target,
};
use kiln_ledger::Event;
use kiln_runtime::{Digest, Observation};

use crate::app::AppCtl;
use crate::config::ReleaseConfig;
use crate::controller::{Controller, not_running};
use crate::dto::RollbackOutcome;
use crate::error::{ControlError, Result};

impl Controller {
    /// `kiln rollback APP [--to N]`: a route swap when the target's instances are warm,
    /// otherwise a new rollout of the target's image and configuration. Never rebuilds. The
    /// planner decides; this loads the target release and carries the decision out.
    pub async fn rollback(
        &self,
        app: &str,
        to: Option<u64>,
        force: bool,
        actor: &str,
    ) -> Result<RollbackOutcome> {
        let started = std::time::Instant::now();
        let mut apps = self.apps.lock().await;
        // The reconciler's last listing: a rollback must not wait for the runtime.
        let observed = Arc::clone(&self.observed.lock().unwrap_or_else(PoisonError::into_inner));
        let a = apps.get_mut(app).ok_or_else(|| not_running(app))?;
        let req = RollbackRequest {
            to,
            force,
            actor: actor.to_owned(),
        };
        let refused = |r: RollbackRefused| refusal(app, r);
        let target = rollback_target(&a.goal, &a.state, &a.history, &req).map_err(refused)?;
        let (from, to, warm) = match target {
            RollbackTarget::AbortRollout { from, to } => {
                // Rolling back an unfinished rollout is aborting it: stable still has its
                // instances, so traffic returns in one swap.
                a.state.abort_requested = Some(format!("rollback by {actor}"));
                self.tick(app, a, &observed).await?;
                (from, to, true)
            }
            RollbackTarget::Release { from, to } => {
                let (config, image) = self.load_release(app, to)?;
                let target = TargetRelease {
                    number: to,
                    deploy: config.deploy_spec(),
                    same_route: config.route == a.config.route,
                };
                let view = self.observe(app, a, &observed).await?;
                let now = self.exec.clock.now_ms();
                let plan =
                    plan_rollback(&a.goal, &target, from, &view.observed, a.schema, &req, now)
                        .map_err(refused)?;
                let warm = plan.warm;
                if !warm {
                    // A cold rollback starts the release again: the daemon's policy of now
                    // applies, as it would to an apply of that image (a warm one only moves
                    // traffic back to what still runs).
                    let now_policy = ReleaseConfig {
                        daemon_policy: self.daemon_policy.clone(),
                        ..config.clone()
                    };
                    self.enforce_policy(app, &image, &now_policy, Some(to), actor)
                        .await?;
                }
                let loaded = (config, image);
                self.roll_back_to(app, a, plan, loaded, actor, &view.addrs, &observed)
                    .await?;
                (from, to, warm)
            }
        };
        let switch_us =
            warm.then(|| u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        self.exec.record(
            app,
            &Event::Rollback {
                from,
                to,
                warm,
                actor: actor.to_owned(),
                switch_us,
            },
        )?;
        // A followed app is pinned before the rollback answers: the follower never applies
        // the commit rolled back from again.
        self.notice_rollback(app, from, actor).await;
        Ok(RollbackOutcome {
            from,
            to,
            warm,
            switch_us,
        })
    }

    /// Carries out a rollback plan: persisted first, then the warm swap (one route change,
    /// the table `decide` computes for a completed rollout) or a new rollout's first pass.
    #[allow(clippy::too_many_arguments)]
    async fn roll_back_to(
        &self,
        app: &str,
        a: &mut AppCtl,
        plan: RollbackPlan,
        (config, image): (ReleaseConfig, Digest),
        actor: &str,
        addrs: &BTreeMap<String, (std::net::SocketAddr, u64)>,
        observed: &[Observation],
    ) -> Result<()> {
        if let Some(f) = &plan.forced {
            let event = Event::RollbackForced {
                to: plan.goal.release,
                target_schema: f.target_schema,
                live_schema: f.live_schema,
                actor: actor.to_owned(),
            };
            self.exec.record(app, &event)?;
        }
        self.exec.forget(app);
        a.goal = plan.goal;
        a.config = config;
        a.image = image;
        a.state = plan.state;
        if plan.warm {
            kiln_deploy::became_live(&mut a.history, a.goal.release);
        }
        let state = a.state.clone();
        self.persist(app, a, &state)?;
        match plan.route {
            Some(route) => self.exec.publish(app, a, route, addrs).await,
            None => self.tick(app, a, observed).await,
        }
    }
}

/// A refused rollback as the API reports it.
fn refusal(app: &str, r: RollbackRefused) -> ControlError {
    let message = format!("{app}: {r}");
    match r {
        RollbackRefused::AlreadyLive { .. } | RollbackRefused::RouteChanged { .. } => {
            ControlError::Invalid(message)
        }
        RollbackRefused::InProgress { .. }
        | RollbackRefused::NoLiveRelease
        | RollbackRefused::NoPrevious { .. }
        | RollbackRefused::Schema { .. } => ControlError::Conflict(message),
    }
}
