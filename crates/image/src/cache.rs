//! The build cache: what makes a rebuild cheap. Three maps, all rebuildable from scratch:
//!
//! - `stat.json`: host path + (dev, inode, size, mtime, ctime) → content digest, like git's
//!   index, so an unchanged file is not read again. An entry whose mtime is not safely older
//!   than the scan that recorded it is "racily clean" (as git calls it) and is not trusted.
//! - `units/<xx>/<key>`: compressed members, named by their unit key.
//! - `layers/<key>.json`: layer key (its unit keys) → blob digest, diff_id and size.
//!
//! Cache files are written temp → rename, without fsync: losing them costs time, not
//! correctness. It never decides what goes into an image, only whether work can be skipped.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::build::BuildError;
use crate::digest::{ContentId, Digest, FileHashes};
use crate::tree::StatKey;

/// A layer the cache has assembled before.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CachedLayer {
    pub(crate) digest: Digest,
    pub(crate) diff_id: Digest,
    pub(crate) size: u64,
    /// Where each unit starts in both streams, with the SHA-256 states there, so the next
    /// assembly of this layer can resume after the units it shares with this one.
    #[serde(default)]
    pub(crate) marks: Vec<UnitMark>,
}

/// The start of one unit in an assembled layer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct UnitMark {
    /// The unit's key.
    pub(crate) key: Digest,
    /// Offset of its member in the compressed blob.
    pub(crate) offset: u64,
    /// Serialized hasher state of the compressed stream before it (hex).
    pub(crate) compressed: String,
    /// Serialized hasher state of the uncompressed stream before it (hex).
    pub(crate) uncompressed: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StatEntry {
    stat: StatKey,
    digest: ContentId,
    /// The SBOM's hashes of the same content, when a build with attestations read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hashes: Option<FileHashes>,
    /// Nanoseconds since the epoch when the scan that recorded this entry started.
    scanned_at_ns: i128,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct StatFile {
    entries: BTreeMap<PathBuf, StatEntry>,
}

/// Timestamps coarser than this could hide a change made right after a scan.
const RACY_WINDOW_NS: i128 = 2_000_000_000;

/// The on-disk build cache.
#[derive(Debug)]
pub struct BuildCache {
    dir: PathBuf,
    stat: StatFile,
}

impl BuildCache {
    /// Opens (creating) the cache at `dir`. A damaged `stat.json` is treated as empty.
    pub fn open(dir: impl Into<PathBuf>) -> Result<BuildCache, BuildError> {
        let dir = dir.into();
        for d in [dir.join("units"), dir.join("layers")] {
            fs::create_dir_all(&d).map_err(BuildError::io("create", &d))?;
        }
        let stat = fs::read(dir.join("stat.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(BuildCache { dir, stat })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The content digest recorded for `path` if its stat is unchanged and not racy.
    pub(crate) fn content_digest(
        &self,
        path: &Path,
        stat: &StatKey,
    ) -> Option<(ContentId, Option<FileHashes>)> {
        let e = self.stat.entries.get(path)?;
        let safe = stat.mtime_ns + RACY_WINDOW_NS < e.scanned_at_ns
            && stat.ctime_ns + RACY_WINDOW_NS < e.scanned_at_ns;
        (e.stat == *stat && safe).then(|| (e.digest.clone(), e.hashes.clone()))
    }

    /// Records digests freshly computed by a build whose scan started at `scanned_at_ns`
    /// (the content was read after that instant, so a later change moves mtime or ctime).
    pub(crate) fn save_digests(
        &mut self,
        seen: impl IntoIterator<Item = (PathBuf, StatKey, ContentId, Option<FileHashes>)>,
        scanned_at_ns: i128,
    ) -> Result<(), BuildError> {
        for (path, stat, digest, hashes) in seen {
            self.stat.entries.insert(
                path,
                StatEntry {
                    stat,
                    digest,
                    hashes,
                    scanned_at_ns,
                },
            );
        }
        let path = self.dir.join("stat.json");
        let bytes = serde_json::to_vec(&self.stat).map_err(|e| BuildError::Internal {
            reason: format!("cannot encode the stat cache: {e}"),
        })?;
        kiln_durable::write(&path, &bytes).map_err(BuildError::io("write", &path))
    }

    fn unit_path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.dir
            .join("units")
            .join(hex.get(..2).unwrap_or("00"))
            .join(hex)
    }

    pub(crate) fn has_member(&self, key: &Digest) -> bool {
        self.unit_path(key).is_file()
    }

    pub(crate) fn put_member(&self, key: &Digest, bytes: &[u8]) -> Result<(), BuildError> {
        let path = self.unit_path(key);
        let dir = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir).map_err(BuildError::io("create", dir))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(BuildError::io("create temp file in", dir))?;
        tmp.write_all(bytes)
            .map_err(BuildError::io("write", tmp.path()))?;
        tmp.persist(&path)
            .map_err(|e| BuildError::io("rename into", &path)(e.error))?;
        Ok(())
    }

    /// Opens a cached member for a raw copy, with its length.
    pub(crate) fn open_member(&self, key: &Digest) -> Result<(File, u64), BuildError> {
        let path = self.unit_path(key);
        let f = File::open(&path).map_err(BuildError::io("open", &path))?;
        let len = f.metadata().map_err(BuildError::io("stat", &path))?.len();
        Ok((f, len))
    }

    /// The length of a cached member, if present.
    pub(crate) fn member_len(&self, key: &Digest) -> Option<u64> {
        fs::metadata(self.unit_path(key)).ok().map(|m| m.len())
    }

    fn lineage_path(&self, lineage: &Digest) -> PathBuf {
        self.dir.join("lineage").join(lineage.hex())
    }

    /// The layer key last assembled for this source (a copy of one app), if any.
    pub(crate) fn lineage(&self, lineage: &Digest) -> Option<Digest> {
        let text = fs::read_to_string(self.lineage_path(lineage)).ok()?;
        Digest::parse(text.trim()).ok()
    }

    pub(crate) fn put_lineage(&self, lineage: &Digest, layer: &Digest) -> Result<(), BuildError> {
        let path = self.lineage_path(lineage);
        let dir = self.dir.join("lineage");
        fs::create_dir_all(&dir).map_err(BuildError::io("create", &dir))?;
        kiln_durable::write(&path, layer.as_str().as_bytes())
            .map_err(BuildError::io("write", &path))
    }

    fn layer_path(&self, key: &Digest) -> PathBuf {
        self.dir.join("layers").join(format!("{}.json", key.hex()))
    }

    pub(crate) fn layer(&self, key: &Digest) -> Option<CachedLayer> {
        let bytes = fs::read(self.layer_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub(crate) fn put_layer(&self, key: &Digest, layer: &CachedLayer) -> Result<(), BuildError> {
        let path = self.layer_path(key);
        let bytes = serde_json::to_vec(layer).map_err(|e| BuildError::Internal {
            reason: format!("cannot encode a layer cache entry: {e}"),
        })?;
        kiln_durable::write(&path, &bytes).map_err(BuildError::io("write", &path))
    }
}
