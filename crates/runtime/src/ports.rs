//! Host ports for instances: every provider's instances listen (local) or are published
//! (docker) on 127.0.0.1 only, on a port the spec names or one picked here.
//!
//! **Invariant:** a picked port was free when it was picked and is not one of the ports the
//! caller says are given to instances already (a created or stopped instance holds its port
//! without listening on it). Nothing here reserves a port: the instance binds it later.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

/// How many ports to ask the kernel for before giving up.
const ATTEMPTS: usize = 64;

/// Where an instance listens on the local host.
pub(crate) fn local_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A port on 127.0.0.1 that is free now and not in `taken`.
pub(crate) fn allocate_port(taken: &HashSet<u16>) -> io::Result<u16> {
    for _ in 0..ATTEMPTS {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "every port offered was already given to an instance",
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_picked_port_is_free_and_not_taken() {
        let taken: HashSet<u16> = (1..=1024).collect();
        let port = allocate_port(&taken).unwrap();
        assert!(!taken.contains(&port), "{port}");
        std::net::TcpListener::bind(local_addr(port)).unwrap();
    }

    #[test]
    fn with_every_port_taken_there_is_none() {
        let taken: HashSet<u16> = (1..=u16::MAX).collect();
        let err = allocate_port(&taken).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            err.to_string(),
            "every port offered was already given to an instance"
        );
    }
}
