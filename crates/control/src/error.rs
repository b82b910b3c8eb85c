//! `ControlError`: what can go wrong in a controller call. `api.rs` maps each variant to an
//! HTTP status, in one place.

/// What can go wrong in a controller call.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such app (or release).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what is happening (a rollout in progress, a lock).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The caller could not be authenticated (a webhook's signature does not verify).
    #[error("{0}")]
    Unauthorized(String),
    /// The request is well-formed but not allowed: the deploy policy refuses the image.
    #[error("{0}")]
    Forbidden(String),
    /// A stored record cannot be decoded: the app is not run from it.
    #[error("{0}")]
    Corrupt(String),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] kiln_ledger::Error),
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] kiln_runtime::ProviderError),
    /// The router refused a listener or a table.
    #[error("router: {0}")]
    Router(String),
    /// Something in the daemon itself failed (a task that panicked).
    #[error("internal: {0}")]
    Internal(String),
}

/// A controller call's result.
pub type Result<T> = std::result::Result<T, ControlError>;

impl From<kiln_dataplane::PlaneError> for ControlError {
    fn from(e: kiln_dataplane::PlaneError) -> ControlError {
        match e {
            kiln_dataplane::PlaneError::Invalid(m) => ControlError::Invalid(m),
            kiln_dataplane::PlaneError::Router(m) | kiln_dataplane::PlaneError::Unavailable(m) => {
                ControlError::Router(m)
            }
            e @ kiln_dataplane::PlaneError::NoApp(_) => ControlError::Router(e.to_string()),
        }
    }
}
