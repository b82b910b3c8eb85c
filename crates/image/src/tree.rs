//! Turns an `[[image.copy]]` into the sorted list of entries one layer holds.
//!
//! This is where reproducibility is decided: what is read from the host (content, the
//! executable bits, setuid/setgid, symlink targets, hardlink structure) and what is not
//! (mtimes, owners, user names, xattrs, group/other write bits that only the umask put there).
//! It reads metadata and directory listings but never file contents.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use kiln_spec::CopySpec;

use crate::build::BuildError;
use crate::closure;

/// What the cache keys a file's content hash on, like git's index.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub(crate) struct StatKey {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i128,
    pub(crate) ctime_ns: i128,
}

impl StatKey {
    pub(crate) fn of(m: &Metadata) -> StatKey {
        StatKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// What one entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Dir,
    File {
        source: PathBuf,
        stat: StatKey,
        /// Names the inode has on the host (above 1: maybe a hardlink within the layer).
        nlink: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A second name for an earlier file entry of the same layer.
    Hardlink {
        target: String,
    },
}

/// One tar entry of a layer: path relative to the image root, no leading `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerEntry {
    pub(crate) path: String,
    pub(crate) kind: EntryKind,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Group/other write bits depend on the umask of whoever created the tree, not on intent;
/// dropping them is what makes two checkouts with umask 022 and 002 give one digest.
const UMASK_BITS: u32 = 0o022;

/// Keeps permission, setuid, setgid and sticky bits except those the umask decides.
pub(crate) fn normal_mode(st_mode: u32) -> u32 {
    st_mode & 0o7777 & !UMASK_BITS
}

/// How a tree walk turns host metadata into entries.
struct Walk {
    excludes: GlobSet,
    uid: u32,
    gid: u32,
    /// Forced permission bits for files.
    file_mode: Option<u32>,
    /// Drop the bits the umask decides (copies) or keep them exactly (a rootfs base).
    strip_umask: bool,
}

impl Walk {
    fn mode(&self, st_mode: u32) -> u32 {
        if self.strip_umask {
            normal_mode(st_mode)
        } else {
            st_mode & 0o7777
        }
    }
}

/// Plans a `rootfs:` directory base: everything under `root` at `/`, permission bits exact,
/// owner 0:0.
pub(crate) fn plan_rootfs(root: &Path) -> Result<Vec<LayerEntry>, BuildError> {
    let walk = Walk {
        excludes: GlobSet::empty(),
        uid: 0,
        gid: 0,
        file_mode: None,
        strip_umask: false,
    };
    let root = std::path::absolute(root).map_err(BuildError::io("resolve", root))?;
    let mut entries = BTreeMap::new();
    walk_dir(&walk, &root, "", "", &mut entries)?;
    Ok(link_hardlinks(entries.into_values().collect()))
}

/// Plans the entries for one copy: ancestors of `to`, the tree under `from`, and the
/// shared-library closure when asked. Sorted by path; hardlinks point at the first name.
pub(crate) fn plan_copy(copy: &CopySpec) -> Result<Vec<LayerEntry>, BuildError> {
    let walk = Walk {
        excludes: build_excludes(&copy.exclude)?,
        uid: copy.owner.uid,
        gid: copy.owner.gid,
        file_mode: copy.mode,
        strip_umask: true,
    };
    // Absolute source paths: the stat cache is keyed on them, and the working directory
    // must not decide whether a rebuild hits it.
    let from = std::path::absolute(&copy.from).map_err(BuildError::io("resolve", &copy.from))?;
    let copy = &CopySpec {
        from,
        ..copy.clone()
    };
    let mut entries: BTreeMap<String, LayerEntry> = BTreeMap::new();
    let to = copy.to.trim_start_matches('/').to_owned();
    add_ancestors(&mut entries, &to);
    let root_meta = fs::metadata(&copy.from).map_err(BuildError::io("stat", &copy.from))?;
    if root_meta.is_dir() {
        if !to.is_empty() {
            entries.insert(
                to.clone(),
                LayerEntry {
                    path: to.clone(),
                    kind: EntryKind::Dir,
                    mode: walk.mode(root_meta.mode()),
                    uid: walk.uid,
                    gid: walk.gid,
                },
            );
        }
        walk_dir(&walk, &copy.from, "", &to, &mut entries)?;
    } else {
        let entry = file_entry(&walk, &copy.from, &root_meta, &to)?;
        entries.insert(to.clone(), entry);
    }
    if copy.closure {
        for host_path in closure::resolve(&copy.from)? {
            add_host_path(&mut entries, &host_path)?;
        }
    }
    Ok(link_hardlinks(entries.into_values().collect()))
}

fn build_excludes(patterns: &[String]) -> Result<GlobSet, BuildError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob = GlobBuilder::new(p.trim_start_matches('/'))
            .literal_separator(false)
            .build()
            .map_err(|source| BuildError::BadGlob {
                pattern: p.clone(),
                source,
            })?;
        b.add(glob);
    }
    b.build().map_err(|source| BuildError::BadGlob {
        pattern: patterns.join(", "),
        source,
    })
}

