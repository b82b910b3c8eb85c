//! Authenticode: the signature UEFI Secure Boot checks on a PE/COFF image, here for the
//! unified kernel image ([`crate::uki`]) so that its command line, which carries the
//! dm-verity root hash, is covered by a key the firmware trusts.
//!
//! [`sign`] appends a PKCS#7 `SignedData` (SHA-256, RSA PKCS#1 v1.5) as the image's
//! certificate table, as `sbsign` does, but with no signing time among the authenticated
//! attributes: PKCS#1 v1.5 signatures are deterministic, so the same image and key give the
//! same bytes, which keeps kiln's disks reproducible. [`digest`] is the image hash the
//! signature covers, computed the way EDK2's `DxeImageVerificationLib` (the firmware side)
//! does.
//!
//! The PKCS#7 structure is written by a small DER writer in this module (`tlv`): it is a
//! fixed shape with three variable leaves (the digest, the certificate, the signature), and
//! the RustCrypto `cms`/`x509-cert` crates would add several crates to the build for it. The
//! certificate is read with `der`'s reader; the key and the signature are `rsa`'s.
//!
//! **API boundary:** pure. No files, no processes, no clock, no randomness: the caller reads
//! the key and the image and writes the result.

use der::asn1::ObjectIdentifier;
use der::{Reader, SliceReader, Tag, TagNumber};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer as _};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};

/// `SPC_INDIRECT_DATA_OBJID`: the content type of an Authenticode signature.
const SPC_INDIRECT_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.4");
/// `SPC_PE_IMAGE_DATAOBJ`: what the signed digest is of (a PE image).
const SPC_PE_IMAGE_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.15");
/// `SPC_SP_OPUS_INFO_OBJID`: the (empty) program name and URL attribute.
const SPC_SP_OPUS_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.12");
/// PKCS#7 `signedData`.
const SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
/// PKCS#9 `contentType`.
const CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
/// PKCS#9 `messageDigest`.
const MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
/// SHA-256.
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
/// `rsaEncryption`, the signature algorithm Authenticode names for RSA PKCS#1 v1.5.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// `WIN_CERT_REVISION_2_0`.
const WIN_CERT_REVISION: u16 = 0x0200;
/// `WIN_CERT_TYPE_PKCS_SIGNED_DATA`.
const WIN_CERT_TYPE_PKCS: u16 = 0x0002;
/// The optional header magic of a PE32+ image.
const PE32_PLUS: u16 = 0x20b;
/// The index of the security (certificate table) data directory entry.
const SECURITY: usize = 4;

/// Why an image could not be hashed or signed, or a key read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image is not a well-formed PE/COFF image.
    #[error("not a PE image that can be signed: {0}")]
    Malformed(&'static str),
    /// The image is PE32 (or something else), not PE32+.
    #[error(
        "not a PE32+ image (optional header magic {magic:#06x}): UEFI on x86-64 and arm64 runs PE32+"
    )]
    NotPe32Plus {
        /// The optional header's magic.
        magic: u16,
    },
    /// The image already carries a certificate table.
    #[error(
        "the image is already signed (it has a certificate table of {size} bytes at {offset:#x})"
    )]
    AlreadySigned {
        /// Where the table is.
        offset: u32,
        /// Its size.
        size: u32,
    },
    /// The image or its signature is beyond what a PE file's 32-bit offsets can say.
    #[error("the signed image would be too large: {0}")]
    TooLarge(&'static str),
    /// The private key is encrypted.
    #[error(
        "the private key is encrypted: decrypt it first, e.g. `openssl pkey -in KEY -out DECRYPTED` (openssl asks for the passphrase), and keep the decrypted file private"
    )]
    EncryptedKey,
    /// The key PEM holds something else.
    #[error(
        "the key is a PEM `{label}`, not a `PRIVATE KEY` (PKCS#8) or `RSA PRIVATE KEY` (PKCS#1)"
    )]
    NotAKey {
        /// The PEM label found.
        label: String,
    },
    /// The key PEM could not be read.
    #[error("cannot read the private key: {0}")]
    Key(String),
    /// The certificate could not be read.
    #[error("cannot read the certificate: {0}")]
    Certificate(String),
    /// The key is not the certificate's.
    #[error("the private key does not belong to the certificate (their public keys differ)")]
    KeyMismatch,
    /// RSA signing failed.
    #[error("cannot sign: {0}")]
    Sign(#[source] rsa::signature::Error),
}

