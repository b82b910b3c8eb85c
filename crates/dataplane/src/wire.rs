//! What travels on the router's control socket: one JSON request per line, one JSON answer
//! per line. These are wire types (serde); the router's own types (`kiln_proxy`) are not,
//! so a change there never silently changes this format.
//!
//! **Invariant:** a daemon and a router of neighbouring versions understand each other (an
//! upgrade runs the new daemon beside the old router, and hands the old router's state to the
//! new one): unknown fields are ignored, and a field is only ever added with a default.
//! [`PROTOCOL`] counts the changes that break that rule.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The format's version: a router answering another one is replaced rather than spoken to.
pub const PROTOCOL: u32 = 1;

/// One app as the router serves it: its listener and its `[route]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// The app's name.
    pub name: String,
    /// The address it is served on.
    pub listen: SocketAddr,
    /// The PEM files (certificate, key) its address terminates TLS with.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Host names routed to it.
    pub hosts: Vec<String>,
    /// Whether a cookie keeps a client on its release.
    pub sticky: bool,
    /// The header that pins a request to a release, if any.
    pub preview_header: Option<String>,
    /// The longest wait for an instance's response head.
    pub request_timeout_ms: u64,
    /// The longest a drain waits for an instance's requests.
    pub drain_timeout_ms: u64,
    /// The largest request body, if limited.
    pub max_body_bytes: Option<u64>,
    /// The largest request head.
    pub max_header_bytes: u64,
}

impl AppSpec {
    /// The spec of an app with `config`, served on `listen` with `tls`.
    pub fn new(
        config: &kiln_proxy::AppConfig,
        listen: SocketAddr,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> AppSpec {
        AppSpec {
            name: config.name.clone(),
            listen,
            tls,
            hosts: config.hosts.clone(),
            sticky: config.sticky == kiln_proxy::Sticky::Cookie,
            preview_header: config
                .preview_header
                .as_ref()
                .map(|h| h.as_str().to_owned()),
            request_timeout_ms: millis(config.request_timeout),
            drain_timeout_ms: millis(config.drain_timeout),
            max_body_bytes: config.max_body_bytes,
            max_header_bytes: u64::try_from(config.max_header_bytes).unwrap_or(u64::MAX),
        }
    }

    /// The router's configuration of the app.
    pub fn config(&self) -> kiln_proxy::AppConfig {
        let mut c = kiln_proxy::AppConfig::new(self.name.clone());
        c.hosts.clone_from(&self.hosts);
        c.sticky = if self.sticky {
            kiln_proxy::Sticky::Cookie
        } else {
            kiln_proxy::Sticky::Off
        };
        c.preview_header = self
            .preview_header
            .as_deref()
            .and_then(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).ok());
        c.request_timeout = Duration::from_millis(self.request_timeout_ms);
        c.drain_timeout = Duration::from_millis(self.drain_timeout_ms);
        c.max_body_bytes = self.max_body_bytes;
        c.max_header_bytes = usize::try_from(self.max_header_bytes).unwrap_or(usize::MAX);
        c
    }
}

/// A route table: releases, weights, instances.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// The releases, in order.
    pub releases: Vec<TableRelease>,
}

/// One release of a [`Table`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRelease {
    /// Its name (`r12`).
    pub name: String,
    /// Its weight.
    pub weight: u32,
    /// Its instances' addresses.
    pub instances: Vec<SocketAddr>,
    /// Those of its instances that get no new requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy: Vec<SocketAddr>,
}

impl Table {
    /// The wire form of `table`.
    pub fn of(table: &kiln_proxy::RouteTable) -> Table {
        Table {
            releases: table
                .releases()
                .iter()
                .map(|r| TableRelease {
                    name: r.name.clone(),
                    weight: r.weight,
                    instances: r.instances.iter().map(|i| i.addr).collect(),
                    unhealthy: r
                        .instances
                        .iter()
                        .filter(|i| !i.healthy)
                        .map(|i| i.addr)
                        .collect(),
                })
                .collect(),
        }
    }

    /// The router's table, checked as [`kiln_proxy::RouteTable::new`] checks it.
    pub fn route_table(&self) -> Result<kiln_proxy::RouteTable, kiln_proxy::RouteError> {
        let releases = self
            .releases
            .iter()
            .map(|r| kiln_proxy::RouteRelease {
                name: r.name.clone(),
                weight: r.weight,
                instances: r
                    .instances
                    .iter()
                    .map(|addr| kiln_proxy::Instance {
                        addr: *addr,
                        healthy: !r.unhealthy.contains(addr),
                    })
                    .collect(),
            })
            .collect();
        kiln_proxy::RouteTable::new(releases)
    }
}

