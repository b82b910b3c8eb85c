//! `kiln-proxy`: kiln's router, a weighted, health-aware HTTP reverse proxy that kiln embeds
//! in-process.
//!
//! The router owns the traffic path: it accepts client connections (HTTP/1.1, HTTP/2 as h2c or
//! over TLS, `Upgrade` tunnels), picks an app by `Host`, a release by weight (or by sticky
//! cookie or preview header), an instance by least outstanding requests, and streams the
//! request and response through without buffering. It measures every response per release so
//! that canary analysis can judge a release without an external metrics system.
//!
//! It deliberately knows nothing about the ledger, providers or `kiln.toml`: its caller
//! translates those into [`AppConfig`], [`ListenerConfig`] and [`RouteTable`] values.
//!
//! How the daemon drives it:
//!
//! 1. [`App::new`] per app, then [`Listener::bind`] per listen address with the apps that share
//!    it, then [`Listener::serve`] on a task.
//! 2. [`App::set_route`] publishes a new [`RouteTable`] atomically; it returns the instances
//!    that left the route, and [`App::drain`] resolves when each one has no request in flight
//!    (or its drain timeout passed), after which the provider may stop it. [`App::set_gate`]
//!    pauses the app (new requests held) or closes it for maintenance.
//!
//! Every request reaches its instance with an `X-Request-Id` (the client's if well-formed,
//! else a new one; `request_id.rs`), returned on its response; an [`AccessLog`] given in a
//! listener's config logs responses as JSON lines.
//!
//! 3. [`App::snapshot`] reads a release's measurements over the last seconds;
//!    [`render_prometheus`] writes every app's metrics in the Prometheus text format.

mod access_log;
mod app;
mod batch;
mod body;
mod client_conn;
mod closing;
mod config;
mod conn_timer;
mod error;
mod forward;
mod gate;
mod hosts;
mod instance;
mod listener;
mod peer;
mod request_id;
mod route;
mod spread;
mod stats;
mod sticky;
mod upstream;
mod workers;
mod yielding;

pub use access_log::{AccessLog, AccessLogConfig, AccessLogError, AccessLogTarget};
pub use app::{App, DrainOutcome, RouteChange};
pub use config::{AppConfig, ListenerConfig, Sticky, TlsFiles};
pub use error::{ConfigError, ListenerError, RouteError};
pub use gate::GateMode;
pub use listener::Listener;
pub use route::{Instance, RouteRelease, RouteTable};
pub use stats::{Snapshot, WINDOW_MAX_SECONDS, render_prometheus};
pub use sticky::STICKY_COOKIE;
pub use workers::{Serving, Workers, WorkersConfig};
