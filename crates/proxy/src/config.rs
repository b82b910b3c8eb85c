//! The router's own configuration types: what a listener and an app need, with defaults.
//!
//! These are domain values, not a file format: the daemon fills them from `kiln.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hyper::header::HeaderName;

/// One listen address and how it accepts connections.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Where to accept connections.
    pub listen: SocketAddr,
    /// Terminate TLS with these PEM files; plain TCP (HTTP/1.1 and h2c) when `None`.
    pub tls: Option<TlsFiles>,
    /// How long a client may take to send a request head before its connection is closed;
    /// also how long a connection may stay idle (HTTP/1.1 between requests, HTTP/2 with no
    /// stream open) before it is.
    pub header_read_timeout: Duration,
    /// How long a client may leave the response it is sent untaken (a full receive window)
    /// before its connection is closed, as nginx's `send_timeout`: the kernel's
    /// `TCP_USER_TIMEOUT` on its socket. Without it a client that stops reading holds its
    /// request's instance connection for as long as it likes.
    pub send_timeout: Duration,
    /// Bind with `SO_REUSEPORT`, so that another listener can bind the same address while
    /// this one serves (the daemon rebinds an address this way when the apps sharing it
    /// change). The router's threads serve copies of one socket instead (`Listener::try_clone`).
    pub reuse_port: bool,
    /// Where its responses are logged; not at all when `None`.
    pub access_log: Option<crate::AccessLog>,
}

impl ListenerConfig {
    /// A plain-TCP listener with the default limits.
    #[must_use]
    pub fn new(listen: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            listen,
            tls: None,
            header_read_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            reuse_port: false,
            access_log: None,
        }
    }
}

/// PEM files for TLS termination.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Whether a client stays on the release it first got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sticky {
    /// Every request is weighted afresh.
    #[default]
    Off,
    /// A cookie ([`crate::STICKY_COOKIE`]) remembers the release while it keeps a weight.
    Cookie,
}

/// One app behind a listener.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The app's name, used in metrics labels and error messages.
    pub name: String,
    /// Host names routed to this app (case-insensitive, without port). A leading `*.` makes a
    /// wildcard (`*.example.com` matches `a.example.com` and `a.b.example.com`, not
    /// `example.com`); an exact name wins over wildcards, the longest wildcard over shorter
    /// ones. Empty means "every host", which is allowed only when the app is alone on its
    /// listen address.
    pub hosts: Vec<String>,
    /// Sticky sessions.
    pub sticky: Sticky,
    /// A request header whose value names a release to pin the request to (for smoke-testing a
    /// release that has no weight yet). Off when `None`.
    pub preview_header: Option<HeaderName>,
    /// The longest wait for an upstream's response head, connect and retries included.
    /// Response bodies are not bounded by it, so long streams (SSE) keep flowing.
    pub request_timeout: Duration,
    /// The longest [`crate::App::drain`] waits for an instance's in-flight requests.
    pub drain_timeout: Duration,
    /// The largest request body accepted, in bytes (413 beyond it); `None` for no limit.
    pub max_body_bytes: Option<u64>,
    /// The largest request head accepted, in bytes (at least 8192; 431 beyond it). A head is
    /// read before its `Host` names the app, so a listener reads up to the largest limit of
    /// its apps, and each app's own is checked once the head is parsed.
    pub max_header_bytes: usize,
}

impl AppConfig {
    /// An app with no host names, no stickiness, no preview header, a 30 s request timeout, a
    /// 30 s drain timeout, no body limit and heads of up to 64 KiB.
    #[must_use]
    pub fn new(name: impl Into<String>) -> AppConfig {
        AppConfig {
            name: name.into(),
            hosts: Vec::new(),
            sticky: Sticky::Off,
            preview_header: None,
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            max_body_bytes: None,
            max_header_bytes: 64 * 1024,
        }
    }
}
