//! DHCP (RFC 2131) as the guest init speaks it: the messages of one client on one interface
//! (`DISCOVER`, `REQUEST` to select or renew), and the server's answers read back into a
//! [`Lease`].
//!
//! The client asks for broadcast answers (the `BROADCAST` flag), so a reply reaches it
//! while `eth0` has no address yet; it takes the first offer, and keeps what the ACK says:
//! address, netmask, router, DNS servers (reported, not written: the root is read-only),
//! lease time and the renewal times. An answer that is not for this client (another
//! transaction id or hardware address), malformed or truncated is ignored, never trusted
//! in part: a hostile network can make the boot wait, not misconfigure it.
//!
//! **API boundary:** pure: bytes in, bytes out. The socket is [`super::net`]'s.

use std::net::Ipv4Addr;
use std::time::Duration;

/// The client's UDP port.
pub const CLIENT_PORT: u16 = 68;
/// The server's UDP port.
pub const SERVER_PORT: u16 = 67;
/// The fixed BOOTP header before the magic cookie.
const HEADER_LEN: usize = 236;
/// RFC 2131's magic cookie, which starts the options.
const COOKIE: [u8; 4] = [99, 130, 83, 99];
/// The BOOTP `flags` bit asking the server to broadcast its answer.
const FLAG_BROADCAST: u16 = 0x8000;

/// Option codes the client writes or reads.
mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETERS: u8 = 55;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

/// The `DHCP message type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Ack = 5,
    Nak = 6,
}

/// What a client tells about itself in every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The transaction id, fresh for each exchange.
    pub xid: u32,
    /// The interface's hardware (MAC) address.
    pub mac: [u8; 6],
}

/// An address the server holds for this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub addr: Ipv4Addr,
    /// The network's prefix length, from the subnet mask (32 without one).
    pub prefix: u8,
    /// The first router, the default route's gateway.
    pub router: Option<Ipv4Addr>,
    /// DNS servers, in the server's order.
    pub dns: Vec<Ipv4Addr>,
    /// The server that granted it (where renewals go).
    pub server: Ipv4Addr,
    /// How long it holds; `None` for an infinite lease.
    pub lease: Option<Duration>,
    /// T1: when to renew with [`Lease::server`].
    pub renew: Option<Duration>,
    /// T2: when to ask any server.
    pub rebind: Option<Duration>,
}

/// A server's answer to this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OFFER`: an address and the server offering it.
    Offer {
        /// The offered address.
        addr: Ipv4Addr,
        /// The offering server's identifier.
        server: Ipv4Addr,
    },
    /// `ACK`: the lease.
    Ack(Lease),
    /// `NAK`: start again.
    Nak,
}

/// What the client asks a `REQUEST` for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// SELECTING: the offered address, from the offering server (both broadcast).
    Select {
        /// The offered address.
        addr: Ipv4Addr,
        /// The server that offered it.
        server: Ipv4Addr,
    },
    /// RENEWING or REBINDING: the address the client already has (`ciaddr`).
    Extend {
        /// The address held.
        addr: Ipv4Addr,
    },
}

/// A `DISCOVER`.
pub fn discover(client: Client) -> Vec<u8> {
    let mut m = header(client, Ipv4Addr::UNSPECIFIED);
    option(&mut m, opt::MESSAGE_TYPE, &[Kind::Discover as u8]);
    common_options(&mut m, client);
    m.push(opt::END);
    m
}

/// A `REQUEST`.
pub fn request(client: Client, ask: Ask) -> Vec<u8> {
    let ciaddr = match ask {
        Ask::Select { .. } => Ipv4Addr::UNSPECIFIED,
        Ask::Extend { addr } => addr,
    };
    let mut m = header(client, ciaddr);
    option(&mut m, opt::MESSAGE_TYPE, &[Kind::Request as u8]);
    if let Ask::Select { addr, server } = ask {
        option(&mut m, opt::REQUESTED_IP, &addr.octets());
        option(&mut m, opt::SERVER_ID, &server.octets());
    }
    common_options(&mut m, client);
    m.push(opt::END);
    m
}

