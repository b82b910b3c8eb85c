//! Detached SSH signatures (OpenSSH's `PROTOCOL.sshsig`), armored as
//! `-----BEGIN SSH SIGNATURE-----`: the format `ssh-keygen -Y sign` writes and
//! `ssh-keygen -Y verify` checks, hashed with SHA-512 as `ssh-keygen` does.
//!
//! The namespace binds a signature to its purpose, so a signature over an image manifest can
//! never pass as a signature over a ledger checkpoint with the same bytes.

use ssh_key::{HashAlg, LineEnding, SshSig};

use crate::{PublicKey, SignError, SigningKey};

/// The namespace of a signature over an image manifest's exact bytes.
pub const NAMESPACE_IMAGE: &str = "kiln-image";
/// The namespace of a signature over a ledger checkpoint.
pub const NAMESPACE_LEDGER: &str = "kiln-ledger";

/// Signs `msg` for `namespace` and returns the armored signature (LF line endings, ending in a
/// newline).
pub fn sign(key: &SigningKey, namespace: &str, msg: &[u8]) -> Result<String, SignError> {
    let sig = key
        .inner()
        .sign(namespace, HashAlg::Sha512, msg)
        .map_err(|e| SignError::Signing(e.to_string()))?;
    let mut armored = sig
        .to_pem(LineEnding::LF)
        .map_err(|e| SignError::Signing(e.to_string()))?;
    if !armored.ends_with('\n') {
        armored.push('\n');
    }
    Ok(armored)
}

/// Checks an armored signature of `msg` for `namespace` against the `trusted` keys and returns
/// the key that made it.
///
/// Fails if the armor is malformed, the namespace differs, the signing key is not trusted, or
/// the signature does not match `msg`.
pub fn verify(
    armored: &str,
    namespace: &str,
    msg: &[u8],
    trusted: &[PublicKey],
) -> Result<PublicKey, SignError> {
    let sig = SshSig::from_pem(armored.trim().as_bytes())
        .map_err(|e| SignError::MalformedSignature(e.to_string()))?;
    if sig.namespace() != namespace {
        return Err(SignError::Namespace {
            expected: namespace.to_owned(),
            found: sig.namespace().to_owned(),
        });
    }
    let signer = PublicKey::from_inner(ssh_key::PublicKey::from(sig.public_key().clone()));
    let Some(key) = trusted.iter().find(|k| **k == signer) else {
        return Err(SignError::Untrusted {
            fingerprint: signer.fingerprint(),
        });
    };
    key.inner()
        .verify(namespace, msg, &sig)
        .map_err(|_| SignError::BadSignature {
            fingerprint: key.fingerprint(),
        })?;
    Ok(key.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_namespace_message_and_key() {
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let armored = sign(&key, NAMESPACE_IMAGE, b"{\"manifest\":1}").unwrap();
        assert!(
            armored.starts_with("-----BEGIN SSH SIGNATURE-----\n"),
            "{armored}"
        );
        assert!(
            armored.ends_with("-----END SSH SIGNATURE-----\n"),
            "{armored}"
        );
        assert_eq!(
            armored,
            sign(&key, NAMESPACE_IMAGE, b"{\"manifest\":1}").unwrap()
        );

        let trusted = [other.public(), key.public()];
        let by = verify(&armored, NAMESPACE_IMAGE, b"{\"manifest\":1}", &trusted).unwrap();
        assert_eq!(by, key.public());

        let err = verify(&armored, NAMESPACE_LEDGER, b"{\"manifest\":1}", &trusted).unwrap_err();
        assert!(matches!(err, SignError::Namespace { .. }), "{err}");
        let err = verify(&armored, NAMESPACE_IMAGE, b"{\"manifest\":2}", &trusted).unwrap_err();
        assert!(matches!(err, SignError::BadSignature { .. }), "{err}");
        let err = verify(
            &armored,
            NAMESPACE_IMAGE,
            b"{\"manifest\":1}",
            &[other.public()],
        )
        .unwrap_err();
        assert!(matches!(err, SignError::Untrusted { .. }), "{err}");
        assert!(
            err.to_string().contains(&key.public().fingerprint()),
            "{err}"
        );
        let err = verify(
            "-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n",
            NAMESPACE_IMAGE,
            b"",
            &trusted,
        )
        .unwrap_err();
        assert!(matches!(err, SignError::MalformedSignature(_)), "{err}");
    }

    #[test]
    fn a_signature_from_ssh_keygen_verifies() {
        // Made with `ssh-keygen -Y sign -f k -n kiln-image` over the bytes "hello\n".
        let public =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2a4UfuLZCeo70Y4ucURuY86Slf8ksAaS8YVrrbkVm0";
        let armored = "-----BEGIN SSH SIGNATURE-----
U1NIU0lHAAAAAQAAADMAAAALc3NoLWVkMjU1MTkAAAAgTZrhR+4tkJ6jvRji5xRG5jzpKV
/ySwBpLxhWutuRWbQAAAAKa2lsbi1pbWFnZQAAAAAAAAAGc2hhNTEyAAAAUwAAAAtzc2gt
ZWQyNTUxOQAAAEAT6xM4nF58ne0XWk9utuLm8lOFq/rS2x17E4v9sXORC/MI3OS2Z7Xspc
f7AQGMCx9OZF7EcFqgYM/NGAQlSL8D
-----END SSH SIGNATURE-----
";
        let key = PublicKey::parse_openssh(public).unwrap();
        verify(armored, NAMESPACE_IMAGE, b"hello\n", &[key]).unwrap();
    }
}
