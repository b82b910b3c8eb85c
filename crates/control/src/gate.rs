//! The daemon's own gates on what it records: whatever client sent an apply (the CLI, the raw
//! API, later GitOps or the dashboard), it passes these here or is refused with a 400 naming
//! the field.

use kiln_runtime::Digest;

use crate::dto::ApplyRequest;
use crate::error::{ControlError, Result};

/// The most instances an app may ask for (as `[service] replicas` allows).
pub const MAX_REPLICAS: u32 = 1000;

/// Where the daemon reads an image's test attestation (the binary backs it with the store).
pub trait Attestations: Send + Sync {
    /// Whether `image` passed its `[image.test]`; `Err` when the image is unknown or its
    /// attestation unreadable.
    fn passed(&self, image: &Digest) -> std::result::Result<bool, String>;

    /// What `image` carries, checked against `keys` (OpenSSH `ssh-ed25519` lines): which of
    /// them signed it and its attestations. Without a store that holds more, only the test
    /// attestation, unsigned.
    fn evidence(
        &self,
        image: &Digest,
        keys: &[String],
    ) -> std::result::Result<crate::policy::Evidence, String> {
        let _ = keys;
        let tested = if self.passed(image)? {
            crate::policy::Attested::Unsigned
        } else {
            crate::policy::Attested::Absent
        };
        Ok(crate::policy::Evidence {
            tested,
            ..Default::default()
        })
    }

    /// The same store, as the API's image upload sees it (`blobs.rs`); `None` when images
    /// cannot be sent to this daemon.
    fn image_store(
        self: std::sync::Arc<Self>,
    ) -> Option<std::sync::Arc<dyn crate::blobs::ImageStore>> {
        None
    }
}

/// An app name as the API and the spec allow it: `^[a-z][a-z0-9-]{0,39}$`.
pub fn check_app_name(app: &str) -> Result<()> {
    let mut chars = app.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if first_ok && rest_ok && app.len() <= 40 {
        return Ok(());
    }
    let shown: String = app.chars().take(60).collect();
    Err(ControlError::Invalid(format!(
        "app: {shown:?} is not an app name (a lowercase letter, then up to 39 lowercase \
         letters, digits or `-`)"
    )))
}

/// A name the API accepts in a path or a query: what the ledger can hold (letters, digits,
/// `-`, `_`, `.`; at most 128), so a name no app can have is a 400, not a ledger error. New
/// apps are held to [`check_app_name`].
pub fn check_stored_name(app: &str) -> Result<()> {
    let ok = !app.is_empty()
        && app.len() <= 128
        && app
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        return Ok(());
    }
    let shown: String = app.chars().take(60).collect();
    Err(ControlError::Invalid(format!(
        "app: {shown:?} is not an app name (letters, digits, `-`, `_` or `.`, at most 128)"
    )))
}

/// A replica count the daemon will run.
pub fn check_replicas(replicas: u32) -> std::result::Result<(), String> {
    if (1..=MAX_REPLICAS).contains(&replicas) {
        Ok(())
    } else {
        Err(format!(
            "replicas must be between 1 and {MAX_REPLICAS}, got {replicas}"
        ))
    }
}

/// Everything an apply must pass before anything is recorded: the app name, the image
/// digest, the configuration in full, and — when the release's spec has `[image.test]` —
/// a passed test attestation for the image.
pub fn check_apply(
    app: &str,
    req: &ApplyRequest,
    attestations: Option<&dyn Attestations>,
) -> Result<Digest> {
    check_stored_name(app)?;
    let image =
        Digest::parse(&req.image).map_err(|e| ControlError::Invalid(format!("image: {e}")))?;
    if let Err(problems) = req.config.validate() {
        let all: Vec<String> = problems.iter().map(|p| format!("config.{p}")).collect();
        return Err(ControlError::Invalid(all.join("; ")));
    }
    if req.config.test_required() {
        let passed = match attestations {
            Some(a) => a.passed(&image).map_err(ControlError::Invalid)?,
            None => false,
        };
        if !passed {
            return Err(ControlError::Invalid(format!(
                "image: {image} has not passed its tests and {app}'s spec has [image.test]: \
                 run `kiln test` on it first"
            )));
        }
    }
    Ok(image)
}
