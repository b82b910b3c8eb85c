//! Layer encoding: a sorted entry list → a tar stream → a compressed blob, incrementally.
//!
//! The tar stream is cut into *units* at entry boundaries (and large files into chunks), and
//! each unit is compressed on its own as one gzip member or zstd frame. Concatenated
//! members decompress to exactly the one tar stream, so the blob is an ordinary
//! `tar+gzip`/`tar+zstd` layer. Each compressed unit is cached under a key made of its tar
//! header bytes and its files' content digests, so a one-file change recompresses only that
//! file's unit; then the members are concatenated and hashed again.
//!
//! Unit boundaries depend only on paths (a hash of the path) and on file sizes, never on the
//! thread count or the cache, so the bytes are the same however the work is scheduled.
//! **Invariant:** the compressed bytes of a unit are a pure function of its key — the pinned
//! backend (flate2's miniz_oxide, zstd's bundled libzstd) and a fixed level guarantee it.
//! This module writes blobs through the [`Store`] and cache files through [`BuildCache`];
//! it knows nothing about image configs or bases.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_spec::Compression;
use sha2::{Digest as _, Sha256};

use crate::build::BuildError;
use crate::cache::{BuildCache, CachedLayer, UnitMark};
use crate::digest::{ContentId, Digest, FileHashes, SbomHasher};
use crate::oci;
use crate::store::Store;
use crate::tree::{EntryKind, LayerEntry, StatKey};

/// gzip level. miniz_oxide at 1 runs ~8x faster than at 6 on source-like text for ~30% more
/// bytes; rebuild speed is the point of this crate, and registries store what they get.
pub(crate) const GZIP_LEVEL: u32 = 1;
/// Each block of a unit is its own member, so incompressible parts can be stored.
const BLOCK: usize = 256 * 1024;
/// A block is test-compressed on this many slices of [`SAMPLE`] bytes to decide whether to
/// store it (3% of it: the test must cost much less than the compression it saves).
const SAMPLES: usize = 4;
const SAMPLE: usize = 2 * 1024;
/// zstd level: the library default.
pub(crate) const ZSTD_LEVEL: i32 = 3;
/// Files at least this large get units of their own.
const BIG_FILE: u64 = 256 * 1024;
/// Large files are split into members of this many bytes, so one file compresses on all cores.
const CHUNK: u64 = 4 * 1024 * 1024;
/// About one small entry in this many ends a unit (decided by a hash of its path).
const UNIT_SPREAD: u8 = 32;
/// Blob bytes written between background flushes.
const SYNC_EVERY: u64 = 32 * 1024 * 1024;
/// Bumped whenever the bytes of a unit for a given key would change.
const KEY_VERSION: &[u8] = b"kiln-unit-v3";

/// What the builder reports for each layer, for progress and `--json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerReport {
    /// Compressed blob digest.
    pub digest: Digest,
    /// Uncompressed tar digest (the config's `diff_id`).
    pub diff_id: Digest,
    /// Blob size in bytes.
    pub size: u64,
    /// OCI media type.
    pub media_type: String,
    /// Entries in the layer (files, directories, links).
    pub files: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Units compressed by this build.
    pub units_compressed: u64,
    /// Units in the layer.
    pub units: u64,
    /// Whether the whole layer came from the cache (no unit compressed, nothing rehashed).
    pub cache_hit: bool,
    /// Where it came from: `base` or the `to` of its copy.
    pub source: String,
}

/// One piece of a unit's uncompressed bytes.
#[derive(Debug, Clone)]
enum Piece {
    Bytes(Vec<u8>),
    File {
        source: PathBuf,
        stat: StatKey,
        offset: u64,
        len: u64,
    },
    Zeros(u64),
}

/// A run of the tar stream compressed as one member.
#[derive(Debug, Clone)]
struct Unit {
    pieces: Vec<Piece>,
    key: Option<Digest>,
}

/// A layer ready to be encoded.
pub(crate) struct PlannedLayer {
    units: Vec<Unit>,
    compression: Compression,
    files: u64,
    bytes: u64,
    pub(crate) source: String,
    /// Names "this layer of this app" across builds, so a rebuild can resume from the last.
    lineage: Digest,
}