/// An RSA key and its X.509 certificate, from PEM text.
///
/// The key is an unencrypted PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`; an encrypted
/// key is refused with an error that says how to decrypt it with openssl.
pub struct Signer {
    key: rsa::pkcs1v15::SigningKey<Sha256>,
    /// The certificate, DER.
    certificate: Vec<u8>,
    /// The certificate's issuer `Name`, DER (tag and length included).
    issuer: Vec<u8>,
    /// The certificate's serial number `INTEGER`, DER (tag and length included).
    serial: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    // The key stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("certificate_len", &self.certificate.len())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// The SHA-256 of the certificate (DER), hex: how a provenance names the key that signed.
    pub fn certificate_sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.certificate))
    }

    /// The signer of `key_pem` (a private key) and `cert_pem` (one `CERTIFICATE`), checked to
    /// be a pair.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Signer, Error> {
        let key = private_key(key_pem)?;
        // A chain would need its intermediates in the signature; kiln's use is a `db`
        // certificate that the firmware trusts directly, so one certificate is the contract.
        let count = cert_pem.matches("-----BEGIN CERTIFICATE-----").count();
        if count > 1 {
            return Err(Error::Certificate(format!(
                "the PEM holds {count} certificates: give only the signing certificate"
            )));
        }
        let (label, certificate) = der::pem::decode_vec(cert_pem.trim().as_bytes())
            .map_err(|e| Error::Certificate(format!("not a PEM certificate: {e}")))?;
        if label != "CERTIFICATE" {
            return Err(Error::Certificate(format!(
                "the PEM is a `{label}`, not a `CERTIFICATE`"
            )));
        }
        let fields = certificate_fields(&certificate)
            .map_err(|e| Error::Certificate(format!("not an X.509 certificate: {e}")))?;
        let public = RsaPublicKey::from_public_key_der(fields.spki)
            .map_err(|e| Error::Certificate(format!("its key is not an RSA key: {e}")))?;
        if public != key.to_public_key() {
            return Err(Error::KeyMismatch);
        }
        let (issuer, serial) = (fields.issuer.to_vec(), fields.serial.to_vec());
        Ok(Signer {
            key: rsa::pkcs1v15::SigningKey::new(key),
            certificate,
            issuer,
            serial,
        })
    }
}

/// The private key of `pem`, PKCS#8 or PKCS#1, refusing encrypted keys.
fn private_key(pem: &str) -> Result<RsaPrivateKey, Error> {
    let pem = pem.trim();
    // OpenSSL's traditional encrypted PKCS#1 carries RFC 1421 headers, which the RFC 7468
    // reader refuses with a less helpful error.
    if pem.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(Error::EncryptedKey);
    }
    let label =
        der::pem::decode_label(pem.as_bytes()).map_err(|e| Error::Key(format!("not PEM: {e}")))?;
    match label {
        "PRIVATE KEY" => {
            RsaPrivateKey::from_pkcs8_pem(pem).map_err(|e| Error::Key(format!("PKCS#8: {e}")))
        }
        "RSA PRIVATE KEY" => {
            RsaPrivateKey::from_pkcs1_pem(pem).map_err(|e| Error::Key(format!("PKCS#1: {e}")))
        }
        "ENCRYPTED PRIVATE KEY" => Err(Error::EncryptedKey),
        other => Err(Error::NotAKey {
            label: other.to_owned(),
        }),
    }
}

/// The parts of an X.509 certificate a signature names, as DER slices of it.
struct CertificateFields<'a> {
    serial: &'a [u8],
    issuer: &'a [u8],
    spki: &'a [u8],
}

