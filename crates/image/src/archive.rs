//! Moving images in and out of the store: OCI layout directories, oci-archive tarballs,
//! docker-archive tarballs (`docker save` / `docker load`), and plain root filesystems.
//!
//! Every blob that comes in is checked against its digest as it is copied (a mismatch is an
//! error naming the blob), and every new layer is read through once, decompressed, before it
//! is stored: its content must match its `diff_id` and pass [`crate::unpack::check`], within
//! the [`ImportLimits`] (so a hostile layer is refused at import, not when an instance first
//! needs it). Archives are read by seeking to entries, never by extracting them; links inside
//! an archive or a layout directory are never followed out of it, and what kiln reads there
//! must be a regular file. Exported archives are written deterministically (sorted entries,
//! zero mtimes, numeric owners 0:0).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use kiln_spec::OciReference;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::digest::{Digest, HashingReader};
use crate::entries::{Bounded, Entries, stream_too_long};
use crate::limits::{ImportLimits, is_compressed};
use crate::oci::{self, Descriptor, Index, Manifest};
use crate::store::{Store, StoreError};
use crate::unpack::{self, UnpackError, UnpackOptions, WhiteoutMode};

/// Why an import or export failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The input is not in a format kiln reads, or is inconsistent.
    #[error("{path}: {reason}")]
    Invalid {
        /// The input.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A layer's content does not match its `diff_id`.
    #[error(
        "layer {layer} in {path} does not match its diff_id {diff_id} (content hashes to {actual})"
    )]
    DiffIdMismatch {
        /// The archive.
        path: PathBuf,
        /// The layer.
        layer: String,
        /// What the config says.
        diff_id: Digest,
        /// What the content hashes to.
        actual: Digest,
    },
    /// A layer that unpacking would refuse, or that passes a limit.
    #[error("layer {layer} in {path}: {source}{note}")]
    Layer {
        /// The archive or layout.
        path: PathBuf,
        /// The layer.
        layer: String,
        /// What is wrong with it.
        source: Box<UnpackError>,
        /// Which limit applied, when one did (`" (…)"`), else empty.
        note: String,
    },
    /// Unpacking failed (hostile or malformed input).
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ArchiveError {
    let path = path.to_path_buf();
    move |source| ArchiveError::Io { op, path, source }
}

fn invalid(path: &Path, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// An OCI image layout directory.
    Oci,
    /// A tarball of an OCI image layout.
    OciArchive,
    /// What `docker save` writes and `docker load` reads (Docker 20.10 and later).
    DockerArchive,
    /// The image's filesystem, all layers applied, in a directory.
    Rootfs,
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oci" => Ok(ExportFormat::Oci),
            "oci-archive" => Ok(ExportFormat::OciArchive),
            "docker-archive" => Ok(ExportFormat::DockerArchive),
            "rootfs" => Ok(ExportFormat::Rootfs),
            other => Err(format!(
                "unknown format {other:?}: expected oci, oci-archive, docker-archive or rootfs"
            )),
        }
    }
}

/// One image brought into the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Imported {
    /// Its manifest in the store.
    pub manifest: Descriptor,
    /// Tags given to it (from the archive).
    pub tags: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Reading layers.

/// What one import has spent of its [`ImportLimits`].
struct Budget<'a> {
    limits: &'a ImportLimits,
    /// Uncompressed layer bytes read so far.
    used: u64,
}

/// Reads a layer through once: decompressed within the budget, checked as [`unpack`] would,
/// hashed. Returns its diff_id. `open` gives a fresh reader of the (compressed) blob.
fn check_layer<'r>(
    budget: &mut Budget<'_>,
    path: &Path,
    layer: &str,
    size: u64,
    mut open: impl FnMut() -> Result<Box<dyn Read + 'r>, ArchiveError>,
) -> Result<Digest, ArchiveError> {
    let mut head = Vec::with_capacity(4);
    open()?
        .take(4)
        .read_to_end(&mut head)
        .map_err(io_err("read", path))?;
    let compressed = is_compressed(&head).then_some(size);
    let limits = budget.limits.layer(compressed, budget.used);
    let wrap = |source: UnpackError| {
        let note = match source {
            UnpackError::TooLarge { .. } | UnpackError::StreamTooLong { .. } => {
                format!(" ({})", budget.limits.explain(compressed, budget.used))
            }
            _ => String::new(),
        };
        ArchiveError::Layer {
            path: path.to_path_buf(),
            layer: layer.to_owned(),
            source: Box::new(source),
            note,
        }
    };
    let plain =
        unpack::decompress(open()?).map_err(|source| wrap(UnpackError::Malformed { source }))?;
    let mut plain = HashingReader::new(plain);
    unpack::check(&mut plain, &limits).map_err(wrap)?;
    budget.used = budget.used.saturating_add(plain.len);
    Ok(crate::digest::finish(plain.hasher))
}

/// The `rootfs.diff_ids` of an image config.
fn diff_ids(config: &serde_json::Value) -> Vec<Digest> {
    config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().and_then(|s| Digest::parse(s).ok()))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// OCI layouts: a directory, or an oci-archive read by seeking.