fn path_hash_ends_unit(path: &str) -> bool {
    let h = Sha256::digest(path.as_bytes());
    h[0] % UNIT_SPREAD == 0
}

fn mtime_of(stat: &StatKey, epoch: u64) -> u64 {
    let secs = u64::try_from(stat.mtime_ns.div_euclid(1_000_000_000)).unwrap_or(0);
    secs.min(epoch)
}

/// The tar header bytes of `e` (with a GNU long-name entry before it when needed).
fn header_bytes(
    tb: &mut tar::Builder<Vec<u8>>,
    e: &LayerEntry,
    epoch: u64,
) -> Result<Vec<u8>, BuildError> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(e.mode);
    h.set_uid(u64::from(e.uid));
    h.set_gid(u64::from(e.gid));
    h.set_size(0);
    let err = |source| BuildError::Tar {
        path: e.path.clone(),
        source,
    };
    match &e.kind {
        EntryKind::Dir => {
            h.set_mtime(epoch);
            h.set_entry_type(tar::EntryType::Directory);
            tb.append_data(&mut h, format!("{}/", e.path), io::empty())
                .map_err(err)?;
        }
        EntryKind::File { stat, .. } => {
            h.set_mtime(mtime_of(stat, epoch));
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(stat.size);
            tb.append_data(&mut h, &e.path, io::empty()).map_err(err)?;
        }
        EntryKind::Symlink { target } => {
            h.set_mtime(epoch);
            h.set_entry_type(tar::EntryType::Symlink);
            let target = Path::new(std::ffi::OsStr::from_bytes(target));
            tb.append_link(&mut h, &e.path, target).map_err(err)?;
        }
        EntryKind::Hardlink { target } => {
            h.set_mtime(epoch);
            h.set_entry_type(tar::EntryType::Link);
            tb.append_link(&mut h, &e.path, target).map_err(err)?;
        }
    }
    Ok(std::mem::take(tb.get_mut()))
}

/// Cuts a layer's entries into units. Reads no file content.
pub(crate) fn plan_layer(
    entries: &[LayerEntry],
    compression: Compression,
    epoch: u64,
    source: String,
    lineage: Digest,
) -> Result<PlannedLayer, BuildError> {
    let mut tb = tar::Builder::new(Vec::new());
    let mut units = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    for e in entries {
        files += 1;
        let header = header_bytes(&mut tb, e, epoch)?;
        match &e.kind {
            EntryKind::File { source, stat, .. } => {
                bytes += stat.size;
                let pad = (512 - stat.size % 512) % 512;
                if stat.size >= BIG_FILE {
                    if !current.is_empty() {
                        units.push(std::mem::take(&mut current));
                    }
                    let mut offset = 0;
                    let mut first = true;
                    while offset < stat.size {
                        let len = CHUNK.min(stat.size - offset);
                        let mut pieces = Vec::new();
                        if first {
                            pieces.push(Piece::Bytes(header.clone()));
                            first = false;
                        }
                        pieces.push(Piece::File {
                            source: source.clone(),
                            stat: *stat,
                            offset,
                            len,
                        });
                        offset += len;
                        if offset == stat.size && pad > 0 {
                            pieces.push(Piece::Zeros(pad));
                        }
                        units.push(pieces);
                    }
                    continue;
                }
                current.push(Piece::Bytes(header));
                if stat.size > 0 {
                    current.push(Piece::File {
                        source: source.clone(),
                        stat: *stat,
                        offset: 0,
                        len: stat.size,
                    });
                }
                if pad > 0 {
                    current.push(Piece::Zeros(pad));
                }
            }
            _ => current.push(Piece::Bytes(header)),
        }
        if path_hash_ends_unit(&e.path) {
            units.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        units.push(current);
    }
    Ok(PlannedLayer {
        units: units
            .into_iter()
            .map(|pieces| Unit { pieces, key: None })
            .collect(),
        compression,
        files,
        bytes,
        source,
        lineage,
    })
}

fn compression_tag(c: Compression) -> String {
    match c {
        Compression::Gzip => {
            format!("gzip-{GZIP_LEVEL}-block-{BLOCK}-sample-{SAMPLES}x{SAMPLE}")
        }
        Compression::Zstd => format!("zstd-{ZSTD_LEVEL}"),
    }
}

/// The media type of a layer with this compression.
pub(crate) fn media_type(c: Compression) -> &'static str {
    match c {
        Compression::Gzip => oci::MEDIA_LAYER_GZIP,
        Compression::Zstd => oci::MEDIA_LAYER_ZSTD,
    }
}

