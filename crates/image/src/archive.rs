//! Moving images in and out of the store: OCI layout directories, oci-archive tarballs,
//! docker-archive tarballs (`docker save` / `docker load`), and plain root filesystems.
//!
//! Every blob that comes in is checked against its digest as it is copied (a mismatch is an
//! error naming the blob); an uncompressed docker layer is also checked against its
//! `diff_id`. Archives are read through [`crate::unpack`] or by seeking to entries, never by
//! extracting with tar's own unpacker. Exported archives are written deterministically
//! (sorted entries, zero mtimes, numeric owners 0:0).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kiln_spec::OciReference;

use crate::digest::{Digest, HashingReader};
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
// OCI layout directories.

fn layout_blob(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(d.hex())
}

fn read_layout_json<T: serde::de::DeserializeOwned>(
    dir: &Path,
    d: &Digest,
    what: &str,
) -> Result<(T, Vec<u8>), ArchiveError> {
    let path = layout_blob(dir, d);
    let bytes = fs::read(&path).map_err(io_err("read", &path))?;
    let actual = Digest::of(&bytes);
    if &actual != d {
        return Err(StoreError::Corrupt {
            digest: d.clone(),
            actual,
            path,
        }
        .into());
    }
    let v = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(&path, format!("{what} {d} is not valid: {e}")))?;
    Ok((v, bytes))
}

/// Copies one blob from a layout into the store, verifying its digest on the way.
fn copy_blob(store: &Store, dir: &Path, d: &Digest) -> Result<(), ArchiveError> {
    if store.has_blob(d) {
        return Ok(());
    }
    let path = layout_blob(dir, d);
    let mut f = File::open(&path).map_err(io_err("open", &path))?;
    store.write_blob_from(&mut f, Some(d))?;
    Ok(())
}

fn media_is_index(m: &str) -> bool {
    m == oci::MEDIA_INDEX || m == oci::MEDIA_DOCKER_LIST
}

/// Picks the manifest for `arch`/linux out of an index entry, following nested indexes.
fn pick_manifest(dir: &Path, d: &Descriptor, arch: &str) -> Result<Descriptor, ArchiveError> {
    if !media_is_index(&d.media_type) {
        return Ok(d.clone());
    }
    let (idx, _): (Index, _) = read_layout_json(dir, &d.digest, "index")?;
    let chosen = idx
        .manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.architecture == arch && p.os == "linux")
        })
        .or_else(|| (idx.manifests.len() == 1).then(|| &idx.manifests[0]))
        .ok_or_else(|| invalid(dir, format!("index {} has no linux/{arch} image", d.digest)))?;
    pick_manifest(dir, chosen, arch)
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

/// Images in an OCI layout directory, selected by `reference` (all when `None`), each
/// with the tags its `index.json` gives it.
fn layout_images(
    dir: &Path,
    reference: Option<&OciReference>,
    arch: &str,
) -> Result<Vec<(Descriptor, Vec<String>)>, ArchiveError> {
    if !dir.join("oci-layout").is_file() {
        return Err(invalid(dir, "not an OCI image layout (no oci-layout file)"));
    }
    let index_path = dir.join("index.json");
    let bytes = fs::read(&index_path).map_err(io_err("read", &index_path))?;
    let index: Index = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(&index_path, format!("not a valid index: {e}")))?;
    let mut out: Vec<(Descriptor, Vec<String>)> = Vec::new();
    for d in &index.manifests {
        let tag = d.annotations.get(oci::ANNOTATION_REF_NAME).cloned();
        let selected = match reference {
            None => true,
            Some(OciReference::Digest(want)) => d.digest.as_str() == want,
            Some(OciReference::Tag(want)) => tag.as_deref() == Some(want.as_str()),
        };
        if !selected {
            continue;
        }
        let m = pick_manifest(dir, d, arch)?;
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
        return Err(invalid(dir, what));
    }
    Ok(out)
}

/// Copies one image (manifest, config, layers) from a layout into the store and returns
/// its manifest descriptor in the store.
fn import_layout_image(
    store: &Store,
    dir: &Path,
    m: &Descriptor,
) -> Result<Descriptor, ArchiveError> {
    let (manifest, bytes): (Manifest, _) = read_layout_json(dir, &m.digest, "manifest")?;
    copy_blob(store, dir, &manifest.config.digest)?;
    for l in &manifest.layers {
        copy_blob(store, dir, &l.digest)?;
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
    })
}

