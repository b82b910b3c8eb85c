//! How much an imported archive or base may cost: the bounds [`crate::archive`] and bases
//! apply to what they read, derived from the free space where the store lives.
//!
//! Three bounds apply to each layer's uncompressed stream, the smallest winning: the disk
//! (half the free space of the store's file system, at most 64 GiB; and what is left of the
//! same budget for the whole import), and the ratio (100 times the compressed size, but
//! never under 256 MiB). Real layers compress 2–10 times; gzip cannot pass about 1,000 times,
//! which is what a bomb of zeros reaches. The floor keeps small, very repetitive layers
//! (text, zero-filled files) legal. Extension headers are bounded at 1 MiB and JSON documents
//! (index, manifest, config) at 4 MiB, the manifest size the OCI distribution spec has
//! registries accept.

use std::path::Path;

use crate::unpack::Limits;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Bounds on one import (or one base): see the module docs for the defaults and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportLimits {
    /// Uncompressed bytes of one layer (or of a compressed archive read for its entries).
    pub layer_bytes: u64,
    /// Uncompressed bytes of all the layers of one import together.
    pub import_bytes: u64,
    /// A compressed layer may grow this many times when decompressed…
    pub ratio: u64,
    /// …but is always allowed this many bytes.
    pub ratio_floor: u64,
    /// Entries in one layer.
    pub entries: u64,
    /// Bytes of one PAX or GNU extension header.
    pub header_bytes: u64,
    /// Bytes of one JSON document (index, manifest, config).
    pub json_bytes: u64,
}

impl ImportLimits {
    /// The defaults with no disk to measure: as if 128 GiB were free.
    pub fn fixed() -> Self {
        ImportLimits {
            layer_bytes: 64 * GIB,
            import_bytes: 64 * GIB,
            ratio: 100,
            ratio_floor: 256 * MIB,
            entries: Limits::default().max_entries,
            header_bytes: Limits::default().max_header_bytes,
            json_bytes: 4 * MIB,
        }
    }

    /// The defaults for a store at `dir`: disk bounds at half its file system's free space.
    pub fn for_disk(dir: &Path) -> Self {
        let mut l = Self::fixed();
        if let Ok(st) = rustix::fs::statvfs(dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            l.layer_bytes = l.layer_bytes.min(free / 2);
            l.import_bytes = l.import_bytes.min(free / 2);
        }
        l
    }

    /// The bound on one layer's uncompressed bytes, given its compressed size (`None` for
    /// an uncompressed layer) and what the import has used already.
    pub fn layer_max(&self, compressed: Option<u64>, used: u64) -> u64 {
        let mut max = self.layer_bytes.min(self.import_bytes.saturating_sub(used));
        if let Some(c) = compressed {
            max = max.min(self.ratio.saturating_mul(c).max(self.ratio_floor));
        }
        max
    }

    /// [`Limits`] for unpacking or checking one layer (see [`Self::layer_max`]).
    pub fn layer(&self, compressed: Option<u64>, used: u64) -> Limits {
        Limits {
            max_entries: self.entries,
            max_bytes: self.layer_max(compressed, used),
            max_header_bytes: self.header_bytes,
        }
    }

    /// Which bound [`Self::layer_max`] picked, in words, for an error message.
    pub fn explain(&self, compressed: Option<u64>, used: u64) -> String {
        let max = self.layer_max(compressed, used);
        if let Some(c) = compressed
            && max == self.ratio.saturating_mul(c).max(self.ratio_floor)
            && max < self.layer_bytes.min(self.import_bytes.saturating_sub(used))
        {
            return format!(
                "a layer may decompress to {} times its {c} compressed bytes, and at least \
                 {} bytes",
                self.ratio, self.ratio_floor
            );
        }
        if max == self.layer_bytes {
            return "a layer may take at most half the store's free disk space, and 64 GiB"
                .to_owned();
        }
        format!(
            "an import's layers together may take at most {} bytes, half the store's free \
             disk space or 64 GiB",
            self.import_bytes
        )
    }
}

/// Whether a stream starting with `head` is gzip or zstd.
pub(crate) fn is_compressed(head: &[u8]) -> bool {
    head.starts_with(&[0x1f, 0x8b]) || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_bound_wins_and_is_explained() {
        let l = ImportLimits::fixed();
        // A 1 MB gzip layer: the ratio floor.
        assert_eq!(l.layer_max(Some(1_000_000), 0), 256 * MIB);
        assert!(l.explain(Some(1_000_000), 0).contains("100 times"));
        // A 100 MB layer: 100 times it.
        assert_eq!(l.layer_max(Some(100_000_000), 0), 10_000_000_000);
        // Uncompressed, or compressed past the disk bound: the disk.
        assert_eq!(l.layer_max(None, 0), 64 * GIB);
        assert_eq!(l.layer_max(Some(GIB), 0), 64 * GIB);
        assert!(l.explain(None, 0).contains("free disk"));
        // What the import used before is taken off.
        assert_eq!(l.layer_max(None, 60 * GIB), 4 * GIB);
        assert!(l.explain(None, 60 * GIB).contains("together"));
    }

    #[test]
    fn the_disk_bound_is_half_the_free_space() {
        let dir = std::env::temp_dir();
        let l = ImportLimits::for_disk(&dir);
        let st = rustix::fs::statvfs(&dir).unwrap();
        let half = st.f_bavail * st.f_frsize / 2;
        assert_eq!(l.layer_bytes, half.min(64 * GIB));
    }
}