/// Reads `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
/// serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, .. }, .. }`.
fn certificate_fields(der: &[u8]) -> der::Result<CertificateFields<'_>> {
    let mut reader = SliceReader::new(der)?;
    let fields = reader.sequence(|certificate| {
        let fields = certificate.sequence(|tbs| {
            let version = Tag::ContextSpecific {
                constructed: true,
                number: TagNumber::N0,
            };
            if tbs.peek_tag()? == version {
                tbs.tlv_bytes()?;
            }
            tbs.peek_tag()?.assert_eq(Tag::Integer)?;
            let serial = tbs.tlv_bytes()?;
            tbs.tlv_bytes()?;
            tbs.peek_tag()?.assert_eq(Tag::Sequence)?;
            let issuer = tbs.tlv_bytes()?;
            tbs.tlv_bytes()?;
            tbs.tlv_bytes()?;
            let spki = tbs.tlv_bytes()?;
            // Unique identifiers and extensions: not needed.
            while !tbs.is_finished() {
                tbs.tlv_bytes()?;
            }
            Ok(CertificateFields {
                serial,
                issuer,
                spki,
            })
        })?;
        while !certificate.is_finished() {
            certificate.tlv_bytes()?;
        }
        Ok(fields)
    })?;
    reader.finish(fields)
}

/// Where the fields that signing touches are in a PE image, all bounds-checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    /// The file offset of the optional header's `CheckSum`.
    checksum: usize,
    /// The file offset of the security data directory entry, if the image has one.
    security: Option<usize>,
    /// `SizeOfHeaders`.
    headers: usize,
    /// `(PointerToRawData, SizeOfRawData)` of each section with data, sorted by the pointer.
    sections: Vec<(usize, usize)>,
}

