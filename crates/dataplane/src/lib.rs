//! `kiln-dataplane`: kiln's router as the daemon drives it — in a process of its own (the
//! data plane outlives the control plane: a daemon crash or restart is no traffic outage),
//! or embedded in the daemon's process (tests on paused time).
//!
//! - `local.rs`: [`LocalPlane`], the router itself: threads, one listener per address, each
//!   app's table and gate; it can hand all of it (sockets included) to a successor.
//! - `server.rs`: the router process (`kiln router`), a `LocalPlane` on `<state>/router.sock`.
//! - `remote.rs`: [`RemotePlane`], the daemon's client of that process.
//! - `wire.rs`: the control socket's format; `fdpass.rs`: sockets passed with `SCM_RIGHTS`.
//!
//! [`Plane`] is what the daemon holds: either one, with the same calls.

mod fdpass;
mod local;
mod remote;
mod server;
pub mod wire;

use std::net::SocketAddr;
use std::time::Duration;

pub use local::LocalPlane;
pub use remote::{RemotePlane, Spawn, hello};
pub use server::{RouterConfig, binary_identity, run, socket};

use remote::unexpected;
use wire::{Answer, AppSpec, Gate, Request, Table};

/// Why the router could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// The router failed (a socket could not be bound, a thread is gone).
    #[error("router: {0}")]
    Router(String),
    /// The request itself is wrong (an invalid table, a TLS conflict on an address).
    #[error("{0}")]
    Invalid(String),
    /// The router serves no such app.
    #[error("the router serves no app named {0}")]
    NoApp(String),
    /// No router process answers.
    #[error("{0}")]
    Unavailable(String),
}

/// The router, as the daemon drives it.
pub enum Plane {
    /// In this process.
    Embedded(LocalPlane),
    /// A router process.
    Process(std::sync::Arc<RemotePlane>),
}

impl Plane {
    /// Serves an app (kept as it is when already served so: its table and gate stay).
    /// Returns whether the router already routed it somewhere.
    pub async fn put_app(&self, spec: AppSpec) -> Result<bool, PlaneError> {
        match self {
            Plane::Embedded(p) => p.put_app(spec).await,
            Plane::Process(p) => match p.call(&Request::PutApp { app: spec }).await? {
                Answer::Served { had_table } => Ok(had_table),
                other => Err(unexpected(&other)),
            },
        }
    }

    /// Stops serving every app but `names`.
    pub async fn retain_apps(&self, names: Vec<String>) -> Result<(), PlaneError> {
        match self {
            Plane::Embedded(p) => p.retain_apps(&names).await,
            Plane::Process(p) => p.call(&Request::RetainApps { names }).await.map(drop),
        }
    }

    /// Stops serving an app.
    pub async fn remove_app(&self, name: &str) -> Result<(), PlaneError> {
        match self {
            Plane::Embedded(p) => p.remove_app(name).await,
            Plane::Process(p) => {
                let name = name.to_owned();
                p.call(&Request::RemoveApp { name }).await.map(drop)
            }
        }
    }

    /// Publishes an app's table (one atomic swap in the router).
    pub async fn set_route(
        &self,
        name: &str,
        table: &kiln_proxy::RouteTable,
    ) -> Result<(), PlaneError> {
        let table = Table::of(table);
        match self {
            Plane::Embedded(p) => p.set_route(name, &table).await,
            Plane::Process(p) => {
                let name = name.to_owned();
                p.call(&Request::SetRoute { name, table }).await.map(drop)
            }
        }
    }

    /// Sets an app's gate.
    pub async fn set_gate(
        &self,
        name: &str,
        mode: &kiln_proxy::GateMode,
    ) -> Result<(), PlaneError> {
        let gate = Gate::of(mode);
        match self {
            Plane::Embedded(p) => p.set_gate(name, &gate).await,
            Plane::Process(p) => {
                let name = name.to_owned();
                p.call(&Request::SetGate { name, gate }).await.map(drop)
            }
        }
    }

    /// How many of an app's requests are held.
    pub async fn held(&self, name: &str) -> Result<usize, PlaneError> {
        match self {
            Plane::Embedded(p) => p.held(name).await,
            Plane::Process(p) => {
                let name = name.to_owned();
                match p.call(&Request::Held { name }).await? {
                    Answer::Held { held } => Ok(held),
                    other => Err(unexpected(&other)),
                }
            }
        }
    }

    /// Waits until the instance at `addr` has no request of the app in flight (or the
    /// app's drain timeout passed).
    pub async fn drain(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<kiln_proxy::DrainOutcome, PlaneError> {
        match self {
            Plane::Embedded(p) => p.drain(name, addr).await,
            Plane::Process(p) => {
                let name = name.to_owned();
                match p.call(&Request::Drain { name, addr }).await? {
                    Answer::Drained { drain } => Ok(drain.outcome()),
                    other => Err(unexpected(&other)),
                }
            }
        }
    }

    /// A release's measurements over the last `window`.
    pub async fn snapshot(
        &self,
        name: &str,
        release: &str,
        window: Duration,
    ) -> Result<Option<kiln_proxy::Snapshot>, PlaneError> {
        match self {
            Plane::Embedded(p) => p.snapshot(name, release, window).await,
            Plane::Process(p) => {
                let request = Request::Snapshot {
                    name: name.to_owned(),
                    release: release.to_owned(),
                    window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
                };
                match p.call(&request).await? {
                    Answer::Snapshot { measurements } => Ok(measurements.map(|m| m.snapshot())),
                    other => Err(unexpected(&other)),
                }
            }
        }
    }

    /// Every app's metrics in the Prometheus text format.
    pub async fn metrics(&self) -> Result<String, PlaneError> {
        match self {
            Plane::Embedded(p) => Ok(p.metrics().await),
            Plane::Process(p) => match p.call(&Request::Metrics).await? {
                Answer::Metrics { text } => Ok(text),
                other => Err(unexpected(&other)),
            },
        }
    }

    /// Whether the router changed since this was last asked (a router process that crashed
    /// and started again, or was replaced): then it is fed every app again.
    pub fn take_resync(&self) -> bool {
        match self {
            Plane::Embedded(_) => false,
            Plane::Process(p) => p.take_resync(),
        }
    }

    /// The daemon stops: an embedded router drains its listeners; a router process is only
    /// left (it keeps serving, and exits once it serves no app).
    pub async fn shutdown(&self) {
        match self {
            Plane::Embedded(p) => p.shutdown().await,
            Plane::Process(p) => p.detach(),
        }
    }
}