/// Runs `f` on every job on up to `threads` threads; results in job order.
pub(crate) fn parallel<T: Sync, R: Send>(
    jobs: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let workers = threads.clamp(1, jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let r = f(job);
                    if let Some(slot) = results.get(i)
                        && let Ok(mut slot) = slot.lock()
                    {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .filter_map(|m| m.into_inner().ok().flatten())
        .collect()
}

/// Opens a source file. Whether it is still the planned file is checked once, after reading
/// ([`check_unchanged`]): a replaced file has another inode, a rewritten one a new ctime.
fn open_unchanged(source: &Path, _stat: &StatKey) -> Result<File, BuildError> {
    File::open(source).map_err(BuildError::io("open", source))
}

fn check_unchanged(f: &File, source: &Path, stat: &StatKey) -> Result<(), BuildError> {
    let m = f.metadata().map_err(BuildError::io("stat", source))?;
    if StatKey::of(&m) != *stat || m.nlink() == 0 {
        return Err(BuildError::ChangedDuringBuild {
            path: source.to_path_buf(),
        });
    }
    Ok(())
}

/// Feeds a unit's uncompressed bytes to `sink`, reading file pieces from disk.
fn emit_unit(pieces: &[Piece], sink: &mut dyn Write, buf: &mut [u8]) -> Result<(), BuildError> {
    for p in pieces {
        match p {
            Piece::Bytes(b) => sink
                .write_all(b)
                .map_err(BuildError::io("encode", Path::new("-")))?,
            Piece::Zeros(n) => {
                io::copy(&mut io::repeat(0).take(*n), sink)
                    .map_err(BuildError::io("encode", Path::new("-")))?;
            }
            Piece::File {
                source,
                stat,
                offset,
                len,
            } => {
                let mut f = open_unchanged(source, stat)?;
                if *offset > 0 {
                    f.seek(SeekFrom::Start(*offset))
                        .map_err(BuildError::io("seek", source))?;
                }
                let mut left = *len;
                while left > 0 {
                    let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                    let n = f
                        .read(&mut buf[..want])
                        .map_err(BuildError::io("read", source))?;
                    if n == 0 {
                        return Err(BuildError::ChangedDuringBuild {
                            path: source.clone(),
                        });
                    }
                    sink.write_all(&buf[..n])
                        .map_err(BuildError::io("encode", source))?;
                    left -= n as u64;
                }
                check_unchanged(&f, source, stat)?;
            }
        }
    }
    Ok(())
}

/// Compresses a unit with the pinned backend: its uncompressed bytes are cut into
/// [`BLOCK`]-sized blocks, each its own gzip member or zstd frame. For gzip, a block whose
/// sample does not compress is stored instead (deflate level 0), which is as fast as a copy;
/// the choice depends only on the bytes, so it is as reproducible as the rest.
fn compress_unit(pieces: &[Piece], c: Compression, out: &mut Vec<u8>) -> Result<(), BuildError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut plain: Vec<u8> = Vec::new();
    emit_unit(pieces, &mut plain, &mut buf)?;
    compress_bytes(&plain, c, out)
}

fn compress_bytes(plain: &[u8], c: Compression, out: &mut Vec<u8>) -> Result<(), BuildError> {
    let enc_err = || BuildError::io("compress", Path::new("-"));
    let mut sample_out = Vec::new();
    for block in plain.chunks(BLOCK) {
        match c {
            Compression::Gzip => {
                let level = if incompressible(block, &mut sample_out)? {
                    0
                } else {
                    GZIP_LEVEL
                };
                let mut enc = flate2::GzBuilder::new()
                    .operating_system(255)
                    .mtime(0)
                    .write(&mut *out, flate2::Compression::new(level));
                enc.write_all(block).map_err(enc_err())?;
                enc.finish().map_err(enc_err())?;
            }
            Compression::Zstd => {
                let mut enc =
                    zstd::stream::write::Encoder::new(&mut *out, ZSTD_LEVEL).map_err(enc_err())?;
                enc.write_all(block).map_err(enc_err())?;
                enc.finish().map_err(enc_err())?;
            }
        }
    }
    Ok(())
}

/// Whether deflate would gain less than a tenth on `block`, judged at the fastest level on
/// [`SAMPLES`] slices of [`SAMPLE`] bytes spread over it (random data, media, archives).
fn incompressible(block: &[u8], scratch: &mut Vec<u8>) -> Result<bool, BuildError> {
    if block.len() < SAMPLES * SAMPLE * 2 {
        return Ok(false);
    }
    scratch.clear();
    let mut enc = flate2::write::DeflateEncoder::new(&mut *scratch, flate2::Compression::new(1));
    let stride = block.len() / SAMPLES;
    let mut sampled = 0;
    for i in 0..SAMPLES {
        let slice = &block[i * stride..i * stride + SAMPLE];
        sampled += slice.len();
        enc.write_all(slice)
            .map_err(BuildError::io("compress", Path::new("-")))?;
    }
    enc.finish()
        .map_err(BuildError::io("compress", Path::new("-")))?;
    Ok(scratch.len() * 10 > sampled * 9)
}

/// The member that ends every layer: tar's two zero blocks.
fn trailer_member(c: Compression) -> Result<Vec<u8>, BuildError> {
    let mut out = Vec::new();
    compress_bytes(&[0u8; 1024], c, &mut out)?;
    Ok(out)
}

/// Fills in every unit's key from the content digests in `digests` (path → digest).
fn unit_key(
    unit: &Unit,
    c: Compression,
    digest_of: &dyn Fn(&Path) -> Option<ContentId>,
) -> Option<Digest> {
    let mut h = Sha256::new();
    h.update(KEY_VERSION);
    h.update(compression_tag(c).as_bytes());
    for p in &unit.pieces {
        match p {
            Piece::Bytes(b) => {
                h.update(b"B");
                h.update((b.len() as u64).to_le_bytes());
                h.update(b);
            }
            Piece::Zeros(n) => {
                h.update(b"Z");
                h.update(n.to_le_bytes());
            }
            Piece::File {
                source,
                offset,
                len,
                ..
            } => {
                h.update(b"F");
                h.update(digest_of(source)?.as_str().as_bytes());
                h.update(offset.to_le_bytes());
                h.update(len.to_le_bytes());
            }
        }
    }
    Some(crate::digest::finish(h))
}

/// Every source file of a layer with its planned stat.
pub(crate) fn layer_files(layer: &PlannedLayer) -> Vec<(PathBuf, StatKey)> {
    let mut out = Vec::new();
    for u in &layer.units {
        for p in &u.pieces {
            if let Piece::File {
                source,
                stat,
                offset: 0,
                ..
            } = p
            {
                out.push((source.clone(), *stat));
            }
        }
    }
    out
}

/// Hashes a whole file's content, checking it did not change while read.
pub(crate) fn hash_file(
    source: &Path,
    stat: &StatKey,
    sbom: bool,
) -> Result<(ContentId, Option<FileHashes>), BuildError> {
    let mut f = open_unchanged(source, stat)?;
    // With attestations the SBOM's BLAKE3 is the content identity too, so each byte is
    // hashed twice (SPDX's SHA1 and BLAKE3), not three times.
    let mut blake = (!sbom).then(blake3::Hasher::new);
    let mut s = sbom.then(SbomHasher::default);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(BuildError::io("read", source))?;
        if n == 0 {
            break;
        }
        if let Some(h) = &mut blake {
            h.update(&buf[..n]);
        }
        if let Some(s) = &mut s {
            s.update(&buf[..n]);
        }
    }
    check_unchanged(&f, source, stat)?;
    match (blake, s) {
        (_, Some(s)) => {
            let hashes = s.finish();
            Ok((ContentId::from_hashes(&hashes), Some(hashes)))
        }
        (Some(h), None) => Ok((ContentId::from_hasher(&h), None)),
        (None, None) => Err(BuildError::Internal {
            reason: "no hasher for a file's content".to_owned(),
        }),
    }
}

