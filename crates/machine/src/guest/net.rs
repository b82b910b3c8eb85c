//! The network as the command line sets it (`kiln.ip`): `lo` up; `eth0` up with the
//! address a DHCP server leases ([`super::dhcp`], kept renewed by [`Renewal`]) or the
//! command line's own; its netmask; and a default route through the gateway. The classic
//! inet ioctls (`SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCSIFFLAGS`, `SIOCADDRT`,
//! `SIOCGIFHWADDR`) on a datagram socket do it all.
//!
//! The request structures (`struct ifreq`, `struct rtentry`) are built as bytes by pure
//! functions checked against the C structs on x86_64.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketType};

use super::config::Network;
use super::dhcp::{self, Ask, Client, Lease, Reply};
use super::run::say;
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
/// How long the boot waits for a DHCP lease before it gives up (and powers off).
const LEASE_WITHIN: Duration = Duration::from_secs(60);
/// The first wait for a DHCP answer; each retry doubles it, up to [`DHCP_WAIT_MAX`].
const DHCP_WAIT: Duration = Duration::from_secs(1);
/// The longest wait for one DHCP answer.
const DHCP_WAIT_MAX: Duration = Duration::from_secs(8);
/// The least time between two renewal attempts (RFC 2131 §4.4.5).
const RENEW_RETRY_MIN: Duration = Duration::from_secs(60);

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

/// What `eth0` holds once [`up`] returns.
#[derive(Debug)]
pub struct Address {
    /// The address.
    pub addr: Ipv4Addr,
    /// Its network's prefix length.
    pub prefix: u8,
    /// The default route's gateway.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers a DHCP server named (the read-only root's `/etc/resolv.conf` is the
    /// image's: these are reported, not written).
    pub dns: Vec<Ipv4Addr>,
    /// The lease to keep renewed, when the address came from DHCP.
    pub renewal: Option<Renewal>,
}

/// Brings `lo` up, and `eth0` as the command line says (`None`: left down).
pub fn up(net: Option<&Network>) -> Result<Option<Address>, Error> {
    let socket = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None)
        .map_err(|e| err("opening a socket for", "lo")(e.into()))?;
    set_up(&socket, "lo").map_err(err("bringing up", "lo"))?;
    let Some(net) = net else {
        return Ok(None);
    };
    // virtio_net registers eth0 asynchronously after its probe.
    let start = Instant::now();
    while let Err(e) = flags(&socket, INTERFACE) {
        if start.elapsed() > APPEAR_WITHIN {
            return Err(err("waiting 10 s for", INTERFACE)(e));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let address = match net {
        Network::Static(ip) => Address {
            addr: ip.addr,
            prefix: ip.prefix,
            gateway: ip.gateway,
            dns: Vec::new(),
            renewal: None,
        },
        Network::Dhcp => {
            set_up(&socket, INTERFACE).map_err(err("bringing up", INTERFACE))?;
            let mac = hardware_address(&socket).map_err(err("reading the MAC of", INTERFACE))?;
            let dhcp = Dhcp::open(mac).map_err(err("opening the DHCP socket on", INTERFACE))?;
            let lease = dhcp
                .acquire()
                .map_err(err("asking DHCP for an address for", INTERFACE))?;
            Address {
                addr: lease.addr,
                prefix: lease.prefix,
                gateway: lease.router,
                dns: lease.dns.clone(),
                renewal: Some(Renewal {
                    dhcp,
                    lease,
                    got: Instant::now(),
                }),
            }
        }
    };
    let mask = netmask(address.prefix);
    sys::ioctl(
        &socket,
        Request::SetIfAddr,
        &mut ifreq_addr(INTERFACE, address.addr),
    )
    .map_err(err("setting the address of", INTERFACE))?;
    sys::ioctl(
        &socket,
        Request::SetIfNetmask,
        &mut ifreq_addr(INTERFACE, mask),
    )
    .map_err(err("setting the netmask of", INTERFACE))?;
    set_up(&socket, INTERFACE).map_err(err("bringing up", INTERFACE))?;
    if let Some(gateway) = address.gateway {
        sys::ioctl(&socket, Request::AddRoute, &mut rtentry_default(gateway))
            .map_err(err("adding the default route via", INTERFACE))?;
    }
    Ok(Some(address))
}

fn err(what: &'static str, interface: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error {
        what,
        interface,
        source,
    }
}