/// Where an OCI layout's files are read from. Nothing is followed out of it: in a
/// directory, paths resolve beneath it with no symlinks at all; in a tarball, see
/// [`TarIndex::locate`]. Either way what is read must be a regular file.
enum Layout<'a> {
    Dir { path: PathBuf, fd: OwnedFd },
    Tar(&'a TarIndex),
}

impl Layout<'_> {
    fn dir(path: &Path) -> Result<Layout<'static>, ArchiveError> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open", path)(e.into()))?;
        Ok(Layout::Dir {
            path: path.to_path_buf(),
            fd,
        })
    }

    fn path(&self) -> &Path {
        match self {
            Layout::Dir { path, .. } => path,
            Layout::Tar(t) => &t.path,
        }
    }

    fn has(&self, rel: &str) -> bool {
        match self {
            Layout::Dir { .. } => self.open(rel).is_ok(),
            Layout::Tar(t) => t.entries.contains_key(rel),
        }
    }

    /// A regular file of the layout and its size.
    fn open(&self, rel: &str) -> Result<(Box<dyn Read + '_>, u64), ArchiveError> {
        match self {
            Layout::Dir { path, fd } => {
                // O_NONBLOCK: a FIFO planted in the layout must not hang the open; it is
                // refused below like any file that is not regular.
                let file = rustix::fs::openat2(
                    fd,
                    rel,
                    OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
                )
                .map_err(|e| match e {
                    rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => invalid(
                        path,
                        format!("{rel:?} is a symlink or passes through one; links in an image layout are not followed"),
                    ),
                    e => io_err("open", &path.join(rel))(e.into()),
                })?;
                let st = rustix::fs::fstat(&file)
                    .map_err(|e| io_err("stat", &path.join(rel))(e.into()))?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    != rustix::fs::FileType::RegularFile
                {
                    return Err(invalid(path, format!("{rel:?} is not a regular file")));
                }
                let size = u64::try_from(st.st_size).unwrap_or(0);
                Ok((
                    Box::new(io::BufReader::with_capacity(1 << 20, File::from(file))),
                    size,
                ))
            }
            Layout::Tar(t) => {
                let (off, size) = t.locate(rel)?;
                Ok((Box::new(t.reader_at(off, size)?), size))
            }
        }
    }

    /// A whole file of at most `max` bytes.
    fn read(&self, rel: &str, max: u64) -> Result<Vec<u8>, ArchiveError> {
        let (r, size) = self.open(rel)?;
        if size > max {
            return Err(invalid(
                self.path(),
                format!("{rel:?} is {size} bytes, over the limit of {max} for a JSON document"),
            ));
        }
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        r.take(max)
            .read_to_end(&mut out)
            .map_err(io_err("read", self.path()))?;
        Ok(out)
    }
}

fn blob_name(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

fn read_layout_json<T: serde::de::DeserializeOwned>(
    layout: &Layout<'_>,
    limits: &ImportLimits,
    d: &Digest,
    what: &str,
) -> Result<(T, Vec<u8>), ArchiveError> {
    let name = blob_name(d);
    let bytes = layout.read(&name, limits.json_bytes)?;
    let actual = Digest::of(&bytes);
    if &actual != d {
        return Err(StoreError::Corrupt {
            digest: d.clone(),
            actual,
            path: layout.path().join(name),
        }
        .into());
    }
    let v = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(layout.path(), format!("{what} {d} is not valid: {e}")))?;
    Ok((v, bytes))
}

/// Copies one blob from a layout into the store, verifying its digest on the way.
fn copy_blob(store: &Store, layout: &Layout<'_>, d: &Digest) -> Result<(), ArchiveError> {
    if store.has_blob(d) {
        return Ok(());
    }
    let (mut r, _) = layout.open(&blob_name(d))?;
    store.write_blob_from(&mut r, Some(d))?;
    Ok(())
}

fn media_is_index(m: &str) -> bool {
    m == oci::MEDIA_INDEX || m == oci::MEDIA_DOCKER_LIST
}

/// Picks the manifest for `arch`/linux out of an index entry, following nested indexes.
fn pick_manifest(
    layout: &Layout<'_>,
    limits: &ImportLimits,
    d: &Descriptor,
    arch: &str,
    depth: u32,
) -> Result<Descriptor, ArchiveError> {
    if !media_is_index(&d.media_type) {
        return Ok(d.clone());
    }
    if depth > 8 {
        return Err(invalid(layout.path(), "indexes nest more than 8 deep"));
    }
    let (idx, _): (Index, _) = read_layout_json(layout, limits, &d.digest, "index")?;
    let chosen = idx
        .manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.architecture == arch && p.os == "linux")
        })
        .or_else(|| (idx.manifests.len() == 1).then(|| &idx.manifests[0]))
        .ok_or_else(|| {
            invalid(
                layout.path(),
                format!("index {} has no linux/{arch} image", d.digest),
            )
        })?;
    pick_manifest(layout, limits, chosen, arch, depth + 1)
}

