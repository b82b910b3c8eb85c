//! The `Provider` trait: the one seam between kiln and whatever runs instances (the local
//! provider on runc now; a Docker Engine and cluster engines later), and its error type.
//!
//! The trait is deliberately small and closed. Each method documents when it is legal and
//! what it guarantees; every method is idempotent where the controller may retry it after a
//! crash (`stop`, `destroy`). It knows nothing of releases, routes or strategies: those are
//! the controller's, which calls this trait.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};

use crate::types::{Digest, DriftReport, Health, InstanceId, InstanceSpec, LogChunk, Observation};

/// Runs instances.
///
/// Lifecycle: [`create`](Provider::create) → [`start`](Provider::start) →
/// [`stop`](Provider::stop) → [`destroy`](Provider::destroy). `destroy` is legal in any state
/// and after a crash; every other call on a destroyed instance is
/// [`ProviderError::NotFound`].
#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's name as `[target] provider` spells it.
    fn name(&self) -> &'static str;

    /// Prepares an instance of `spec.image` (filesystem, runtime config, port) without
    /// starting it. Its id is new and unique.
    async fn create(&self, spec: InstanceSpec) -> Result<InstanceId, ProviderError>;

    /// Starts a created instance; returns once its process was launched (health is
    /// observed separately). Legal only in `Created`.
    async fn start(&self, id: &InstanceId) -> Result<(), ProviderError>;

    /// Sends SIGTERM, waits up to `grace` for the process to exit, then SIGKILL. Returns
    /// once it exited. Stopping a stopped instance does nothing.
    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), ProviderError>;

    /// Removes everything the instance owns — process, mounts, files — whatever state it is
    /// in, including after a crash half-way through `create` or `destroy`. Destroying an
    /// unknown instance succeeds.
    async fn destroy(&self, id: &InstanceId) -> Result<(), ProviderError>;

    /// The instance's state, exit code, health and address now.
    async fn observe(&self, id: &InstanceId) -> Result<Observation, ProviderError>;

    /// Every instance this provider holds, including ones created by an earlier kiln
    /// process: listing adopts them (their health checks and drift watches resume) instead
    /// of killing them.
    async fn list(&self) -> Result<Vec<Observation>, ProviderError>;

    /// The instance's output from byte `from` of its current log (0 for the start; pass
    /// back [`LogChunk::next`] to follow). Logs are size-capped and rotated, so old output
    /// may be gone.
    async fn logs(&self, id: &InstanceId, from: u64) -> Result<LogChunk, ProviderError>;

    /// A full check for drift now (the periodic rescan); `None` when the instance is clean.
    async fn check_drift(&self, id: &InstanceId) -> Result<Option<DriftReport>, ProviderError>;

    /// Drift as it is found (sub-second on the local provider), for every instance.
    fn drift_events(&self) -> broadcast::Receiver<DriftReport>;

    /// Follows an instance's health; the receiver sees every change.
    async fn health(&self, id: &InstanceId) -> Result<watch::Receiver<Health>, ProviderError>;

    /// Waits for the instance's process to exit and returns its exit code (`None` when the
    /// provider could not see it, e.g. it exited while kiln was not running).
    async fn wait(&self, id: &InstanceId) -> Result<Option<i32>, ProviderError>;
}

/// What can go wrong running instances. Every variant names the instance, image, path or
/// command involved.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No such instance.
    #[error("instance {0} not found")]
    NotFound(InstanceId),
    /// The call is not legal in the instance's state.
    #[error("instance {id}: cannot {action} while {state}")]
    InvalidState {
        /// The instance.
        id: InstanceId,
        /// What was asked.
        action: &'static str,
        /// The state it is in.
        state: &'static str,
    },
    /// The image is not in the store or cannot be read.
    #[error("image {digest}: {message}")]
    Image {
        /// The image.
        digest: Digest,
        /// What is wrong.
        message: String,
    },
    /// A layer could not be unpacked into the layer cache.
    #[error("layer {digest}: {message}")]
    Layer {
        /// The layer.
        digest: Digest,
        /// What is wrong.
        message: String,
    },
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What kiln was doing.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A mount or unmount failed.
    #[error("{op} {}: {source}", target.display())]
    Mount {
        /// `mount overlay`, `unmount`…
        op: &'static str,
        /// The mount point.
        target: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The OCI runtime binary failed.
    #[error("instance {id}: `{command}` failed: {message}")]
    Runtime {
        /// The instance.
        id: InstanceId,
        /// The command line, for reproducing it by hand.
        command: String,
        /// Its stderr or why it could not run.
        message: String,
    },
    /// The runtime configuration cannot be built (bad user, bad path, no free port…).
    #[error("instance {id}: {message}")]
    Config {
        /// The instance.
        id: InstanceId,
        /// What is wrong.
        message: String,
    },
    /// The Docker Engine refused or failed a call.
    #[error("Docker Engine: cannot {what}: {message}")]
    Engine {
        /// What kiln asked, naming the instance or image.
        what: String,
        /// The engine's answer.
        message: String,
    },
    /// An instance's own network could not be set up or torn down.
    #[error("instance {id}: network: {source}")]
    Network {
        /// The instance.
        id: InstanceId,
        /// What failed.
        source: crate::local::network::NetworkError,
    },
    /// An instance record on disk cannot be read.
    #[error("instance record {}: {message}", path.display())]
    Record {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ProviderError {
    /// An [`ProviderError::Io`] for `op` on `path`.
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ProviderError {
        let path = path.into();
        move |source| ProviderError::Io { op, path, source }
    }
}