/// Keys all units, compresses those the cache lacks (in parallel across all layers), then
/// assembles and stores each layer blob.
pub(crate) fn encode_layers(
    layers: &mut [PlannedLayer],
    digest_of: &(dyn Fn(&Path) -> Option<ContentId> + Sync),
    cache: &BuildCache,
    store: &Store,
    threads: usize,
    progress: &mut dyn FnMut(crate::build::Progress<'_>),
) -> Result<Vec<LayerReport>, BuildError> {
    // Key every unit, and collect the ones whose compressed member is not cached.
    let mut missing: Vec<(usize, usize)> = Vec::new();
    for (li, layer) in layers.iter_mut().enumerate() {
        let c = layer.compression;
        for (ui, unit) in layer.units.iter_mut().enumerate() {
            let key = unit_key(unit, c, digest_of).ok_or_else(|| BuildError::Internal {
                reason: "a file's content digest was not computed".to_owned(),
            })?;
            if !cache.has_member(&key) {
                missing.push((li, ui));
            }
            unit.key = Some(key);
        }
    }
    if !missing.is_empty() {
        progress(crate::build::Progress::Compressing {
            units: missing.len(),
        });
    }
    let layers_ref: &[PlannedLayer] = layers;
    let results = parallel(&missing, threads, |&(li, ui)| -> Result<(), BuildError> {
        let layer = &layers_ref[li];
        let unit = &layer.units[ui];
        let mut out = Vec::new();
        compress_unit(&unit.pieces, layer.compression, &mut out)?;
        if let Some(key) = &unit.key {
            cache.put_member(key, &out)?;
        }
        Ok(())
    });
    for r in results {
        r?;
    }
    let mut reports = Vec::new();
    for (li, layer) in layers.iter().enumerate() {
        let compressed_here = missing.iter().filter(|(l, _)| *l == li).count() as u64;
        progress(crate::build::Progress::Assembling {
            source: &layer.source,
        });
        let report = assemble(layer, compressed_here, cache, store)?;
        progress(crate::build::Progress::Layer(&report));
        reports.push(report);
    }
    Ok(reports)
}

fn layer_key(layer: &PlannedLayer) -> Digest {
    let mut h = Sha256::new();
    h.update(KEY_VERSION);
    h.update(compression_tag(layer.compression).as_bytes());
    for u in &layer.units {
        if let Some(k) = &u.key {
            h.update(k.as_str().as_bytes());
        }
    }
    crate::digest::finish(h)
}

/// Concatenates a layer's members into a blob, hashing the compressed stream on this thread
/// and the uncompressed tar stream on another.
///
/// When the last assembly of the same layer (its lineage) shares a run of leading units with
/// this one, both hashes resume from the states recorded at the first differing unit and the
/// shared members are copied in-kernel: a change costs the part of the layer after it. The
/// recorded states came from hashing those very members and files, so this trusts the build
/// cache exactly as far as the rest of the build does.
fn assemble(
    layer: &PlannedLayer,
    compressed_here: u64,
    cache: &BuildCache,
    store: &Store,
) -> Result<LayerReport, BuildError> {
    let key = layer_key(layer);
    let report = |cached: &CachedLayer, hit: bool| LayerReport {
        digest: cached.digest.clone(),
        diff_id: cached.diff_id.clone(),
        size: cached.size,
        media_type: media_type(layer.compression).to_owned(),
        files: layer.files,
        bytes: layer.bytes,
        units_compressed: compressed_here,
        units: layer.units.len() as u64,
        cache_hit: hit,
        source: layer.source.clone(),
    };
    if let Some(cached) = cache.layer(&key)
        && store.has_blob(&cached.digest)
    {
        return Ok(report(&cached, compressed_here == 0));
    }
    let keys: Vec<&Digest> = layer.units.iter().filter_map(|u| u.key.as_ref()).collect();
    if keys.len() != layer.units.len() {
        return Err(BuildError::Internal {
            reason: "unit without key".to_owned(),
        });
    }
    let resume = resume_point(layer, &keys, cache);
    let start = resume.as_ref().map_or(0, |r| r.index);
    let trailer = trailer_member(layer.compression)?;
    let (blob, diff) = std::thread::scope(|s| {
        let resume = &resume;
        let diff = s.spawn(move || -> Result<(Digest, Vec<String>), BuildError> {
            let mut h = crate::digest::HashingWriter::new(io::sink());
            if let Some(r) = resume {
                h.hasher = r.uncompressed.clone();
            }
            let mut states = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            for u in &layer.units[start..] {
                states.push(crate::digest::save_hasher(&h.hasher));
                emit_unit(&u.pieces, &mut h, &mut buf)?;
            }
            h.write_all(&[0u8; 1024])
                .map_err(BuildError::io("hash", Path::new("-")))?;
            Ok((crate::digest::finish(h.hasher), states))
        });
        // The compressed stream is hashed on its own thread, reading the members, while this
        // one builds the blob with in-kernel copies: the bytes never pass through user space
        // on the write side, and both run at once.
        let (keys, trailer) = (&keys, &trailer);
        let hashed = s.spawn(move || -> Result<HashedStream, BuildError> {
            let (mut h, mut offset) = match resume {
                Some(r) => (r.compressed.clone(), r.offset),
                None => (Sha256::new(), 0),
            };
            let mut marks = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            for k in &keys[start..] {
                marks.push((offset, crate::digest::save_hasher(&h)));
                let (mut f, _) = cache.open_member(k)?;
                loop {
                    let n = f
                        .read(&mut buf)
                        .map_err(BuildError::io("read", cache.dir()))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    offset += n as u64;
                }
            }
            h.update(trailer);
            offset += trailer.len() as u64;
            Ok((h, marks, offset))
        });
        // The blob must be fsynced before it is named; flushing it in the background every
        // SYNC_EVERY bytes while the rest is still being written leaves the final fsync only
        // the tail. Errors here are not lost: the final fsync reports them.
        let (sync_tx, sync_rx) = std::sync::mpsc::channel::<File>();
        s.spawn(move || {
            for f in sync_rx {
                let _ = f.sync_data();
            }
        });
        let blob = (|| -> Result<BlobWriterAndLen, BuildError> {
            let mut w = store.blob_writer()?;
            let mut synced_at = 0u64;
            let mut background_sync = |w: &crate::store::BlobWriter| {
                if w.len() - synced_at >= SYNC_EVERY
                    && let Ok(f) = w.file_handle()
                {
                    synced_at = w.len();
                    let _ = sync_tx.send(f);
                }
            };
            let werr = BuildError::io("write", store.root());
            if let Some(r) = resume {
                // The previous blob starts with exactly these members: one in-kernel copy of
                // its prefix is much cheaper than one per member. Collected? Use the members.
                let from_blob = std::fs::File::open(store.blob_path(&r.previous_blob))
                    .ok()
                    .filter(|f| f.metadata().is_ok_and(|m| m.len() == r.previous_size));
                match from_blob {
                    Some(f) => {
                        w.write_unhashed(&mut f.take(r.offset)).map_err(werr)?;
                    }
                    None => {
                        for k in &keys[..start] {
                            let (mut f, _) = cache.open_member(k)?;
                            w.write_unhashed(&mut f)
                                .map_err(BuildError::io("write", store.root()))?;
                        }
                    }
                }
                if w.len() != r.offset {
                    return Err(BuildError::Internal {
                        reason: "cached units changed size while being copied".to_owned(),
                    });
                }
                background_sync(&w);
            }
            for k in &keys[start..] {
                let (mut f, _) = cache.open_member(k)?;
                w.write_unhashed(&mut f)
                    .map_err(BuildError::io("write", store.root()))?;
                background_sync(&w);
            }
            w.write_unhashed(&mut trailer.as_slice())
                .map_err(BuildError::io("write", store.root()))?;
            let len = w.len();
            Ok((w, len))
        })();
        let blob = match (blob, hashed.join()) {
            (Ok((mut w, len)), Ok(Ok((h, marks, hashed_len)))) => {
                if len != hashed_len {
                    Err(BuildError::Internal {
                        reason: format!("blob has {len} bytes but {hashed_len} were hashed"),
                    })
                } else {
                    w.resume(h);
                    w.commit(None)
                        .map(|(d, size)| (d, size, marks))
                        .map_err(BuildError::from)
                }
            }
            (Err(e), _) | (_, Ok(Err(e))) => Err(e),
            (_, Err(_)) => Err(BuildError::Internal {
                reason: "the hashing thread panicked".to_owned(),
            }),
        };
        let diff = diff.join().unwrap_or_else(|_| {
            Err(BuildError::Internal {
                reason: "the hashing thread panicked".to_owned(),
            })
        });
        (blob, diff)
    });
    let (digest, size, blob_marks) = blob?;
    let (diff_id, diff_states) = diff?;
    let mut marks: Vec<UnitMark> = match &resume {
        Some(r) => r.shared.clone(),
        None => Vec::new(),
    };
    for ((k, (offset, compressed)), uncompressed) in
        keys[start..].iter().zip(blob_marks).zip(diff_states)
    {
        marks.push(UnitMark {
            key: (*k).clone(),
            offset,
            compressed,
            uncompressed,
        });
    }
    let cached = CachedLayer {
        digest,
        diff_id,
        size,
        marks,
    };
    cache.put_layer(&key, &cached)?;
    cache.put_lineage(&layer.lineage, &key)?;
    Ok(report(&cached, false))
}

/// The compressed stream's hasher, the (offset, state) at each new unit, and its length.
type HashedStream = (Sha256, Vec<(u64, String)>, u64);

/// A blob being written, with its length.
type BlobWriterAndLen = (crate::store::BlobWriter, u64);

/// Where an assembly can pick up from the previous one of the same lineage.
struct Resume {
    /// The first unit to process.
    index: usize,
    /// Compressed offset there.
    offset: u64,
    compressed: Sha256,
    uncompressed: Sha256,
    /// Marks of the shared units, reused as they are.
    shared: Vec<UnitMark>,
    /// The blob that assembly produced, and its size.
    previous_blob: Digest,
    previous_size: u64,
}

fn resume_point(layer: &PlannedLayer, keys: &[&Digest], cache: &BuildCache) -> Option<Resume> {
    let prev = cache.layer(&cache.lineage(&layer.lineage)?)?;
    let common = prev
        .marks
        .iter()
        .zip(keys)
        .take_while(|(m, k)| &m.key == **k)
        .count();
    // Everything shared (only the blob was collected): still redo the last unit, so there is
    // always a mark to resume from.
    let index = common
        .min(keys.len().saturating_sub(1))
        .min(prev.marks.len());
    if index == 0 {
        return None;
    }
    let mark = prev.marks.get(index)?;
    // The shared members must be the bytes the recorded offset counts.
    let mut total = 0u64;
    for k in &keys[..index] {
        total += cache.member_len(k)?;
    }
    if total != mark.offset {
        return None;
    }
    Some(Resume {
        index,
        offset: mark.offset,
        compressed: crate::digest::resume_hasher(&mark.compressed)?,
        uncompressed: crate::digest::resume_hasher(&mark.uncompressed)?,
        shared: prev.marks[..index].to_vec(),
        previous_blob: prev.digest.clone(),
        previous_size: prev.size,
    })
}