fn header(client: Client, ciaddr: Ipv4Addr) -> Vec<u8> {
    let mut m = vec![0u8; HEADER_LEN];
    m[0] = 1; // op: BOOTREQUEST
    m[1] = 1; // htype: Ethernet
    m[2] = 6; // hlen
    m[4..8].copy_from_slice(&client.xid.to_be_bytes());
    m[10..12].copy_from_slice(&FLAG_BROADCAST.to_be_bytes());
    m[12..16].copy_from_slice(&ciaddr.octets());
    m[28..34].copy_from_slice(&client.mac);
    m.extend_from_slice(&COOKIE);
    m
}

fn common_options(m: &mut Vec<u8>, client: Client) {
    let mut id = [1u8; 7]; // type 1 (Ethernet), then the MAC
    id[1..].copy_from_slice(&client.mac);
    option(m, opt::CLIENT_ID, &id);
    option(
        m,
        opt::PARAMETERS,
        &[
            opt::SUBNET_MASK,
            opt::ROUTER,
            opt::DNS,
            opt::LEASE_TIME,
            opt::RENEWAL_TIME,
            opt::REBINDING_TIME,
        ],
    );
}

fn option(m: &mut Vec<u8>, code: u8, value: &[u8]) {
    m.push(code);
    m.push(u8::try_from(value.len()).unwrap_or(u8::MAX));
    m.extend_from_slice(&value[..value.len().min(255)]);
}

/// Reads a server's message: `None` unless it is a well-formed reply to `client`.
pub fn parse(bytes: &[u8], client: Client) -> Option<Reply> {
    let header = bytes.get(..HEADER_LEN)?;
    if header[0] != 2 || header[1] != 1 || header[2] != 6 {
        return None;
    }
    if header[4..8] != client.xid.to_be_bytes() || header[28..34] != client.mac {
        return None;
    }
    if bytes.get(HEADER_LEN..HEADER_LEN + 4)? != COOKIE {
        return None;
    }
    let yiaddr = ipv4(&header[16..20])?;
    let options = Options::read(&bytes[HEADER_LEN + 4..])?;
    let kind = match options.get(opt::MESSAGE_TYPE)? {
        [2] => Kind::Offer,
        [5] => Kind::Ack,
        [6] => Kind::Nak,
        _ => return None,
    };
    let server = options.get(opt::SERVER_ID).and_then(ipv4);
    match kind {
        Kind::Nak => Some(Reply::Nak),
        Kind::Offer => Some(Reply::Offer {
            addr: usable(yiaddr)?,
            server: server?,
        }),
        Kind::Ack => {
            let prefix = match options.get(opt::SUBNET_MASK) {
                Some(mask) => prefix_of(ipv4(mask)?)?,
                None => 32,
            };
            let seconds = |code| {
                options
                    .get(code)
                    .and_then(|v| <[u8; 4]>::try_from(v).ok())
                    .map(u32::from_be_bytes)
                    .filter(|&s| s != u32::MAX)
                    .map(|s| Duration::from_secs(u64::from(s)))
            };
            let lease = seconds(opt::LEASE_TIME);
            Some(Reply::Ack(Lease {
                addr: usable(yiaddr)?,
                prefix,
                router: options
                    .get(opt::ROUTER)
                    .and_then(|r| r.get(..4))
                    .and_then(ipv4),
                dns: options
                    .get(opt::DNS)
                    .map(|d| d.chunks_exact(4).filter_map(ipv4).collect())
                    .unwrap_or_default(),
                server: server?,
                lease,
                // RFC 2131 §4.4.5's defaults: half the lease, and seven eighths of it.
                renew: seconds(opt::RENEWAL_TIME).or_else(|| lease.map(|l| l / 2)),
                rebind: seconds(opt::REBINDING_TIME).or_else(|| lease.map(|l| l * 7 / 8)),
            }))
        }
        Kind::Discover | Kind::Request => None,
    }
}

fn ipv4(b: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(b).ok().map(Ipv4Addr::from)
}

/// An address an interface can hold: not 0.0.0.0, broadcast, multicast or loopback.
fn usable(a: Ipv4Addr) -> Option<Ipv4Addr> {
    (!a.is_unspecified() && !a.is_broadcast() && !a.is_multicast() && !a.is_loopback()).then_some(a)
}

