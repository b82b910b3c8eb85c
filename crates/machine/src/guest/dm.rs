//! Device-mapper through its ioctls (`/dev/mapper/control`), as much as a verity root needs
//! and no more: check the interface version, create a device, load its one-target table,
//! resume it (which makes the table live). `dmsetup` is not in an initramfs of one binary.
//!
//! A request is `struct dm_ioctl` (version 4, 312 bytes) followed by its data; a table load's
//! data is one `struct dm_target_spec` (40 bytes) and the target's parameters, NUL-ended and
//! padded to 8 bytes, which is what `next` covers. The encoders are pure and checked against
//! bytes the C structs give (`linux/dm-ioctl.h`).

use std::fs::File;
use std::io;

use super::sys::{self, Request};

/// `sizeof(struct dm_ioctl)`.
pub const HEADER_LEN: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const SPEC_LEN: usize = 40;
/// `DM_NAME_LEN`: a name's bytes, NUL included.
const NAME_LEN: usize = 128;
/// `sizeof(dm_target_spec.target_type)`.
const TYPE_LEN: usize = 16;
/// The interface version this init speaks (`DM_VERSION_MAJOR`).
const VERSION_MAJOR: u32 = 4;
/// `DM_READONLY_FLAG`.
const READONLY_FLAG: u32 = 1;
/// The buffer of a request without data: room for what the kernel writes back.
const REPLY_LEN: usize = 16 * 1024;

/// `_IOWR(DM_IOCTL, DM_VERSION_CMD, struct dm_ioctl)`.
pub const DM_VERSION: u32 = iowr(0);
/// `_IOWR(DM_IOCTL, DM_DEV_CREATE_CMD, struct dm_ioctl)`.
pub const DM_DEV_CREATE: u32 = iowr(3);
/// `_IOWR(DM_IOCTL, DM_DEV_SUSPEND_CMD, struct dm_ioctl)`.
pub const DM_DEV_SUSPEND: u32 = iowr(6);
/// `_IOWR(DM_IOCTL, DM_TABLE_LOAD_CMD, struct dm_ioctl)`.
pub const DM_TABLE_LOAD: u32 = iowr(9);

const fn iowr(nr: u32) -> u32 {
    (3 << 30) | ((HEADER_LEN as u32) << 16) | (0xfd << 8) | nr
}

/// The control device.
pub const CONTROL: &str = "/dev/mapper/control";

/// Why a device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A table line that is not `<start> <length> <type> <params>`.
    #[error("device-mapper table line {0:?} is not <start> <length> <type> <params>")]
    Table(String),
    /// A name or target type too long for its field, or with a NUL.
    #[error("device-mapper {what} {value:?} does not fit its field")]
    Field {
        /// Which field.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The kernel speaks another interface version.
    #[error("the kernel's device-mapper interface is version {0}, this init speaks 4")]
    Version(u32),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// One line of a device-mapper table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// The first sector it maps.
    pub start: u64,
    /// Its length in 512-byte sectors.
    pub length: u64,
    /// The target type (`verity`).
    pub kind: &'a str,
    /// The target's parameters.
    pub params: &'a str,
}

impl<'a> Target<'a> {
    /// Splits a table line (what `dmsetup table` prints).
    pub fn parse(line: &'a str) -> Result<Target<'a>, Error> {
        let bad = || Error::Table(line.to_owned());
        let mut rest = line.trim();
        let mut field = || -> Result<&'a str, Error> {
            let (word, tail) = rest.split_once(' ').ok_or_else(bad)?;
            rest = tail.trim_start();
            Ok(word)
        };
        let start = field()?.parse().map_err(|_| bad())?;
        let length = field()?.parse().map_err(|_| bad())?;
        let kind = field()?;
        if rest.is_empty() {
            return Err(bad());
        }
        Ok(Target {
            start,
            length,
            kind,
            params: rest,
        })
    }
}

