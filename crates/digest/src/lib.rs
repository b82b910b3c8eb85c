//! `kiln-digest`: the content digest, the only way kiln names an image, a layer, a config or
//! a spec text.
//!
//! A [`Digest`] is validated on construction (`sha256:` and 64 lowercase hex digits), so code
//! that holds one can build a path from it without re-checking for `/` or `..`. The image
//! store, the providers, the control plane and the ledger's callers all use this one type, so
//! a digest crosses from one to another as it is, never through a string.
//!
//! **API boundary:** this crate names content and hashes bytes; it does no I/O. Streaming
//! hashers (and their saved states) belong to the code that streams: it finishes its own
//! SHA-256 and hands the 32 bytes to [`Digest::from_sha256`].

use std::fmt;

use sha2::{Digest as _, Sha256};

/// A `sha256:<64 lowercase hex>` content digest.
///
/// Its serde form is that string (the OCI format); deserializing validates it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

/// A string that is not a `sha256:` digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256: followed by 64 lowercase hex digits")]
pub struct InvalidDigest(pub String);

impl Digest {
    /// Parses `s`, which must be `sha256:` and 64 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Digest, InvalidDigest> {
        let ok = s.strip_prefix("sha256:").is_some_and(|hex| {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(Digest(s.to_owned()))
        } else {
            Err(InvalidDigest(s.to_owned()))
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::digest(bytes).into())
    }

    /// The digest whose SHA-256 is `hash` (a hasher's finished output).
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(7 + 64);
        s.push_str("sha256:");
        for b in hash {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        Digest(s)
    }

    /// `sha256:…`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits without the algorithm.
    pub fn hex(&self) -> &str {
        self.0.get(7..).unwrap_or_default()
    }

    /// The first 12 hex digits, for humans.
    pub fn short(&self) -> &str {
        self.0.get(7..19).unwrap_or_default()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for Digest {
    type Error = InvalidDigest;
    fn try_from(s: &str) -> Result<Digest, InvalidDigest> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse_accepts_only_lowercase_sha256() {
        let d = Digest::of(b"");
        assert_eq!(d.as_str(), EMPTY);
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.short(), "e3b0c44298fc");
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::parse(EMPTY), Ok(d.clone()));
        assert_eq!(Digest::try_from(EMPTY), Ok(d));
        for bad in [
            "",
            "sha256:",
            &EMPTY.to_uppercase(),
            &EMPTY[..EMPTY.len() - 1],
            &format!("{EMPTY}0"),
            "sha256:../../etc/passwd",
            "sha512:00",
            &EMPTY.replace("sha256:", ""),
        ] {
            assert_eq!(Digest::parse(bad), Err(InvalidDigest(bad.to_owned())));
        }
    }

    #[test]
    fn from_sha256_spells_the_hash_as_of_does() {
        let hash: [u8; 32] = Sha256::digest(b"kiln").into();
        assert_eq!(Digest::from_sha256(hash), Digest::of(b"kiln"));
        let mut bytes = [0u8; 32];
        bytes[0] = 0x0f;
        bytes[31] = 0xa0;
        assert_eq!(
            Digest::from_sha256(bytes).hex(),
            format!("0f{}a0", "00".repeat(30))
        );
    }

    #[test]
    fn serde_is_the_string_and_validates() {
        let d = Digest::of(b"");
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{EMPTY}\""));
        assert_eq!(
            serde_json::from_str::<Digest>(&format!("\"{EMPTY}\"")).unwrap(),
            d
        );
        let err = serde_json::from_str::<Digest>("\"sha256:../x\"").unwrap_err();
        assert!(err.to_string().starts_with("invalid digest"), "{err}");
    }
}
