//! `AppCtl`: one app as the controller runs it — its goal and rollout state, its release's
//! configuration, its router side and what was last published to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use kiln_dataplane::wire::AppSpec;
use kiln_deploy::{Goal, LiveSchema, Phase, RolloutState, RouteTarget};
use kiln_proxy::{AppConfig, GateMode};
use kiln_runtime::{Digest, InstanceSpec, Tmpfs};
use kiln_spec::Network;

use crate::config::ReleaseConfig;

/// The label that records which release an instance runs.
pub const RELEASE_LABEL: &str = "kiln.release";

/// The label that marks a one-shot instance (`migration`, `run`, `test`): not part of any
/// release's count, and not the reconciler's to remove.
pub const ROLE_LABEL: &str = "kiln.role";

/// The role of the daemon's own one-shots: a release's migration, recorded in the app's
/// history like the rest of the rollout (drift on it included).
pub const MIGRATION_ROLE: &str = "migration";

/// Whether an instance is the daemon's: a release's instance (no role) or its migration.
/// Any other role (`kiln test`, `kiln run`) belongs to the command that made it, which
/// destroys it: the daemon neither acts on it nor writes anything about it in the app's
/// history, even when it shares the state directory and the app's name.
pub fn daemons_own(labels: &BTreeMap<String, String>) -> bool {
    labels
        .get(ROLE_LABEL)
        .is_none_or(|role| role == MIGRATION_ROLE)
}

/// One app the controller runs.
pub(crate) struct AppCtl {
    /// What the router serves the app as.
    pub spec: AppSpec,
    /// The router's gate for the app, as last set (and persisted in its document).
    pub gate: GateMode,
    /// Set when the router already routed the app as the daemon started (a router process
    /// that outlived the daemon before it): until then, its table stands while instances of
    /// the app have no health verdict yet, rather than a table of the few judged so far.
    pub adopted_until: Option<kiln_deploy::Millis>,
    pub listen: SocketAddr,
    pub goal: Goal,
    pub config: ReleaseConfig,
    pub image: Digest,
    pub state: RolloutState,
    /// The releases that became live, oldest first: what `kiln rollback` returns to.
    pub history: Vec<u64>,
    /// The table last published to the router.
    pub route: RouteTarget,
    /// The live database schema, when migrations set one.
    pub schema: Option<LiveSchema>,
    /// Why the router does not serve the app's address (it could not be bound when the
    /// daemon restarted); each reconcile pass tries again.
    pub unserved: Option<String>,
}

impl AppCtl {
    /// The release live now: the rolled-out one once complete, the stable one otherwise.
    pub fn live_release(&self) -> Option<u64> {
        match self.state.phase {
            Phase::Completed { .. } => Some(self.goal.release),
            Phase::Aborted { .. } | Phase::Progressing => self.goal.stable,
        }
    }

    /// An instance of `release` as the release's configuration describes it; `role` marks a
    /// one-shot (no health check, `command` instead of the image's).
    pub fn instance_spec(
        &self,
        name: &str,
        release: u64,
        role: Option<(&str, Vec<String>)>,
    ) -> InstanceSpec {
        let service = &self.config.service;
        let mut labels = BTreeMap::new();
        labels.insert(RELEASE_LABEL.to_owned(), release.to_string());
        let (health, command) = match role {
            Some((role, command)) => {
                labels.insert(ROLE_LABEL.to_owned(), role.to_owned());
                (None, Some(command))
            }
            None => (Some(self.config.health()), None),
        };
        InstanceSpec {
            image: self.image.clone(),
            app: name.to_owned(),
            env: service.env.clone(),
            writable: service
                .tmpfs()
                .map(|(path, size)| Tmpfs::new(path, size))
                .collect(),
            memory: service.memory,
            cpus: service.cpus,
            stop_grace: self.stop_grace(),
            init: service.init,
            health,
            port: None,
            container_port: Some(service.port),
            command,
            labels,
            target: self.config.target(),
            user: service.user.clone(),
            pids: service.pids,
            seccomp: service.seccomp.into(),
            network: service
                .network
                .as_deref()
                .map_or(Network::Kiln, Network::from_name),
            capabilities: service.capability_list(),
            // Filled in by the executor from `Secrets`, never kept here.
            secrets: Vec::new(),
        }
    }

    /// SIGTERM → SIGKILL for this app's instances.
    pub fn stop_grace(&self) -> Duration {
        Duration::from_millis(self.config.service.stop_grace_ms)
    }
}

/// The router's side of an app, as its release's `[route]` configures it.
pub(crate) fn router_app(name: &str, config: &ReleaseConfig) -> AppSpec {
    let route = &config.route;
    let mut app = AppConfig::new(name);
    app.hosts = route.hosts.clone();
    app.sticky = if route.sticky {
        kiln_proxy::Sticky::Cookie
    } else {
        kiln_proxy::Sticky::Off
    };
    app.request_timeout = Duration::from_millis(route.request_timeout_ms);
    app.drain_timeout = Duration::from_millis(route.drain_timeout_ms);
    app.max_body_bytes = route.max_body_bytes;
    app.max_header_bytes = usize::try_from(route.max_header_bytes).unwrap_or(usize::MAX);
    app.preview_header = route
        .preview_header
        .as_deref()
        .and_then(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).ok());
    AppSpec::new(&app, route.listen, route.tls.clone())
}

/// The router's name for a release.
pub(crate) fn release_name(n: u64) -> String {
    format!("r{n}")
}
