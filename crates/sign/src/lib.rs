//! `kiln-sign`: the signing keys of kiln and the two signature formats it writes.
//!
//! - [`SigningKey`] / [`PublicKey`]: ed25519 keys in OpenSSH's own file formats, so a key made
//!   by `ssh-keygen -t ed25519` works with kiln and a key made by `kiln key generate` works with
//!   `ssh-keygen`. A key is named by its [`PublicKey::fingerprint`], the string `ssh-keygen -l`
//!   prints.
//! - [`sshsig`]: detached SSH signatures (`-----BEGIN SSH SIGNATURE-----`), verifiable by
//!   `ssh-keygen -Y verify`; kiln signs an image manifest's bytes and a ledger checkpoint so.
//! - [`dsse`]: DSSE envelopes, the signed wrapper of an in-toto attestation.
//!
//! **API boundary:** this crate knows keys, bytes and signatures, not images or ledgers: the
//! caller decides what is signed and where the signature is kept. Its only I/O is reading and
//! writing key files. Only ed25519 is accepted: an RSA or ECDSA key is refused by name, and an
//! encrypted private key is refused (it is never decrypted here), so no passphrase is ever asked.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use signature::{Signer, Verifier};
use ssh_key::{Algorithm, HashAlg, LineEnding};

pub mod dsse;
pub mod sshsig;

/// What went wrong reading a key, making a signature or checking one.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// [`SigningKey::write`] found a file where the key or its `.pub` half would go.
    #[error("{path}: already exists; kiln never overwrites a key (choose another path)")]
    Exists {
        /// The file that exists.
        path: PathBuf,
    },
    /// The private key file is protected by a passphrase.
    #[error(
        "{path}: the private key is encrypted with a passphrase, which kiln does not read; \
         use an unencrypted ed25519 key (`ssh-keygen -t ed25519 -N ''`) kept where only the \
         signer can read it"
    )]
    Encrypted {
        /// The key file.
        path: PathBuf,
    },
    /// The key is well-formed but not ed25519.
    #[error(
        "{what}: a {algorithm} key; kiln signs only with ed25519 keys (`ssh-keygen -t ed25519`)"
    )]
    NotEd25519 {
        /// The key file, or `public key` for a key given as text.
        what: String,
        /// The key's algorithm as OpenSSH names it (`ssh-rsa`, …).
        algorithm: String,
    },
    /// A private key file was given where a public key line was expected, or the reverse.
    #[error("{what}: {reason}")]
    WrongKind {
        /// The key file or text.
        what: String,
        /// What was found and what was expected.
        reason: String,
    },
    /// The text or file is not a key in OpenSSH format.
    #[error("{what}: not an OpenSSH key: {reason}")]
    MalformedKey {
        /// The key file, or `public key` for a key given as text.
        what: String,
        /// The parser's reason.
        reason: String,
    },
    /// A signature could not be parsed (armor, encoding or fields).
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    /// An SSH signature was made for another namespace than the one being checked.
    #[error("signature is for namespace {found:?}, expected {expected:?}")]
    Namespace {
        /// The namespace being checked.
        expected: String,
        /// The namespace the signature names.
        found: String,
    },
    /// The signature was made by a key that is not among the trusted keys.
    #[error("signed by {fingerprint}, which is not a trusted key")]
    Untrusted {
        /// The signing key's fingerprint.
        fingerprint: String,
    },
    /// The signature does not match the message and key: the message or signature was changed.
    #[error(
        "signature by {fingerprint} does not verify: the signed bytes or the signature were changed"
    )]
    BadSignature {
        /// The key the signature was checked against.
        fingerprint: String,
    },
    /// A DSSE envelope is not valid JSON of the envelope's shape.
    #[error("malformed DSSE envelope: {0}")]
    MalformedEnvelope(String),
    /// A signature could not be made (a fault in the signing library, not in the input).
    #[error("signing failed: {0}")]
    Signing(String),
}