fn add_ancestors(entries: &mut BTreeMap<String, LayerEntry>, path: &str) {
    let mut prefix = String::new();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        entries.entry(prefix.clone()).or_insert_with(|| LayerEntry {
            path: prefix.clone(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
        });
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}/{b}"),
    }
}

fn walk_dir(
    walk: &Walk,
    dir: &Path,
    rel: &str,
    dest: &str,
    entries: &mut BTreeMap<String, LayerEntry>,
) -> Result<(), BuildError> {
    let mut names: Vec<OsString> = Vec::new();
    for e in fs::read_dir(dir).map_err(BuildError::io("list", dir))? {
        names.push(e.map_err(BuildError::io("list", dir))?.file_name());
    }
    names.sort();
    for name in names {
        let Some(name_str) = name.to_str() else {
            return Err(BuildError::UnsupportedFile {
                path: dir.join(&name),
                what: "a name that is not UTF-8".to_owned(),
            });
        };
        let rel_child = join(rel, name_str);
        if walk.excludes.is_match(&rel_child) {
            continue;
        }
        let host = dir.join(&name);
        let meta = fs::symlink_metadata(&host).map_err(BuildError::io("stat", &host))?;
        let image_path = join(dest, name_str);
        if meta.is_dir() {
            entries.insert(
                image_path.clone(),
                LayerEntry {
                    path: image_path.clone(),
                    kind: EntryKind::Dir,
                    mode: walk.mode(meta.mode()),
                    uid: walk.uid,
                    gid: walk.gid,
                },
            );
            walk_dir(walk, &host, &rel_child, &image_path, entries)?;
        } else {
            let entry = file_entry(walk, &host, &meta, &image_path)?;
            entries.insert(image_path, entry);
        }
    }
    Ok(())
}

fn file_entry(
    walk: &Walk,
    host: &Path,
    meta: &Metadata,
    image_path: &str,
) -> Result<LayerEntry, BuildError> {
    let ft = meta.file_type();
    let (kind, mode) = if ft.is_file() {
        let mode = walk.file_mode.unwrap_or_else(|| walk.mode(meta.mode()));
        (
            EntryKind::File {
                source: host.to_path_buf(),
                stat: StatKey::of(meta),
                nlink: meta.nlink(),
            },
            mode,
        )
    } else if ft.is_symlink() {
        let target = fs::read_link(host).map_err(BuildError::io("read link", host))?;
        (
            EntryKind::Symlink {
                target: target.into_os_string().into_vec(),
            },
            0o777,
        )
    } else {
        let what = if ft.is_socket() {
            "a socket"
        } else if ft.is_fifo() {
            "a named pipe"
        } else {
            "a device node"
        };
        return Err(BuildError::UnsupportedFile {
            path: host.to_path_buf(),
            what: what.to_owned(),
        });
    };
    Ok(LayerEntry {
        path: image_path.to_owned(),
        kind,
        mode,
        uid: walk.uid,
        gid: walk.gid,
    })
}

