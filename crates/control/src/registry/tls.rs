//! The registry's TLS: a certificate authority kiln makes once per state directory and a
//! server certificate it signs at every start for the address the registry listens on.
//!
//! `<state>/registry/ca.key` (0600) and `ca.crt` are written once (temp → fsync → rename);
//! an operator installs `ca.crt` on each node as `/etc/docker/certs.d/<ADDR>/ca.crt`, so only
//! that registry address is trusted with it. The server's key lives in memory only: a restart
//! (or a new address) makes a new one, and nothing needs installing again.
//!
//! **Invariant:** the CA's key never leaves `<state>/registry/` and is never logged. The CA's
//! subject is derived from its key, so the issuer of a new server certificate always matches
//! the `ca.crt` on disk, even when that certificate was written by an earlier run.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest as _, Sha256};

/// Why the registry's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a file of the CA.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The CA's key file is not a key kiln can use.
    #[error("the registry's CA key {path} is not a PKCS#8 PEM key: {source}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What rcgen said.
        source: rcgen::Error,
    },
    /// Making a key or a certificate failed.
    #[error("cannot make the registry's {what}: {source}")]
    Make {
        /// The key or certificate.
        what: &'static str,
        /// What rcgen said.
        source: rcgen::Error,
    },
    /// rustls refused the server certificate.
    #[error("rustls refused the registry's server certificate: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The registry's certificate authority, loaded (or made) from `<state>/registry/`.
pub struct Ca {
    /// `ca.crt`: what nodes trust.
    pub cert_path: PathBuf,
    key: KeyPair,
    /// The CA certificate as rcgen signs with it (same subject and key as `ca.crt`).
    issuer: Certificate,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// How long certificates kiln makes are valid, in days from the day before they are made.
const VALID_DAYS: u64 = 10 * 365;

impl Ca {
    /// Loads the CA in `dir` (`ca.key`, `ca.crt`), making whichever is missing: a new key
    /// (and certificate) when there is no key, a certificate for the key when only that is
    /// there (a crash between the two writes).
    pub fn load_or_create(dir: &Path) -> Result<Ca, TlsError> {
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.crt");
        let (key, new_key) = match std::fs::read_to_string(&key_path) {
            Ok(pem) => (
                KeyPair::from_pem(&pem).map_err(|source| TlsError::BadKey {
                    path: key_path.clone(),
                    source,
                })?,
                false,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate().map_err(|source| TlsError::Make {
                    what: "CA key",
                    source,
                })?;
                // tempfile makes the temp file 0600, and the rename keeps it.
                kiln_durable::write(&key_path, key.serialize_pem().as_bytes())
                    .map_err(io("write", &key_path))?;
                (key, true)
            }
            Err(e) => return Err(io("read", &key_path)(e)),
        };
        let issuer = ca_params(&key)?
            .self_signed(&key)
            .map_err(|source| TlsError::Make {
                what: "CA certificate",
                source,
            })?;
        if new_key || !cert_path.exists() {
            kiln_durable::write(&cert_path, issuer.pem().as_bytes())
                .map_err(io("write", &cert_path))?;
        }
        Ok(Ca {
            cert_path,
            key,
            issuer,
        })
    }

    /// A server certificate for `ip` (and `host`, when it is a DNS name) signed by this CA,
    /// with a key of its own, as a rustls server configuration (HTTP/1.1).
    pub fn server_config(
        &self,
        ip: IpAddr,
        host: Option<&str>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let (chain, key) = self.server_chain(ip, host)?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The server's chain (its certificate, then the CA's) and its new key.
    fn server_chain(
        &self,
        ip: IpAddr,
        host: Option<&str>,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let key = KeyPair::generate().map_err(|source| TlsError::Make {
            what: "server key",
            source,
        })?;
        let mut params = CertificateParams::default();
        set_validity(&mut params);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, ip.to_string());
        params.subject_alt_names.push(SanType::IpAddress(ip));
        if let Some(name) = host.and_then(|h| h.to_owned().try_into().ok()) {
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|source| TlsError::Make {
                what: "server certificate",
                source,
            })?;
        let chain = vec![cert.der().clone(), self.issuer.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key))
    }
}

/// The CA's parameters, all derived from its key, so they are the same at every start.
fn ca_params(key: &KeyPair) -> Result<CertificateParams, TlsError> {
    let id = hex8(&Sha256::digest(key.public_key_der()));
    let mut params = CertificateParams::default();
    set_validity(&mut params);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "kiln");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("kiln registry CA {id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn hex8(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Valid from yesterday (a node whose clock is a little behind still accepts it) for
/// [`VALID_DAYS`].
fn set_validity(params: &mut CertificateParams) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let day = |days: u64| {
        let (y, m, d) = civil(days);
        rcgen::date_time_ymd(y, m, d)
    };
    params.not_before = day(today.saturating_sub(1));
    params.not_after = day(today + VALID_DAYS);
}

/// The (year, month, day) of a day counted from 1970-01-01 (Howard Hinnant's
/// civil-from-days); month 1–12 and day 1–31 by construction.
fn civil(days: u64) -> (i32, u8, u8) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        i32::try_from(y).unwrap_or(i32::MAX),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(59), (1970, 3, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_453), (2025, 12, 31));
        assert_eq!(civil(20_454), (2026, 1, 1));
    }

    #[test]
    fn the_ca_is_made_once_and_signs_what_trusts_it() {
        use std::os::unix::fs::PermissionsExt;

        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{ServerName, UnixTime};

        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let pem = std::fs::read(&ca.cert_path).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A second start keeps the files, and its issuer still matches them.
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(std::fs::read(&again.cert_path).unwrap(), pem);
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&pem).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = UnixTime::now();
        let verify = |chain: &[CertificateDer<'static>], name: &str| {
            let name = ServerName::try_from(name.to_owned()).unwrap();
            verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
        };

        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let (chain, _) = again.server_chain(ip, Some("node-1")).unwrap();
        assert_eq!(chain.len(), 2);
        verify(&chain, "192.0.2.7").unwrap();
        verify(&chain, "node-1").unwrap();
        assert!(verify(&chain, "192.0.2.8").is_err());
        assert!(again.server_config(ip, None).is_ok());

        // Only the certificate lost: made again for the same key, still the same CA.
        std::fs::remove_file(&ca.cert_path).unwrap();
        let third = Ca::load_or_create(dir.path()).unwrap();
        let (chain, _) = third.server_chain(ip, None).unwrap();
        verify(&chain[..1], "192.0.2.7").unwrap();

        // Another state's CA is not trusted.
        let elsewhere = tempfile::tempdir().unwrap();
        let stranger = Ca::load_or_create(elsewhere.path()).unwrap();
        let (chain, _) = stranger.server_chain(ip, None).unwrap();
        assert!(verify(&chain, "192.0.2.7").is_err());
    }
}