/// What the router does with an app's new requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Gate {
    /// Forward them.
    #[default]
    Open,
    /// Hold them.
    Paused {
        /// The longest one is held.
        max_hold_ms: u64,
        /// How many are held at most.
        max_held: usize,
    },
    /// Answer 503 with a message.
    Maintenance {
        /// The message.
        message: String,
        /// `Retry-After`, in seconds.
        retry_after_s: u64,
    },
}

impl Gate {
    /// The wire form of `mode`.
    pub fn of(mode: &kiln_proxy::GateMode) -> Gate {
        match mode {
            kiln_proxy::GateMode::Open => Gate::Open,
            kiln_proxy::GateMode::Paused { max_hold, max_held } => Gate::Paused {
                max_hold_ms: millis(*max_hold),
                max_held: *max_held,
            },
            kiln_proxy::GateMode::Maintenance {
                message,
                retry_after,
            } => Gate::Maintenance {
                message: message.to_string(),
                retry_after_s: retry_after.as_secs(),
            },
        }
    }

    /// The router's gate mode.
    pub fn mode(&self) -> kiln_proxy::GateMode {
        match self {
            Gate::Open => kiln_proxy::GateMode::Open,
            Gate::Paused {
                max_hold_ms,
                max_held,
            } => kiln_proxy::GateMode::Paused {
                max_hold: Duration::from_millis(*max_hold_ms),
                max_held: *max_held,
            },
            Gate::Maintenance {
                message,
                retry_after_s,
            } => kiln_proxy::GateMode::Maintenance {
                message: message.as_str().into(),
                retry_after: Duration::from_secs(*retry_after_s),
            },
        }
    }
}

/// A release's measurements (see [`kiln_proxy::Snapshot`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurements {
    /// Responses.
    pub requests: u64,
    /// 5xx responses.
    pub errors: u64,
    /// Median time to the response head, in microseconds.
    pub p50_us: u64,
    /// 99th percentile, in microseconds.
    pub p99_us: u64,
}

impl Measurements {
    /// The wire form of `s`.
    pub fn of(s: &kiln_proxy::Snapshot) -> Measurements {
        Measurements {
            requests: s.requests,
            errors: s.errors,
            p50_us: u64::try_from(s.p50.as_micros()).unwrap_or(u64::MAX),
            p99_us: u64::try_from(s.p99.as_micros()).unwrap_or(u64::MAX),
        }
    }

    /// The router's form.
    pub fn snapshot(&self) -> kiln_proxy::Snapshot {
        kiln_proxy::Snapshot {
            requests: self.requests,
            errors: self.errors,
            #[allow(clippy::cast_precision_loss)]
            error_rate: if self.requests == 0 {
                0.0
            } else {
                self.errors as f64 / self.requests as f64
            },
            p50: Duration::from_micros(self.p50_us),
            p99: Duration::from_micros(self.p99_us),
        }
    }
}

/// How a drain ended (see [`kiln_proxy::DrainOutcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Drain {
    /// No request in flight.
    Drained,
    /// Requests were still in flight at the timeout.
    TimedOut {
        /// How many.
        in_flight: usize,
    },
    /// The instance is routed.
    StillRouted,
}

impl Drain {
    /// The wire form of `o`.
    pub fn of(o: kiln_proxy::DrainOutcome) -> Drain {
        match o {
            kiln_proxy::DrainOutcome::Drained => Drain::Drained,
            kiln_proxy::DrainOutcome::TimedOut { in_flight } => Drain::TimedOut { in_flight },
            kiln_proxy::DrainOutcome::StillRouted => Drain::StillRouted,
        }
    }

    /// The router's form.
    pub fn outcome(self) -> kiln_proxy::DrainOutcome {
        match self {
            Drain::Drained => kiln_proxy::DrainOutcome::Drained,
            Drain::TimedOut { in_flight } => kiln_proxy::DrainOutcome::TimedOut { in_flight },
            Drain::StillRouted => kiln_proxy::DrainOutcome::StillRouted,
        }
    }
}

/// A request to the router.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Who are you? With `attach`, the connection stays open for as long as the daemon
    /// runs: the router knows a daemon feeds it.
    Hello {
        /// Keep the connection as the daemon's attachment.
        attach: bool,
    },
    /// Serve an app (or keep serving it as it is, its table and gate kept).
    PutApp {
        /// The app.
        app: AppSpec,
    },
    /// Stop serving every app not named.
    RetainApps {
        /// The apps to keep.
        names: Vec<String>,
    },
    /// Stop serving an app.
    RemoveApp {
        /// Its name.
        name: String,
    },
    /// Publish an app's table.
    SetRoute {
        /// The app.
        name: String,
        /// The table.
        table: Table,
    },
    /// Set an app's gate.
    SetGate {
        /// The app.
        name: String,
        /// The gate.
        gate: Gate,
    },
    /// How many of an app's requests are held.
    Held {
        /// The app.
        name: String,
    },
    /// Wait for an instance of an app to have no request in flight.
    Drain {
        /// The app.
        name: String,
        /// The instance.
        addr: SocketAddr,
    },
    /// A release's measurements over the last `window_ms`.
    Snapshot {
        /// The app.
        name: String,
        /// The release (`r12`).
        release: String,
        /// The window.
        window_ms: u64,
    },
    /// Every app's metrics, in Prometheus text.
    Metrics,
    /// Stop serving: drain every listener, then exit.
    Shutdown,
    /// Hand every listening socket and app to the process asking (a new router).
    Handoff,
}