/// The prefix length of a contiguous netmask; `None` for one with holes.
pub fn prefix_of(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    (bits.checked_shl(ones).unwrap_or(0) == 0).then(|| u8::try_from(ones).unwrap_or(32))
}

/// The options area, each code's value (the first time it appears; RFC 3396's
/// concatenation of long options is not needed for what the client reads).
struct Options<'a> {
    found: Vec<(u8, &'a [u8])>,
}

impl<'a> Options<'a> {
    fn read(mut bytes: &'a [u8]) -> Option<Options<'a>> {
        let mut found = Vec::new();
        loop {
            match bytes {
                [] | [opt::END, ..] => return Some(Options { found }),
                [opt::PAD, rest @ ..] => bytes = rest,
                [code, len, rest @ ..] => {
                    let len = usize::from(*len);
                    let value = rest.get(..len)?;
                    if !found.iter().any(|(c, _)| c == code) {
                        found.push((*code, value));
                    }
                    bytes = &rest[len..];
                }
                [_] => return None,
            }
        }
    }

    fn get(&self, code: u8) -> Option<&'a [u8]> {
        self.found.iter().find(|(c, _)| *c == code).map(|(_, v)| *v)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const CLIENT: Client = Client {
        xid: 0x1234_5678,
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
    };

    /// A server's reply as QEMU's user-mode network (slirp) writes one.
    fn reply(kind: u8, yiaddr: [u8; 4], options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_LEN];
        m[0] = 2;
        m[1] = 1;
        m[2] = 6;
        m[4..8].copy_from_slice(&CLIENT.xid.to_be_bytes());
        m[16..20].copy_from_slice(&yiaddr);
        m[28..34].copy_from_slice(&CLIENT.mac);
        m.extend_from_slice(&COOKIE);
        option(&mut m, opt::MESSAGE_TYPE, &[kind]);
        for (code, value) in options {
            option(&mut m, *code, value);
        }
        m.push(opt::END);
        m
    }

    #[test]
    fn a_discover_asks_for_a_broadcast_answer_and_the_parameters() {
        let m = discover(CLIENT);
        assert_eq!(&m[..4], [1, 1, 6, 0]);
        assert_eq!(&m[4..8], [0x12, 0x34, 0x56, 0x78]);
        assert_eq!(&m[10..12], [0x80, 0]);
        assert_eq!(&m[28..34], CLIENT.mac);
        assert_eq!(&m[236..240], COOKIE);
        let o = Options::read(&m[240..]).unwrap();
        assert_eq!(o.get(opt::MESSAGE_TYPE), Some(&[1u8][..]));
        assert_eq!(o.get(opt::PARAMETERS), Some(&[1u8, 3, 6, 51, 58, 59][..]));
        assert_eq!(o.get(opt::CLIENT_ID).unwrap()[1..], CLIENT.mac);
        assert_eq!(*m.last().unwrap(), opt::END);
    }

