//! Drift detection on the local provider: what counts as drift in an instance's overlay
//! upper dir ([`scan_upper`]), and the inotify watcher ([`Watcher`]) that sees it in
//! milliseconds. The provider backs the watcher with a periodic full rescan, because
//! recursive watches can miss entries created faster than a watch is added.
//!
//! An upper dir legitimately holds only the empty directories the OCI runtime creates as
//! mount points before the root becomes read-only (`/dev`, `/proc`, `/sys`, each `writable`
//! path, and their parents). Everything else — a file, a whiteout (a deletion), an opaque or
//! non-empty directory that is not a mount point — was written from outside and is drift.
//! Cached layers are checked against the record taken when they were unpacked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::broadcast;

use crate::local::layers::{CachedLayer, Tree, check_path};
use crate::types::{Digest, DriftFinding, DriftReport, InstanceId};

/// Paths in `upper` that are drift, as the instance sees them (absolute). `mount_points`
/// are the directories the runtime may create (with their ancestors); `writable` paths are
/// tmpfs inside the instance, so nothing below them should reach the upper dir either.
pub(crate) fn scan_upper(upper: &Path, mount_points: &[String]) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    match fs::read_dir(upper) {
        Ok(_) => scan_dir(upper, "", mount_points, &mut out)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort();
    Ok(out)
}

