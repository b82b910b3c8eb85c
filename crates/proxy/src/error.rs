//! The router's typed errors: bad configuration, bad route tables, and failures to listen.
//!
//! Errors met while serving a request are not here: they become an HTTP response to that
//! client (see `forward`) and a measurement, never an error returned to the caller.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A listener or app configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Two apps on one listen address claim the same host name.
    #[error("host {host:?} is claimed by both app {first:?} and app {second:?}")]
    DuplicateHost {
        /// The host name, normalised (lowercase, no port).
        host: String,
        /// The app that claimed it first.
        first: String,
        /// The app that claimed it again.
        second: String,
    },
    /// An app without host names shares its address with other apps, so it could only be
    /// reached by guessing.
    #[error(
        "app {app:?} has no host names but shares its listen address with other apps; give it `hosts`"
    )]
    AppWithoutHosts {
        /// The app without host names.
        app: String,
    },
    /// A host name that cannot appear in a `Host` header.
    #[error("app {app:?}: host name {host:?} is not valid")]
    InvalidHost {
        /// The app that declared it.
        app: String,
        /// The host name as given.
        host: String,
    },
    /// Two apps on one listener have the same name, so their metrics would collide.
    #[error("two apps on one listener are named {app:?}")]
    DuplicateApp {
        /// The repeated name.
        app: String,
    },
    /// A listener was given no app at all.
    #[error("listener {listen} has no app")]
    NoApps {
        /// The listen address.
        listen: SocketAddr,
    },
    /// The header size limit is below what HTTP/1.1 parsing needs.
    #[error("app {app}: max_header_bytes must be at least 8192, got {got}")]
    HeaderLimitTooSmall {
        /// The app whose limit it is.
        app: String,
        /// The configured limit.
        got: usize,
    },
}

/// A route table that cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Two releases have the same name.
    #[error("release {name:?} appears twice in the route table")]
    DuplicateRelease {
        /// The repeated name.
        name: String,
    },
    /// A release name that cannot be carried in a cookie or a header.
    #[error("release name {name:?} is not valid: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    InvalidReleaseName {
        /// The name as given.
        name: String,
    },
    /// One instance address is listed twice; an instance runs exactly one release.
    #[error("instance {addr} appears twice in the route table")]
    DuplicateInstance {
        /// The repeated address.
        addr: SocketAddr,
    },
    /// The weights' smallest exact cycle is too long to precompute.
    #[error(
        "weights {weights:?} need a cycle of {period} picks; use coarser weights (at most {max} after dividing by their common factor)"
    )]
    WeightsTooFine {
        /// The weights as given.
        weights: Vec<u32>,
        /// Their sum after dividing by their greatest common divisor.
        period: u64,
        /// The largest cycle allowed.
        max: u64,
    },
}

/// A listener that could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A TLS certificate or key file could not be read or parsed.
    #[error("cannot load TLS {what} from {path}: {message}")]
    TlsFile {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        message: String,
    },
    /// rustls rejected the certificate and key pair.
    #[error("TLS certificate {cert} and key {key} do not form a usable pair: {source}")]
    TlsConfig {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
}
