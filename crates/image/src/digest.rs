//! Hashing as the image crate streams it: finishing a SHA-256 into a [`Digest`], the build
//! cache's [`ContentId`], hashing reader/writer, and hasher state save/resume.
//!
//! [`Digest`] itself is `kiln_digest::Digest`, the one digest type of the workspace;
//! `kiln_image::Digest` re-exports it.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

pub use kiln_digest::{Digest, InvalidDigest};

/// Finishes `hasher` into a digest.
pub(crate) fn finish(hasher: Sha256) -> Digest {
    Digest::from_sha256(hasher.finalize().into())
}

/// What the build cache knows a file's content by: `blake3:<hex>`, with or without
/// attestations (the SBOM lists the same BLAKE3, so a file's bytes are hashed once for both).
/// Never part of an image — only a cache key — so it can use the fastest sound hash at hand.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub(crate) struct ContentId(String);

impl ContentId {
    pub(crate) fn from_hasher(h: &blake3::Hasher) -> ContentId {
        ContentId(format!("blake3:{}", h.finalize().to_hex()))
    }

    /// The SBOM's BLAKE3 as the content identity (the same string [`from_hasher`] makes).
    ///
    /// [`from_hasher`]: ContentId::from_hasher
    pub(crate) fn from_hashes(h: &FileHashes) -> ContentId {
        let usual = h.blake3.get(..64).unwrap_or(&h.blake3);
        ContentId(format!("blake3:{usual}"))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// What an SBOM records of a file's content: SHA1 (SPDX requires it) and BLAKE3 (one of
/// SPDX 2.3's checksum algorithms, and the build cache's content identity, so a build with
/// attestations hashes each byte twice, not three times).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FileHashes {
    /// SHA1, lowercase hex.
    pub sha1: String,
    /// BLAKE3, lowercase hex, 1,024 bits of its extendable output (see [`blake3_hex`]).
    pub blake3: String,
}

/// Both SBOM hashes, fed together so a file is read once.
#[derive(Clone, Default)]
pub(crate) struct SbomHasher {
    sha1: sha1::Sha1,
    blake3: blake3::Hasher,
}

impl SbomHasher {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.sha1.update(bytes);
        self.blake3.update(bytes);
    }

    pub(crate) fn finish(self) -> FileHashes {
        FileHashes {
            sha1: hex(self.sha1.finalize().as_slice()),
            blake3: blake3_hex(&self.blake3),
        }
    }
}

/// BLAKE3 as the SBOM lists it: 1,024 bits (256 hex digits) of its extendable output, whose
/// first 256 bits are the usual BLAKE3 hash. SPDX 2.3 asks for at least 256 bits; spdx-tools
/// (0.8) checks for at least 256 hex digits, so the longer output satisfies both.
pub fn blake3_hex(h: &blake3::Hasher) -> String {
    let mut out = [0u8; 128];
    h.finalize_xof().fill(&mut out);
    hex(&out)
}

/// The SBOM hashes of `bytes`.
pub fn file_hashes(bytes: &[u8]) -> FileHashes {
    let mut h = SbomHasher::default();
    h.update(bytes);
    h.finish()
}

/// A hasher's state as hex, to be resumed later by [`resume_hasher`].
pub(crate) fn save_hasher(h: &Sha256) -> String {
    use sha2::digest::common::hazmat::SerializableState;
    hex(h.serialize().as_slice())
}

/// The hasher [`save_hasher`] saved, or `None` if `s` is not one (e.g. another version).
pub(crate) fn resume_hasher(s: &str) -> Option<Sha256> {
    use sha2::digest::common::hazmat::{SerializableState, SerializedState};
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect::<Option<_>>()?;
    let state = SerializedState::<Sha256>::try_from(bytes.as_slice()).ok()?;
    Sha256::deserialize(&state).ok()
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// A writer that hashes and counts what passes through it.
pub(crate) struct HashingWriter<W> {
    pub(crate) inner: W,
    pub(crate) hasher: Sha256,
    pub(crate) len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what passes through it.
pub(crate) struct HashingReader<R> {
    pub(crate) inner: R,
    pub(crate) hasher: Sha256,
    pub(crate) len: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_sboms_blake3_is_the_caches_content_identity() {
        let h = file_hashes(b"kiln");
        assert_eq!(h.blake3.len(), 256);
        assert!(
            h.blake3
                .starts_with(blake3::hash(b"kiln").to_hex().as_str())
        );
        // `printf kiln | sha1sum`
        assert_eq!(h.sha1, "7908ea50dacbb9a91898af51d70a054211d46dee");
        let mut b = blake3::Hasher::new();
        b.update(b"kiln");
        assert_eq!(ContentId::from_hashes(&h), ContentId::from_hasher(&b));
    }

    #[test]
    fn a_finished_hasher_is_the_digest_of_what_it_hashed() {
        let mut w = HashingWriter::new(io::sink());
        w.write_all(b"kiln").unwrap();
        assert_eq!(w.len, 4);
        assert_eq!(finish(w.hasher), Digest::of(b"kiln"));
        let saved = save_hasher(&Sha256::new_with_prefix(b"ki"));
        let mut resumed = resume_hasher(&saved).unwrap();
        resumed.update(b"ln");
        assert_eq!(finish(resumed), Digest::of(b"kiln"));
    }
}
