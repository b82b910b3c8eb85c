//! The builder: an `[image]` section → a tagged OCI image in the store, without a daemon.
//!
//! It resolves the base, plans one layer per `[[image.copy]]`, hashes the files the cache
//! cannot vouch for, encodes layers (see [`crate::layer`]), writes the config and the
//! manifest as canonical JSON, and tags `NAME:latest`. Time enters only as
//! [`BuildOptions::source_date_epoch`], a value, so the digest never depends on the clock.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_spec::ImageSpec;
use serde_json::{Value, json};

use crate::base::{self, Base};
use crate::cache::BuildCache;
use crate::digest::Digest;
use crate::layer::{self, LayerReport};
use crate::oci::{self, Descriptor, Manifest};
use crate::store::{Store, StoreError};
use crate::tree::{self, StatKey};
use crate::unpack::UnpackError;

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file kind an image layer cannot hold reproducibly.
    #[error("cannot copy {path}: it is {what}")]
    UnsupportedFile {
        /// The host file.
        path: PathBuf,
        /// What it is.
        what: String,
    },
    /// An `exclude` pattern does not parse.
    #[error("invalid exclude pattern {pattern:?}: {source}")]
    BadGlob {
        /// The pattern.
        pattern: String,
        /// Why.
        source: globset::Error,
    },
    /// The shared-library closure could not be computed.
    #[error("closure of {binary}: {reason}")]
    Closure {
        /// The binary.
        binary: PathBuf,
        /// Why.
        reason: String,
    },
    /// A `DT_NEEDED` library was not found where the loader would look.
    #[error(
        "library {library} needed by {needed_by} not found in its RUNPATH, RPATH, /etc/ld.so.conf or the system directories"
    )]
    LibraryNotFound {
        /// The `DT_NEEDED` name.
        library: String,
        /// The object that needs it.
        needed_by: PathBuf,
    },
    /// A source file changed while it was being read.
    #[error("{path} changed while the image was being built; build again")]
    ChangedDuringBuild {
        /// The file.
        path: PathBuf,
    },
    /// tar refused an entry (e.g. a name it cannot encode).
    #[error("cannot encode {path:?} in a tar header: {source}")]
    Tar {
        /// The path in the image.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The base image is unusable.
    #[error("base image {base}: {reason}")]
    Base {
        /// The base as written.
        base: String,
        /// Why.
        reason: String,
    },
    /// Unpacking a rootfs tarball base failed (hostile or malformed).
    #[error("base image {base}: {source}")]
    BaseUnpack {
        /// The base as written.
        base: String,
        /// Why.
        source: UnpackError,
    },
    /// The store refused an operation.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug: something the builder itself should have prevented.
    #[error("internal error: {reason}")]
    Internal {
        /// What went wrong.
        reason: String,
    },
}

impl BuildError {
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
        let path = path.to_path_buf();
        move |source| BuildError::Io { op, path, source }
    }
}

/// Knobs that are not in `kiln.toml`.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// `SOURCE_DATE_EPOCH`: mtimes are clamped to it and it is the config's `created`.
    pub source_date_epoch: u64,
    /// Worker threads (never changes the bytes).
    pub threads: usize,
    /// Tag to point at the result (`NAME:latest`), if any.
    pub tag: Option<String>,
    /// `architecture` of a scratch image.
    pub architecture: String,
    /// `os` of a scratch image.
    pub os: String,
    /// Whether to gather what the SBOM and the provenance need ([`BuildOutput::record`]):
    /// every file's SHA1 and BLAKE3 (the BLAKE3 is the cache's hash, read in one pass), the base's
    /// identity and the host files of a closure.
    pub attest: bool,
    /// dpkg's database, read for the Debian packages a closure's host files came from.
    pub dpkg_admin_dir: PathBuf,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            source_date_epoch: 0,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            tag: None,
            architecture: "amd64".to_owned(),
            os: "linux".to_owned(),
            attest: true,
            dpkg_admin_dir: PathBuf::from(crate::attest::DPKG_ADMIN_DIR),
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildOutput {
    /// The manifest digest: the image's identity.
    pub digest: Digest,
    /// Manifest + config + all layers, in bytes.
    pub size: u64,
    /// The config blob digest.
    pub config: Digest,
    /// Every layer, base layers first.
    pub layers: Vec<LayerReport>,
    /// The tag pointed at the image, if any.
    pub tag: Option<String>,
    /// What the attestations are made of, when [`BuildOptions::attest`] asked for it.
    #[serde(skip)]
    pub record: Option<crate::attest::BuildRecord>,
}