fn u16_at(pe: &[u8], at: usize) -> Option<u16> {
    let b = pe.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(pe: &[u8], at: usize) -> Option<u32> {
    let b = pe.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads and checks the headers of a PE32+ image.
fn layout(pe: &[u8]) -> Result<Layout, Error> {
    use Error::Malformed;
    if pe.get(..2) != Some(b"MZ".as_slice()) {
        return Err(Malformed("no MZ signature"));
    }
    let lfanew = u32_at(pe, 0x3c).ok_or(Malformed("truncated DOS header"))? as usize;
    if pe.get(lfanew..lfanew.saturating_add(4)) != Some(b"PE\0\0".as_slice()) {
        return Err(Malformed("no PE signature"));
    }
    let coff = lfanew + 4;
    let sections_count = u16_at(pe, coff + 2).ok_or(Malformed("truncated COFF header"))? as usize;
    let optional_size = u16_at(pe, coff + 16).ok_or(Malformed("truncated COFF header"))? as usize;
    let optional = coff + 20;
    let magic = u16_at(pe, optional).ok_or(Malformed("truncated optional header"))?;
    if magic != PE32_PLUS {
        return Err(Error::NotPe32Plus { magic });
    }
    // PE32+: SizeOfHeaders at 60, CheckSum at 64, NumberOfRvaAndSizes at 108, the data
    // directories (8 bytes each) from 112.
    if optional_size < 112 {
        return Err(Malformed("optional header too small for a PE32+ image"));
    }
    let section_table = optional + optional_size;
    let section_table_end = sections_count
        .checked_mul(40)
        .and_then(|n| n.checked_add(section_table))
        .ok_or(Malformed("section table out of range"))?;
    if section_table_end > pe.len() {
        return Err(Malformed("truncated section table"));
    }
    let headers = u32_at(pe, optional + 60).ok_or(Malformed("truncated optional header"))? as usize;
    let checksum = optional + 64;
    let directories = u32_at(pe, optional + 108).ok_or(Malformed("truncated optional header"))?;
    if directories > 16 || 112 + 8 * directories as usize > optional_size {
        return Err(Malformed(
            "more data directories than the optional header holds",
        ));
    }
    let security = (directories as usize > SECURITY).then_some(optional + 112 + 8 * SECURITY);
    if headers > pe.len() {
        return Err(Malformed("SizeOfHeaders is beyond the end of the file"));
    }
    if section_table_end > headers {
        return Err(Malformed("the section table overlaps the sections"));
    }
    let mut sections = Vec::with_capacity(sections_count);
    for i in 0..sections_count {
        let header = section_table + 40 * i;
        let size = u32_at(pe, header + 16).ok_or(Malformed("truncated section table"))? as usize;
        let pointer = u32_at(pe, header + 20).ok_or(Malformed("truncated section table"))? as usize;
        if size == 0 {
            continue;
        }
        if pointer < headers {
            return Err(Malformed("a section's data overlaps the headers"));
        }
        if pointer.checked_add(size).is_none_or(|end| end > pe.len()) {
            return Err(Malformed("a section's data is beyond the end of the file"));
        }
        sections.push((pointer, size));
    }
    // Stable, as EDK2's insertion sort is, so equal pointers keep their table order.
    sections.sort_by_key(|&(pointer, _)| pointer);
    if sections.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(Malformed("sections' data overlap"));
    }
    Ok(Layout {
        checksum,
        security,
        headers,
        sections,
    })
}

/// The security directory entry `(VirtualAddress, Size)` — a file offset and size.
fn security_entry(pe: &[u8], layout: &Layout) -> (u32, u32) {
    layout
        .security
        .and_then(|at| Some((u32_at(pe, at)?, u32_at(pe, at + 4)?)))
        .unwrap_or((0, 0))
}

/// The Authenticode SHA-256 digest of an image, as UEFI firmware (EDK2's
/// `DxeImageVerificationLib`, `HashPeImage`) computes it: the headers up to `SizeOfHeaders`
/// without the checksum and the security data directory entry, then each section's raw data
/// sorted by `PointerToRawData`, then the file's data up to the certificate table from the
/// offset that is the number of bytes hashed so far (which is the end of the last section
/// when there are no gaps). Gaps between sections are not hashed.
pub fn digest(pe: &[u8]) -> Result<[u8; 32], Error> {
    let layout = layout(pe)?;
    digest_of(pe, &layout)
}

fn digest_of(pe: &[u8], layout: &Layout) -> Result<[u8; 32], Error> {
    let mut hash = Sha256::new();
    let after_checksum = layout.checksum + 4;
    match layout.security {
        Some(entry) => {
            hash.update(&pe[..layout.checksum]);
            hash.update(&pe[after_checksum..entry]);
            hash.update(&pe[entry + 8..layout.headers]);
        }
        None => {
            hash.update(&pe[..layout.checksum]);
            hash.update(&pe[after_checksum..layout.headers]);
        }
    }
    let mut hashed = layout.headers;
    for &(pointer, size) in &layout.sections {
        hash.update(&pe[pointer..pointer + size]);
        hashed += size;
    }
    let (_, certificates) = security_entry(pe, layout);
    let end = pe
        .len()
        .checked_sub(certificates as usize)
        .ok_or(Error::Malformed(
            "the certificate table is larger than the file",
        ))?;
    // EDK2 hashes the rest from `hashed`, not from the end of the last section: with gaps
    // between sections these differ, and the firmware is what has to agree.
    if end > hashed {
        hash.update(&pe[hashed..end]);
    } else if end < hashed {
        return Err(Error::Malformed(
            "the certificate table overlaps the sections",
        ));
    }
    Ok(hash.finalize().into())
}

/// The layout of `pe` and the offset of its security directory entry, if it can be signed:
/// a PE32+ image with such an entry and no certificate table yet.
fn signable(pe: &[u8]) -> Result<(Layout, usize), Error> {
    let layout = layout(pe)?;
    let Some(entry) = layout.security else {
        return Err(Error::Malformed(
            "no security data directory entry to point at a signature",
        ));
    };
    let (offset, size) = security_entry(pe, &layout);
    if (offset, size) != (0, 0) {
        return Err(Error::AlreadySigned { offset, size });
    }
    Ok((layout, entry))
}

/// The image with an Authenticode signature (PKCS#7 `SignedData`, SHA-256, RSA PKCS#1 v1.5)
/// appended as its certificate table, and its checksum updated: deterministic, the same
/// image and key give the same bytes (there is no signing time).
pub fn sign(pe: &[u8], signer: &Signer) -> Result<Vec<u8>, Error> {
    let (layout, entry) = signable(pe)?;
    // The certificate table starts 8-byte aligned; the padding before it is image data, so
    // it is hashed (as `sbsign` and EDK2 both do).
    let mut out = pe.to_vec();
    out.resize(pe.len().next_multiple_of(8), 0);
    let image_digest = digest_of(&out, &layout)?;
    let pkcs7 = signed_data(&image_digest, signer)?;
    // EDK2 reads the hash algorithm at a fixed offset that assumes the outer SEQUENCE's
    // length takes two bytes, so a signature must be 256 bytes to 64 KiB.
    if pkcs7.len() > 0xffff + 4 {
        return Err(Error::TooLarge(
            "the signature is over 64 KiB, which firmware does not read",
        ));
    }
    let length = u32::try_from(8 + pkcs7.len()).map_err(|_| Error::TooLarge("signature"))?;
    let table = u32::try_from(out.len()).map_err(|_| Error::TooLarge("image"))?;
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&WIN_CERT_REVISION.to_le_bytes());
    out.extend_from_slice(&WIN_CERT_TYPE_PKCS.to_le_bytes());
    out.extend_from_slice(&pkcs7);
    out.resize(out.len().next_multiple_of(8), 0);
    let table_size =
        u32::try_from(out.len() - table as usize).map_err(|_| Error::TooLarge("signature"))?;
    // The PE checksum adds the file's length as a 32-bit number.
    u32::try_from(out.len()).map_err(|_| Error::TooLarge("signed image"))?;
    out[entry..entry + 4].copy_from_slice(&table.to_le_bytes());
    out[entry + 4..entry + 8].copy_from_slice(&table_size.to_le_bytes());
    out[layout.checksum..layout.checksum + 4].fill(0);
    let sum = crate::uki::pe_checksum(&out, layout.checksum);
    out[layout.checksum..layout.checksum + 4].copy_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// The DER of a tag and a content (definite length, shortest form).
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = Vec::with_capacity(len + 6);
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// `SEQUENCE { parts.. }`.
fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// `SET { parts.. }` — the caller gives SET OF's elements in DER order.
fn set(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x31, &parts.concat())
}