/// Docker media types name the same bytes as their OCI counterparts.
pub(crate) fn oci_layer_type(m: &str) -> String {
    match m {
        oci::MEDIA_DOCKER_LAYER_GZIP => oci::MEDIA_LAYER_GZIP.to_owned(),
        "application/vnd.docker.image.rootfs.diff.tar" => oci::MEDIA_LAYER_TAR.to_owned(),
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => oci::MEDIA_LAYER_ZSTD.to_owned(),
        other => other.to_owned(),
    }
}

/// Images in an OCI layout, selected by `reference` (all when `None`), each with the tags
/// its `index.json` gives it.
fn layout_images(
    layout: &Layout<'_>,
    limits: &ImportLimits,
    reference: Option<&OciReference>,
    arch: &str,
) -> Result<Vec<(Descriptor, Vec<String>)>, ArchiveError> {
    if !layout.has("oci-layout") {
        return Err(invalid(
            layout.path(),
            "not an OCI image layout (no oci-layout file)",
        ));
    }
    let bytes = layout.read("index.json", limits.json_bytes)?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(
            layout.path(),
            format!("index.json is not a valid index: {e}"),
        )
    })?;
    let mut out: Vec<(Descriptor, Vec<String>)> = Vec::new();
    for d in &index.manifests {
        let tag = d.annotations.get(oci::ANNOTATION_REF_NAME).cloned();
        // Referrers come in with their subject (`import_referrers`), not as images.
        if reference.is_none() && is_referrer_entry(d) {
            continue;
        }
        let selected = match reference {
            None => true,
            Some(OciReference::Digest(want)) => d.digest.as_str() == want,
            Some(OciReference::Tag(want)) => tag.as_deref() == Some(want.as_str()),
        };
        if !selected {
            continue;
        }
        let m = pick_manifest(layout, limits, d, arch, 0)?;
        match out.iter_mut().find(|(x, _)| x.digest == m.digest) {
            Some((_, tags)) => tags.extend(tag),
            None => out.push((m, tag.into_iter().collect())),
        }
    }
    if out.is_empty() {
        let what = match reference {
            Some(OciReference::Tag(t)) => format!("no image tagged {t:?}"),
            Some(OciReference::Digest(d)) => format!("no image {d}"),
            None => "no image".to_owned(),
        };
        return Err(invalid(layout.path(), what));
    }
    Ok(out)
}

/// Copies one image (manifest, config, layers) from a layout into the store and returns
/// its manifest descriptor in the store. A layer not in the store yet is checked first.
fn import_layout_image(
    store: &Store,
    layout: &Layout<'_>,
    budget: &mut Budget<'_>,
    m: &Descriptor,
) -> Result<Descriptor, ArchiveError> {
    let (manifest, bytes): (Manifest, _) =
        read_layout_json(layout, budget.limits, &m.digest, "manifest")?;
    let (config, _): (serde_json::Value, _) =
        read_layout_json(layout, budget.limits, &manifest.config.digest, "config")?;
    let diff_ids = diff_ids(&config);
    if diff_ids.len() != manifest.layers.len() {
        return Err(invalid(
            layout.path(),
            format!(
                "config {} lists {} diff_ids for {} layers",
                manifest.config.digest,
                diff_ids.len(),
                manifest.layers.len()
            ),
        ));
    }
    copy_blob(store, layout, &manifest.config.digest)?;
    for (l, diff_id) in manifest.layers.iter().zip(&diff_ids) {
        if store.has_blob(&l.digest) {
            continue;
        }
        let name = blob_name(&l.digest);
        let actual = check_layer(budget, layout.path(), &name, l.size, || {
            Ok(layout.open(&name)?.0)
        })?;
        if &actual != diff_id {
            return Err(ArchiveError::DiffIdMismatch {
                path: layout.path().to_path_buf(),
                layer: name,
                diff_id: diff_id.clone(),
                actual,
            });
        }
        copy_blob(store, layout, &l.digest)?;
    }
    let digest = store.write_blob(&bytes)?;
    Ok(Descriptor {
        media_type: manifest
            .media_type
            .clone()
            .unwrap_or_else(|| m.media_type.clone()),
        digest,
        size: bytes.len() as u64,
        annotations: BTreeMap::new(),
        platform: None,
        artifact_type: None,
    })
}

/// Brings the image `reference` selects (or the only one) from an OCI layout directory into
/// the store.
pub fn import_oci_base(
    store: &Store,
    dir: &Path,
    reference: Option<&OciReference>,
    arch: &str,
    limits: &ImportLimits,
) -> Result<Descriptor, ArchiveError> {
    let layout = Layout::dir(dir)?;
    let images = layout_images(&layout, limits, reference, arch)?;
    if images.len() > 1 {
        return Err(invalid(
            dir,
            format!(
                "holds {} images; name one with oci:PATH:TAG or oci:PATH@DIGEST",
                images.len()
            ),
        ));
    }
    let (m, _) = &images[0];
    let mut budget = Budget { limits, used: 0 };
    import_layout_image(store, &layout, &mut budget, m)
}

// ---------------------------------------------------------------------------------------
// Tarballs read by seeking.

/// What a tarball entry is.
enum Kind {
    File,
    Symlink(String),
    Other(tar::EntryType),
}

