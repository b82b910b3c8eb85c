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
//! A cached layer is verified against its record each time an instance is created from it.
//! One that fails is **evicted** — moved with its record to `evicted/sha256-<hex>.<inode>`,
//! where the instances already running on it keep their overlay — and unpacked again from the
//! store, which checks the blob's digest. So a changed layer is never handed to a new
//! instance, and the replacement of a drifted instance does not inherit the drift. An evicted
//! copy is removed ([`LayerCache::sweep`]) once no instance record names it; a
//! [`CachedLayer`] (digest and root inode) is how a record names the copy it runs on.
//!
//! **Invariant:** `<state>/layers` is `0700`: the layers keep the image's owners and setuid
//! bits, which must not be reachable by other local users.
//!
//! This module never writes into a layer once it is recorded.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::image::ImageSource;
use crate::private::private_dir;
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

/// The inode of a tree's root directory: which copy of a layer the tree is of.
pub(crate) fn root_inode(tree: &Tree) -> u64 {
    tree.get("/").map_or(0, |m| m.ino)
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

/// Differences between a layer's record and what is on disk: `(path, change)`.
pub(crate) type Changes = Vec<(String, &'static str)>;

/// The differences between a recorded tree and the one found.
pub(crate) fn compare(recorded: &Tree, found: &Tree) -> Changes {
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

/// One unpacked copy of a layer: its digest and the inode of the copy's root directory. After
/// an eviction one digest has two copies (the fresh one, and the evicted one older instances
/// still run on), and only the root inode tells them apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct CachedLayer {
    pub digest: Digest,
    pub root: u64,
}

/// What [`LayerCache::ensure`] hands to a new instance.
#[derive(Debug)]
pub(crate) struct Ensured {
    /// The verified (or freshly unpacked) copy.
    pub layer: CachedLayer,
    /// Its directory, the overlay lower dir.
    pub dir: PathBuf,
    /// The copy that failed verification and was moved away, with where it is now.
    pub evicted: Option<(CachedLayer, PathBuf)>,
}

/// Which evicted copies are still in use, from the instance records.
#[derive(Debug, Default)]
pub(crate) struct InUse {
    /// Copies named by a record.
    pub copies: HashSet<CachedLayer>,
    /// Layers named by a record older than eviction, which names no copy: every evicted copy
    /// of these is kept.
    pub any_copy_of: HashSet<Digest>,
}

/// The layer cache under `<state>/layers`.
#[derive(Debug)]
pub(crate) struct LayerCache {
    dir: PathBuf,
    /// Serialises unpacking and eviction within this process so two instances of a new image
    /// unpack each layer once.
    unpacking: Mutex<()>,
}

impl LayerCache {
    pub(crate) fn new(dir: PathBuf) -> LayerCache {
        LayerCache {
            dir,
            unpacking: Mutex::new(()),
        }
    }

    /// The directory of the current copy of `layer`.
    pub(crate) fn layer_dir(&self, layer: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}", layer.hex()))
    }

    fn record_path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}.tree.json", layer.hex()))
    }

    fn evicted_dir(&self, copy: &CachedLayer) -> PathBuf {
        self.dir
            .join("evicted")
            .join(format!("sha256-{}.{}", copy.digest.hex(), copy.root))
    }

    fn evicted_record(&self, copy: &CachedLayer) -> PathBuf {
        self.dir.join("evicted").join(format!(
            "sha256-{}.{}.tree.json",
            copy.digest.hex(),
            copy.root
        ))
    }

    /// The directory and record of a copy of `layer`: the evicted copy with root inode
    /// `root` while it exists, else the current one (also for `root: None`, a record older
    /// than eviction).
    pub(crate) fn locate(&self, layer: &Digest, root: Option<u64>) -> (PathBuf, PathBuf) {
        if let Some(root) = root {
            let copy = CachedLayer {
                digest: layer.clone(),
                root,
            };
            let dir = self.evicted_dir(&copy);
            if dir.exists() {
                return (dir, self.evicted_record(&copy));
            }
        }
        (self.layer_dir(layer), self.record_path(layer))
    }

    /// An always-empty lower dir for images with no layers (overlay needs one).
    pub(crate) fn empty_dir(&self) -> Result<PathBuf, ProviderError> {
        let dir = self.dir.join("empty");
        fs::create_dir_all(&dir).map_err(ProviderError::io("create", &dir))?;
        Ok(dir)
    }

    /// A verified copy of `layer` for a new instance: the cached one when it matches its
    /// record, else (evicting a cached copy that does not) one unpacked from `source`.
    pub(crate) fn ensure(
        &self,
        source: &dyn ImageSource,
        image: &Digest,
        layer: &Digest,
    ) -> Result<Ensured, ProviderError> {
        let _guard = self.unpacking.lock().unwrap_or_else(|p| p.into_inner());
        let dest = self.layer_dir(layer);
        let record = self.record_path(layer);
        let mut evicted = None;
        if record.exists() {
            match self.check_current(layer) {
                Ok(root) => {
                    return Ok(Ensured {
                        layer: CachedLayer {
                            digest: layer.clone(),
                            root,
                        },
                        dir: dest,
                        evicted: None,
                    });
                }
                Err(changes) => evicted = self.evict(layer, &changes)?,
            }
        }
        private_dir(&self.dir)?;
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
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
            .map_err(ProviderError::io("chmod", tmp.path()))?;
        let tmp = tmp.keep();
        fs::rename(&tmp, &dest).map_err(ProviderError::io("rename into", &dest))?;
        let tree = snapshot(&dest).map_err(ProviderError::io("scan", &dest))?;
        let root = root_inode(&tree);
        let bytes = serde_json::to_vec(&TreeRecord {
            layer: layer.to_string(),
            entries: tree,
        })
        .map_err(|e| layer_err(e.to_string()))?;
        kiln_durable::write(&record, &bytes).map_err(ProviderError::io("write", &record))?;
        Ok(Ensured {
            layer: CachedLayer {
                digest: layer.clone(),
                root,
            },
            dir: dest,
            evicted,
        })
    }

    /// The root inode of the current copy of `layer` when it matches its record; what differs
    /// when it does not (an unreadable record counts as a difference).
    fn check_current(&self, layer: &Digest) -> Result<u64, Changes> {
        let recorded = self
            .read_tree(&self.record_path(layer))
            .map_err(|_| vec![("/".to_owned(), "record unreadable")])?;
        let root = root_inode(&recorded);
        match snapshot(&self.layer_dir(layer)) {
            Ok(found) => {
                let changes = compare(&recorded, &found);
                if changes.is_empty() {
                    Ok(root)
                } else {
                    Err(changes)
                }
            }
            Err(_) => Err(vec![("/".to_owned(), "removed")]),
        }
    }

    /// Moves the current copy of `layer` and its record under `evicted/`, where instances
    /// running on it keep it until [`LayerCache::sweep`] finds none left. Returns the copy
    /// and its new directory, or `None` when there was no directory to move.
    fn evict(
        &self,
        layer: &Digest,
        changes: &[(String, &'static str)],
    ) -> Result<Option<(CachedLayer, PathBuf)>, ProviderError> {
        let dest = self.layer_dir(layer);
        let record = self.record_path(layer);
        // The recorded root inode is what instance records name; a record too damaged to
        // say falls back to the directory's own inode.
        let root = match self.read_tree(&record) {
            Ok(tree) => tree.get("/").map(|_| root_inode(&tree)),
            Err(_) => None,
        }
        .or_else(|| fs::symlink_metadata(&dest).ok().map(|m| m.ino()));
        let shown: Vec<String> = changes
            .iter()
            .take(5)
            .map(|(p, c)| format!("{p} {c}"))
            .collect();
        tracing::warn!(
            layer = %layer,
            changes = %shown.join(", "),
            "a cached layer differs from its record: evicted, unpacking it again from the store"
        );
        let Some(root) = root else {
            // Neither a readable record nor a directory: nothing runs from it.
            remove_file_if_present(&record)?;
            return Ok(None);
        };
        let copy = CachedLayer {
            digest: layer.clone(),
            root,
        };
        private_dir(&self.dir.join("evicted"))?;
        let moved_dir = self.evicted_dir(&copy);
        let moved = match fs::rename(&dest, &moved_dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(ProviderError::Io {
                    op: "move an evicted layer to",
                    path: moved_dir,
                    source: e,
                });
            }
        };
        // The directory first: a crash in between leaves a record without its directory,
        // which the next create evicts again (moving the record).
        match fs::rename(&record, self.evicted_record(&copy)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ProviderError::Io {
                    op: "move an evicted layer's record from",
                    path: record,
                    source: e,
                });
            }
        }
        kiln_durable::sync_dir(&self.dir).map_err(ProviderError::io("sync", &self.dir))?;
        Ok(moved.then_some((copy, moved_dir)))
    }

    fn read_tree(&self, path: &Path) -> Result<Tree, ProviderError> {
        let bytes = fs::read(path).map_err(ProviderError::io("read", path))?;
        let record: TreeRecord =
            serde_json::from_slice(&bytes).map_err(|e| ProviderError::Record {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(record.entries)
    }

    /// The recorded tree of a copy of `layer` (see [`LayerCache::locate`]).
    pub(crate) fn tree(&self, layer: &Digest, root: Option<u64>) -> Result<Tree, ProviderError> {
        self.read_tree(&self.locate(layer, root).1)
    }

    /// The differences between a copy of `layer` on disk and its record.
    pub(crate) fn verify(
        &self,
        layer: &Digest,
        root: Option<u64>,
    ) -> Result<Changes, ProviderError> {
        let (dir, record) = self.locate(layer, root);
        let recorded = self.read_tree(&record)?;
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

    /// Removes the evicted copies no instance uses any more; returns how many.
    pub(crate) fn sweep(&self, in_use: &InUse) -> Result<usize, ProviderError> {
        let evicted = self.dir.join("evicted");
        let entries = match fs::read_dir(&evicted) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(ProviderError::Io {
                    op: "read",
                    path: evicted,
                    source: e,
                });
            }
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(ProviderError::io("read", &evicted))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(copy) = parse_evicted(name.trim_end_matches(".tree.json")) else {
                continue;
            };
            if in_use.copies.contains(&copy) || in_use.any_copy_of.contains(&copy.digest) {
                continue;
            }
            let path = entry.path();
            if name.ends_with(".tree.json") {
                remove_file_if_present(&path)?;
            } else {
                match fs::remove_dir_all(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(ProviderError::Io {
                            op: "remove",
                            path,
                            source: e,
                        });
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// `sha256-<hex>.<root inode>`, an evicted copy's name.
fn parse_evicted(name: &str) -> Option<CachedLayer> {
    let (hex, root) = name.strip_prefix("sha256-")?.split_once('.')?;
    Some(CachedLayer {
        digest: Digest::parse(&format!("sha256:{hex}")).ok()?,
        root: root.parse().ok()?,
    })
}

fn remove_file_if_present(path: &Path) -> Result<(), ProviderError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ProviderError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::image::{DirImageSource, ImageConfig};

    /// A one-layer image of `bin/app` = "v1", its source directory, and an empty cache.
    fn fixture() -> (
        tempfile::TempDir,
        DirImageSource,
        Digest,
        Digest,
        LayerCache,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/app"), b"v1").unwrap();
        let mut source = DirImageSource::new();
        let image = source.add(ImageConfig::default(), &[src]);
        let layer = source.resolve(&image).unwrap().layers[0].clone();
        let cache = LayerCache::new(dir.path().join("state/layers"));
        (dir, source, image, layer, cache)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_layer_is_unpacked_once_and_any_change_is_found() {
        let (dir, source, image, layer, cache) = fixture();
        let e = cache.ensure(&source, &image, &layer).unwrap();
        assert!(e.evicted.is_none());
        assert_eq!(fs::read(e.dir.join("bin/app")).unwrap(), b"v1");
        assert_eq!(cache.verify(&layer, Some(e.layer.root)).unwrap(), []);
        // The cache is root's alone; a layer's root is the instance's `/`.
        assert_eq!(mode(&dir.path().join("state/layers")), 0o700);
        assert_eq!(mode(&e.dir), 0o755);
        // Cached: a second ensure does not unpack again (the source is gone).
        fs::remove_dir_all(dir.path().join("src")).unwrap();
        let again = cache.ensure(&source, &image, &layer).unwrap();
        assert_eq!((again.dir, again.layer), (e.dir.clone(), e.layer.clone()));

        let recorded = cache.tree(&layer, None).unwrap();
        assert_eq!(root_inode(&recorded), e.layer.root);
        let dir = e.dir;
        assert_eq!(check_path(&recorded, &dir, "/bin/app"), None);
        fs::write(dir.join("bin/app"), b"v2").unwrap();
        fs::write(dir.join("bin/extra"), b"").unwrap();
        assert_eq!(check_path(&recorded, &dir, "/bin/app"), Some("modified"));
        assert_eq!(check_path(&recorded, &dir, "/bin/extra"), Some("added"));
        assert_eq!(
            cache.verify(&layer, None).unwrap(),
            [
                ("/bin".to_owned(), "modified"),
                ("/bin/app".to_owned(), "modified"),
                ("/bin/extra".to_owned(), "added"),
            ]
        );
    }

    /// The issue: a layer that failed verification was reused, so every replacement of a
    /// drifted instance ran the tampered layer and drifted at once (85 replacements in 20 s).
    #[test]
    fn a_changed_layer_is_evicted_and_unpacked_again_never_reused() {
        let (_dir, source, image, layer, cache) = fixture();
        let first = cache.ensure(&source, &image, &layer).unwrap();
        let tampered = first.dir.join("bin/app");
        let mut f = fs::OpenOptions::new().append(true).open(&tampered).unwrap();
        std::io::Write::write_all(&mut f, b"!").unwrap();
        drop(f);

        let second = cache.ensure(&source, &image, &layer).unwrap();
        // The new instance gets a fresh copy, from the store, at the usual place…
        assert_eq!(second.dir, first.dir);
        assert_ne!(second.layer.root, first.layer.root);
        assert_eq!(fs::read(second.dir.join("bin/app")).unwrap(), b"v1");
        assert_eq!(cache.verify(&layer, Some(second.layer.root)).unwrap(), []);
        assert_eq!(cache.verify(&layer, None).unwrap(), []);
        // …while the instances on the tampered copy keep it, and it still shows as drift.
        let (copy, moved) = second.evicted.expect("the tampered copy was evicted");
        assert_eq!(copy, first.layer);
        assert_eq!(fs::read(moved.join("bin/app")).unwrap(), b"v1!");
        assert_eq!(cache.locate(&layer, Some(copy.root)).0, moved);
        let changes = cache.verify(&layer, Some(copy.root)).unwrap();
        assert!(
            changes.contains(&("/bin/app".to_owned(), "modified")),
            "{changes:?}"
        );
        assert_eq!(mode(moved.parent().unwrap()), 0o700);

        // The fresh copy is reused as long as it matches its record.
        let third = cache.ensure(&source, &image, &layer).unwrap();
        assert_eq!(third.layer, second.layer);
        assert!(third.evicted.is_none());

        // The evicted copy goes once no record names it, not before.
        let named = InUse {
            copies: HashSet::from([copy.clone()]),
            ..InUse::default()
        };
        assert_eq!(cache.sweep(&named).unwrap(), 0);
        let legacy = InUse {
            any_copy_of: HashSet::from([layer.clone()]),
            ..InUse::default()
        };
        assert_eq!(cache.sweep(&legacy).unwrap(), 0);
        assert!(moved.exists());
        assert_eq!(cache.sweep(&InUse::default()).unwrap(), 1);
        assert!(!moved.exists());
        assert!(!cache.evicted_record(&copy).exists());
        assert_eq!(fs::read(second.dir.join("bin/app")).unwrap(), b"v1");
    }

    #[test]
    fn a_damaged_record_or_a_removed_layer_is_unpacked_again() {
        let (_dir, source, image, layer, cache) = fixture();
        let first = cache.ensure(&source, &image, &layer).unwrap();
        fs::write(cache.record_path(&layer), b"{").unwrap();
        let second = cache.ensure(&source, &image, &layer).unwrap();
        assert_eq!(second.evicted.map(|(c, _)| c), Some(first.layer));
        assert_eq!(cache.verify(&layer, Some(second.layer.root)).unwrap(), []);

        fs::remove_dir_all(&second.dir).unwrap();
        let third = cache.ensure(&source, &image, &layer).unwrap();
        assert!(third.evicted.is_none());
        assert_eq!(fs::read(third.dir.join("bin/app")).unwrap(), b"v1");
        assert_eq!(cache.verify(&layer, None).unwrap(), []);
    }
}