/// Within a layer, files sharing an inode become one file entry (the first path in sorted
/// order) and hardlink entries to it, so the structure is kept and never depends on walk
/// order.
fn link_hardlinks(mut entries: Vec<LayerEntry>) -> Vec<LayerEntry> {
    let mut first: HashMap<(u64, u64), String> = HashMap::new();
    for e in &mut entries {
        if let EntryKind::File { stat, nlink, .. } = &e.kind {
            if *nlink < 2 {
                continue;
            }
            match first.get(&(stat.dev, stat.ino)) {
                Some(target) => {
                    e.kind = EntryKind::Hardlink {
                        target: target.clone(),
                    }
                }
                None => {
                    first.insert((stat.dev, stat.ino), e.path.clone());
                }
            }
        }
    }
    entries
}

/// Adds a host path the dynamic loader opens, mirroring every directory and symlink met on
/// the way (so `/lib64/ld-linux-x86-64.so.2` keeps working on a merged-/usr layout).
fn add_host_path(
    entries: &mut BTreeMap<String, LayerEntry>,
    path: &Path,
) -> Result<(), BuildError> {
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut hops = 0;
    while let Some(p) = pending.pop() {
        hops += 1;
        if hops > 64 {
            return Err(BuildError::UnsupportedFile {
                path: path.to_path_buf(),
                what: "a path with too many symlinks".to_owned(),
            });
        }
        let mut current = PathBuf::from("/");
        let comps: Vec<Component> = p.components().collect();
        for (i, c) in comps.iter().enumerate() {
            match c {
                Component::RootDir | Component::CurDir => continue,
                Component::ParentDir => {
                    current.pop();
                    continue;
                }
                Component::Prefix(_) => continue,
                Component::Normal(n) => current.push(n),
            }
            let rel = current
                .strip_prefix("/")
                .unwrap_or(&current)
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&current).map_err(BuildError::io("stat", &current))?;
            let last = i + 1 == comps.len();
            if meta.file_type().is_symlink() {
                let target =
                    fs::read_link(&current).map_err(BuildError::io("read link", &current))?;
                entries.entry(rel.clone()).or_insert_with(|| LayerEntry {
                    path: rel.clone(),
                    kind: EntryKind::Symlink {
                        target: target.clone().into_os_string().into_vec(),
                    },
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                });
                let base = current.parent().map(Path::to_path_buf).unwrap_or_default();
                let mut next = base.join(&target);
                for rest in &comps[i + 1..] {
                    next.push(rest);
                }
                pending.push(next);
                break;
            }
            if meta.is_dir() {
                entries.entry(rel.clone()).or_insert_with(|| LayerEntry {
                    path: rel.clone(),
                    kind: EntryKind::Dir,
                    mode: normal_mode(meta.mode()),
                    uid: 0,
                    gid: 0,
                });
            } else if last && meta.is_file() {
                entries.entry(rel.clone()).or_insert_with(|| LayerEntry {
                    path: rel.clone(),
                    kind: EntryKind::File {
                        source: current.clone(),
                        stat: StatKey::of(&meta),
                        nlink: meta.nlink(),
                    },
                    mode: normal_mode(meta.mode()),
                    uid: 0,
                    gid: 0,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn umask_bits_are_dropped_but_special_bits_kept() {
        assert_eq!(normal_mode(0o100664), 0o644);
        assert_eq!(normal_mode(0o100775), 0o755);
        assert_eq!(normal_mode(0o104755), 0o4755);
        assert_eq!(normal_mode(0o100600), 0o600);
    }
}