fn oid(oid: &ObjectIdentifier) -> Vec<u8> {
    tlv(0x06, oid.as_bytes())
}

/// `AlgorithmIdentifier { algorithm, NULL }`.
fn algorithm(algorithm: &ObjectIdentifier) -> Vec<u8> {
    sequence(&[&oid(algorithm), &[0x05, 0x00]])
}

/// `INTEGER 1`, the version of `SignedData`, `SignerInfo`.
const VERSION_1: [u8; 3] = [0x02, 0x01, 0x01];

/// The `SpcIndirectDataContent` of an image digest.
fn indirect_data(image_digest: &[u8; 32]) -> Vec<u8> {
    // SpcPeImageData's `file` is an SpcLink [0] holding an SpcString [2] holding a
    // BMPString [0]: the "<<<Obsolete>>>" every Authenticode signer writes.
    let obsolete: Vec<u8> = "<<<Obsolete>>>"
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    let file = tlv(0xa0, &tlv(0xa2, &tlv(0x80, &obsolete)));
    let flags = [0x03, 0x01, 0x00];
    let pe_image_data = sequence(&[&flags, &file]);
    let data = sequence(&[&oid(&SPC_PE_IMAGE_DATA), &pe_image_data]);
    let digest_info = sequence(&[&algorithm(&SHA256), &tlv(0x04, image_digest)]);
    sequence(&[&data, &digest_info])
}

/// The content of a DER value: its bytes after the tag and the length.
fn content(der: &[u8]) -> &[u8] {
    let long = der
        .get(1)
        .map_or(0, |&b| if b & 0x80 == 0 { 0 } else { b & 0x7f });
    der.get(2 + long as usize..).unwrap_or_default()
}