/// An ed25519 private key: it signs.
pub struct SigningKey {
    key: ssh_key::PrivateKey,
}

/// An ed25519 public key: it verifies, and its fingerprint names it.
///
/// Two public keys are equal when their key bytes are; the comment is not compared.
#[derive(Clone)]
pub struct PublicKey {
    key: ssh_key::PublicKey,
}

impl SigningKey {
    /// A new random key from the operating system's random source.
    pub fn generate() -> SigningKey {
        let keypair = ssh_key::private::Ed25519Keypair::random(&mut ssh_key::rand_core::OsRng);
        SigningKey {
            key: ssh_key::PrivateKey::from(keypair),
        }
    }

    /// Reads an unencrypted OpenSSH ed25519 private key file (`-----BEGIN OPENSSH PRIVATE
    /// KEY-----`).
    pub fn load(path: &Path) -> Result<SigningKey, SignError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignError::Io {
            path: path.to_owned(),
            source,
        })?;
        let what = path.display().to_string();
        let trimmed = text.trim_start();
        if trimmed.starts_with("ssh-") || trimmed.starts_with("ecdsa-") {
            return Err(SignError::WrongKind {
                what,
                reason: "a public key; signing needs the private key file (the path without .pub)"
                    .to_owned(),
            });
        }
        if trimmed.starts_with("-----BEGIN")
            && !trimmed.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----")
        {
            // PEM/PKCS#8 keys (`ssh-keygen -m PEM`, openssl) carry no OpenSSH framing.
            let label = trimmed.lines().next().unwrap_or_default().trim().to_owned();
            return Err(SignError::MalformedKey {
                what,
                reason: format!(
                    "found {label}; kiln reads OpenSSH private keys (`-----BEGIN OPENSSH PRIVATE KEY-----`)"
                ),
            });
        }
        let key = match ssh_key::PrivateKey::from_openssh(&text) {
            Ok(key) => key,
            Err(e) => {
                // ssh-key is built with ed25519 only, so an RSA or ECDSA key fails to decode;
                // name its algorithm rather than call a valid key malformed.
                return Err(match foreign_algorithm(&text) {
                    Some(algorithm) => SignError::NotEd25519 { what, algorithm },
                    None => SignError::MalformedKey {
                        what,
                        reason: e.to_string(),
                    },
                });
            }
        };
        if key.is_encrypted() {
            return Err(SignError::Encrypted {
                path: path.to_owned(),
            });
        }
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(SignError::NotEd25519 {
                what,
                algorithm: key.algorithm().as_str().to_owned(),
            });
        }
        if key.key_data().ed25519().is_none() {
            return Err(SignError::MalformedKey {
                what,
                reason: "the ed25519 key pair could not be read".to_owned(),
            });
        }
        Ok(SigningKey { key })
    }

    /// Writes the private key to `path` (mode 0600, OpenSSH format) and the public key line to
    /// `path.pub`, both with `comment`. Neither file may exist: a key is never overwritten.
    pub fn write(&self, path: &Path, comment: &str) -> Result<(), SignError> {
        let mut key = self.key.clone();
        key.set_comment(comment);
        let private = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| SignError::Signing(format!("encoding the private key: {e}")))?;
        let public = format!("{}\n", self.public_with_comment(comment).to_openssh());

        let mut pub_path = path.as_os_str().to_owned();
        pub_path.push(".pub");
        let pub_path = PathBuf::from(pub_path);

        // Both files are created exclusively before either is written, so a refusal leaves
        // nothing behind and an existing key is never touched.
        let mut private_file = create_new(path, 0o600)?;
        let mut public_file = match create_new(&pub_path, 0o644) {
            Ok(file) => file,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let written = write_all_sync(&mut private_file, private.as_bytes(), path)
            .and_then(|()| write_all_sync(&mut public_file, public.as_bytes(), &pub_path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(&pub_path);
            return Err(e);
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        kiln_durable::sync_dir(dir).map_err(|source| SignError::Io {
            path: dir.to_owned(),
            source,
        })
    }

    /// The public half, with this key's comment.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.key.public_key().clone(),
        }
    }

    fn public_with_comment(&self, comment: &str) -> PublicKey {
        let mut key = self.key.public_key().clone();
        key.set_comment(comment);
        PublicKey { key }
    }

    /// A raw 64-byte ed25519 signature of `msg` (deterministic: the same key and message give
    /// the same bytes).
    pub fn sign_raw(&self, msg: &[u8]) -> Vec<u8> {
        // `load` and `generate` only ever hold an ed25519 key pair, for which signing cannot
        // fail; were it to, an empty signature verifies against nothing.
        match self.key.try_sign(msg) {
            Ok(sig) => sig.as_bytes().to_vec(),
            Err(_) => Vec::new(),
        }
    }

    pub(crate) fn inner(&self) -> &ssh_key::PrivateKey {
        &self.key
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret: only which key this is.
        f.debug_struct("SigningKey")
            .field("fingerprint", &self.public().fingerprint())
            .finish_non_exhaustive()
    }
}

