//! The app's secrets, as the platform gives them: QEMU's firmware configuration device
//! (`-fw_cfg name=opt/kiln/secrets/NAME,file=PATH`), read through the `qemu_fw_cfg` driver's
//! sysfs files before sysfs is taken away. The values never touch the disk: the init holds
//! them in memory, then writes them to a read-only tmpfs at `/run/secrets/NAME` (0400, the
//! app's) and, with `expose_env`, into the app's environment, as an instance of the local
//! provider finds them.
//!
//! A secret `machine.json` names that the platform does not give stops the boot: an app
//! started without its database password fails later and less clearly.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::Secret;

/// Where the `qemu_fw_cfg` driver lists the items by name.
pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg/by_name";
/// The fw_cfg name prefix of kiln's secrets (`opt/` is for users, per QEMU's docs).
pub const PREFIX: &str = "opt/kiln/secrets";
/// Where the app finds them.
pub const DIR: &str = "/run/secrets";
/// The largest value taken, as for the local provider's sources.
pub const MAX_BYTES: u64 = 64 * 1024;
/// How long the driver may take to list the items after it loads.
const APPEAR_WITHIN: Duration = Duration::from_secs(2);

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The platform has no fw_cfg device (or the driver did not load).
    #[error(
        "secret {name}: this machine has no QEMU fw_cfg device to give it (run it with -fw_cfg name={PREFIX}/{name},file=PATH)"
    )]
    NoDevice {
        /// The secret.
        name: String,
    },
    /// fw_cfg has no item of that name.
    #[error(
        "secret {name}: not given (run the machine with -fw_cfg name={PREFIX}/{name},file=PATH)"
    )]
    Missing {
        /// The secret.
        name: String,
    },
    /// The item is larger than [`MAX_BYTES`].
    #[error("secret {name}: larger than {MAX_BYTES} bytes")]
    TooLarge {
        /// The secret.
        name: String,
    },
    /// Reading failed.
    #[error("secret {name}: reading {path}: {source}")]
    Read {
        /// The secret.
        name: String,
        /// The sysfs file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The value as the app gets it: one trailing newline dropped (a file written by `echo`
/// holds one), as the local provider's `file` and `command` sources do.
pub fn value(mut raw: Vec<u8>) -> Vec<u8> {
    if raw.last() == Some(&b'\n') {
        raw.pop();
    }
    raw
}

/// Reads every secret from fw_cfg, in `machine.json`'s order.
pub fn read_all(secrets: &[Secret]) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let Some(first) = secrets.first() else {
        return Ok(Vec::new());
    };
    let root = Path::new(FW_CFG);
    let start = Instant::now();
    while !root.is_dir() {
        if start.elapsed() > APPEAR_WITHIN {
            return Err(Error::NoDevice {
                name: first.name.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    secrets
        .iter()
        .map(|s| {
            let name = s.name.clone();
            let item = root.join(PREFIX).join(&s.name);
            let size = item.join("size");
            let size = match std::fs::read_to_string(&size) {
                Ok(text) => text.trim().parse::<u64>().unwrap_or(u64::MAX),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Error::Missing { name });
                }
                Err(source) => {
                    return Err(Error::Read {
                        name,
                        path: size,
                        source,
                    });
                }
            };
            if size > MAX_BYTES {
                return Err(Error::TooLarge { name });
            }
            let raw = item.join("raw");
            let bytes = std::fs::read(&raw).map_err(|source| Error::Read {
                name: name.clone(),
                path: raw,
                source,
            })?;
            Ok((name, value(bytes)))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_dropped() {
        assert_eq!(value(b"s3cret\n".to_vec()), b"s3cret");
        assert_eq!(value(b"s3cret\n\n".to_vec()), b"s3cret\n");
        assert_eq!(value(b"s3cret".to_vec()), b"s3cret");
        assert_eq!(value(Vec::new()), b"");
    }

    #[test]
    fn refusals_say_how_to_give_the_secret() {
        let e = Error::Missing {
            name: "DB_PASSWORD".to_owned(),
        };
        assert_eq!(
            e.to_string(),
            "secret DB_PASSWORD: not given (run the machine with -fw_cfg name=opt/kiln/secrets/DB_PASSWORD,file=PATH)"
        );
    }
}