/// An uncompressed tarball indexed by entry name, read by seeking.
struct TarIndex {
    file: File,
    path: PathBuf,
    /// Name → (data offset, size, kind).
    entries: BTreeMap<String, (u64, u64, Kind)>,
    _tmp: Option<tempfile::NamedTempFile>,
}

fn clean_name(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .to_owned()
}

impl TarIndex {
    /// Indexes the tarball at `path`. A compressed one is first decompressed to a temp
    /// file in `tmp_dir`, within the limits (so the temp file is bounded too).
    fn open(path: &Path, tmp_dir: &Path, limits: &ImportLimits) -> Result<TarIndex, ArchiveError> {
        let mut file = File::open(path).map_err(io_err("open", path))?;
        let meta = file.metadata().map_err(io_err("stat", path))?;
        if !meta.is_file() {
            return Err(invalid(path, "is not a regular file"));
        }
        let mut head = Vec::with_capacity(4);
        (&mut file)
            .take(4)
            .read_to_end(&mut head)
            .map_err(io_err("read", path))?;
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("seek", path))?;
        let mut tmp = None;
        if is_compressed(&head) {
            // Seeking needs the plain tar: decompress it once to a temp file.
            let max = limits.layer_max(Some(meta.len()), 0);
            let mut t = tempfile::Builder::new()
                .prefix("import-")
                .tempfile_in(tmp_dir)
                .map_err(io_err("create temp file in", tmp_dir))?;
            let r = unpack::decompress(io::BufReader::new(file)).map_err(io_err("read", path))?;
            io::copy(&mut Bounded::new(r, max), t.as_file_mut()).map_err(
                |e| match stream_too_long(&e) {
                    Some(limit) => invalid(
                        path,
                        format!(
                            "decompresses to more than {limit} bytes ({}); refused",
                            limits.explain(Some(meta.len()), 0)
                        ),
                    ),
                    None => io_err("decompress", path)(e),
                },
            )?;
            file = t.reopen().map_err(io_err("reopen", t.path()))?;
            tmp = Some(t);
        }
        let mut entries = BTreeMap::new();
        {
            let mut ar = tar::Archive::new(&file);
            let mut it =
                Entries::new(&mut ar, limits.header_bytes).map_err(ArchiveError::Unpack)?;
            while let Some(e) = it.next_entry()? {
                if entries.len() as u64 >= limits.entries {
                    return Err(UnpackError::TooManyEntries {
                        limit: limits.entries,
                    }
                    .into());
                }
                let name = clean_name(&String::from_utf8_lossy(&e.name));
                let kind = match e.header.entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
                    tar::EntryType::Symlink => Kind::Symlink(
                        String::from_utf8_lossy(e.link.as_deref().unwrap_or_default()).into_owned(),
                    ),
                    other => Kind::Other(other),
                };
                entries.insert(name, (e.offset, e.size, kind));
            }
        }
        Ok(TarIndex {
            file,
            path: path.to_path_buf(),
            entries,
            _tmp: tmp,
        })
    }

    /// Resolves `name` to (offset, size) of a regular file. Symlinked entries (older
    /// `docker save` links shared layers) are followed only to other entries: a link
    /// that is absolute or climbs out of the archive is refused, never read on the host.
    fn locate(&self, name: &str) -> Result<(u64, u64), ArchiveError> {
        let asked = clean_name(name);
        let mut name = asked.clone();
        for _ in 0..8 {
            let Some((off, size, kind)) = self.entries.get(&name) else {
                return Err(invalid(&self.path, format!("has no entry {name:?}")));
            };
            match kind {
                Kind::File => return Ok((*off, *size)),
                Kind::Other(t) => {
                    return Err(invalid(
                        &self.path,
                        format!("entry {name:?} is not a regular file ({t:?}); refused"),
                    ));
                }
                Kind::Symlink(target) => {
                    let refuse = || {
                        invalid(
                            &self.path,
                            format!(
                                "entry {name:?} is a symlink to {target:?}, out of the archive; \
                                 links are not followed out of an archive"
                            ),
                        )
                    };
                    if target.starts_with('/') {
                        return Err(refuse());
                    }
                    let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                    let mut parts: Vec<String> = Vec::new();
                    for c in base.join(target).components() {
                        match c {
                            std::path::Component::ParentDir if parts.pop().is_none() => {
                                return Err(refuse());
                            }
                            std::path::Component::ParentDir => {}
                            std::path::Component::Normal(p) => {
                                parts.push(p.to_string_lossy().into_owned())
                            }
                            _ => {}
                        }
                    }
                    name = parts.join("/");
                }
            }
        }
        Err(invalid(&self.path, format!("symlink loop at {asked:?}")))
    }

    fn reader_at(&self, off: u64, size: u64) -> Result<impl Read + '_, ArchiveError> {
        let mut f = &self.file;
        f.seek(SeekFrom::Start(off))
            .map_err(io_err("seek", &self.path))?;
        Ok(io::BufReader::with_capacity(1 << 20, f.take(size)))
    }

    fn reader(&self, name: &str) -> Result<(impl Read + '_, u64), ArchiveError> {
        let (off, size) = self.locate(name)?;
        Ok((self.reader_at(off, size)?, size))
    }

    /// A whole entry of at most `max` bytes.
    fn read(&self, name: &str, max: u64) -> Result<Vec<u8>, ArchiveError> {
        let (r, size) = self.reader(name)?;
        if size > max {
            return Err(invalid(
                &self.path,
                format!(
                    "entry {name:?} is {size} bytes, over the limit of {max} for a JSON document"
                ),
            ));
        }
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        r.take(max)
            .read_to_end(&mut out)
            .map_err(io_err("read", &self.path))?;
        Ok(out)
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Imports every image of a `docker save` tarball (plain or gzip).
pub fn import_docker_archive(
    store: &Store,
    path: &Path,
    limits: &ImportLimits,
) -> Result<Vec<Imported>, ArchiveError> {
    let _writer = store.writer_guard()?;
    let tar = TarIndex::open(path, &store.root().join("tmp"), limits)?;
    import_docker_from_index(store, &tar, limits)
}

fn import_docker_from_index(
    store: &Store,
    tar: &TarIndex,
    limits: &ImportLimits,
) -> Result<Vec<Imported>, ArchiveError> {
    let path = tar.path.as_path();
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&tar.read("manifest.json", limits.json_bytes)?)
            .map_err(|e| invalid(path, format!("manifest.json is not valid: {e}")))?;
    let mut budget = Budget { limits, used: 0 };
    let mut out = Vec::new();
    for entry in entries {
        let config_bytes = tar.read(&entry.config, limits.json_bytes)?;
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(path, format!("{} is not valid JSON: {e}", entry.config)))?;
        let diff_ids = diff_ids(&config);
        if diff_ids.len() != entry.layers.len() {
            return Err(invalid(
                path,
                format!(
                    "{} lists {} diff_ids for {} layers",
                    entry.config,
                    diff_ids.len(),
                    entry.layers.len()
                ),
            ));
        }
        let config_digest = store.write_blob(&config_bytes)?;
        let mut layers = Vec::new();
        for (name, diff_id) in entry.layers.iter().zip(&diff_ids) {
            layers.push(import_docker_layer(store, tar, &mut budget, name, diff_id)?);
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(oci::MEDIA_MANIFEST.to_owned()),
            config: Descriptor {
                media_type: oci::MEDIA_CONFIG.to_owned(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                annotations: BTreeMap::new(),
                platform: None,
                artifact_type: None,
            },
            layers,
            annotations: BTreeMap::new(),
            artifact_type: None,
            subject: None,
        };
        let bytes = crate::store::canonical(&manifest, "manifest")?;
        let digest = store.write_blob(&bytes)?;
        let desc = Descriptor {
            media_type: oci::MEDIA_MANIFEST.to_owned(),
            digest,
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
            artifact_type: None,
        };
        out.push(Imported {
            manifest: desc,
            tags: entry.repo_tags.unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Stores one docker layer as-is (same bytes, so the same digest) after checking it and
/// that its uncompressed content matches `diff_id`.
fn import_docker_layer(
    store: &Store,
    tar: &TarIndex,
    budget: &mut Budget<'_>,
    name: &str,
    diff_id: &Digest,
) -> Result<Descriptor, ArchiveError> {
    let path = tar.path.as_path();
    let (mut r, size) = tar.reader(name)?;
    let mut head = Vec::with_capacity(4);
    (&mut r)
        .take(4)
        .read_to_end(&mut head)
        .map_err(io_err("read", path))?;
    let media_type = if head.starts_with(&[0x1f, 0x8b]) {
        oci::MEDIA_LAYER_GZIP
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        oci::MEDIA_LAYER_ZSTD
    } else {
        oci::MEDIA_LAYER_TAR
    };
    let actual = check_layer(budget, path, name, size, || {
        Ok(Box::new(tar.reader(name)?.0))
    })?;
    if &actual != diff_id {
        return Err(ArchiveError::DiffIdMismatch {
            path: path.to_path_buf(),
            layer: name.to_owned(),
            diff_id: diff_id.clone(),
            actual,
        });
    }
    let (digest, size) = store.write_blob_from(&mut tar.reader(name)?.0, None)?;
    Ok(Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size,
        annotations: BTreeMap::new(),
        platform: None,
        artifact_type: None,
    })
}

/// Imports an OCI layout directory, an oci-archive, or a docker-archive, tagging each image
/// as the input names it, within the default [`ImportLimits`] for the store's disk.
pub fn import(store: &Store, path: &Path) -> Result<Vec<Imported>, ArchiveError> {
    import_with(store, path, &ImportLimits::for_disk(store.root()))
}

/// [`import`] within `limits`.
pub fn import_with(
    store: &Store,
    path: &Path,
    limits: &ImportLimits,
) -> Result<Vec<Imported>, ArchiveError> {
    let _writer = store.writer_guard()?;
    if path.is_dir() {
        return import_layout_all(store, &Layout::dir(path)?, limits);
    }
    let tar = TarIndex::open(path, &store.root().join("tmp"), limits)?;
    if tar.entries.contains_key("manifest.json") {
        let imported = import_docker_from_index(store, &tar, limits)?;
        tag_all(store, &imported)?;
        return Ok(imported);
    }
    if tar.entries.contains_key("oci-layout") {
        return import_layout_all(store, &Layout::Tar(&tar), limits);
    }
    Err(invalid(
        path,
        "not an OCI layout directory, an oci-archive or a docker-archive",
    ))
}

fn import_layout_all(
    store: &Store,
    layout: &Layout<'_>,
    limits: &ImportLimits,
) -> Result<Vec<Imported>, ArchiveError> {
    let mut budget = Budget { limits, used: 0 };
    let mut out = Vec::new();
    for (m, tags) in layout_images(layout, limits, None, "amd64")? {
        let desc = import_layout_image(store, layout, &mut budget, &m)?;
        out.push(Imported {
            manifest: desc,
            tags,
        });
    }
    let subjects = out.iter().map(|i| i.manifest.digest.clone()).collect();
    import_referrers(store, layout, limits, subjects)?;
    tag_all(store, &out)?;
    Ok(out)
}

/// Whether an `index.json` entry of a layout is a referrer or a referrers-tag index.
fn is_referrer_entry(d: &Descriptor) -> bool {
    d.artifact_type.is_some()
        || d.annotations
            .get(oci::ANNOTATION_REF_NAME)
            .and_then(|t| crate::referrers::fallback_subject(t))
            .is_some()
}

/// The most bytes one referrer's payload may have on import (an SBOM of a large image is a
/// few MB; a signature a few hundred bytes).
const MAX_REFERRER_PAYLOAD: u64 = 64 << 20;

/// Brings the referrers of the images in `subjects` (and theirs, in turn) from a layout into
/// the store: those its `index.json` lists untagged with `subject` naming an image, and
/// those in an image's referrers-tag index (`sha256-<hex>`, as `skopeo copy --all` carries
/// them). Each is checked as the store checks its own: one naming another image as its
/// subject is refused, never attached to this one.
fn import_referrers(
    store: &Store,
    layout: &Layout<'_>,
    limits: &ImportLimits,
    subjects: Vec<Digest>,
) -> Result<(), ArchiveError> {
    let bytes = layout.read("index.json", limits.json_bytes)?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(
            layout.path(),
            format!("index.json is not a valid index: {e}"),
        )
    })?;
    // Untagged referrers: which image each one names is in its manifest.
    let mut loose: Vec<(Digest, Vec<u8>, Descriptor)> = Vec::new();
    for d in index.manifests.iter().filter(|d| d.artifact_type.is_some()) {
        let (m, bytes): (Manifest, _) = read_layout_json(layout, limits, &d.digest, "referrer")?;
        if let Some(s) = m.subject {
            loose.push((s.digest, bytes, d.clone()));
        }
    }
    let mut work = subjects;
    let mut done = std::collections::BTreeSet::new();
    while let Some(subject) = work.pop() {
        if !done.insert(subject.clone()) {
            continue;
        }
        let mut found: BTreeMap<Digest, Vec<u8>> = BTreeMap::new();
        for (s, bytes, d) in &loose {
            if s == &subject {
                found.insert(d.digest.clone(), bytes.clone());
            }
        }
        let tag = crate::referrers::fallback_tag(&subject);
        let fallback = index.manifests.iter().find(|d| {
            d.annotations.get(oci::ANNOTATION_REF_NAME) == Some(&tag)
                && media_is_index(&d.media_type)
        });
        if let Some(f) = fallback {
            let (list, _): (Index, _) =
                read_layout_json(layout, limits, &f.digest, "referrers index")?;
            for child in list.manifests {
                let (_, bytes): (serde_json::Value, _) =
                    read_layout_json(layout, limits, &child.digest, "referrer")?;
                found.insert(child.digest, bytes);
            }
        }
        for (digest, bytes) in found {
            let (manifest, referrer) = crate::referrers::parse_referrer(&subject, &digest, &bytes)?;
            let (_, config_size) = layout.open(&blob_name(&manifest.config.digest))?;
            if config_size > limits.json_bytes {
                return Err(invalid(
                    layout.path(),
                    format!("referrer {digest}'s config is {config_size} bytes; refused"),
                ));
            }
            copy_blob(store, layout, &manifest.config.digest)?;
            let (_, payload_size) = layout.open(&blob_name(&referrer.payload))?;
            if payload_size > MAX_REFERRER_PAYLOAD {
                return Err(invalid(
                    layout.path(),
                    format!(
                        "referrer {digest}'s payload is {payload_size} bytes, more than \
                         {MAX_REFERRER_PAYLOAD}; refused"
                    ),
                ));
            }
            copy_blob(store, layout, &referrer.payload)?;
            let stored = store.write_blob(&bytes)?;
            let mut desc = Descriptor::new(oci::MEDIA_MANIFEST, stored, bytes.len() as u64);
            desc.artifact_type = Some(referrer.artifact_type.clone());
            store.add_referrer(&subject, desc, referrer.annotations)?;
            work.push(digest);
        }
    }
    Ok(())
}

fn tag_all(store: &Store, imported: &[Imported]) -> Result<(), ArchiveError> {
    for i in imported {
        for t in &i.tags {
            store.tag(t, &i.manifest)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Export.

/// Writes the image `reference` names to `dest` in `format`. `dest` must not exist yet
/// (for `oci`, an existing OCI layout is added to).
pub fn export(
    store: &Store,
    reference: &str,
    format: ExportFormat,
    dest: &Path,
) -> Result<Descriptor, ArchiveError> {
    let desc = store.resolve(reference)?;
    let manifest = store.manifest(&desc.digest)?;
    let tags: Vec<String> = store.inspect(desc.digest.as_str())?.tags;
    match format {
        ExportFormat::Oci => export_layout(store, &desc, &manifest, &tags, dest)?,
        ExportFormat::OciArchive => {
            refuse_existing(dest)?;
            let tmp = sibling_tempdir(dest)?;
            let layout = tmp.path().join("layout");
            export_layout(store, &desc, &manifest, &tags, &layout)?;
            write_tar(dest, |b| append_dir_sorted(b, &layout, ""))?;
        }
        ExportFormat::DockerArchive => {
            refuse_existing(dest)?;
            export_docker(store, &manifest, &tags, dest)?;
        }
        ExportFormat::Rootfs => {
            refuse_existing(dest)?;
            fs::create_dir_all(dest).map_err(io_err("create", dest))?;
            let opts = UnpackOptions {
                whiteouts: WhiteoutMode::Apply,
                ..UnpackOptions::default()
            };
            for l in &manifest.layers {
                let blob = store.open_blob(&l.digest)?;
                let r = unpack::decompress(blob)
                    .map_err(io_err("read", &store.blob_path(&l.digest)))?;
                unpack::unpack(r, dest, &opts)?;
            }
        }
    }
    Ok(desc)
}

/// Writes the image whose manifest is `manifest` as a `docker save`-style archive at `dest`
/// (which must not exist), naming it `tags` (`repo:tag`) instead of its tags in the store,
/// and returns its config digest: the image ID a Docker Engine reports after loading it.
pub fn export_docker_archive(
    store: &Store,
    manifest: &Digest,
    tags: &[String],
    dest: &Path,
) -> Result<Digest, ArchiveError> {
    refuse_existing(dest)?;
    let manifest = store.manifest(manifest)?;
    export_docker(store, &manifest, tags, dest)?;
    Ok(manifest.config.digest.clone())
}

fn refuse_existing(dest: &Path) -> Result<(), ArchiveError> {
    if dest.exists() {
        return Err(invalid(dest, "already exists; choose a new path"));
    }
    Ok(())
}

fn sibling_tempdir(dest: &Path) -> Result<tempfile::TempDir, ArchiveError> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(".kiln-export-")
        .tempdir_in(parent)
        .map_err(io_err("create temp dir in", parent))
}

fn export_layout(
    store: &Store,
    desc: &Descriptor,
    manifest: &Manifest,
    tags: &[String],
    dest: &Path,
) -> Result<(), ArchiveError> {
    let out = Store::open(dest)?;
    let digests = std::iter::once(&desc.digest)
        .chain(std::iter::once(&manifest.config.digest))
        .chain(manifest.layers.iter().map(|l| &l.digest));
    for d in digests {
        if !out.has_blob(d) {
            let mut r = store.open_blob(d)?;
            out.write_blob_from(&mut r, Some(d))?;
        }
    }
    // The image's referrers (and theirs), so signatures and attestations travel with it.
    let mut work = vec![desc.digest.clone()];
    while let Some(subject) = work.pop() {
        for r in store.referrers(&subject)? {
            let (m, _) = store.read_referrer(&subject, &r.manifest)?;
            for d in [&r.manifest, &m.config.digest, &r.payload] {
                if !out.has_blob(d) {
                    let mut rd = store.open_blob(d)?;
                    out.write_blob_from(&mut rd, Some(d))?;
                }
            }
            let mut rdesc = Descriptor::new(
                oci::MEDIA_MANIFEST,
                r.manifest.clone(),
                store.blob_size(&r.manifest)?,
            );
            rdesc.artifact_type = Some(r.artifact_type.clone());
            out.add_referrer(&subject, rdesc, r.annotations.clone())?;
            work.push(r.manifest);
        }
    }
    for t in tags {
        out.tag(t, desc)?;
    }
    if tags.is_empty() {
        out.tag(&format!("kiln/{}:latest", desc.digest.short()), desc)?;
    }
    // The export is a plain layout: kiln's lock and temp directories have no place in it.
    for extra in ["locks", "tmp"] {
        let _ = fs::remove_dir_all(dest.join(extra));
    }
    Ok(())
}

fn write_tar(
    dest: &Path,
    fill: impl FnOnce(&mut tar::Builder<io::BufWriter<&mut File>>) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-export-")
        .tempfile_in(parent)
        .map_err(io_err("create temp file in", parent))?;
    {
        let mut b = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut()));
        fill(&mut b)?;
        b.finish().map_err(io_err("write", dest))?;
        let mut w = b.into_inner().map_err(io_err("write", dest))?;
        w.flush().map_err(io_err("write", dest))?;
    }
    tmp.as_file().sync_all().map_err(io_err("sync", dest))?;
    tmp.persist(dest)
        .map_err(|e| io_err("rename into", dest)(e.error))?;
    Ok(())
}

fn tar_header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(kind);
    h
}

