//! Host ports for instances: every provider's instances listen (local) or are published
//! (docker) on 127.0.0.1 only, on a port the spec names or one picked here.
//!
//! **Invariant:** a picked port was free when it was picked and is not given to any instance
//! on record in the state directory, whichever provider holds it (a created or stopped
//! instance holds its port without listening on it). Nothing here reserves a port: the
//! instance binds it later.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

/// How many ports to ask the kernel for before giving up.
const ATTEMPTS: usize = 64;

/// Where an instance listens on the local host.
pub(crate) fn local_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The ports given to the instances on record in the state directory `state`: the local
/// provider's (`instances/<id>/instance.json`) and the docker provider's (`docker/<id>.json`)
/// alike, since both use 127.0.0.1 of this host. Only the records' `port` field is read.
pub(crate) fn on_record(state: &Path) -> HashSet<u16> {
    #[derive(serde::Deserialize)]
    struct Port {
        port: u16,
        /// An instance in its own network namespace holds no port of the host.
        #[serde(default)]
        address: Option<serde::de::IgnoredAny>,
    }
    let port = |path: &Path| {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice::<Port>(&bytes)
            .ok()
            .filter(|r| r.address.is_none())
            .map(|r| r.port)
    };
    let entries = |dir: &Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
    };
    let local =
        entries(&state.join("instances")).filter_map(|dir| port(&dir.join("instance.json")));
    let docker = entries(&state.join("docker"))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .filter_map(|path| port(&path));
    local.chain(docker).collect()
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

    // A docker instance created but not started yet does not listen on its port, and the
    // local provider only skipped ports on its own records: it could pick that port.
    #[test]
    fn a_port_on_record_with_either_provider_is_taken() {
        let state = tempfile::tempdir().unwrap();
        let write = |path: &str, text: &str| {
            let path = state.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write(
            "instances/web-1/instance.json",
            r#"{"version":1,"port":4001}"#,
        );
        write("instances/web-2/upper/x", "");
        write("docker/api-1.json", r#"{"version":1,"port":4002}"#);
        write("docker/api-1.exec", "sh");
        write("docker/engine", "unix:///run/docker.sock");
        write("docker/tmp/x.json", r#"{"port":4003}"#);
        write("docker/broken.json", r#"{"port":"#);
        assert_eq!(on_record(state.path()), HashSet::from([4001, 4002]));
        assert_eq!(on_record(&state.path().join("missing")), HashSet::new());
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
