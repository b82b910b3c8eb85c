//! Resolving `[image] base` into layers and a config to start from.
//!
//! `oci:` and `docker-archive:` bases are imported into the store with their layers
//! byte-for-byte (same digests) and their config inherited. A `rootfs:` directory becomes a
//! layer built like a copy to `/` (exact permission bits, owner 0:0); a `rootfs:` tarball is
//! first unpacked with [`crate::unpack`] — which refuses or contains hostile entries — into
//! a temp directory, then treated as a directory. Both are bounded by [`ImportLimits`] for
//! the store's disk, so a hostile base fails the build with little memory and disk spent.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kiln_spec::{BaseImage, Compression};
use serde_json::Value;

use crate::archive;
use crate::build::{BuildError, BuildOptions};
use crate::cache::BuildCache;
use crate::digest::Digest;
use crate::layer::LayerReport;
use crate::limits::{ImportLimits, is_compressed};
use crate::oci::Descriptor;
use crate::store::Store;
use crate::unpack::{self, UnpackError, UnpackOptions, WhiteoutMode};

/// A resolved base.
pub(crate) struct Base {
    /// Imported layers (empty for scratch and rootfs).
    pub(crate) layers: Vec<Descriptor>,
    /// Reports for those layers.
    pub(crate) reports: Vec<LayerReport>,
    /// The config to inherit (`{}` for scratch and rootfs).
    pub(crate) config: Value,
    /// A root filesystem to turn into the first layer.
    pub(crate) rootfs: Option<PathBuf>,
    /// Keeps an unpacked rootfs tarball alive for the build.
    pub(crate) _tmp: Option<tempfile::TempDir>,
    /// What it is, by content: the manifest digest of an image base, the SHA-256 of a
    /// rootfs tarball; `None` for scratch and a rootfs directory (whose files the SBOM lists).
    pub(crate) identity: Option<Digest>,
}

fn describe(base: &BaseImage) -> String {
    match base {
        BaseImage::Scratch => "scratch".to_owned(),
        BaseImage::Oci { path, .. } => format!("oci:{}", path.display()),
        BaseImage::DockerArchive(p) => format!("docker-archive:{}", p.display()),
        BaseImage::Rootfs(p) => format!("rootfs:{}", p.display()),
    }
}

pub(crate) fn load(
    base: &BaseImage,
    store: &Store,
    cache: &BuildCache,
    opts: &BuildOptions,
    _compression: Compression,
) -> Result<Base, BuildError> {
    let name = describe(base);
    let limits = ImportLimits::for_disk(store.root());
    let arch_err = |e: archive::ArchiveError| match e {
        archive::ArchiveError::Store(s) => BuildError::Store(s),
        archive::ArchiveError::Unpack(u) => BuildError::BaseUnpack {
            base: name.clone(),
            source: u,
        },
        other => BuildError::Base {
            base: name.clone(),
            reason: other.to_string(),
        },
    };
    match base {
        BaseImage::Scratch => Ok(Base {
            layers: Vec::new(),
            reports: Vec::new(),
            config: Value::Object(Default::default()),
            rootfs: None,
            _tmp: None,
            identity: None,
        }),
        BaseImage::Oci { path, reference } => {
            let m = archive::import_oci_base(
                store,
                path,
                reference.as_ref(),
                &opts.architecture,
                &limits,
            )
            .map_err(arch_err)?;
            from_manifest(store, &m.digest, &name)
        }
        BaseImage::DockerArchive(path) => {
            let imported =
                archive::import_docker_archive(store, path, &limits).map_err(arch_err)?;
            match imported.as_slice() {
                [one] => from_manifest(store, &one.manifest.digest, &name),
                _ => Err(BuildError::Base {
                    base: name,
                    reason: format!(
                        "holds {} images; a base must hold exactly one",
                        imported.len()
                    ),
                }),
            }
        }
        BaseImage::Rootfs(path) => {
            if path.is_dir() {
                return Ok(Base {
                    layers: Vec::new(),
                    reports: Vec::new(),
                    config: Value::Object(Default::default()),
                    rootfs: Some(path.clone()),
                    _tmp: None,
                    identity: None,
                });
            }
            let tmp = unpack_rootfs_tar(path, cache, &name, &limits)?;
            let identity = if opts.attest {
                let mut f = std::fs::File::open(path).map_err(BuildError::io("open", path))?;
                let mut h = crate::digest::HashingWriter::new(std::io::sink());
                std::io::copy(&mut f, &mut h).map_err(BuildError::io("read", path))?;
                Some(crate::digest::finish(h.hasher))
            } else {
                None
            };
            Ok(Base {
                layers: Vec::new(),
                reports: Vec::new(),
                config: Value::Object(Default::default()),
                rootfs: Some(tmp.path().to_path_buf()),
                _tmp: Some(tmp),
                identity,
            })
        }
    }
}

