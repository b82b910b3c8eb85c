//! The content-addressed layer cache: each image layer unpacked once, into
//! `<state>/layers/sha256-<hex>/`, and shared read-only (as overlay lower dirs) by every
//! instance that runs it.
//!
//! Next to each layer, `sha256-<hex>.tree.json` records the metadata of every entry as
//! unpacked (kind, mode, owner, size, mtime, ctime, inode, link target). Any later difference
//! is drift: ctime cannot be set from user space, so even a modification that restores mtime
//! is seen. A layer counts as present only when its record exists; a directory without one is
//! a crashed unpack and is redone.
//!
//! This module never writes into a layer once it is recorded.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::image::ImageSource;
use crate::provider::ProviderError;
use crate::types::Digest;

/// The metadata of one entry of a layer, as recorded (a storage format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EntryMeta {
    /// `d` dir, `f` file, `l` symlink, `c` char device (overlay whiteout), `b`, `p`, `s`.
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link: Option<String>,
}

impl EntryMeta {
    fn of(path: &Path, md: &fs::Metadata) -> io::Result<EntryMeta> {
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else if ft.is_socket() {
            's'
        } else {
            'f'
        };
        let link = if kind == 'l' {
            Some(fs::read_link(path)?.to_string_lossy().into_owned())
        } else {
            None
        };
        Ok(EntryMeta {
            kind,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            // A directory's size depends on the file system's bookkeeping, not its content.
            size: if kind == 'd' { 0 } else { md.size() },
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
            ino: md.ino(),
            link,
        })
    }
}

/// Every entry of a layer by its absolute path inside the layer (`/` is the root).
pub(crate) type Tree = BTreeMap<String, EntryMeta>;

#[derive(Debug, Serialize, Deserialize)]
struct TreeRecord {
    layer: String,
    entries: Tree,
}

/// Walks `root` into a [`Tree`].
pub(crate) fn snapshot(root: &Path) -> io::Result<Tree> {
    let mut tree = Tree::new();
    let md = fs::symlink_metadata(root)?;
    tree.insert("/".to_owned(), EntryMeta::of(root, &md)?);
    walk(root, "", &mut tree)?;
    Ok(tree)
}

fn walk(dir: &Path, prefix: &str, tree: &mut Tree) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let md = fs::symlink_metadata(&path)?;
        let rel = format!("{prefix}/{}", entry.file_name().to_string_lossy());
        tree.insert(rel.clone(), EntryMeta::of(&path, &md)?);
        if md.is_dir() {
            walk(&path, &rel, tree)?;
        }
    }
    Ok(())
}

/// The differences between a recorded tree and the one found: `(path, change)`.
pub(crate) fn compare(recorded: &Tree, found: &Tree) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for (path, meta) in recorded {
        match found.get(path) {
            None => out.push((path.clone(), "removed")),
            Some(now) if !same(meta, now) => out.push((path.clone(), "modified")),
            Some(_) => {}
        }
    }
    for path in found.keys() {
        if !recorded.contains_key(path) {
            out.push((path.clone(), "added"));
        }
    }
    out.sort();
    out
}

/// Whether an entry is unchanged. The record is taken after the unpacked directory was
/// renamed into place, so every field, the root's times included, must match.
fn same(a: &EntryMeta, b: &EntryMeta) -> bool {
    a == b
}

/// The change at one path (`rel`, absolute inside the layer), if any; for inotify events,
/// which name one entry.
pub(crate) fn check_path(recorded: &Tree, root: &Path, rel: &str) -> Option<&'static str> {
    let path = root.join(rel.trim_start_matches('/'));
    match (recorded.get(rel), fs::symlink_metadata(&path)) {
        (None, Err(_)) => None,
        (None, Ok(_)) => Some("added"),
        (Some(_), Err(_)) => Some("removed"),
        (Some(meta), Ok(md)) => match EntryMeta::of(&path, &md) {
            Ok(now) if same(meta, &now) => None,
            _ => Some("modified"),
        },
    }
}

/// The layer cache under `<state>/layers`.
#[derive(Debug)]
pub(crate) struct LayerCache {
    dir: PathBuf,
    /// Serialises unpacking within this process so two instances of a new image unpack
    /// each layer once.
    unpacking: Mutex<()>,
}

impl LayerCache {
    pub(crate) fn new(dir: PathBuf) -> LayerCache {
        LayerCache {
            dir,
            unpacking: Mutex::new(()),
        }
    }