/// Progress events, in order, for a terminal or a log.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// The base is resolved.
    Base {
        /// Its layers.
        layers: usize,
    },
    /// Files are being hashed (those the cache could not vouch for).
    Hashing {
        /// How many.
        files: usize,
    },
    /// Units (runs of files) are being compressed.
    Compressing {
        /// How many.
        units: usize,
    },
    /// A layer's blob is being written and hashed.
    Assembling {
        /// Where the layer came from (`copy #N → /to`, `base rootfs`).
        source: &'a str,
    },
    /// A layer is done.
    Layer(&'a LayerReport),
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// Builds `spec` into `store`, using and refreshing `cache`.
pub fn build(
    spec: &ImageSpec,
    store: &Store,
    cache: &mut BuildCache,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<BuildOutput, BuildError> {
    let scan_started = now_ns();
    // Held until the tag is written, so a concurrent gc cannot take our fresh blobs.
    let _writer = store.writer_guard()?;
    let base = base::load(&spec.base, store, cache, opts, spec.compression)?;
    progress(Progress::Base {
        layers: base.layers.len(),
    });
    let mut planned = Vec::new();
    // What each of our layers holds, kept for the SBOM and the provenance.
    let mut contents: Vec<crate::attest::LayerContents> = Vec::new();
    if let Some(root) = &base.rootfs {
        let entries = tree::plan_rootfs(root)?;
        planned.push(layer::plan_layer(
            &entries,
            spec.compression,
            opts.source_date_epoch,
            "base rootfs".to_owned(),
            lineage(root, "/", spec.compression),
        )?);
        if opts.attest {
            contents.push(crate::attest::LayerContents {
                source: "base rootfs".to_owned(),
                from: None,
                entries,
            });
        }
    }
    for (i, copy) in spec.copies.iter().enumerate() {
        let entries = tree::plan_copy(copy)?;
        let source = format!("copy #{} → {}", i + 1, copy.to);
        planned.push(layer::plan_layer(
            &entries,
            spec.compression,
            opts.source_date_epoch,
            source.clone(),
            lineage(&copy.from, &copy.to, spec.compression),
        )?);
        if opts.attest {
            let from =
                std::path::absolute(&copy.from).map_err(BuildError::io("resolve", &copy.from))?;
            contents.push(crate::attest::LayerContents {
                source,
                from: copy.closure.then_some(from),
                entries,
            });
        }
    }
    let digests = hash_sources(&planned, cache, opts, scan_started, progress)?;
    let digest_of = |p: &Path| digests.get(p).map(|(c, _)| c.clone());
    let mut reports = base.reports.clone();
    let ours = layer::encode_layers(
        &mut planned,
        &digest_of,
        cache,
        store,
        opts.threads,
        progress,
    )?;
    reports.extend(ours);
    let record = if opts.attest {
        let hashes = |p: &Path| digests.get(p).and_then(|(_, h)| h.clone());
        Some(crate::attest::BuildRecord::gather(
            spec, store, cache, opts, &base, &contents, &hashes,
        )?)
    } else {
        None
    };
    let mut out = finish(spec, store, opts, base, reports)?;
    if let Some(mut record) = record {
        record.image = out.digest.clone();
        record.tag = out.tag.clone();
        out.record = Some(record);
    }
    Ok(out)
}

/// Names a layer across builds: the same source copied to the same place.
fn lineage(from: &Path, to: &str, c: kiln_spec::Compression) -> Digest {
    let from = std::path::absolute(from).unwrap_or_else(|_| from.to_path_buf());
    Digest::of(format!("{}\0{to}\0{c:?}", from.display()).as_bytes())
}

/// A file's cache identity and, when asked for, its SBOM hashes.
type CachedHashes = (crate::digest::ContentId, Option<crate::digest::FileHashes>);

/// Content digests for every source file: from the stat cache where it can vouch, else by
/// reading the file (in parallel). Fresh digests are saved back to the cache.
fn hash_sources(
    planned: &[layer::PlannedLayer],
    cache: &mut BuildCache,
    opts: &BuildOptions,
    scan_started: i128,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<std::collections::HashMap<PathBuf, CachedHashes>, BuildError> {
    let mut digests = std::collections::HashMap::new();
    let mut todo: Vec<(PathBuf, StatKey)> = Vec::new();
    for l in planned {
        for (path, stat) in layer::layer_files(l) {
            if digests.contains_key(&path) {
                continue;
            }
            match cache.content_digest(&path, &stat) {
                // A file the cache knows, but not its SBOM hashes, is read again for them.
                Some((_, None)) if opts.attest => todo.push((path, stat)),
                Some(d) => {
                    digests.insert(path, d);
                }
                None => todo.push((path, stat)),
            }
        }
    }
    todo.sort();
    todo.dedup();
    if !todo.is_empty() {
        progress(Progress::Hashing { files: todo.len() });
    }
    let hashed = layer::parallel(&todo, opts.threads, |(p, s)| {
        layer::hash_file(p, s, opts.attest)
    });
    let mut fresh = Vec::new();
    for ((path, stat), d) in todo.into_iter().zip(hashed) {
        let (content, hashes) = d?;
        digests.insert(path.clone(), (content.clone(), hashes.clone()));
        fresh.push((path, stat, content, hashes));
    }
    if !fresh.is_empty() {
        cache.save_digests(fresh, scan_started)?;
    }
    Ok(digests)
}

fn finish(
    spec: &ImageSpec,
    store: &Store,
    opts: &BuildOptions,
    base: Base,
    reports: Vec<LayerReport>,
) -> Result<BuildOutput, BuildError> {
    let config = image_config(spec, opts, &base, &reports);
    let config_bytes = crate::store::canonical(&config, "image config")?;
    let config_digest = store.write_blob(&config_bytes)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_MANIFEST.to_owned()),
        config: Descriptor {
            media_type: oci::MEDIA_CONFIG.to_owned(),
            digest: config_digest.clone(),
            size: config_bytes.len() as u64,
            annotations: Default::default(),
            platform: None,
            artifact_type: None,
        },
        layers: reports
            .iter()
            .map(|r| Descriptor {
                media_type: r.media_type.clone(),
                digest: r.digest.clone(),
                size: r.size,
                annotations: Default::default(),
                platform: None,
                artifact_type: None,
            })
            .collect(),
        annotations: Default::default(),
        artifact_type: None,
        subject: None,
    };
    let manifest_bytes = crate::store::canonical(&manifest, "manifest")?;
    let digest = store.write_blob(&manifest_bytes)?;
    let desc = Descriptor {
        media_type: oci::MEDIA_MANIFEST.to_owned(),
        digest: digest.clone(),
        size: manifest_bytes.len() as u64,
        annotations: Default::default(),
        platform: None,
        artifact_type: None,
    };
    if let Some(tag) = &opts.tag {
        store.tag(tag, &desc)?;
    }
    let size = desc.size + config_bytes.len() as u64 + reports.iter().map(|r| r.size).sum::<u64>();
    Ok(BuildOutput {
        digest,
        size,
        config: config_digest,
        layers: reports,
        tag: opts.tag.clone(),
        record: None,
    })
}

/// The base config, with kiln's fields set and the spec's overrides applied.
fn image_config(
    spec: &ImageSpec,
    opts: &BuildOptions,
    base: &Base,
    reports: &[LayerReport],
) -> Value {
    let mut config = match &base.config {
        Value::Object(_) => base.config.clone(),
        _ => json!({}),
    };
    let created = oci::rfc3339(opts.source_date_epoch);
    if let Value::Object(obj) = &mut config {
        obj.insert("created".to_owned(), json!(created));
        obj.entry("architecture")
            .or_insert_with(|| json!(opts.architecture));
        obj.entry("os").or_insert_with(|| json!(opts.os));
        let inner = obj.entry("config").or_insert_with(|| json!({}));
        if !inner.is_object() {
            *inner = json!({});
        }
        if let Value::Object(c) = inner {
            apply_overrides(spec, c);
        }
        let diff_ids: Vec<Value> = reports.iter().map(|r| json!(r.diff_id)).collect();
        obj.insert(
            "rootfs".to_owned(),
            json!({"type": "layers", "diff_ids": diff_ids}),
        );
        let base_history: Vec<Value> = obj
            .get("history")
            .and_then(|h| h.as_array())
            .cloned()
            .unwrap_or_default();
        let base_nonempty = base_history
            .iter()
            .filter(|h| h.get("empty_layer").and_then(Value::as_bool) != Some(true))
            .count();
        // Docker checks that history and layers agree: a base whose history does not is
        // given none rather than a wrong one (and then ours would not agree either).
        let history = if base_nonempty == base.layers.len() {
            let mut h = base_history;
            for r in reports.iter().skip(base.layers.len()) {
                h.push(json!({"created": created, "created_by": format!("kiln {}", r.source)}));
            }
            h
        } else {
            Vec::new()
        };
        obj.insert("history".to_owned(), Value::Array(history));
    }
    config
}

fn apply_overrides(spec: &ImageSpec, c: &mut serde_json::Map<String, Value>) {
    if !spec.env.is_empty() {
        let mut env: Vec<String> = c
            .get("Env")
            .and_then(|e| e.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for (k, v) in &spec.env {
            let item = format!("{k}={v}");
            match env
                .iter_mut()
                .find(|e| e.split('=').next() == Some(k.as_str()))
            {
                Some(slot) => *slot = item,
                None => env.push(item),
            }
        }
        c.insert("Env".to_owned(), json!(env));
    }
    if let Some(ep) = &spec.entrypoint {
        c.insert("Entrypoint".to_owned(), json!(ep));
        // As in a Dockerfile, a new entrypoint drops the base's cmd unless cmd is given.
        if spec.cmd.is_none() {
            c.remove("Cmd");
        }
    }
    if let Some(cmd) = &spec.cmd {
        c.insert("Cmd".to_owned(), json!(cmd));
    }
    if let Some(w) = &spec.workdir {
        c.insert("WorkingDir".to_owned(), json!(w));
    }
    if let Some(u) = &spec.user {
        c.insert("User".to_owned(), json!(u.to_string()));
    }
    if !spec.labels.is_empty() {
        let labels = c.entry("Labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        if let Value::Object(l) = labels {
            for (k, v) in &spec.labels {
                l.insert(k.clone(), json!(v));
            }
        }
    }
}