/// The algorithm named by an OpenSSH private key file's public key section, if the file has
/// that framing and names one other than ed25519. Used only to word an error.
fn foreign_algorithm(text: &str) -> Option<String> {
    let body: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    let bytes = <base64ct::Base64 as base64ct::Encoding>::decode_vec(&body).ok()?;
    let mut rest = bytes.strip_prefix(b"openssh-key-v1\0")?;
    // cipher name, kdf name, kdf options, then the key count and the first public key blob.
    for _ in 0..3 {
        take_string(&mut rest)?;
    }
    let (_count, tail) = rest.split_first_chunk::<4>()?;
    rest = tail;
    let mut blob = take_string(&mut rest)?;
    let name = std::str::from_utf8(take_string(&mut blob)?).ok()?;
    let known = name.bytes().all(|b| b.is_ascii_graphic()) && !name.is_empty();
    (known && name != "ssh-ed25519").then(|| name.to_owned())
}

fn take_string<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = input.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    let value = rest.get(..len)?;
    *input = rest.get(len..)?;
    Some(value)
}

fn create_new(path: &Path, mode: u32) -> Result<std::fs::File, SignError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                SignError::Exists {
                    path: path.to_owned(),
                }
            } else {
                SignError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })
}

fn write_all_sync(file: &mut std::fs::File, bytes: &[u8], path: &Path) -> Result<(), SignError> {
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| SignError::Io {
            path: path.to_owned(),
            source,
        })
}

impl PublicKey {
    /// Parses one OpenSSH public key line, `ssh-ed25519 AAAA… [comment]` (the content of a
    /// `.pub` file or an `authorized_keys` line without options).
    pub fn parse_openssh(line: &str) -> Result<PublicKey, SignError> {
        let line = line.trim();
        let what = "public key".to_owned();
        if line.starts_with("-----BEGIN") {
            return Err(SignError::WrongKind {
                what,
                reason: "a private key file was given where a public key line (`ssh-ed25519 AAAA…`) was expected".to_owned(),
            });
        }
        let key = ssh_key::PublicKey::from_openssh(line).map_err(|e| SignError::MalformedKey {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(SignError::NotEd25519 {
                what,
                algorithm: key.algorithm().as_str().to_owned(),
            });
        }
        Ok(PublicKey { key })
    }

    /// The OpenSSH public key line, `ssh-ed25519 AAAA… comment` (no comment if it has none).
    pub fn to_openssh(&self) -> String {
        // Encoding an in-memory ed25519 key cannot fail; the fallback spells the same line.
        self.key.to_openssh().unwrap_or_else(|_| {
            let comment = self.key.comment();
            let body = <base64ct::Base64 as base64ct::Encoding>::encode_string(&self.wire_bytes());
            if comment.is_empty() {
                format!("ssh-ed25519 {body}")
            } else {
                format!("ssh-ed25519 {body} {comment}")
            }
        })
    }

    /// `SHA256:<base64 without padding>` of the key's wire encoding, as `ssh-keygen -l` prints.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(HashAlg::Sha256).to_string()
    }

