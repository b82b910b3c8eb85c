//! The CNCF distribution registry (Debian's `docker-registry`) run by a test: a registry of
//! the team's own, as `[target] registry` names one. Plain HTTP on loopback, or TLS on any
//! address with a certificate of a CA made for the test (for a Swarm's nodes: trust the CA
//! with `Cluster::trust_registry`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, raw_get};

/// Whether `docker-registry` is installed (scripts/ci-setup.sh installs it).
pub fn distribution_available() -> bool {
    Command::new("docker-registry")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A global IPv4 address of this host (not loopback), where kiln must speak TLS.
pub fn host_address() -> IpAddr {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("this host has no global IPv4 address: {text}"))
}

/// A running registry with its storage under the directory it was given; killed on drop.
/// Its log (stderr: a line per request answered, `http.request.method=PUT …
/// http.request.uri="/v2/…"`) is kept in a file.
pub struct Distribution {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Distribution {
    /// Plain HTTP on a free loopback port.
    pub fn start(dir: &Path) -> Distribution {
        let port = free_port();
        Distribution::start_at(dir, format!("127.0.0.1:{port}").parse().unwrap(), "")
    }

    /// TLS on a free port of `ip`, with a certificate for `ip` signed by a CA made now;
    /// returns the CA certificate's file (PEM) too.
    pub fn start_tls(dir: &Path, ip: IpAddr) -> (Distribution, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![ip.to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let ca_pem = tls.join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        std::fs::write(tls.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(tls.join("key.pem"), key.serialize_pem()).unwrap();
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let registry = Distribution::start_at(
            dir,
            addr,
            &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                tls.join("cert.pem").display(),
                tls.join("key.pem").display()
            ),
        );
        (registry, ca_pem)
    }

    /// At `addr`, with `tls` (YAML lines under `http:`) added to its configuration; returns
    /// once it answers.
    pub fn start_at(dir: &Path, addr: SocketAddr, tls: &str) -> Distribution {
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: false\n\
                 http:\n  addr: {addr}\n{tls}",
                storage.display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut registry = Distribution { child, addr, log };
        for _ in 0..300 {
            let answer = raw_get(addr, &addr.to_string(), "/v2/");
            // Over TLS a plain request gets a 400 once the server is up.
            if answer.starts_with("HTTP/1.1 200")
                || (!tls.is_empty() && answer.starts_with("HTTP/1."))
            {
                return registry;
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry ended ({status}): {}", registry.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = registry.child.kill();
        panic!(
            "docker-registry never answered /v2/: {}",
            registry.log_text()
        );
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many log lines (one per request answered) hold all of `parts`.
    pub fn requests(&self, parts: &[&str]) -> usize {
        self.log_text()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