/// The netmask of a prefix length.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    super::config::Ip {
        addr: Ipv4Addr::UNSPECIFIED,
        prefix,
        gateway: None,
    }
    .netmask()
}

/// `eth0`'s MAC address (`SIOCGIFHWADDR`: a `struct sockaddr` whose data starts with it).
fn hardware_address(socket: &impl std::os::fd::AsFd) -> io::Result<[u8; 6]> {
    let mut req = ifreq(INTERFACE);
    sys::ioctl(socket, Request::GetIfHwAddr, &mut req)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&req[IFNAMSIZ + 2..IFNAMSIZ + 8]);
    Ok(mac)
}

/// A DHCP client's socket on `eth0`: UDP port 68, bound to the interface, broadcasting.
#[derive(Debug)]
struct Dhcp {
    socket: UdpSocket,
    mac: [u8; 6],
}

impl Dhcp {
    fn open(mac: [u8; 6]) -> io::Result<Dhcp> {
        let fd = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None)?;
        rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
        rustix::net::sockopt::set_socket_broadcast(&fd, true)?;
        sys::bind_to_device(&fd, INTERFACE)?;
        rustix::net::bind(
            &fd,
            &SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::CLIENT_PORT),
        )?;
        Ok(Dhcp {
            socket: UdpSocket::from(fd),
            mac,
        })
    }

    /// A client with a fresh transaction id.
    fn client(&self) -> Client {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mac = u32::from_be_bytes([self.mac[2], self.mac[3], self.mac[4], self.mac[5]]);
        Client {
            xid: nanos ^ mac.rotate_left(7),
            mac: self.mac,
        }
    }

    /// Sends `message` to `to` and waits at most `wait` for an answer `wanted` says is one.
    fn exchange(
        &self,
        message: &[u8],
        to: Ipv4Addr,
        client: Client,
        wait: Duration,
        wanted: impl Fn(&Reply) -> bool,
    ) -> io::Result<Option<Reply>> {
        self.socket.send_to(message, (to, dhcp::SERVER_PORT))?;
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 1500];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            match self.socket.recv(&mut buf) {
                Ok(n) => match dhcp::parse(&buf[..n], client) {
                    Some(reply) if wanted(&reply) => return Ok(Some(reply)),
                    _ => {}
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// DISCOVER, OFFER, REQUEST, ACK: the first offer taken, retried with a doubling wait
    /// until [`LEASE_WITHIN`] passes.
    fn acquire(&self) -> io::Result<Lease> {
        let start = Instant::now();
        let mut wait = DHCP_WAIT;
        while start.elapsed() < LEASE_WITHIN {
            let client = self.client();
            let offer = self.exchange(
                &dhcp::discover(client),
                Ipv4Addr::BROADCAST,
                client,
                wait,
                |r| matches!(r, Reply::Offer { .. }),
            )?;
            if let Some(Reply::Offer { addr, server }) = offer {
                let ask = Ask::Select { addr, server };
                let answer = self.exchange(
                    &dhcp::request(client, ask),
                    Ipv4Addr::BROADCAST,
                    client,
                    wait,
                    |r| matches!(r, Reply::Ack(_) | Reply::Nak),
                )?;
                if let Some(Reply::Ack(lease)) = answer {
                    return Ok(lease);
                }
            }
            wait = (wait * 2).min(DHCP_WAIT_MAX);
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no DHCP server answered within {} s",
                LEASE_WITHIN.as_secs()
            ),
        ))
    }
}

/// A DHCP lease kept alive: renewed with its server from T1, with any server from T2.
#[derive(Debug)]
pub struct Renewal {
    dhcp: Dhcp,
    lease: Lease,
    got: Instant,
}

/// What the renewal does next, `elapsed` after the lease was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing: an infinite lease.
    Never,
    /// Sleep this long, until T1.
    Sleep(Duration),
    /// Ask the granting server (RENEWING), then wait at most this long.
    Renew(Duration),
    /// Ask any server (REBINDING), then wait at most this long.
    Rebind(Duration),
    /// The lease ran out: said once, then rebinding goes on.
    Expired,
}