    /// The key's comment (empty if none).
    pub fn comment(&self) -> &str {
        self.key.comment()
    }

    /// The raw 32-byte ed25519 public key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key
            .key_data()
            .ed25519()
            .map(|k| k.0)
            .unwrap_or_default()
    }

    fn wire_bytes(&self) -> Vec<u8> {
        let raw = self.to_bytes();
        let mut out = Vec::with_capacity(51);
        out.extend_from_slice(&11u32.to_be_bytes());
        out.extend_from_slice(b"ssh-ed25519");
        out.extend_from_slice(&32u32.to_be_bytes());
        out.extend_from_slice(&raw);
        out
    }

    /// Checks a raw 64-byte ed25519 signature of `msg`.
    pub fn verify_raw(&self, msg: &[u8], sig: &[u8]) -> Result<(), SignError> {
        let bad = || SignError::BadSignature {
            fingerprint: self.fingerprint(),
        };
        if sig.len() != 64 {
            return Err(bad());
        }
        let sig = ssh_key::Signature::new(Algorithm::Ed25519, sig.to_vec()).map_err(|_| bad())?;
        Verifier::verify(self.key.key_data(), msg, &sig).map_err(|_| bad())
    }

    pub(crate) fn inner(&self) -> &ssh_key::PublicKey {
        &self.key
    }

    pub(crate) fn from_inner(key: ssh_key::PublicKey) -> PublicKey {
        PublicKey { key }
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &PublicKey) -> bool {
        self.key.key_data() == other.key.key_data()
    }
}

impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PublicKey")
            .field(&self.fingerprint())
            .finish()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_round_trips_through_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = SigningKey::generate();
        key.write(&path, "ci@kiln").unwrap();

        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let loaded = SigningKey::load(&path).unwrap();
        assert_eq!(loaded.public(), key.public());
        let line = std::fs::read_to_string(dir.path().join("k.pub")).unwrap();
        assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
        assert!(line.trim_end().ends_with(" ci@kiln"), "{line}");
        let parsed = PublicKey::parse_openssh(&line).unwrap();
        assert_eq!(parsed, key.public());
        assert_eq!(parsed.comment(), "ci@kiln");
        assert_eq!(parsed.to_openssh(), line.trim_end());
    }

    #[test]
    fn write_never_overwrites_either_half() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        SigningKey::generate().write(&path, "").unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = SigningKey::generate().write(&path, "").unwrap_err();
        assert!(matches!(err, SignError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);

        // Only the .pub half in the way: the private half must not be left behind.
        let other = dir.path().join("j");
        std::fs::write(dir.path().join("j.pub"), "x").unwrap();
        let err = SigningKey::generate().write(&other, "").unwrap_err();
        assert!(err.to_string().contains("j.pub: already exists"), "{err}");
        assert!(!other.exists());
    }

    #[test]
    fn raw_signatures_verify_and_tampering_is_caught() {
        let key = SigningKey::generate();
        let sig = key.sign_raw(b"manifest");
        assert_eq!(sig.len(), 64);
        assert_eq!(sig, key.sign_raw(b"manifest"), "ed25519 is deterministic");
        key.public().verify_raw(b"manifest", &sig).unwrap();
        assert!(key.public().verify_raw(b"manifest!", &sig).is_err());
        let mut flipped = sig.clone();
        flipped[10] ^= 1;
        assert!(key.public().verify_raw(b"manifest", &flipped).is_err());
        assert!(key.public().verify_raw(b"manifest", &sig[..63]).is_err());
        let other = SigningKey::generate();
        assert!(other.public().verify_raw(b"manifest", &sig).is_err());
    }

    #[test]
    fn fingerprint_has_ssh_keygen_shape() {
        let fp = SigningKey::generate().public().fingerprint();
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert_eq!(fp.len(), "SHA256:".len() + 43, "{fp}");
        assert!(!fp.ends_with('='));
    }

    #[test]
    fn bad_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = SigningKey::load(&missing).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");

        let junk = dir.path().join("junk");
        std::fs::write(&junk, "hello\n").unwrap();
        let err = SigningKey::load(&junk).unwrap_err();
        assert!(matches!(err, SignError::MalformedKey { .. }), "{err}");
        assert!(err.to_string().contains("junk"), "{err}");

        let key = dir.path().join("k");
        SigningKey::generate().write(&key, "").unwrap();
        let err = SigningKey::load(&dir.path().join("k.pub")).unwrap_err();
        assert!(matches!(err, SignError::WrongKind { .. }), "{err}");

        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDCpX9Cj3vNbd4Mw2Rq3n/OxcKdbPT/ZW7pyTSFTY6Kl3x0oXoJr6sS3VeM3J4z6mBiuM6v2HcbSKu0NNNLPYMTUDbEhTl6vM2WqsqaS0g5W6PhYZk6FtiD6s6o1wQp6G5BYiBTWm4NZ5F3jmGGUvaWg0zHDTrMbVx6vTkfQe3k8w== x";
        let err = PublicKey::parse_openssh(rsa).unwrap_err();
        assert!(matches!(err, SignError::NotEd25519 { .. }), "{err}");
        assert!(err.to_string().contains("ssh-rsa"), "{err}");
        assert!(PublicKey::parse_openssh("ssh-ed25519 AAAA!!").is_err());
    }

    #[test]
    fn encrypted_and_foreign_private_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // `ssh-keygen -t ed25519 -N secret`
        let enc = dir.path().join("enc");
        std::fs::write(&enc, ENCRYPTED).unwrap();
        let err = SigningKey::load(&enc).unwrap_err();
        assert!(matches!(err, SignError::Encrypted { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("enc: the private key is encrypted"),
            "{err}"
        );
        // `ssh-keygen -t ecdsa -N ''`
        let ec = dir.path().join("ec");
        std::fs::write(&ec, ECDSA).unwrap();
        let err = SigningKey::load(&ec).unwrap_err();
        assert!(err.to_string().contains("ecdsa-sha2-nistp256"), "{err}");
        assert!(err.to_string().contains("only with ed25519"), "{err}");
    }

    const ENCRYPTED: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABAa9PxNuK\n4o7I/CCv6VniJZAAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAINBfFZJlJNHsPP1r\nHmiBTpee3WX3KOHtKies7DeyyTTiAAAAkKLRtYGQGUr6m7Hb+BkLIbMlJDdWChiEtCQW62\nH3Xg1PAHy0Sp/mlKYjsOsZRh7+djKbq0/KKkdFdj47RsKqwTkGf5iCTcTjt+x8xD6+RvOs\npk3fGhRUNSgdwsgtX3v80rb3vvCJr8vFxD15LJYMQFKvEEib68sDreTUGZ0yZDfxTFIRsD\nl5Y7FDQ3erBsB1FA==\n-----END OPENSSH PRIVATE KEY-----\n";
    const ECDSA: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAaAAAABNlY2RzYS\n1zaGEyLW5pc3RwMjU2AAAACG5pc3RwMjU2AAAAQQSffuqK2ZB0y/qp1UU5kHCkb9GrSNnj\n2bGPyavj+1iYFn8QTFrLCabsqFcmxmDwCVLuWq++/V15v1rTQ4LJZbvZAAAAmMEgNKnBID\nSpAAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJ9+6orZkHTL+qnV\nRTmQcKRv0atI2ePZsY/Jq+P7WJgWfxBMWssJpuyoVybGYPAJUu5ar779XXm/WtNDgsllu9\nkAAAAga2g+aHLIctsmIMXrQpee3irJVDjDJBj1oWFlXxUm/T4AAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
}
