//! kiln's control plane: what `kiln serve` runs.
//!
//! - [`controller`]: the [`Controller`], the conductor: apps, apply, rollback, promote,
//!   abort, scale, down (`pause.rs`: pause, resume, maintenance); `reconcile.rs` is its loop (observe → decide → persist → act) and
//!   `status.rs` what it reports.
//! - `executor.rs`: carries the planner's actions out through the provider and records
//!   typed events; `create.rs` its creates, in the background; [`oneshot`]: create → start → wait → output → destroy, for migrations and
//!   `kiln test`.
//! - The router is `kiln_dataplane`'s [`kiln_dataplane::Plane`] (in this process, or a
//!   router process the daemon feeds), held by the executor.
//! - [`gate`]: what every apply must pass, whichever client sent it.
//! - [`blobs`]: images sent by a remote client, streamed into the daemon's store.
//! - [`registry`]: the store served read-only over the OCI Distribution API, for nodes to
//!   pull from.
//! - [`config`]: [`ReleaseConfig`], a release's runtime configuration as stored.
//! - [`clock`]: the injected [`Clock`].
//! - `metrics.rs`: the daemon's own Prometheus counters, served after the router's on
//!   `/metrics`.
//! - [`api`]: the HTTP/JSON API, the one place errors map to HTTP statuses; `peer.rs`: who
//!   its connections come from; [`client`]: the CLI's side of it; [`dto`]: its data.
//!
//! **API boundary:** no clap, no terminal output; the binary owns those. No decision is
//! made here that `kiln_deploy` could make.

pub mod api;
mod app;
pub mod blobs;
pub mod client;
pub mod clock;
pub mod config;
pub mod controller;
mod create;
mod doc;
pub mod dto;
mod error;
mod executor;
pub mod gate;
mod metrics;
pub mod oneshot;
mod pause;
mod peer;
pub mod policy;
mod reconcile;
pub mod registry;
mod rollback;
pub mod secrets;
pub mod sources;
mod status;
pub mod ui;

pub use app::{MIGRATION_ROLE, RELEASE_LABEL, ROLE_LABEL, daemons_own};
pub use clock::{Clock, SystemClock, TokioClock};
pub use config::{ConfigError, PolicyConfig, ReleaseConfig};
pub use controller::{Controller, ControllerConfig, RouterChoice};
pub use dto::{AppStatus, ApplyRequest, GateStatus, InstanceStatus, LiveSchema, RollbackOutcome};
pub use error::ControlError;
pub use gate::Attestations;
pub use peer::local_actor;
pub use reconcile::TICK;
pub use status::{plan_current, plan_next};