/// A request header for device `name` (or none), with `data_size` covering the whole buffer.
fn header(name: Option<&str>, flags: u32, target_count: u32, len: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    buf[0..4].copy_from_slice(&VERSION_MAJOR.to_ne_bytes());
    buf[12..16].copy_from_slice(&u32_len(len).to_ne_bytes());
    buf[16..20].copy_from_slice(&u32_len(HEADER_LEN).to_ne_bytes());
    buf[20..24].copy_from_slice(&target_count.to_ne_bytes());
    buf[28..32].copy_from_slice(&flags.to_ne_bytes());
    if let Some(name) = name {
        put_str(&mut buf[48..48 + NAME_LEN], "device name", name)?;
    }
    Ok(buf)
}

/// Buffers here are at most a few KiB.
fn u32_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Copies `value` into a NUL-padded field, refusing what does not fit with its NUL.
fn put_str(field: &mut [u8], what: &'static str, value: &str) -> Result<(), Error> {
    if value.len() >= field.len() || value.contains('\0') {
        return Err(Error::Field {
            what,
            value: value.to_owned(),
        });
    }
    field[..value.len()].copy_from_slice(value.as_bytes());
    Ok(())
}

/// `DM_VERSION`, `DM_DEV_CREATE` (read-only) or `DM_DEV_SUSPEND` (resume) for `name`.
pub fn simple_request(name: Option<&str>, flags: u32) -> Result<Vec<u8>, Error> {
    header(name, flags, 0, REPLY_LEN)
}

/// `DM_TABLE_LOAD`: device `name` (read-only) gets the one target `target`.
pub fn table_load(name: &str, target: &Target<'_>) -> Result<Vec<u8>, Error> {
    let data = (SPEC_LEN + target.params.len() + 1).next_multiple_of(8);
    let mut buf = header(Some(name), READONLY_FLAG, 1, HEADER_LEN + data)?;
    let spec = &mut buf[HEADER_LEN..];
    spec[0..8].copy_from_slice(&target.start.to_ne_bytes());
    spec[8..16].copy_from_slice(&target.length.to_ne_bytes());
    spec[20..24].copy_from_slice(&u32_len(data).to_ne_bytes());
    put_str(&mut spec[24..24 + TYPE_LEN], "target type", target.kind)?;
    put_str(&mut spec[SPEC_LEN..], "target parameters", target.params)?;
    Ok(buf)
}

/// The reply's `dev` field: the new device's (major, minor).
fn reply_dev(buf: &[u8]) -> (u32, u32) {
    let dev = buf
        .get(40..48)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_ne_bytes);
    (rustix::fs::major(dev), rustix::fs::minor(dev))
}