fn unpack_rootfs_tar(
    path: &Path,
    cache: &BuildCache,
    name: &str,
    limits: &ImportLimits,
) -> Result<tempfile::TempDir, BuildError> {
    let tmp_root = cache.dir().join("tmp");
    std::fs::create_dir_all(&tmp_root).map_err(BuildError::io("create", &tmp_root))?;
    let tmp = tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir_in(&tmp_root)
        .map_err(BuildError::io("create temp dir in", &tmp_root))?;
    let mut file = std::fs::File::open(path).map_err(BuildError::io("open", path))?;
    let size = file.metadata().map_err(BuildError::io("stat", path))?.len();
    let mut head = Vec::with_capacity(4);
    (&mut file)
        .take(4)
        .read_to_end(&mut head)
        .map_err(BuildError::io("read", path))?;
    file.seek(SeekFrom::Start(0))
        .map_err(BuildError::io("seek", path))?;
    // Unpacked to the disk: the same bounds as an imported layer, so the temp dir is too.
    let compressed = is_compressed(&head).then_some(size);
    let reader =
        unpack::decompress(std::io::BufReader::new(file)).map_err(BuildError::io("read", path))?;
    let opts = UnpackOptions {
        whiteouts: WhiteoutMode::Record,
        // Owners are not kept: a rootfs base is owned by 0:0 like every copy.
        preserve_owners: false,
        limits: limits.layer(compressed, 0),
    };
    unpack::unpack(reader, tmp.path(), &opts).map_err(|source| match source {
        UnpackError::TooLarge { .. } | UnpackError::StreamTooLong { .. } => BuildError::Base {
            base: name.to_owned(),
            reason: format!("{source} ({})", limits.explain(compressed, 0)),
        },
        source => BuildError::BaseUnpack {
            base: name.to_owned(),
            source,
        },
    })?;
    Ok(tmp)
}

fn from_manifest(store: &Store, digest: &Digest, name: &str) -> Result<Base, BuildError> {
    let manifest = store.manifest(digest)?;
    let config = store.config(&manifest.config.digest)?;
    let diff_ids: Vec<Digest> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().and_then(|s| Digest::parse(s).ok()))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != manifest.layers.len() {
        return Err(BuildError::Base {
            base: name.to_owned(),
            reason: format!(
                "its config lists {} diff_ids for {} layers",
                diff_ids.len(),
                manifest.layers.len()
            ),
        });
    }
    let mut layers = Vec::new();
    let mut reports = Vec::new();
    for (l, diff_id) in manifest.layers.iter().zip(diff_ids) {
        let media_type = archive::oci_layer_type(&l.media_type);
        reports.push(LayerReport {
            digest: l.digest.clone(),
            diff_id,
            size: l.size,
            media_type: media_type.clone(),
            files: 0,
            bytes: 0,
            units_compressed: 0,
            units: 0,
            cache_hit: true,
            source: "base".to_owned(),
        });
        layers.push(Descriptor {
            media_type,
            ..l.clone()
        });
    }
    Ok(Base {
        layers,
        reports,
        config,
        rootfs: None,
        _tmp: None,
        identity: Some(digest.clone()),
    })
}