fn scan_dir(dir: &Path, prefix: &str, allowed: &[String], out: &mut Vec<String>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let rel = format!("{prefix}/{}", entry.file_name().to_string_lossy());
        let path = entry.path();
        let ft = match entry.file_type() {
            Ok(ft) => ft,
            // Removed while scanning: the next event or scan sees what replaced it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if ft.is_dir() {
            let is_mount_point = allowed.iter().any(|a| a == &rel);
            if is_mount_point && !is_opaque(&path) {
                scan_dir(&path, &rel, allowed, out)?;
            } else {
                let before = out.len();
                scan_dir(&path, &rel, &[], out)?;
                // Name the directory itself when nothing below it does (a new empty dir,
                // or a copied-up directory whose metadata was changed).
                if out.len() == before {
                    out.push(rel);
                }
            }
        } else if ft.is_char_device() {
            // An overlay whiteout: a file of the image was deleted.
            out.push(rel);
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

/// Whether overlayfs marked the directory opaque (it hides the lower layers' content: it was
/// deleted and re-created).
fn is_opaque(path: &Path) -> bool {
    let mut buf = [0u8; 8];
    rustix::fs::lgetxattr(path, "trusted.overlay.opaque", &mut buf).is_ok()
}

/// What a watch descriptor watches.
#[derive(Debug, Clone)]
enum Owner {
    /// A directory of an instance's upper dir (the directory itself).
    Upper(InstanceId, PathBuf),
    /// An instance's bundle directory (its `config.json`).
    Bundle(InstanceId),
    /// A directory of a cached layer's copy; the string is its path inside the layer.
    Layer(CachedLayer, String),
}

/// What the watcher needs to know about one instance.
#[derive(Debug, Clone)]
pub(crate) struct WatchedInstance {
    pub upper: PathBuf,
    pub bundle: PathBuf,
    pub mount_points: Vec<String>,
    /// The copies of its layers it runs on.
    pub layers: Vec<CachedLayer>,
    pub config_digest: Digest,
}

#[derive(Debug)]
struct WatchedLayer {
    dir: PathBuf,
    tree: Tree,
    users: BTreeSet<InstanceId>,
    /// Changes seen so far (inotify names one path per event; they accumulate).
    changes: BTreeMap<String, &'static str>,
}

#[derive(Debug, Default)]
struct Table {
    by_wd: HashMap<WatchDescriptor, Owner>,
    instances: HashMap<InstanceId, (WatchedInstance, Vec<WatchDescriptor>)>,
    /// By copy, not digest: after an eviction, the changes seen on the evicted copy are not
    /// the fresh copy's.
    layers: HashMap<CachedLayer, (WatchedLayer, Vec<WatchDescriptor>)>,
    /// The last findings published per instance, so a burst of events publishes once.
    published: HashMap<InstanceId, Vec<DriftFinding>>,
}

/// The inotify watcher: one thread reading events, a table of what each watch means.
pub(crate) struct Watcher {
    watches: Mutex<Watches>,
    table: Arc<Mutex<Table>>,
    tx: broadcast::Sender<DriftReport>,
}

const DIR_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::ONLYDIR);

impl Watcher {
    /// Starts the reader thread.
    pub(crate) fn start(tx: broadcast::Sender<DriftReport>) -> io::Result<Arc<Watcher>> {
        let inotify = Inotify::init()?;
        let watcher = Arc::new(Watcher {
            watches: Mutex::new(inotify.watches()),
            table: Arc::new(Mutex::new(Table::default())),
            tx,
        });
        let weak = Arc::downgrade(&watcher);
        std::thread::Builder::new()
            .name("kiln-drift-watch".to_owned())
            .spawn(move || read_loop(inotify, weak))?;
        Ok(watcher)
    }

    /// Watches an instance's upper dir, its bundle and its layers (with their records).
    pub(crate) fn watch_instance(
        &self,
        id: &InstanceId,
        inst: WatchedInstance,
        layers: Vec<(CachedLayer, PathBuf, Tree)>,
    ) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.instances.contains_key(id) {
            return;
        }
        let mut wds = Vec::new();
        let upper_owner = Owner::Upper(id.clone(), inst.upper.clone());
        self.add_tree(&mut table, &inst.upper, "", &upper_owner, &mut wds);
        if let Ok(wd) = self.add(&inst.bundle) {
            table.by_wd.insert(wd.clone(), Owner::Bundle(id.clone()));
            wds.push(wd);
        }
        for (copy, dir, tree) in layers {
            if let Some((layer, _)) = table.layers.get_mut(&copy) {
                layer.users.insert(id.clone());
                continue;
            }
            let mut lwds = Vec::new();
            self.add_tree(
                &mut table,
                &dir,
                "",
                &Owner::Layer(copy.clone(), String::new()),
                &mut lwds,
            );
            let layer = WatchedLayer {
                dir,
                tree,
                users: BTreeSet::from([id.clone()]),
                changes: BTreeMap::new(),
            };
            table.layers.insert(copy, (layer, lwds));
        }
        table.instances.insert(id.clone(), (inst, wds));
    }

    /// Stops watching an instance (and layers no other instance uses).
    pub(crate) fn unwatch_instance(&self, id: &InstanceId) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some((inst, wds)) = table.instances.remove(id) else {
            return;
        };
        table.published.remove(id);
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        for wd in wds {
            table.by_wd.remove(&wd);
            let _ = watches.remove(wd);
        }
        for copy in inst.layers {
            let unused = match table.layers.get_mut(&copy) {
                Some((layer, _)) => {
                    layer.users.remove(id);
                    layer.users.is_empty()
                }
                None => false,
            };
            if unused && let Some((_, lwds)) = table.layers.remove(&copy) {
                for wd in lwds {
                    table.by_wd.remove(&wd);
                    let _ = watches.remove(wd);
                }
            }
        }
    }

    /// Tells the watcher that an evicted copy's directory moved to `dir` (its watches follow
    /// the inodes; the paths it checks an event against must follow too).
    pub(crate) fn layer_moved(&self, copy: &CachedLayer, dir: PathBuf) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((layer, _)) = table.layers.get_mut(copy) {
            layer.dir = dir;
        }
    }

    /// Whether the instance is watched (adopted) already.
    pub(crate) fn is_watched(&self, id: &InstanceId) -> bool {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.instances.contains_key(id)
    }

    /// Publishes `findings` for `id` unless they are what was published last; returns the
    /// report when published.
    pub(crate) fn publish(
        &self,
        id: &InstanceId,
        findings: Vec<DriftFinding>,
    ) -> Option<DriftReport> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        publish_locked(&mut table, &self.tx, id, findings)
    }

    fn add(&self, dir: &Path) -> io::Result<WatchDescriptor> {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.add(dir, DIR_MASK)
    }

    /// Adds watches on `dir` and every directory below it.
    fn add_tree(
        &self,
        table: &mut Table,
        dir: &Path,
        rel: &str,
        owner: &Owner,
        wds: &mut Vec<WatchDescriptor>,
    ) {
        let Ok(wd) = self.add(dir) else {
            return;
        };
        let owner_here = match owner {
            Owner::Layer(c, _) => Owner::Layer(c.clone(), rel.to_owned()),
            Owner::Upper(id, _) => Owner::Upper(id.clone(), dir.to_path_buf()),
            other => other.clone(),
        };
        table.by_wd.insert(wd.clone(), owner_here);
        wds.push(wd);
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let child_rel = format!("{rel}/{}", entry.file_name().to_string_lossy());
                self.add_tree(table, &entry.path(), &child_rel, owner, wds);
            }
        }
    }

    fn handle(&self, wd: &WatchDescriptor, mask: EventMask, name: Option<&OsStr>) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(owner) = table.by_wd.get(wd).cloned() else {
            return;
        };
        let new_dir = mask.contains(EventMask::ISDIR)
            && (mask.contains(EventMask::CREATE) || mask.contains(EventMask::MOVED_TO));
        match owner {
            Owner::Upper(id, parent) => {
                if new_dir && let Some(name) = name {
                    let dir = parent.join(name);
                    let mut wds = Vec::new();
                    let owner = Owner::Upper(id.clone(), dir.clone());
                    self.add_tree(&mut table, &dir, "", &owner, &mut wds);
                    if let Some((_, all)) = table.instances.get_mut(&id) {
                        all.extend(wds);
                    }
                }
                self.recheck(&mut table, &id);
            }
            Owner::Bundle(id) => {
                if name.is_none_or(|n| n == "config.json") {
                    self.recheck(&mut table, &id);
                }
            }
            Owner::Layer(copy, dir_rel) => {
                let rel = match name {
                    Some(n) => format!("{dir_rel}/{}", n.to_string_lossy()),
                    None if dir_rel.is_empty() => "/".to_owned(),
                    None => dir_rel.clone(),
                };
                let users: Vec<InstanceId> = match table.layers.get_mut(&copy) {
                    Some((layer, _)) => {
                        if let Some(change) = check_path(&layer.tree, &layer.dir, &rel) {
                            layer.changes.insert(rel.clone(), change);
                        }
                        layer.users.iter().cloned().collect()
                    }
                    None => Vec::new(),
                };
                if new_dir && let Some((layer, _)) = table.layers.get(&copy) {
                    let dir = layer.dir.join(rel.trim_start_matches('/'));
                    let mut wds = Vec::new();
                    let owner = Owner::Layer(copy.clone(), rel.clone());
                    self.add_tree(&mut table, &dir, &rel, &owner, &mut wds);
                    if let Some((_, all)) = table.layers.get_mut(&copy) {
                        all.extend(wds);
                    }
                }
                for id in users {
                    self.recheck(&mut table, &id);
                }
            }
        }
    }

    /// Recomputes the fast findings of `id` (upper dir, config digest, layer changes seen)
    /// and publishes them when they changed.
    fn recheck(&self, table: &mut Table, id: &InstanceId) {
        let Some((inst, _)) = table.instances.get(id) else {
            return;
        };
        let mut findings = Vec::new();
        if let Ok(paths) = scan_upper(&inst.upper, &inst.mount_points) {
            findings.extend(paths.into_iter().map(|path| DriftFinding::Write { path }));
        }
        if let Some(f) = config_finding(&inst.bundle, &inst.config_digest) {
            findings.push(f);
        }
        for copy in &inst.layers {
            if let Some((layer, _)) = table.layers.get(copy) {
                for (path, change) in &layer.changes {
                    findings.push(DriftFinding::Layer {
                        layer: copy.digest.clone(),
                        path: path.clone(),
                        change,
                    });
                }
            }
        }
        let id = id.clone();
        publish_locked(table, &self.tx, &id, findings);
    }

    /// A full rescan of every watched instance's fast findings (after an inotify queue
    /// overflow).
    fn recheck_all(&self) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<InstanceId> = table.instances.keys().cloned().collect();
        for id in ids {
            self.recheck(&mut table, &id);
        }
    }
}

