//! kiln's control plane: what `kiln serve` runs.
//!
//! - [`controller`]: the [`Controller`] — ledger, provider, router and the reconciler loop
//!   that executes the rollout state machine's decisions.
//! - [`config`]: [`ReleaseConfig`], a release's runtime configuration as stored.
//! - [`api`]: the HTTP/JSON API over a Unix socket (and optional TCP with a bearer token),
//!   the one place errors map to HTTP statuses; [`client`]: the CLI's side of it.
//!
//! **API boundary:** no clap, no terminal output; the binary owns those.

pub mod api;
pub mod client;
pub mod config;
pub mod controller;

pub use config::{ConfigError, ReleaseConfig};
pub use controller::{
    AppStatus, ApplyRequest, ControlError, Controller, ControllerConfig, InstanceStatus,
    LiveSchema, RollbackOutcome,
};
