//! What the firmware says about the boot: whether UEFI Secure Boot was on, read from the
//! `SecureBoot` variable through efivarfs (mounted for the read, then unmounted: the app
//! gets no sysfs). With it on, the firmware checked the unified kernel image's signature,
//! so the command line (and the root hash in it) is the signer's.

use rustix::mount::{MountFlags, UnmountFlags};

/// Where efivarfs is mounted for the read (inside the initramfs's sysfs).
const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// `SecureBoot` in the EFI global variable GUID's namespace.
const SECURE_BOOT: &str = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// An efivarfs file's bytes: 4 bytes of attributes, then the value; `SecureBoot` is one
/// byte, 1 for on.
pub fn parse_secure_boot(bytes: &[u8]) -> Option<bool> {
    match bytes {
        [_, _, _, _, value] => Some(*value == 1),
        _ => None,
    }
}

/// Whether Secure Boot was on; `None` when the machine did not boot through UEFI or the
/// variable cannot be read.
pub fn secure_boot() -> Option<bool> {
    if !std::path::Path::new(EFIVARS).is_dir() {
        return None;
    }
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::RDONLY;
    rustix::mount::mount("efivarfs", EFIVARS, "efivarfs", flags, None).ok()?;
    let value = std::fs::read(format!("{EFIVARS}/{SECURE_BOOT}"));
    let _ = rustix::mount::unmount(EFIVARS, UnmountFlags::DETACH);
    match value {
        Ok(bytes) => parse_secure_boot(&bytes),
        // Firmware without Secure Boot support has no such variable: it is off.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(false),
        Err(_) => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_secure_boot_variable() {
        assert_eq!(parse_secure_boot(&[6, 0, 0, 0, 1]), Some(true));
        assert_eq!(parse_secure_boot(&[6, 0, 0, 0, 0]), Some(false));
        assert_eq!(parse_secure_boot(&[6, 0, 0, 0]), None);
        assert_eq!(parse_secure_boot(&[]), None);
    }
}