fn publish_locked(
    table: &mut Table,
    tx: &broadcast::Sender<DriftReport>,
    id: &InstanceId,
    mut findings: Vec<DriftFinding>,
) -> Option<DriftReport> {
    findings.sort_by_key(|f| f.to_string());
    findings.dedup();
    let last = table.published.get(id);
    if last.is_some_and(|l| *l == findings) || (last.is_none() && findings.is_empty()) {
        return None;
    }
    table.published.insert(id.clone(), findings.clone());
    if findings.is_empty() {
        return None;
    }
    let report = DriftReport {
        instance: id.clone(),
        findings,
        at: SystemTime::now(),
    };
    // No receiver is fine: drift is also found by the rescan and by `check_drift`.
    let _ = tx.send(report.clone());
    Some(report)
}

/// A config finding when `bundle/config.json` is not what kiln wrote.
pub(crate) fn config_finding(bundle: &Path, expected: &Digest) -> Option<DriftFinding> {
    let found = fs::read(bundle.join("config.json"))
        .ok()
        .map(|b| config_digest(bundle, &b));
    match found {
        Some(d) if &d == expected => None,
        found => Some(DriftFinding::Config {
            expected: expected.clone(),
            found,
        }),
    }
}

/// The digest of a bundle's `config.json` as its record keeps it. A bundle on a tmpfs (an
/// instance with secrets, whose exposed values are in the config) has a random salt there,
/// `config.salt`: the digest on disk is then no oracle to check a guess of a value against.
pub(crate) fn config_digest(bundle: &Path, config: &[u8]) -> Digest {
    match fs::read(bundle.join(CONFIG_SALT)) {
        Ok(mut salted) => {
            salted.extend_from_slice(config);
            Digest::of(&salted)
        }
        Err(_) => Digest::of(config),
    }
}

