//! The client at the other end of one connection, as the forwarding headers name it.
//!
//! Everything here is computed once per client connection, not once per request: the client's
//! address does not change while its connection lives, and a keep-alive client nearly always
//! sends the same `Host`, so the `Forwarded` element for the last host is kept and reused.
//! Formatting an address and building header values per request was a measurable share of
//! the router's time (see the router's section of ARCHITECTURE.md).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use hyper::header::HeaderValue;

/// One client connection's forwarding identity.
pub(crate) struct Peer {
    /// The client's address.
    addr: IpAddr,
    /// The client's address as `X-Forwarded-For` lists it (`10.1.2.3`, `::1`).
    ip: HeaderValue,
    /// This hop's `Forwarded` element without a host: `for=10.1.2.3;proto=http`.
    forwarded: HeaderValue,
    /// The `Forwarded` element for the last host seen on this connection.
    last_host: Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr, scheme: &'static str) -> Peer {
        let ip = client_ip(addr);
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            // RFC 7239: an IPv6 node is bracketed and quoted.
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        Peer {
            addr: ip,
            ip: value(ip.to_string().into_bytes()),
            forwarded: value(format!("for={node};proto={scheme}").into_bytes()),
            last_host: Mutex::new(None),
        }
    }

    /// The client's address (IPv4-mapped IPv6 as IPv4).
    pub(crate) fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The `X-Forwarded-For` value to send: the client's own list, if any, with this client
    /// appended.
    pub(crate) fn forwarded_for(&self, earlier: Option<&HeaderValue>) -> HeaderValue {
        match earlier {
            None => self.ip.clone(),
            Some(earlier) => {
                let mut list = Vec::with_capacity(earlier.len() + 2 + self.ip.len());
                list.extend_from_slice(earlier.as_bytes());
                list.extend_from_slice(b", ");
                list.extend_from_slice(self.ip.as_bytes());
                value(list)
            }
        }
    }

    /// This hop's `Forwarded` element for a request to `host`.
    pub(crate) fn forwarded(&self, host: Option<&HeaderValue>) -> HeaderValue {
        let Some(host) = host else {
            return self.forwarded.clone();
        };
        let mut last = self
            .last_host
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, element)) = last.as_ref()
            && seen == host
        {
            return element.clone();
        }
        let mut element = Vec::with_capacity(self.forwarded.len() + host.len() + 8);
        element.extend_from_slice(self.forwarded.as_bytes());
        element.extend_from_slice(b";host=\"");
        // A quoted-string (RFC 7239 §4): a quote or backslash in it is escaped, so that no
        // host can end the string and add elements of its own (`forward` refuses such hosts
        // already).
        for &b in host.as_bytes() {
            if b == b'"' || b == b'\\' {
                element.push(b'\\');
            }
            element.push(b);
        }
        element.push(b'"');
        let element = value(element);
        // A copy of the host, not a view of the request: the view would keep the client
        // connection's whole read buffer alive for as long as the host stays the same.
        let seen = HeaderValue::from_bytes(host.as_bytes()).unwrap_or_else(|_| host.clone());
        *last = Some((seen, element.clone()));
        element
    }
}

/// A header value from bytes that came from valid header values and fixed ASCII text.
fn value(bytes: Vec<u8>) -> HeaderValue {
    // The parts are visible ASCII already (header values or formatted addresses); a value
    // that is somehow not is sent empty rather than dropped or panicked on.
    HeaderValue::from_maybe_shared(Bytes::from(bytes))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// IPv4 clients reached over a dual-stack socket show as `::ffff:a.b.c.d`; report them as IPv4.
pub(crate) fn client_ip(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn peer(addr: &str) -> Peer {
        Peer::new(addr.parse().unwrap(), "http")
    }

    #[test]
    fn forwarding_values_name_the_client_and_host() {
        let p = peer("10.1.2.3:5000");
        assert_eq!(p.forwarded_for(None), "10.1.2.3");
        assert_eq!(
            p.forwarded_for(Some(&HeaderValue::from_static("203.0.113.9"))),
            "203.0.113.9, 10.1.2.3"
        );
        assert_eq!(p.forwarded(None), "for=10.1.2.3;proto=http");
        let shop = HeaderValue::from_static("shop.example");
        let blog = HeaderValue::from_static("blog.example:8080");
        assert_eq!(
            p.forwarded(Some(&shop)),
            "for=10.1.2.3;proto=http;host=\"shop.example\""
        );
        // The cached element is for the last host only.
        assert_eq!(
            p.forwarded(Some(&blog)),
            "for=10.1.2.3;proto=http;host=\"blog.example:8080\""
        );
        assert_eq!(
            p.forwarded(Some(&shop)),
            "for=10.1.2.3;proto=http;host=\"shop.example\""
        );
    }

    #[test]
    fn a_host_is_escaped_in_its_quoted_string() {
        let p = peer("10.1.2.3:5000");
        let odd = HeaderValue::from_static("a\", for=6.6.6.6;host=\"b\\");
        assert_eq!(
            p.forwarded(Some(&odd)),
            "for=10.1.2.3;proto=http;host=\"a\\\", for=6.6.6.6;host=\\\"b\\\\\""
        );
    }

    #[test]
    fn ipv6_clients_are_bracketed_and_quoted_in_forwarded() {
        let p = Peer::new("[2001:db8::1]:443".parse().unwrap(), "https");
        assert_eq!(p.forwarded_for(None), "2001:db8::1");
        assert_eq!(p.forwarded(None), "for=\"[2001:db8::1]\";proto=https");
    }

    #[test]
    fn mapped_ipv4_clients_are_reported_as_ipv4() {
        let peer: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        assert_eq!(client_ip(peer).to_string(), "10.1.2.3");
    }
}