    /// The directory of `layer`.
    pub(crate) fn layer_dir(&self, layer: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}", layer.hex()))
    }

    fn record_path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}.tree.json", layer.hex()))
    }

    /// An always-empty lower dir for images with no layers (overlay needs one).
    pub(crate) fn empty_dir(&self) -> Result<PathBuf, ProviderError> {
        let dir = self.dir.join("empty");
        fs::create_dir_all(&dir).map_err(ProviderError::io("create", &dir))?;
        Ok(dir)
    }

    /// The directory of `layer`, unpacking it from `source` first when it is not cached.
    pub(crate) fn ensure(
        &self,
        source: &dyn ImageSource,
        image: &Digest,
        layer: &Digest,
    ) -> Result<PathBuf, ProviderError> {
        let dest = self.layer_dir(layer);
        let record = self.record_path(layer);
        if record.exists() {
            return Ok(dest);
        }
        let _guard = self.unpacking.lock().unwrap_or_else(|p| p.into_inner());
        if record.exists() {
            return Ok(dest);
        }
        fs::create_dir_all(&self.dir).map_err(ProviderError::io("create", &self.dir))?;
        let layer_err = |message: String| ProviderError::Layer {
            digest: layer.clone(),
            message,
        };
        // A directory without its record is a crashed unpack: start again.
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(ProviderError::io("remove", &dest))?;
        }
        let tmp = tempfile::Builder::new()
            .prefix(".unpack-")
            .tempdir_in(&self.dir)
            .map_err(ProviderError::io("create temp dir in", &self.dir))?;
        source
            .unpack_layer(image, layer, tmp.path())
            .map_err(|e| layer_err(format!("unpack failed: {e}")))?;
        // The temp dir is created 0700; the root of a layer is the instance's `/`.
        fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(ProviderError::io("chmod", tmp.path()))?;
        let tmp = tmp.keep();
        fs::rename(&tmp, &dest).map_err(ProviderError::io("rename into", &dest))?;
        let tree = snapshot(&dest).map_err(ProviderError::io("scan", &dest))?;
        let bytes = serde_json::to_vec(&TreeRecord {
            layer: layer.to_string(),
            entries: tree,
        })
        .map_err(|e| layer_err(e.to_string()))?;
        kiln_durable::write(&record, &bytes).map_err(ProviderError::io("write", &record))?;
        Ok(dest)
    }

    /// The recorded tree of `layer`.
    pub(crate) fn tree(&self, layer: &Digest) -> Result<Tree, ProviderError> {
        let path = self.record_path(layer);
        let bytes = fs::read(&path).map_err(ProviderError::io("read", &path))?;
        let record: TreeRecord =
            serde_json::from_slice(&bytes).map_err(|e| ProviderError::Record {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(record.entries)
    }

    /// The differences between `layer` on disk and its record.
    pub(crate) fn verify(
        &self,
        layer: &Digest,
    ) -> Result<Vec<(String, &'static str)>, ProviderError> {
        let recorded = self.tree(layer)?;
        let dir = self.layer_dir(layer);
        match snapshot(&dir) {
            Ok(found) => Ok(compare(&recorded, &found)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(vec![("/".to_owned(), "removed")]),
            Err(e) => Err(ProviderError::Io {
                op: "scan",
                path: dir,
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::image::{DirImageSource, ImageConfig};

    #[test]
    fn a_layer_is_unpacked_once_and_any_change_is_found() {
        let src_dir = tempfile::tempdir().unwrap();
        fs::create_dir(src_dir.path().join("bin")).unwrap();
        fs::write(src_dir.path().join("bin/app"), b"v1").unwrap();
        let mut source = DirImageSource::new();
        let image = source.add(ImageConfig::default(), &[src_dir.path().to_owned()]);
        let layer = source.resolve(&image).unwrap().layers[0].clone();

        let state = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(state.path().join("layers"));
        let dir = cache.ensure(&source, &image, &layer).unwrap();
        assert_eq!(fs::read(dir.join("bin/app")).unwrap(), b"v1");
        assert_eq!(cache.verify(&layer).unwrap(), []);
        // Cached: a second ensure does not unpack again (the source is gone).
        fs::remove_dir_all(src_dir.path()).unwrap();
        assert_eq!(cache.ensure(&source, &image, &layer).unwrap(), dir);

        let recorded = cache.tree(&layer).unwrap();
        assert_eq!(check_path(&recorded, &dir, "/bin/app"), None);
        fs::write(dir.join("bin/app"), b"v2").unwrap();
        fs::write(dir.join("bin/extra"), b"").unwrap();
        assert_eq!(check_path(&recorded, &dir, "/bin/app"), Some("modified"));
        assert_eq!(check_path(&recorded, &dir, "/bin/extra"), Some("added"));
        assert_eq!(
            cache.verify(&layer).unwrap(),
            [
                ("/bin".to_owned(), "modified"),
                ("/bin/app".to_owned(), "modified"),
                ("/bin/extra".to_owned(), "added"),
            ]
        );
    }
}