/// The authenticated attributes, in DER `SET OF` order (sorted by their encodings).
fn attributes(indirect: &[u8]) -> Vec<Vec<u8>> {
    // Authenticode's quirk: the message digest is of the content's value, without the
    // SEQUENCE's tag and length.
    let message_digest: [u8; 32] = Sha256::digest(content(indirect)).into();
    let mut attributes = vec![
        sequence(&[&oid(&CONTENT_TYPE), &set(&[&oid(&SPC_INDIRECT_DATA)])]),
        sequence(&[&oid(&SPC_SP_OPUS_INFO), &set(&[&[0x30, 0x00]])]),
        sequence(&[&oid(&MESSAGE_DIGEST), &set(&[&tlv(0x04, &message_digest)])]),
    ];
    attributes.sort();
    attributes
}

/// The PKCS#7 `ContentInfo` (`signedData`) of the Authenticode signature of `image_digest`.
fn signed_data(image_digest: &[u8; 32], signer: &Signer) -> Result<Vec<u8>, Error> {
    let indirect = indirect_data(image_digest);
    let attributes = attributes(&indirect).concat();
    // The signature is over the attributes as a SET; in SignerInfo they are [0] IMPLICIT.
    // No random number generator: the PKCS#1 v1.5 signature is the same with or without
    // one, and this module reads nothing. Without one `rsa` does not blind the private-key
    // operation (RUSTSEC-2023-0071's timing channel), which matters only to an attacker who
    // can time many signings on the build host.
    let signature = signer
        .key
        .try_sign(&tlv(0x31, &attributes))
        .map_err(Error::Sign)?
        .to_vec();
    let signer_info = sequence(&[
        &VERSION_1,
        &sequence(&[&signer.issuer, &signer.serial]),
        &algorithm(&SHA256),
        &tlv(0xa0, &attributes),
        &algorithm(&RSA_ENCRYPTION),
        &tlv(0x04, &signature),
    ]);
    let content_info = sequence(&[&oid(&SPC_INDIRECT_DATA), &tlv(0xa0, &indirect)]);
    let signed = sequence(&[
        &VERSION_1,
        &set(&[&algorithm(&SHA256)]),
        &content_info,
        &tlv(0xa0, &signer.certificate),
        &set(&[&signer_info]),
    ]);
    Ok(sequence(&[&oid(&SIGNED_DATA), &tlv(0xa0, &signed)]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use der::Encode;

    /// A small PE32+ image of `len` bytes: 0x200 bytes of headers with 16 data directories,
    /// a section table of `sections` (`PointerToRawData`, `SizeOfRawData`), and every byte
    /// after the headers its offset's low byte, so a shifted range hashes differently.
    fn image(sections: &[(u32, u32)], len: usize) -> Vec<u8> {
        let mut pe = vec![0u8; len];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3c] = 0x40;
        pe[0x40..0x44].copy_from_slice(b"PE\0\0");
        pe[0x44..0x46].copy_from_slice(&0x8664u16.to_le_bytes());
        pe[0x46..0x48].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        pe[0x54..0x56].copy_from_slice(&240u16.to_le_bytes());
        let optional = 0x58;
        pe[optional..optional + 2].copy_from_slice(&PE32_PLUS.to_le_bytes());
        pe[optional + 60..optional + 64].copy_from_slice(&0x200u32.to_le_bytes());
        pe[optional + 64..optional + 68].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        pe[optional + 108..optional + 112].copy_from_slice(&16u32.to_le_bytes());
        for (i, &(pointer, size)) in sections.iter().enumerate() {
            let header = optional + 240 + 40 * i;
            pe[header..header + 5].copy_from_slice(b".sect");
            pe[header + 16..header + 20].copy_from_slice(&size.to_le_bytes());
            pe[header + 20..header + 24].copy_from_slice(&pointer.to_le_bytes());
        }
        for (at, byte) in pe.iter_mut().enumerate().skip(0x200) {
            *byte = at as u8;
        }
        pe
    }

    const CHECKSUM: usize = 0x58 + 64;
    const SECURITY_ENTRY: usize = 0x58 + 112 + 8 * 4;

    #[test]
    fn tlv_lengths_as_der_encodes_them() {
        for len in [0, 1, 127, 128, 255, 256, 1693, 65535, 65536, 1 << 24] {
            let header = der::Header::new(Tag::OctetString, der::Length::try_from(len).unwrap())
                .unwrap()
                .to_der()
                .unwrap();
            let ours = tlv(0x04, &vec![0; len]);
            assert_eq!(ours[..header.len()], header[..], "length {len}");
            assert_eq!(ours.len(), header.len() + len);
            assert_eq!(content(&ours).len(), len);
        }
    }

    #[test]
    fn indirect_data_as_sbsign_writes_it() {
        // The SpcIndirectDataContent of an `sbsign` 0.9.4 signature of a UKI, from
        // `openssl asn1parse` of its certificate table.
        let digest =
            hex::decode("af20f295ee7b89f0837460e84c62c050858f3711b4d1a9a49f9a9761e6b578e0")
                .unwrap();
        let expected = "30683033060a2b06010401823702010f3025030100a020a21e801c003c003c003c004f\
            00620073006f006c006500740065003e003e003e3031300d06096086480165030402010500\
            0420af20f295ee7b89f0837460e84c62c050858f3711b4d1a9a49f9a9761e6b578e0";
        let ours = indirect_data(&digest.try_into().unwrap());
        assert_eq!(hex::encode(ours), expected);
    }

    #[test]
    fn attributes_sorted_with_the_digest_of_the_content_alone() {
        let indirect = indirect_data(&[7; 32]);
        let attributes = attributes(&indirect);
        assert_eq!(attributes.len(), 3);
        assert!(attributes.is_sorted());
        // DER sorts a SET OF by encoding, so the shortest attribute (SpcSpOpusInfo, an empty
        // SEQUENCE) comes first and the longest (messageDigest) last.
        assert_eq!(
            attributes[0][attributes[0].len() - 4..],
            [0x31, 0x02, 0x30, 0x00]
        );
        let content_type = &attributes[1];
        assert!(content_type.ends_with(&oid(&SPC_INDIRECT_DATA)));
        let message_digest = &attributes[2];
        assert_eq!(message_digest[2..13], oid(&MESSAGE_DIGEST));
        let of_content: [u8; 32] = Sha256::digest(&indirect[2..]).into();
        assert!(message_digest.ends_with(&of_content));
    }

    #[test]
    fn digest_skips_gaps_and_hashes_the_rest_from_the_count_hashed() {
        // Sections listed out of file order, a 0x100-byte gap between them, and 0x20 bytes
        // after the last one.
        let pe = image(&[(0x400, 0x100), (0x200, 0x100)], 0x520);
        let mut expected = Sha256::new();
        expected.update(&pe[..CHECKSUM]);
        expected.update(&pe[CHECKSUM + 4..SECURITY_ENTRY]);
        expected.update(&pe[SECURITY_ENTRY + 8..0x200]);
        expected.update(&pe[0x200..0x300]);
        expected.update(&pe[0x400..0x500]);
        // EDK2 hashes the rest from the number of bytes hashed so far (0x400), not from the
        // end of the last section (0x500).
        expected.update(&pe[0x400..0x520]);
        let expected: [u8; 32] = expected.finalize().into();
        assert_eq!(digest(&pe).unwrap(), expected);

        // The checksum, the security entry and the certificate table it points at are not
        // covered; any other header byte is.
        let mut changed = pe.clone();
        changed[CHECKSUM] ^= 1;
        changed.extend_from_slice(&[0x5a; 0x1000]);
        changed[SECURITY_ENTRY..SECURITY_ENTRY + 4].copy_from_slice(&0x520u32.to_le_bytes());
        changed[SECURITY_ENTRY + 4..SECURITY_ENTRY + 8].copy_from_slice(&0x1000u32.to_le_bytes());
        assert_eq!(digest(&changed).unwrap(), expected);
        // A table larger than what follows the sections is refused.
        changed[SECURITY_ENTRY + 4..SECURITY_ENTRY + 8].copy_from_slice(&0x1200u32.to_le_bytes());
        assert!(digest(&changed).is_err());
        let mut changed = pe.clone();
        changed[0x30] ^= 1;
        assert_ne!(digest(&changed).unwrap(), expected);
        // Nor is the gap.
        let mut changed = pe.clone();
        changed[0x380] ^= 1;
        assert_eq!(digest(&changed).unwrap(), expected);
    }

    #[test]
    fn digest_without_a_security_entry() {
        let mut pe = image(&[(0x200, 0x100)], 0x300);
        pe[0x58 + 108] = 4;
        let mut expected = Sha256::new();
        expected.update(&pe[..CHECKSUM]);
        expected.update(&pe[CHECKSUM + 4..0x300]);
        let expected: [u8; 32] = expected.finalize().into();
        assert_eq!(digest(&pe).unwrap(), expected);
        assert!(matches!(signable(&pe), Err(Error::Malformed(m)) if m.contains("security")));
    }

    #[test]
    fn refusals() {
        let good = image(&[(0x200, 0x100), (0x300, 0x100)], 0x400);
        assert!(signable(&good).is_ok());
        let check = |edit: &dyn Fn(&mut Vec<u8>), expected: &str| {
            let mut pe = good.clone();
            edit(&mut pe);
            let err = signable(&pe).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} does not say {expected:?}");
        };
        check(&|pe| pe[0] = b'X', "no MZ signature");
        check(&|pe| pe[0x40] = b'X', "no PE signature");
        check(&|pe| pe[0x3c] = 0xff, "no PE signature");
        check(
            &|pe| pe[0x59] = 0x01,
            "not a PE32+ image (optional header magic 0x010b)",
        );
        check(
            &|pe| pe[SECURITY_ENTRY..SECURITY_ENTRY + 8].copy_from_slice(&[0, 4, 0, 0, 8, 0, 0, 0]),
            "already signed (it has a certificate table of 8 bytes at 0x400)",
        );
        check(&|pe| pe.truncate(0x3ff), "beyond the end of the file");
        check(&|pe| pe.truncate(0x150), "truncated section table");
        check(
            &|pe| pe[0x58 + 61] = 0x01,
            "the section table overlaps the sections",
        );
        check(
            &|pe| pe[0x58 + 240 + 20 + 1] = 0x01,
            "a section's data overlaps the headers",
        );
        check(&|pe| pe[0x58 + 240 + 16] = 0x01, "sections' data overlap");
        check(&|pe| pe[0x58 + 108] = 17, "more data directories");
        check(&|pe| pe[0x54] = 100, "optional header too small");
    }

    #[test]
    fn no_panic_on_truncated_or_garbage_images() {
        let good = image(&[(0x200, 0x100), (0x400, 0x80)], 0x520);
        for len in 0..good.len() {
            let _ = digest(&good[..len]);
            let _ = signable(&good[..len]);
        }
        // Random bytes written over the headers and section table (a 64-bit LCG, so the
        // run is the same every time).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            x >> 33
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut pe = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % 0x200) as usize;
                pe[at] = next() as u8;
            }
            accepted += usize::from(digest(&pe).is_ok());
            let _ = signable(&pe);
        }
        // Most single-field changes still leave a valid image: the fuzzing reached the
        // hashing, not only the first check.
        assert!(accepted > 10_000, "{accepted}");
    }

    #[test]
    fn keys_refused_with_reasons() {
        let pem = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
        let err = |key: &str| Signer::from_pem(key, "").unwrap_err().to_string();
        assert!(err(&pem("ENCRYPTED PRIVATE KEY")).contains("openssl pkey -in KEY -out DECRYPTED"));
        let traditional = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
            DEK-Info: AES-128-CBC,00000000000000000000000000000000\n\nAAAA\n\
            -----END RSA PRIVATE KEY-----\n";
        assert!(matches!(
            Signer::from_pem(traditional, ""),
            Err(Error::EncryptedKey)
        ));
        assert!(err(&pem("PUBLIC KEY")).contains("PEM `PUBLIC KEY`, not a `PRIVATE KEY`"));
        assert!(err(&pem("PRIVATE KEY")).starts_with("cannot read the private key: PKCS#8"));
        assert!(err("not pem").starts_with("cannot read the private key: not PEM"));
    }

    #[test]
    fn certificate_reader_refuses_garbage() {
        // Too little for a certificate: refused by the reader, not a panic.
        assert!(certificate_fields(&[]).is_err());
        assert!(certificate_fields(&[0x30, 0x03, 0x30, 0x01, 0x02]).is_err());
        assert!(certificate_fields(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