    #[test]
    fn requests_select_an_offer_or_extend_a_lease() {
        let (addr, server) = (Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2));
        let m = request(CLIENT, Ask::Select { addr, server });
        let o = Options::read(&m[240..]).unwrap();
        assert_eq!(o.get(opt::MESSAGE_TYPE), Some(&[3u8][..]));
        assert_eq!(o.get(opt::REQUESTED_IP), Some(&addr.octets()[..]));
        assert_eq!(o.get(opt::SERVER_ID), Some(&server.octets()[..]));
        assert_eq!(&m[12..16], [0, 0, 0, 0]);
        let m = request(CLIENT, Ask::Extend { addr });
        let o = Options::read(&m[240..]).unwrap();
        assert_eq!(&m[12..16], addr.octets(), "ciaddr");
        assert_eq!(o.get(opt::REQUESTED_IP), None);
        assert_eq!(o.get(opt::SERVER_ID), None);
    }

    #[test]
    fn an_offer_and_an_ack_as_slirp_sends_them() {
        let server = [10, 0, 2, 2];
        let offer = reply(2, [10, 0, 2, 15], &[(opt::SERVER_ID, &server)]);
        assert_eq!(
            parse(&offer, CLIENT),
            Some(Reply::Offer {
                addr: Ipv4Addr::new(10, 0, 2, 15),
                server: Ipv4Addr::new(10, 0, 2, 2)
            })
        );
        let ack = reply(
            5,
            [10, 0, 2, 15],
            &[
                (opt::SERVER_ID, &server),
                (opt::SUBNET_MASK, &[255, 255, 255, 0]),
                (opt::ROUTER, &server),
                (opt::DNS, &[10, 0, 2, 3, 1, 1, 1, 1]),
                (opt::LEASE_TIME, &86400u32.to_be_bytes()),
            ],
        );
        let Some(Reply::Ack(lease)) = parse(&ack, CLIENT) else {
            panic!("no ack");
        };
        assert_eq!(lease.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(
            lease.dns,
            [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)]
        );
        assert_eq!(lease.lease, Some(Duration::from_secs(86400)));
        assert_eq!(lease.renew, Some(Duration::from_secs(43200)));
        assert_eq!(lease.rebind, Some(Duration::from_secs(75600)));
        assert_eq!(parse(&reply(6, [0; 4], &[]), CLIENT), Some(Reply::Nak));
    }

    #[test]
    fn an_infinite_lease_is_never_renewed() {
        let ack = reply(
            5,
            [192, 168, 1, 9],
            &[
                (opt::SERVER_ID, &[192, 168, 1, 1]),
                (opt::LEASE_TIME, &u32::MAX.to_be_bytes()),
            ],
        );
        let Some(Reply::Ack(lease)) = parse(&ack, CLIENT) else {
            panic!("no ack");
        };
        assert_eq!((lease.lease, lease.renew, lease.rebind), (None, None, None));
        assert_eq!((lease.prefix, lease.router), (32, None));
    }

    #[test]
    fn answers_not_for_this_client_or_malformed_are_ignored() {
        let server: &[u8] = &[10, 0, 2, 2];
        let good = reply(2, [10, 0, 2, 15], &[(opt::SERVER_ID, server)]);
        assert!(parse(&good, CLIENT).is_some());
        let other = Client {
            xid: CLIENT.xid + 1,
            ..CLIENT
        };
        assert_eq!(parse(&good, other), None, "another transaction");
        let other = Client {
            mac: [0; 6],
            ..CLIENT
        };
        assert_eq!(parse(&good, other), None, "another interface");
        for cut in [0, 100, HEADER_LEN, HEADER_LEN + 3, good.len() - 3] {
            assert_eq!(parse(&good[..cut], CLIENT), None, "cut at {cut}");
        }
        let mut request = good.clone();
        request[0] = 1;
        assert_eq!(parse(&request, CLIENT), None, "a client's message");
        let no_server = reply(2, [10, 0, 2, 15], &[]);
        assert_eq!(parse(&no_server, CLIENT), None);
        for bad in [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
        ] {
            let offer = reply(2, bad, &[(opt::SERVER_ID, server)]);
            assert_eq!(parse(&offer, CLIENT), None, "{bad:?}");
        }
        let holes = reply(
            5,
            [10, 0, 2, 15],
            &[
                (opt::SERVER_ID, server),
                (opt::SUBNET_MASK, &[255, 0, 255, 0]),
            ],
        );
        assert_eq!(parse(&holes, CLIENT), None, "a netmask with holes");
        let unknown = reply(9, [10, 0, 2, 15], &[(opt::SERVER_ID, server)]);
        assert_eq!(parse(&unknown, CLIENT), None);
    }

    #[test]
    fn an_option_running_past_the_end_is_refused_and_garbage_never_panics() {
        let mut m = reply(2, [10, 0, 2, 15], &[(opt::SERVER_ID, &[10, 0, 2, 2])]);
        m.pop(); // END
        m.extend_from_slice(&[opt::DNS, 200, 1, 2]);
        assert_eq!(parse(&m, CLIENT), None);
        let mut x: u32 = 7;
        for len in 0..600 {
            let mut bytes = reply(5, [10, 0, 2, 15], &[]);
            bytes.truncate(240);
            for _ in 0..len {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                bytes.push((x >> 16) as u8);
            }
            let _ = parse(&bytes, CLIENT);
        }
    }

    #[test]
    fn prefixes_of_netmasks() {
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(prefix_of(Ipv4Addr::UNSPECIFIED), Some(0));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 252, 0)), Some(22));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}
