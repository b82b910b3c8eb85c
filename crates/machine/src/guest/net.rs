//! The network as the command line sets it (`kiln.ip`): `lo` up, `eth0` with its address,
//! netmask and up, and a default route through the gateway, with the classic inet ioctls
//! (`SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCSIFFLAGS`, `SIOCADDRT`) on a datagram socket.
//! No DHCP: the export writes the address QEMU's user-mode network (or the platform) gives.
//!
//! The request structures (`struct ifreq`, `struct rtentry`) are built as bytes by pure
//! functions checked against the C structs on x86_64.

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketType};

use super::config::Ip;
use super::sys::{self, Request};

/// `sizeof(struct ifreq)`.
pub const IFREQ_LEN: usize = 40;
/// `sizeof(struct rtentry)` on x86_64.
pub const RTENTRY_LEN: usize = 120;
/// `IFNAMSIZ`.
const IFNAMSIZ: usize = 16;
/// `IFF_UP`.
const IFF_UP: u16 = 0x1;
/// `RTF_UP | RTF_GATEWAY`.
const RTF_UP_GATEWAY: u16 = 0x1 | 0x2;
/// `AF_INET`.
const AF_INET: u16 = 2;
/// The one interface `kiln.ip` configures (the first virtio-net device).
pub const INTERFACE: &str = "eth0";
/// How long `eth0` may take to appear after `virtio_net` loads.
const APPEAR_WITHIN: Duration = Duration::from_secs(10);

/// Why the network could not be brought up.
#[derive(Debug, thiserror::Error)]
#[error("{what} {interface}: {source}")]
pub struct Error {
    /// The step.
    pub what: &'static str,
    /// The interface.
    pub interface: &'static str,
    /// The kernel's answer.
    #[source]
    pub source: io::Error,
}

/// A `struct sockaddr_in` with port 0: family, port, address, zero padding.
fn sockaddr_in(out: &mut [u8], addr: Ipv4Addr) {
    out[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
    out[4..8].copy_from_slice(&addr.octets());
}

/// A `struct ifreq` naming `name` (at most 15 bytes; longer names are cut, the kernel would
/// not know them anyway).
fn ifreq(name: &str) -> [u8; IFREQ_LEN] {
    let mut req = [0u8; IFREQ_LEN];
    let n = name.len().min(IFNAMSIZ - 1);
    req[..n].copy_from_slice(&name.as_bytes()[..n]);
    req
}

/// `struct ifreq` for `SIOCSIFADDR` or `SIOCSIFNETMASK`.
pub fn ifreq_addr(name: &str, addr: Ipv4Addr) -> [u8; IFREQ_LEN] {
    let mut req = ifreq(name);
    sockaddr_in(&mut req[IFNAMSIZ..], addr);
    req
}

/// `struct ifreq` for `SIOCSIFFLAGS`.
pub fn ifreq_flags(name: &str, flags: u16) -> [u8; IFREQ_LEN] {
    let mut req = ifreq(name);
    req[IFNAMSIZ..IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    req
}

/// `struct rtentry` for `SIOCADDRT`: the default route (0.0.0.0/0) through `gateway`; the
/// kernel finds the interface from the gateway's address.
pub fn rtentry_default(gateway: Ipv4Addr) -> [u8; RTENTRY_LEN] {
    let mut rt = [0u8; RTENTRY_LEN];
    sockaddr_in(&mut rt[8..24], Ipv4Addr::UNSPECIFIED); // rt_dst
    sockaddr_in(&mut rt[24..40], gateway); // rt_gateway
    sockaddr_in(&mut rt[40..56], Ipv4Addr::UNSPECIFIED); // rt_genmask
    rt[56..58].copy_from_slice(&RTF_UP_GATEWAY.to_ne_bytes()); // rt_flags
    rt
}

/// Brings `lo` up, and `eth0` with `ip` when the command line gives one.
pub fn up(ip: Option<&Ip>) -> Result<(), Error> {
    let err = |what, interface| {
        move |source| Error {
            what,
            interface,
            source,
        }
    };
    let socket = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None)
        .map_err(|e| err("opening a socket for", "lo")(e.into()))?;
    set_up(&socket, "lo").map_err(err("bringing up", "lo"))?;
    let Some(ip) = ip else {
        return Ok(());
    };
    // virtio_net registers eth0 asynchronously after its probe.
    let start = Instant::now();
    while let Err(e) = flags(&socket, INTERFACE) {
        if start.elapsed() > APPEAR_WITHIN {
            return Err(err("waiting 10 s for", INTERFACE)(e));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    sys::ioctl(
        &socket,
        Request::SetIfAddr,
        &mut ifreq_addr(INTERFACE, ip.addr),
    )
    .map_err(err("setting the address of", INTERFACE))?;
    sys::ioctl(
        &socket,
        Request::SetIfNetmask,
        &mut ifreq_addr(INTERFACE, ip.netmask()),
    )
    .map_err(err("setting the netmask of", INTERFACE))?;
    set_up(&socket, INTERFACE).map_err(err("bringing up", INTERFACE))?;
    if let Some(gateway) = ip.gateway {
        sys::ioctl(&socket, Request::AddRoute, &mut rtentry_default(gateway))
            .map_err(err("adding the default route via", INTERFACE))?;
    }
    Ok(())
}

fn flags(socket: &impl std::os::fd::AsFd, name: &str) -> io::Result<u16> {
    let mut req = ifreq(name);
    sys::ioctl(socket, Request::GetIfFlags, &mut req)?;
    Ok(u16::from_ne_bytes([req[IFNAMSIZ], req[IFNAMSIZ + 1]]))
}

fn set_up(socket: &impl std::os::fd::AsFd, name: &str) -> io::Result<()> {
    let now = flags(socket, name)?;
    sys::ioctl(
        socket,
        Request::SetIfFlags,
        &mut ifreq_flags(name, now | IFF_UP),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    // From `/tmp/guest/layout.c` (the C structs of `net/if.h` and `net/route.h`).
    const C_IFREQ_ADDR: &str =
        "65746830000000000000000000000000020000000a00020f00000000000000000000000000000000";
    const C_IFREQ_FLAGS: &str =
        "65746830000000000000000000000000410000000000000000000000000000000000000000000000";
    const C_RTENTRY: &str = concat!(
        "000000000000000002000000000000000000000000000000020000000a00020200000000000000000200",
        "000000000000000000000000000003000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000",
    );

    #[test]
    fn ifreqs_match_the_c_structs() {
        let addr = ifreq_addr("eth0", Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(hex::encode(addr), C_IFREQ_ADDR);
        // IFF_UP | IFF_RUNNING, as the C program sets them.
        assert_eq!(hex::encode(ifreq_flags("eth0", 0x41)), C_IFREQ_FLAGS);
    }

    #[test]
    fn default_route_matches_the_c_struct() {
        let rt = rtentry_default(Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(hex::encode(rt), C_RTENTRY);
    }

    #[test]
    fn long_names_are_cut_to_ifnamsiz() {
        let req = ifreq("a-very-long-interface-name");
        assert_eq!(&req[..16], b"a-very-long-int\0");
    }
}