/// The salt file of [`config_digest`].
pub(crate) const CONFIG_SALT: &str = "config.salt";

fn read_loop(mut inotify: Inotify, watcher: std::sync::Weak<Watcher>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let events = match inotify.read_events_blocking(&mut buf) {
            Ok(events) => events,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "drift watcher stopped; the periodic rescan still runs");
                return;
            }
        };
        let Some(watcher) = watcher.upgrade() else {
            return;
        };
        for event in events {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                watcher.recheck_all();
            } else if !event.mask.contains(EventMask::IGNORED) {
                watcher.handle(&event.wd, event.mask, event.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn runtime_mount_points_are_not_drift_but_writes_are() {
        let upper = tempfile::tempdir().unwrap();
        let u = upper.path();
        let points =
            crate::local::bundle::mount_points(&["/tmp".to_owned(), "/var/data".to_owned()]);
        for d in ["dev", "proc", "sys", "tmp", "var/data"] {
            fs::create_dir_all(u.join(d)).unwrap();
        }
        assert_eq!(scan_upper(u, &points).unwrap(), Vec::<String>::new());

        fs::write(u.join("evil"), b"x").unwrap();
        fs::create_dir_all(u.join("bin")).unwrap();
        fs::write(u.join("bin/sh"), b"x").unwrap();
        fs::create_dir(u.join("newdir")).unwrap();
        fs::write(u.join("var/data/below-a-tmpfs"), b"x").unwrap();
        assert_eq!(
            scan_upper(u, &points).unwrap(),
            ["/bin/sh", "/evil", "/newdir", "/var/data/below-a-tmpfs"]
        );
    }

    #[test]
    fn a_missing_upper_dir_has_no_findings() {
        assert!(
            scan_upper(Path::new("/nonexistent/kiln-upper"), &[])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_watcher_reports_host_writes_within_milliseconds() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        let bundle = dir.path().join("bundle");
        fs::create_dir_all(upper.join("tmp")).unwrap();
        fs::create_dir_all(&bundle).unwrap();
        fs::write(bundle.join("config.json"), b"{}").unwrap();
        let (tx, mut rx) = broadcast::channel(16);
        let watcher = Watcher::start(tx).unwrap();
        let id = InstanceId::new("t-1").unwrap();
        watcher.watch_instance(
            &id,
            WatchedInstance {
                upper: upper.clone(),
                bundle: bundle.clone(),
                mount_points: crate::local::bundle::mount_points(&["/tmp".to_owned()]),
                layers: Vec::new(),
                config_digest: Digest::of(b"{}"),
            },
            Vec::new(),
        );
        // A mount point the runtime creates is not drift; a nested write is.
        fs::create_dir(upper.join("proc")).unwrap();
        fs::create_dir_all(upper.join("etc/deep")).unwrap();
        let t0 = std::time::Instant::now();
        fs::write(upper.join("etc/deep/file"), b"x").unwrap();
        let report = loop {
            let r = rx.blocking_recv().unwrap();
            if r.paths().contains(&"/etc/deep/file".to_owned()) {
                break r;
            }
        };
        println!("drift seen after {:?}", t0.elapsed());
        assert_eq!(report.instance, id);
        assert!(!report.paths().iter().any(|p| p == "/proc"), "{report:?}");
        // Rewriting config.json is drift too.
        fs::write(bundle.join("config.json"), b"{\"changed\":1}").unwrap();
        let report = loop {
            let r = rx.blocking_recv().unwrap();
            if r.findings
                .iter()
                .any(|f| matches!(f, DriftFinding::Config { .. }))
            {
                break r;
            }
        };
        assert_eq!(report.instance, id);
        watcher.unwatch_instance(&id);
        assert!(!watcher.is_watched(&id));
    }
}