fn append_bytes<W: Write>(
    b: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
    dest: &Path,
) -> Result<(), ArchiveError> {
    let mut h = tar_header(bytes.len() as u64, 0o644, tar::EntryType::Regular);
    b.append_data(&mut h, name, bytes)
        .map_err(io_err("write", dest))
}

fn append_dir_sorted<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    prefix: &str,
) -> Result<(), ArchiveError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let name = format!("{prefix}{}", n.to_string_lossy());
        let meta = fs::symlink_metadata(&p).map_err(io_err("stat", &p))?;
        if meta.is_dir() {
            let mut h = tar_header(0, 0o755, tar::EntryType::Directory);
            b.append_data(&mut h, format!("{name}/"), io::empty())
                .map_err(io_err("write", &p))?;
            append_dir_sorted(b, &p, &format!("{name}/"))?;
        } else if meta.is_file() {
            let mut h = tar_header(meta.len(), 0o644, tar::EntryType::Regular);
            let f = File::open(&p).map_err(io_err("open", &p))?;
            b.append_data(&mut h, &name, f)
                .map_err(io_err("write", &p))?;
        }
    }
    Ok(())
}

/// Writes what `docker save` writes: `manifest.json`, the config as `<hex>.json`, and each
/// layer as `<hex>/layer.tar` (gzip layers kept compressed — Docker 20.10 accepts them;
/// zstd layers decompressed, which it does not read).
fn export_docker(
    store: &Store,
    manifest: &Manifest,
    tags: &[String],
    dest: &Path,
) -> Result<(), ArchiveError> {
    let config_name = format!("{}.json", manifest.config.digest.hex());
    let config_bytes = store.read_blob(&manifest.config.digest)?;
    let mut layer_names = Vec::new();
    for l in &manifest.layers {
        layer_names.push(format!("{}/layer.tar", l.digest.hex()));
    }
    let repo_tags: Vec<String> = tags.to_vec();
    let docker_manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": repo_tags,
        "Layers": layer_names,
    }]);
    let manifest_bytes = crate::store::canonical(&docker_manifest, "manifest.json")?;
    let mut repositories = BTreeMap::<String, BTreeMap<String, String>>::new();
    if let Some(last) = manifest.layers.last() {
        for t in tags {
            if let Some((repo, tag)) = t.rsplit_once(':') {
                repositories
                    .entry(repo.to_owned())
                    .or_default()
                    .insert(tag.to_owned(), last.digest.hex().to_owned());
            }
        }
    }
    let repositories_bytes = crate::store::canonical(&repositories, "repositories")?;
    write_tar(dest, |b| {
        append_bytes(b, &config_name, &config_bytes, dest)?;
        let mut seen = std::collections::BTreeSet::new();
        for (l, name) in manifest.layers.iter().zip(&layer_names) {
            if !seen.insert(name.clone()) {
                continue;
            }
            let mut h = tar_header(0, 0o755, tar::EntryType::Directory);
            b.append_data(&mut h, format!("{}/", l.digest.hex()), io::empty())
                .map_err(io_err("write", dest))?;
            let blob_path = store.blob_path(&l.digest);
            if l.media_type == oci::MEDIA_LAYER_ZSTD {
                // Size must be known for the header: decompress to a temp file first.
                let mut t = tempfile::tempfile_in(store.root().join("tmp"))
                    .map_err(io_err("create temp file in", store.root()))?;
                let mut r = unpack::decompress(store.open_blob(&l.digest)?)
                    .map_err(io_err("read", &blob_path))?;
                let n = io::copy(&mut r, &mut t).map_err(io_err("decompress", &blob_path))?;
                t.seek(SeekFrom::Start(0))
                    .map_err(io_err("seek", &blob_path))?;
                let mut h = tar_header(n, 0o644, tar::EntryType::Regular);
                b.append_data(&mut h, name, t)
                    .map_err(io_err("write", dest))?;
            } else {
                let r = store.open_blob(&l.digest)?;
                let mut h = tar_header(l.size, 0o644, tar::EntryType::Regular);
                b.append_data(&mut h, name, r).map_err(|e| {
                    match e
                        .get_ref()
                        .and_then(|i| i.downcast_ref::<crate::store::CorruptBlob>())
                    {
                        Some(c) => ArchiveError::Store(StoreError::Corrupt {
                            digest: c.expected.clone(),
                            actual: c.actual.clone(),
                            path: c.path.clone(),
                        }),
                        None => io_err("write", dest)(e),
                    }
                })?;
            }
        }
        append_bytes(b, "manifest.json", &manifest_bytes, dest)?;
        append_bytes(b, "repositories", &repositories_bytes, dest)?;
        Ok(())
    })
}