/// Creates the read-only device `name` with the one-line table `line` and makes it live;
/// returns its (major, minor): `/dev/dm-<minor>`.
pub fn create(name: &str, line: &str) -> Result<(u32, u32), Error> {
    let target = Target::parse(line)?;
    let io = |what| move |source| Error::Io { what, source };
    let control = File::options()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(io("opening /dev/mapper/control"))?;
    let mut req = simple_request(None, 0)?;
    sys::ioctl(&control, Request::DmVersion, &mut req).map_err(io("DM_VERSION"))?;
    let major = req
        .get(0..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_ne_bytes);
    if major != VERSION_MAJOR {
        return Err(Error::Version(major));
    }
    let mut req = simple_request(Some(name), READONLY_FLAG)?;
    sys::ioctl(&control, Request::DmDevCreate, &mut req).map_err(io("DM_DEV_CREATE"))?;
    let mut req = table_load(name, &target)?;
    sys::ioctl(&control, Request::DmTableLoad, &mut req).map_err(io("DM_TABLE_LOAD"))?;
    // Without DM_SUSPEND_FLAG, DM_DEV_SUSPEND resumes, which swaps the loaded table in.
    let mut req = simple_request(Some(name), 0)?;
    sys::ioctl(&control, Request::DmDevSuspend, &mut req).map_err(io("DM_DEV_SUSPEND (resume)"))?;
    Ok(reply_dev(&req))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// `/tmp/guest/layout.c` (kept with the boot scripts): dmv.c's TABLE_LOAD request for
    /// "root" with this verity line, from `linux/dm-ioctl.h` on x86_64.
    const C_TABLE_LOAD: &str = concat!(
        "0400000000000000000000009801000038010000010000000000000001000000000000000000000000000000",
        "00000000726f6f74000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000001800000000000000000000006000000076657269747900000000000000000000",
        "31202f6465762f76646132202f6465762f766461332034303936203430393620332030207368613235362061",
        "622030313032000000000000",
    );

    #[test]
    fn request_numbers_match_the_c_macros() {
        assert_eq!(
            [DM_VERSION, DM_DEV_CREATE, DM_TABLE_LOAD, DM_DEV_SUSPEND],
            [0xc138fd00, 0xc138fd03, 0xc138fd09, 0xc138fd06]
        );
    }

    #[test]
    fn table_load_matches_the_c_structs() {
        let line = "0 24 verity 1 /dev/vda2 /dev/vda3 4096 4096 3 0 sha256 ab 0102";
        let target = Target::parse(line).unwrap();
        assert_eq!(
            (target.start, target.length, target.kind),
            (0, 24, "verity")
        );
        let bytes = table_load("root", &target).unwrap();
        assert_eq!(hex::encode(&bytes), C_TABLE_LOAD);
    }

    #[test]
    fn the_roots_table_from_the_command_line() {
        let c = crate::guest::config::Cmdline::parse(&format!(
            "kiln.verity={} kiln.salt=0102 kiln.data_blocks=3",
            "ab".repeat(32)
        ))
        .unwrap();
        let line = c.verity_table().unwrap();
        let target = Target::parse(&line).unwrap();
        assert_eq!(
            (target.start, target.length, target.kind),
            (0, 24, "verity")
        );
        let bytes = table_load("root", &target).unwrap();
        // data_size covers the header, the spec and the NUL-ended, 8-aligned params.
        let params = format!(
            "1 /dev/vda2 /dev/vda3 4096 4096 3 0 sha256 {} 0102",
            "ab".repeat(32)
        );
        let data = (40 + params.len() + 1).next_multiple_of(8);
        assert_eq!(bytes.len(), 312 + data);
        assert_eq!(&bytes[12..16], &u32_len(312 + data).to_ne_bytes());
        assert_eq!(&bytes[312 + 40..312 + 40 + params.len()], params.as_bytes());
        assert_eq!(bytes[312 + 40 + params.len()], 0);
    }

    #[test]
    fn simple_requests() {
        let r = simple_request(Some("root"), READONLY_FLAG).unwrap();
        assert_eq!(r.len(), REPLY_LEN);
        assert_eq!(&r[0..4], &4u32.to_ne_bytes());
        assert_eq!(&r[12..16], &u32_len(REPLY_LEN).to_ne_bytes());
        assert_eq!(&r[16..20], &312u32.to_ne_bytes());
        assert_eq!(&r[28..32], &1u32.to_ne_bytes());
        assert_eq!(&r[48..53], b"root\0");
        let mut reply = r;
        reply[40..48].copy_from_slice(&((253u64 << 8) | 3).to_ne_bytes());
        assert_eq!(reply_dev(&reply), (253, 3));
    }

    #[test]
    fn refusals() {
        assert!(matches!(Target::parse("0 24 verity"), Err(Error::Table(_))));
        assert!(matches!(
            Target::parse("x 24 verity a"),
            Err(Error::Table(_))
        ));
        let t = Target::parse("0 8 a-type-name-too-long x").unwrap();
        assert_eq!(
            table_load("root", &t).unwrap_err().to_string(),
            "device-mapper target type \"a-type-name-too-long\" does not fit its field"
        );
        assert!(simple_request(Some(&"n".repeat(128)), 0).is_err());
        assert!(simple_request(Some(&"n".repeat(127)), 0).is_ok());
    }
}
