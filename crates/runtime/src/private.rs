//! The directories the providers keep under kiln's state directory are private: `0700`,
//! whatever the process umask and whatever an older kiln left, because they hold image
//! layers (with their setuid files), instance records, configs and logs.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::provider::ProviderError;

/// Creates `dir` (and missing parents) `0700`, and makes an existing one `0700`.
pub(crate) fn private_dir(dir: &Path) -> Result<(), ProviderError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(ProviderError::io("create", dir))?;
    let md = fs::metadata(dir).map_err(ProviderError::io("stat", dir))?;
    if md.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(ProviderError::io("chmod 700", dir))?;
    }
    Ok(())
}