/// The router's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// Done.
    Ok,
    /// The router's identity.
    Hello(RouterInfo),
    /// An app is served; `had_table` when it was already, with a non-empty table.
    Served {
        /// Whether the router already had a table for it.
        had_table: bool,
    },
    /// Held requests.
    Held {
        /// How many.
        held: usize,
    },
    /// A drain's end.
    Drained {
        /// How it ended.
        drain: Drain,
    },
    /// Measurements (none when the release is not routed).
    Snapshot {
        /// They.
        measurements: Option<Measurements>,
    },
    /// Prometheus text.
    Metrics {
        /// The text.
        text: String,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
    /// The router is handing over to a new router process: the change is refused, and is to
    /// be asked again of the new one.
    HandingOver,
}

/// Who a router is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterInfo {
    /// The format it speaks ([`PROTOCOL`]).
    #[serde(default)]
    pub protocol: u32,
    /// Its process.
    pub pid: u32,
    /// Different for every router process started.
    pub boot: String,
    /// The binary it runs (device, inode, size, modification time of its executable): a
    /// daemon running another one replaces the router.
    pub binary: String,
    /// Its arguments after the program: a daemon that would start it with others replaces
    /// it.
    #[serde(default)]
    pub args: Vec<String>,
    /// The apps it serves.
    #[serde(default)]
    pub apps: Vec<String>,
}

/// Everything a router hands to its successor, beside its listening sockets (passed with
/// the message, in the order of `listeners`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    /// The apps, with their tables and gates.
    pub apps: Vec<HandedApp>,
    /// The listen addresses, in the order of the sockets passed.
    pub listeners: Vec<SocketAddr>,
}

/// One app in a [`Handover`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedApp {
    /// The app.
    pub spec: AppSpec,
    /// Its table.
    pub table: Table,
    /// Its gate.
    pub gate: Gate,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_neighbouring_version_is_understood() {
        // A newer router's hello, with a field this one does not know, and an older one's,
        // without the fields added since.
        let newer = r#"{"answer":"hello","protocol":1,"pid":7,"boot":"7-1","binary":"b","args":[],"apps":["web"],"uptime_ms":5}"#;
        let Answer::Hello(info) = serde_json::from_str::<Answer>(newer).unwrap() else {
            panic!("not a hello");
        };
        assert_eq!(info.apps, vec!["web".to_owned()]);
        let older = r#"{"answer":"hello","pid":7,"boot":"7-1","binary":"b"}"#;
        let Answer::Hello(info) = serde_json::from_str::<Answer>(older).unwrap() else {
            panic!("not a hello");
        };
        assert_eq!((info.protocol, info.args.len()), (0, 0));
        let table =
            r#"{"releases":[{"name":"r1","weight":1,"instances":["10.0.0.1:80"],"zone":"a"}]}"#;
        let table: Table = serde_json::from_str(table).unwrap();
        assert_eq!(table.route_table().unwrap().releases().len(), 1);
    }

    #[test]
    fn tables_keep_health_across_the_wire() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let table = kiln_proxy::RouteTable::new(vec![kiln_proxy::RouteRelease {
            name: "r1".to_owned(),
            weight: 3,
            instances: vec![
                kiln_proxy::Instance::healthy(a),
                kiln_proxy::Instance {
                    addr: b,
                    healthy: false,
                },
            ],
        }])
        .unwrap();
        let wire: Table =
            serde_json::from_str(&serde_json::to_string(&Table::of(&table)).unwrap()).unwrap();
        assert_eq!(wire.route_table().unwrap(), table);
    }

    #[test]
    fn an_invalid_table_is_refused_as_the_router_would() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let twice = Table {
            releases: vec![
                TableRelease {
                    name: "r1".to_owned(),
                    weight: 1,
                    instances: vec![a],
                    unhealthy: Vec::new(),
                },
                TableRelease {
                    name: "r2".to_owned(),
                    weight: 1,
                    instances: vec![a],
                    unhealthy: Vec::new(),
                },
            ],
        };
        assert!(twice.route_table().is_err());
    }
}