/// Brings the image `reference` selects (or the only one) from an OCI layout into the store.
pub fn import_oci_base(
    store: &Store,
    dir: &Path,
    reference: Option<&OciReference>,
    arch: &str,
) -> Result<Descriptor, ArchiveError> {
    let images = layout_images(dir, reference, arch)?;
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
    import_layout_image(store, dir, m)
}

// ---------------------------------------------------------------------------------------
// Tarballs read by seeking.

/// An uncompressed tarball indexed by entry name, read by seeking.
struct TarIndex {
    file: File,
    path: PathBuf,
    /// Name → (data offset, size, symlink target if a symlink).
    entries: BTreeMap<String, (u64, u64, Option<String>)>,
    _tmp: Option<tempfile::NamedTempFile>,
}

fn clean_name(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .to_owned()
}

impl TarIndex {
    fn open(path: &Path, tmp_dir: &Path) -> Result<TarIndex, ArchiveError> {
        let mut file = File::open(path).map_err(io_err("open", path))?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(io_err("read", path))?;
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("seek", path))?;
        let compressed =
            (n >= 2 && magic[..2] == [0x1f, 0x8b]) || (n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd]);
        let mut tmp = None;
        if compressed {
            // Seeking needs the plain tar: decompress it once to a temp file.
            let mut t = tempfile::Builder::new()
                .prefix("import-")
                .tempfile_in(tmp_dir)
                .map_err(io_err("create temp file in", tmp_dir))?;
            let mut r =
                unpack::decompress(io::BufReader::new(file)).map_err(io_err("read", path))?;
            io::copy(&mut r, t.as_file_mut()).map_err(io_err("decompress", path))?;
            file = t.reopen().map_err(io_err("reopen", t.path()))?;
            tmp = Some(t);
        }
        let mut entries = BTreeMap::new();
        {
            let mut ar = tar::Archive::new(&file);
            for e in ar.entries().map_err(io_err("read tar", path))? {
                let e = e.map_err(io_err("read tar", path))?;
                let name = clean_name(&String::from_utf8_lossy(&e.path_bytes()));
                let link = (e.header().entry_type() == tar::EntryType::Symlink)
                    .then(|| {
                        e.link_name_bytes()
                            .map(|l| String::from_utf8_lossy(&l).into_owned())
                    })
                    .flatten();
                entries.insert(name, (e.raw_file_position(), e.size(), link));
            }
        }
        Ok(TarIndex {
            file,
            path: path.to_path_buf(),
            entries,
            _tmp: tmp,
        })
    }

    /// Resolves `name` (following symlinked entries, as older `docker save` writes for
    /// shared layers) to (offset, size).
    fn locate(&self, name: &str) -> Result<(u64, u64), ArchiveError> {
        let mut name = clean_name(name);
        for _ in 0..8 {
            let Some((off, size, link)) = self.entries.get(&name) else {
                return Err(invalid(&self.path, format!("has no entry {name:?}")));
            };
            match link {
                None => return Ok((*off, *size)),
                Some(target) => {
                    let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                    let mut parts: Vec<String> = Vec::new();
                    for c in base.join(target).components() {
                        match c {
                            std::path::Component::ParentDir => {
                                parts.pop();
                            }
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
        Err(invalid(&self.path, format!("symlink loop at {name:?}")))
    }

    fn reader(&self, name: &str) -> Result<impl Read + '_, ArchiveError> {
        let (off, size) = self.locate(name)?;
        let mut f = &self.file;
        f.seek(SeekFrom::Start(off))
            .map_err(io_err("seek", &self.path))?;
        Ok(io::BufReader::with_capacity(1 << 20, f.take(size)))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, ArchiveError> {
        let mut out = Vec::new();
        self.reader(name)?
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
pub fn import_docker_archive(store: &Store, path: &Path) -> Result<Vec<Imported>, ArchiveError> {
    let _writer = store.writer_guard()?;
    let tar = TarIndex::open(path, &store.root().join("tmp"))?;
    import_docker_from_index(store, &tar)
}

fn import_docker_from_index(store: &Store, tar: &TarIndex) -> Result<Vec<Imported>, ArchiveError> {
    let path = tar.path.as_path();
    let entries: Vec<DockerManifestEntry> = serde_json::from_slice(&tar.read("manifest.json")?)
        .map_err(|e| invalid(path, format!("manifest.json is not valid: {e}")))?;
    let mut out = Vec::new();
    for entry in entries {
        let config_bytes = tar.read(&entry.config)?;
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(path, format!("{} is not valid JSON: {e}", entry.config)))?;
        let diff_ids: Vec<Digest> = config
            .pointer("/rootfs/diff_ids")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().and_then(|s| Digest::parse(s).ok()))
                    .collect()
            })
            .unwrap_or_default();
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
            layers.push(import_docker_layer(store, tar, name, diff_id)?);
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
            },
            layers,
            annotations: BTreeMap::new(),
        };
        let bytes = crate::store::canonical(&manifest, "manifest")?;
        let digest = store.write_blob(&bytes)?;
        let desc = Descriptor {
            media_type: oci::MEDIA_MANIFEST.to_owned(),
            digest,
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
        };
        out.push(Imported {
            manifest: desc,
            tags: entry.repo_tags.unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Stores one docker layer as-is (same bytes, so the same digest) after checking that its
/// uncompressed content matches `diff_id`.
fn import_docker_layer(
    store: &Store,
    tar: &TarIndex,
    name: &str,
    diff_id: &Digest,
) -> Result<Descriptor, ArchiveError> {
    let path = tar.path.as_path();
    let mut head = [0u8; 4];
    let n = tar
        .reader(name)?
        .read(&mut head)
        .map_err(io_err("read", path))?;
    let media_type = if n >= 2 && head[..2] == [0x1f, 0x8b] {
        oci::MEDIA_LAYER_GZIP
    } else if n == 4 && head == [0x28, 0xb5, 0x2f, 0xfd] {
        oci::MEDIA_LAYER_ZSTD
    } else {
        oci::MEDIA_LAYER_TAR
    };
    let mut plain =
        HashingReader::new(unpack::decompress(tar.reader(name)?).map_err(io_err("read", path))?);
    io::copy(&mut plain, &mut io::sink()).map_err(io_err("decompress", path))?;
    let actual = crate::digest::finish(plain.hasher);
    if &actual != diff_id {
        return Err(ArchiveError::DiffIdMismatch {
            path: path.to_path_buf(),
            layer: name.to_owned(),
            diff_id: diff_id.clone(),
            actual,
        });
    }
    let (digest, size) = store.write_blob_from(&mut tar.reader(name)?, None)?;
    Ok(Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size,
        annotations: BTreeMap::new(),
        platform: None,
    })
}

/// Imports an OCI layout directory, an oci-archive, or a docker-archive, tagging each image
/// as the input names it. Returns what was imported.
pub fn import(store: &Store, path: &Path) -> Result<Vec<Imported>, ArchiveError> {
    let _writer = store.writer_guard()?;
    if path.is_dir() {
        return import_layout_all(store, path);
    }
    let tar = TarIndex::open(path, &store.root().join("tmp"))?;
    if tar.entries.contains_key("manifest.json") {
        let imported = import_docker_from_index(store, &tar)?;
        tag_all(store, &imported)?;
        return Ok(imported);
    }
    if tar.entries.contains_key("oci-layout") {
        let tmp = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(store.root().join("tmp"))
            .map_err(io_err("create temp dir in", store.root()))?;
        let mut f = &tar.file;
        f.seek(SeekFrom::Start(0)).map_err(io_err("seek", path))?;
        let opts = UnpackOptions {
            whiteouts: WhiteoutMode::Record,
            preserve_owners: false,
            ..UnpackOptions::default()
        };
        unpack::unpack(io::BufReader::new(f), tmp.path(), &opts)?;
        return import_layout_all(store, tmp.path());
    }
    Err(invalid(
        path,
        "not an OCI layout directory, an oci-archive or a docker-archive",
    ))
}

fn import_layout_all(store: &Store, dir: &Path) -> Result<Vec<Imported>, ArchiveError> {
    let mut out = Vec::new();
    for (m, tags) in layout_images(dir, None, "amd64")? {
        let desc = import_layout_image(store, dir, &m)?;
        out.push(Imported {
            manifest: desc,
            tags,
        });
    }
    tag_all(store, &out)?;
    Ok(out)
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
