//! The account files an image without its own sees: [`crate::user::minimal_accounts`]
//! written as the bottom-most overlay layer of one instance (`instances/<id>/accounts/`).
//!
//! Under the image's layers rather than bound over its root, so overlayfs itself makes the
//! image's own `/etc/passwd` or `/etc/group` win wherever any of its layers has one (or
//! deletes one), nothing is written in the upper dir (which would be drift), and no mount
//! point is needed in the read-only root.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::provider::ProviderError;
use crate::user::MinimalAccounts;

/// Writes `accounts` under `instance_dir` and returns the layer's root: `etc/passwd` and
/// `etc/group`, readable by the instance's user whatever kiln's umask.
pub(crate) fn layer(
    instance_dir: &Path,
    accounts: &MinimalAccounts,
) -> Result<PathBuf, ProviderError> {
    let root = instance_dir.join("accounts");
    let etc = root.join("etc");
    fs::create_dir_all(&etc).map_err(ProviderError::io("create", &etc))?;
    for dir in [&root, &etc] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .map_err(ProviderError::io("chmod", dir))?;
    }
    for (name, text) in [("passwd", &accounts.passwd), ("group", &accounts.group)] {
        let path = etc.join(name);
        fs::write(&path, text).map_err(ProviderError::io("write", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .map_err(ProviderError::io("chmod", &path))?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn the_layer_holds_the_two_files_readable_by_anyone() {
        let d = tempfile::tempdir().unwrap();
        let accounts = crate::user::minimal_accounts(Some("1000:1000"), None);
        let root = layer(d.path(), &accounts).unwrap();
        assert_eq!(root, d.path().join("accounts"));
        assert_eq!(
            fs::read_to_string(root.join("etc/passwd")).unwrap(),
            accounts.passwd
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/group")).unwrap(),
            accounts.group
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o755);
        assert_eq!(mode(&root.join("etc")), 0o755);
        assert_eq!(mode(&root.join("etc/passwd")), 0o644);
        // Written again (a create retried in the same directory): the same files.
        layer(d.path(), &accounts).unwrap();
    }
}
