//! The regular files of a base image's layers, with their SBOM hashes, after whiteouts.
//!
//! A base layer is read once, decompressed, for its files' SHA1 and BLAKE3; the list is
//! kept in the build cache under `sbom/<diff_id>.json` (rebuildable: deleting it costs one
//! more read). Layers were checked within the import limits when they came in.

use std::collections::BTreeMap;
use std::io::Read;

use crate::build::BuildError;
use crate::cache::BuildCache;
use crate::digest::{FileHashes, SbomHasher};
use crate::layer::LayerReport;
use crate::store::Store;

/// What one entry of a layer does to the file list.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Change {
    /// A regular file (or a hardlink to one) at this path.
    File(String, FileHashes),
    /// `.wh.NAME`: the path (and anything under it) is gone.
    Whiteout(String),
    /// `.wh..wh..opq`: everything below this directory from earlier layers is gone.
    Opaque(String),
    /// A directory, link or device at this path: a file of an earlier layer there is gone.
    Replace(String),
}

fn changes(store: &Store, layer: &LayerReport) -> Result<Vec<Change>, BuildError> {
    let path = store.blob_path(&layer.digest);
    let blob = store.open_blob(&layer.digest)?;
    let plain = crate::unpack::decompress(blob).map_err(BuildError::io("read", &path))?;
    let mut ar = tar::Archive::new(plain);
    let mut out = Vec::new();
    let mut here: BTreeMap<String, FileHashes> = BTreeMap::new();
    for entry in ar.entries().map_err(BuildError::io("read", &path))? {
        let mut entry = entry.map_err(BuildError::io("read", &path))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let name = format!("/{}", name.trim_start_matches("./").trim_start_matches('/'));
        let name = name.trim_end_matches('/').to_owned();
        let (dir, base) = name.rsplit_once('/').unwrap_or(("", &name));
        if base == ".wh..wh..opq" {
            out.push(Change::Opaque(dir.to_owned()));
            continue;
        }
        if let Some(gone) = base.strip_prefix(".wh.") {
            out.push(Change::Whiteout(format!("{dir}/{gone}")));
            continue;
        }
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut h = SbomHasher::default();
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = entry
                        .read(&mut buf)
                        .map_err(BuildError::io("read", &path))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                let h = h.finish();
                here.insert(name.clone(), h.clone());
                out.push(Change::File(name, h));
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                let target = format!(
                    "/{}",
                    target.trim_start_matches("./").trim_start_matches('/')
                );
                if let Some(h) = here.get(&target).cloned() {
                    out.push(Change::File(name, h));
                }
            }
            // Anything else at a path replaces a file that was there.
            _ => out.push(Change::Replace(name)),
        }
    }
    Ok(out)
}

fn cached_changes(
    store: &Store,
    cache: &BuildCache,
    layer: &LayerReport,
) -> Result<Vec<Change>, BuildError> {
    let dir = cache.dir().join("sbom");
    let file = dir.join(format!("{}.json", layer.diff_id.hex()));
    if let Some(c) = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        return Ok(c);
    }
    let c = changes(store, layer)?;
    // A cache: written without fsync; losing it costs a read, not correctness.
    if std::fs::create_dir_all(&dir).is_ok()
        && let Ok(bytes) = serde_json::to_vec(&c)
    {
        let tmp = dir.join(format!(".{}.tmp", layer.diff_id.hex()));
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &file);
        }
    }
    Ok(c)
}

/// The regular files the base layers leave, by absolute path.
pub(crate) fn base_files(
    store: &Store,
    cache: &BuildCache,
    layers: &[LayerReport],
) -> Result<BTreeMap<String, FileHashes>, BuildError> {
    let mut files: BTreeMap<String, FileHashes> = BTreeMap::new();
    for layer in layers {
        for change in cached_changes(store, cache, layer)? {
            match change {
                Change::File(path, h) => {
                    files.insert(path, h);
                }
                Change::Whiteout(path) => {
                    let below = format!("{path}/");
                    files.retain(|p, _| p != &path && !p.starts_with(&below));
                }
                Change::Replace(path) => {
                    files.remove(&path);
                }
                Change::Opaque(dir) => {
                    let below = format!("{dir}/");
                    files.retain(|p, _| !p.starts_with(&below));
                }
            }
        }
    }
    Ok(files)
}
