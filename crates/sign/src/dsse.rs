//! DSSE envelopes (the Dead Simple Signing Envelope of secure-systems-lab), the signed wrapper
//! in-toto attestations travel in.
//!
//! A signature is a raw ed25519 signature over [`pae`]`(payload_type, payload)`, and its
//! `keyid` is the signing key's [`PublicKey::fingerprint`]. The JSON form carries the payload
//! and signatures in standard base64 with padding (what securesystemslib writes); reading
//! also accepts URL-safe or unpadded base64, as the DSSE specification allows.

use base64ct::{Base64, Base64Unpadded, Base64Url, Base64UrlUnpadded, Encoding};
use serde::{Deserialize, Serialize};

use crate::{PublicKey, SignError, SigningKey};

/// A payload, its type, and the signatures over both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The payload's media type, e.g. `application/vnd.in-toto+json`.
    pub payload_type: String,
    /// The signed bytes.
    pub payload: Vec<u8>,
    /// The signatures, each over [`pae`] of the type and payload.
    pub signatures: Vec<Signature>,
}

/// One signature in an [`Envelope`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The signing key's fingerprint (a hint: verification tries the trusted keys).
    pub keyid: String,
    /// The raw 64-byte ed25519 signature.
    pub sig: Vec<u8>,
}

/// The most signatures an envelope may carry.
pub const MAX_SIGNATURES: usize = 16;

/// The pre-authentication encoding that is signed:
/// `DSSEv1 <len(type)> <type> <len(payload)> <payload>`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// The envelope's JSON shape.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeJson {
    payload: String,
    payload_type: String,
    signatures: Vec<SignatureJson>,
}

#[derive(Serialize, Deserialize)]
struct SignatureJson {
    #[serde(default)]
    keyid: String,
    sig: String,
}

fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, SignError> {
    Base64::decode_vec(text)
        .or_else(|_| Base64Unpadded::decode_vec(text))
        .or_else(|_| Base64Url::decode_vec(text))
        .or_else(|_| Base64UrlUnpadded::decode_vec(text))
        .map_err(|_| SignError::MalformedEnvelope(format!("{field} is not base64")))
}

impl Envelope {
    /// An envelope of `payload` signed by `key` (see [`SigningKey::sign_raw`] for a key in
    /// ssh-agent; [`Envelope::try_sign`] reports its failure).
    pub fn sign(payload_type: &str, payload: Vec<u8>, key: &SigningKey) -> Envelope {
        let sig = key.sign_raw(&pae(payload_type, &payload));
        Envelope::signed(payload_type, payload, key, sig)
    }

    /// [`Envelope::sign`], with a signing failure (of an agent) as an error.
    pub fn try_sign(
        payload_type: &str,
        payload: Vec<u8>,
        key: &SigningKey,
    ) -> Result<Envelope, SignError> {
        let sig = key.try_sign_raw(&pae(payload_type, &payload))?;
        Ok(Envelope::signed(payload_type, payload, key, sig))
    }

    fn signed(payload_type: &str, payload: Vec<u8>, key: &SigningKey, sig: Vec<u8>) -> Envelope {
        Envelope {
            payload_type: payload_type.to_owned(),
            payload,
            signatures: vec![Signature {
                keyid: key.public().fingerprint(),
                sig,
            }],
        }
    }

    /// The JSON form: `{"payload","payloadType","signatures":[{"keyid","sig"}]}`.
    pub fn to_json(&self) -> Vec<u8> {
        let json = EnvelopeJson {
            payload: Base64::encode_string(&self.payload),
            payload_type: self.payload_type.clone(),
            signatures: self
                .signatures
                .iter()
                .map(|s| SignatureJson {
                    keyid: s.keyid.clone(),
                    sig: Base64::encode_string(&s.sig),
                })
                .collect(),
        };
        // Serializing strings into a Vec cannot fail.
        serde_json::to_vec(&json).unwrap_or_default()
    }

    /// Parses the JSON form.
    pub fn from_json(bytes: &[u8]) -> Result<Envelope, SignError> {
        let json: EnvelopeJson = serde_json::from_slice(bytes)
            .map_err(|e| SignError::MalformedEnvelope(e.to_string()))?;
        // Each signature is tried against each trusted key on every check: an envelope with
        // thousands would make each check costly.
        if json.signatures.len() > MAX_SIGNATURES {
            return Err(SignError::MalformedEnvelope(format!(
                "{} signatures; at most {MAX_SIGNATURES} are read",
                json.signatures.len()
            )));
        }
        let signatures = json
            .signatures
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                Ok(Signature {
                    keyid: s.keyid,
                    sig: decode_base64(&format!("signatures[{i}].sig"), &s.sig)?,
                })
            })
            .collect::<Result<Vec<_>, SignError>>()?;
        Ok(Envelope {
            payload: decode_base64("payload", &json.payload)?,
            payload_type: json.payload_type,
            signatures,
        })
    }

    /// The trusted keys that made a valid signature on this envelope, each once, in the order
    /// of `trusted`. Empty if none did: the payload or a signature was changed, or no trusted
    /// key signed.
    pub fn verified_by(&self, trusted: &[PublicKey]) -> Vec<PublicKey> {
        let signed = pae(&self.payload_type, &self.payload);
        let mut by: Vec<PublicKey> = Vec::new();
        for key in trusted {
            if by.contains(key) {
                continue;
            }
            if self
                .signatures
                .iter()
                .any(|s| key.verify_raw(&signed, &s.sig).is_ok())
            {
                by.push(key.clone());
            }
        }
        by
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_specification_example() {
        // The worked example in the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn an_envelope_round_trips_and_verifies_only_untouched() {
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let env = Envelope::sign("application/vnd.in-toto+json", b"{\"a\":1}".to_vec(), &key);
        assert_eq!(env.signatures[0].keyid, key.public().fingerprint());
        let json = env.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains("\"payloadType\":\"application/vnd.in-toto+json\""),
            "{text}"
        );
        assert!(text.contains("\"payload\":\"eyJhIjoxfQ==\""), "{text}");

        let back = Envelope::from_json(&json).unwrap();
        assert_eq!(back, env);
        assert_eq!(
            back.verified_by(&[other.public(), key.public(), key.public()]),
            vec![key.public()]
        );
        assert!(back.verified_by(&[other.public()]).is_empty());

        let mut tampered = back.clone();
        tampered.payload = b"{\"a\":2}".to_vec();
        assert!(tampered.verified_by(&[key.public()]).is_empty());
        let mut retyped = back.clone();
        retyped.payload_type = "text/plain".to_owned();
        assert!(retyped.verified_by(&[key.public()]).is_empty());
        let mut flipped = back;
        flipped.signatures[0].sig[0] ^= 0x80;
        assert!(flipped.verified_by(&[key.public()]).is_empty());
    }

    #[test]
    fn malformed_envelopes_are_errors() {
        assert!(Envelope::from_json(b"{").is_err());
        assert!(
            Envelope::from_json(br#"{"payload":"!!","payloadType":"t","signatures":[]}"#).is_err()
        );
        let err =
            Envelope::from_json(br#"{"payload":"","payloadType":"t","signatures":[{"sig":"%"}]}"#)
                .unwrap_err();
        assert!(err.to_string().contains("signatures[0].sig"), "{err}");
        // URL-safe unpadded base64 is accepted on read.
        let env =
            Envelope::from_json(br#"{"payload":"-_8","payloadType":"t","signatures":[]}"#).unwrap();
        assert_eq!(env.payload, vec![0xfb, 0xff]);
    }
}
