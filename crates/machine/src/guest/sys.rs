//! The guest init's one `unsafe` door: the ioctls no safe crate wraps (device-mapper's
//! control device; an inet socket's interface addresses, flags, hardware address and
//! routes) and the one socket option rustix lacks (`SO_BINDTODEVICE`, which DHCP needs to
//! broadcast from an interface that has no address yet). Every other system call goes
//! through rustix.
//!
//! Each request names the size of the structure the kernel reads and writes through its
//! pointer, and [`ioctl`] refuses a buffer shorter than that, so no request can reach past
//! the buffer it is given.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// The ioctls the init issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `DM_VERSION`.
    DmVersion,
    /// `DM_DEV_CREATE`.
    DmDevCreate,
    /// `DM_TABLE_LOAD`.
    DmTableLoad,
    /// `DM_DEV_SUSPEND` (without `DM_SUSPEND_FLAG`: resume).
    DmDevSuspend,
    /// `SIOCGIFFLAGS`.
    GetIfFlags,
    /// `SIOCSIFFLAGS`.
    SetIfFlags,
    /// `SIOCSIFADDR`.
    SetIfAddr,
    /// `SIOCSIFNETMASK`.
    SetIfNetmask,
    /// `SIOCGIFHWADDR`.
    GetIfHwAddr,
    /// `SIOCADDRT`.
    AddRoute,
}

impl Request {
    /// The request number (`_IOWR(0xfd, nr, struct dm_ioctl)` for device-mapper).
    pub fn code(self) -> u32 {
        match self {
            Request::DmVersion => super::dm::DM_VERSION,
            Request::DmDevCreate => super::dm::DM_DEV_CREATE,
            Request::DmTableLoad => super::dm::DM_TABLE_LOAD,
            Request::DmDevSuspend => super::dm::DM_DEV_SUSPEND,
            Request::GetIfFlags => 0x8913,
            Request::SetIfFlags => 0x8914,
            Request::SetIfAddr => 0x8916,
            Request::SetIfNetmask => 0x891c,
            Request::GetIfHwAddr => 0x8927,
            Request::AddRoute => 0x890b,
        }
    }

    /// The bytes the kernel may read or write through the pointer.
    fn len(self, buf: &[u8]) -> usize {
        match self {
            // The kernel reads the header, then `data_size` bytes, and writes back at most
            // `data_size` bytes.
            Request::DmVersion
            | Request::DmDevCreate
            | Request::DmTableLoad
            | Request::DmDevSuspend => {
                let size = buf
                    .get(12..16)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(usize::MAX, |b| u32::from_ne_bytes(b) as usize);
                size.max(super::dm::HEADER_LEN)
            }
            Request::GetIfFlags
            | Request::SetIfFlags
            | Request::SetIfAddr
            | Request::SetIfNetmask
            | Request::GetIfHwAddr => super::net::IFREQ_LEN,
            Request::AddRoute => super::net::RTENTRY_LEN,
        }
    }
}

/// Issues `request` on `fd` with `buf` as its argument structure.
pub fn ioctl(fd: impl AsFd, request: Request, buf: &mut [u8]) -> io::Result<()> {
    if buf.len() < request.len(buf) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{request:?} needs {} bytes, given {}",
                request.len(buf),
                buf.len()
            ),
        ));
    }
    // SAFETY: `fd` is an open descriptor borrowed for the call; each request's argument is a
    // pointer to a structure of at most `request.len(buf)` bytes, checked above to lie within
    // `buf`, which is exclusively borrowed for the call; the kernel keeps no pointer to it
    // after the call returns.
    let r = unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            request.code() as _,
            buf.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `setsockopt(SOL_SOCKET, SO_BINDTODEVICE, name)`: the socket sends and receives through
/// the interface `name` only.
pub fn bind_to_device(fd: impl AsFd, name: &str) -> io::Result<()> {
    let len = libc::socklen_t::try_from(name.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is an open descriptor borrowed for the call; the kernel reads at most
    // `len` bytes from `name`, which outlives the call, and keeps no pointer to it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
