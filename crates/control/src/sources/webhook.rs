//! A forge's push notification: `POST /v1/sources/{name}/webhook`, signed the way GitHub and
//! Gitea sign theirs, an HMAC-SHA256 of the exact body with the source's webhook secret, in
//! `X-Hub-Signature-256: sha256=<hex>` (Gitea also sends the bare hex as
//! `X-Gitea-Signature`). The body itself is not read: a valid call only says "fetch now", so
//! a replayed or forged payload can at most cause a fetch of what the branch really holds.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The largest body taken (GitHub caps its payloads at 25 MB; a push's is far smaller).
pub const MAX_BODY: usize = 1 << 20;

/// The key a call for a source without one is checked against (and always refused).
pub const NO_KEY: &str = "kiln: this source has no webhook secret";

/// The headers a signature may come in, in the order they are looked at.
pub const SIGNATURE_HEADERS: [&str; 2] = ["x-hub-signature-256", "x-gitea-signature"];

/// Whether `signature` (a header's value: `sha256=<hex>`, or bare hex) is the HMAC-SHA256 of
/// `body` with `key`. Compared in constant time; a malformed value is simply not valid.
pub fn verify(key: &[u8], signature: Option<&str>, body: &[u8]) -> bool {
    let Some(signature) = signature else {
        return false;
    };
    let hex_part = signature
        .trim()
        .strip_prefix("sha256=")
        .unwrap_or(signature.trim());
    let Ok(expected) = hex::decode(hex_part) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// The signature a forge would send for `body` (`sha256=<hex>`): for tests and examples.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(body);
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        }
        // HMAC takes a key of any length: this arm is never taken.
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_documents_this_signature() {
        // The example in GitHub's "Validating webhook deliveries".
        let key = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(key, body), expected);
        assert!(verify(key, Some(expected), body));
        // Gitea's form: the bare hex.
        assert!(verify(key, Some(&expected["sha256=".len()..]), body));
    }

    #[test]
    fn anything_else_is_refused() {
        let key = b"0123456789abcdef";
        let good = sign(key, b"{}");
        assert!(!verify(key, None, b"{}"));
        assert!(!verify(key, Some(""), b"{}"));
        assert!(!verify(key, Some("sha256=zz"), b"{}"));
        assert!(!verify(key, Some(&good), b"{} "));
        assert!(!verify(b"another key 12345", Some(&good), b"{}"));
        assert!(!verify(key, Some(&good[..good.len() - 2]), b"{}"));
    }
}
