//! Secrets on a provider's host: the files an instance finds at `/run/secrets/NAME`, written
//! to a directory on a tmpfs the provider mounted (never the disk).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use crate::provider::ProviderError;
use crate::types::Secret;

/// How large the tmpfs that holds one instance's secrets is (64 KiB each at most).
pub(crate) const TMPFS_SIZE: u64 = 4 << 20;

/// Writes each secret into `dir`. With `owner` (uid, gid), the directory is 0500 and the
/// files 0400, both the instance user's; without one (a user the engine resolves by name),
/// 0555 and 0444: the directory is private on the host, so only the instance reads them.
pub(crate) fn write_dir(
    dir: &Path,
    secrets: &[Secret],
    owner: Option<(u32, u32)>,
) -> Result<(), ProviderError> {
    fs::create_dir_all(dir).map_err(ProviderError::io("create", dir))?;
    let (dir_mode, file_mode) = if owner.is_some() {
        (0o500, 0o400)
    } else {
        (0o555, 0o444)
    };
    for s in secrets {
        let path = dir.join(&s.name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(file_mode)
            .open(&path)
            .map_err(ProviderError::io("create", &path))?;
        f.write_all(s.value.expose())
            .map_err(ProviderError::io("write", &path))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(ProviderError::io("chown", &path))?;
        }
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(ProviderError::io("chown", dir))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(dir_mode))
        .map_err(ProviderError::io("chmod", dir))
}