/// The renewal's schedule (RFC 2131 §4.4.5): from T1 ask the server, retrying after half
/// the time left to T2 (at least a minute); from T2 ask anyone, likewise until the lease
/// ends.
pub fn next(lease: &Lease, elapsed: Duration) -> Next {
    let (Some(end), Some(t1), Some(t2)) = (lease.lease, lease.renew, lease.rebind) else {
        return Next::Never;
    };
    let retry = |until: Duration| ((until - elapsed) / 2).max(RENEW_RETRY_MIN);
    if elapsed < t1 {
        Next::Sleep(t1 - elapsed)
    } else if elapsed < t2 {
        Next::Renew(retry(t2))
    } else if elapsed < end {
        Next::Rebind(retry(end))
    } else {
        Next::Expired
    }
}

impl Renewal {
    /// Renews the lease for as long as the machine runs (a thread of its own). A server
    /// that refuses (NAK) or moves the address is said on the console; the machine keeps
    /// its address, and a platform's health check is what replaces it.
    pub fn keep(mut self) {
        let mut expired_said = false;
        loop {
            let (to, wait) = match next(&self.lease, self.got.elapsed()) {
                Next::Never => return,
                Next::Sleep(d) => {
                    std::thread::sleep(d);
                    continue;
                }
                Next::Renew(wait) => (self.lease.server, wait),
                Next::Rebind(wait) => (Ipv4Addr::BROADCAST, wait),
                Next::Expired => {
                    if !expired_said {
                        say(&format!(
                            "the DHCP lease of {} on {INTERFACE} ran out; still asking",
                            self.lease.addr
                        ));
                        expired_said = true;
                    }
                    (Ipv4Addr::BROADCAST, RENEW_RETRY_MIN)
                }
            };
            let client = self.dhcp.client();
            let ask = Ask::Extend {
                addr: self.lease.addr,
            };
            let asked = Instant::now();
            match self.dhcp.exchange(
                &dhcp::request(client, ask),
                to,
                client,
                DHCP_WAIT_MAX,
                |r| matches!(r, Reply::Ack(_) | Reply::Nak),
            ) {
                Ok(Some(Reply::Ack(lease))) if lease.addr == self.lease.addr => {
                    self.lease = lease;
                    self.got = asked;
                    expired_said = false;
                }
                Ok(Some(Reply::Ack(lease))) => {
                    say(&format!(
                        "the DHCP server moved {INTERFACE} from {} to {}: the machine keeps its address; replace it",
                        self.lease.addr, lease.addr
                    ));
                    return;
                }
                Ok(Some(Reply::Nak)) => {
                    say(&format!(
                        "the DHCP server took back {} (NAK): the machine keeps its address; replace it",
                        self.lease.addr
                    ));
                    return;
                }
                Ok(_) | Err(_) => std::thread::sleep(wait.saturating_sub(asked.elapsed())),
            }
        }
    }
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

    fn lease(seconds: Option<u64>) -> Lease {
        let d = seconds.map(Duration::from_secs);
        Lease {
            addr: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            router: None,
            dns: Vec::new(),
            server: Ipv4Addr::new(10, 0, 2, 2),
            lease: d,
            renew: d.map(|d| d / 2),
            rebind: d.map(|d| d * 7 / 8),
        }
    }

    #[test]
    fn the_renewal_schedule() {
        let s = Duration::from_secs;
        let day = lease(Some(86_400));
        assert_eq!(next(&day, s(0)), Next::Sleep(s(43_200)));
        assert_eq!(next(&day, s(43_200)), Next::Renew(s(16_200)));
        assert_eq!(
            next(&day, s(75_500)),
            Next::Renew(s(60)),
            "at least a minute"
        );
        assert_eq!(next(&day, s(75_600)), Next::Rebind(s(5_400)));
        assert_eq!(next(&day, s(86_400)), Next::Expired);
        assert_eq!(next(&lease(None), s(1_000_000)), Next::Never);
    }

    #[test]
    fn long_names_are_cut_to_ifnamsiz() {
        let req = ifreq("a-very-long-interface-name");
        assert_eq!(&req[..16], b"a-very-long-int\0");
    }
}
