//! Which kernel modules the guest loads, and in what order: the roots the machine init
//! needs ([`ROOTS`]) and everything they depend on, dependencies first.
//!
//! Dependencies come from each module's own `.modinfo` section (`depends=`), the source
//! `depmod` builds `modules.dep` from, because a kernel unpacked from a Debian
//! `linux-image-*.deb` has no `modules.dep` (its `postinst` runs `depmod`) and kiln does not
//! write into the kernel's tree. Module names compare with `-` and `_` alike, as the kernel
//! does.
//!
//! **API boundary:** [`resolve`] is pure over a [`Catalog`]; [`Catalog::scan`] reads the
//! modules directory (names only) and [`Catalog::depends`] one module file at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

/// The modules the machine init needs, by what they give it. `virtio_pci` is the bus the
/// virtio disk and network devices sit on (no module depends on it: the kernel loads it
/// by alias, which an init without udev does not do); `crc32c_generic` is the `crc32c`
/// that `libcrc32c` (erofs) asks the crypto API for (a soft dependency, not in `depends=`);
/// `efivarfs` is how the init reads whether Secure Boot was on.
pub const ROOTS: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "dm-verity",
    "erofs",
    "virtio_net",
    "evdev",
    "button",
    "efivarfs",
];

/// The module that reads QEMU's firmware configuration device, where the guest finds its
/// secrets: a root only when the app has secrets.
pub const FW_CFG: &str = "qemu_fw_cfg";

/// Why the modules could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The modules directory could not be read.
    #[error("cannot read the kernel modules directory {path}")]
    Scan {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A module the guest needs is not in the kernel's modules directory (built in, or
    /// another kernel's directory).
    #[error(
        "kernel module {name} is not in {dir} (a kernel with it built in is not supported yet)"
    )]
    Missing {
        /// The module's name.
        name: String,
        /// The directory searched.
        dir: PathBuf,
    },
    /// A compressed module (`.ko.xz`, `.ko.zst`, `.ko.gz`): the init loads plain `.ko` files.
    #[error("kernel module {path} is compressed; only uncompressed .ko modules are supported")]
    Compressed {
        /// The module file.
        path: PathBuf,
    },
    /// A module file that is not an ELF object with a `.modinfo` section.
    #[error("kernel module {path} cannot be read: {why}")]
    Module {
        /// The module file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Two module files of one name, or a dependency cycle.
    #[error("kernel modules directory {dir}: {why}")]
    Inconsistent {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// A module's name as the kernel compares it: `-` read as `_`.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The module files of one kernel, by canonical name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    dir: PathBuf,
    /// Canonical name → path relative to `dir`.
    files: BTreeMap<String, PathBuf>,
    /// Canonical name → compressed file path, to say so when one is asked for.
    compressed: BTreeMap<String, PathBuf>,
}

impl Catalog {
    /// Every `*.ko` under `dir` (`lib/modules/<version>`).
    pub fn scan(dir: &Path) -> Result<Catalog, Error> {
        let mut catalog = Catalog {
            dir: dir.to_owned(),
            ..Catalog::default()
        };
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let abs = dir.join(&rel);
            let entries = std::fs::read_dir(&abs).map_err(|source| Error::Scan {
                path: abs.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| Error::Scan {
                    path: abs.clone(),
                    source,
                })?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let kind = entry.file_type().map_err(|source| Error::Scan {
                    path: abs.join(&name),
                    source,
                })?;
                let child = rel.join(&name);
                if kind.is_dir() {
                    stack.push(child);
                } else if let Some(stem) = name.strip_suffix(".ko") {
                    catalog.add(canonical(stem), child)?;
                } else if let Some((stem, _)) = name.split_once(".ko.") {
                    catalog.compressed.insert(canonical(stem), child);
                }
            }
        }
        Ok(catalog)
    }

    /// A catalog from names and relative paths, for tests.
    pub fn from_files(
        dir: &Path,
        files: impl IntoIterator<Item = (String, PathBuf)>,
    ) -> Result<Catalog, Error> {
        let mut catalog = Catalog {
            dir: dir.to_owned(),
            ..Catalog::default()
        };
        for (name, path) in files {
            catalog.add(canonical(&name), path)?;
        }
        Ok(catalog)
    }

    fn add(&mut self, name: String, path: PathBuf) -> Result<(), Error> {
        if let Some(first) = self.files.get(&name) {
            return Err(Error::Inconsistent {
                dir: self.dir.clone(),
                why: format!(
                    "module {name} is both {} and {}",
                    first.display(),
                    path.display()
                ),
            });
        }
        self.files.insert(name, path);
        Ok(())
    }

    /// The modules directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of module `name`, relative to [`Catalog::dir`].
    pub fn file(&self, name: &str) -> Result<&Path, Error> {
        let name = canonical(name);
        if let Some(path) = self.files.get(&name) {
            return Ok(path);
        }
        if let Some(path) = self.compressed.get(&name) {
            return Err(Error::Compressed {
                path: self.dir.join(path),
            });
        }
        Err(Error::Missing {
            name,
            dir: self.dir.clone(),
        })
    }

    /// The modules `name` depends on, from its file's `.modinfo` `depends=` entry.
    pub fn depends(&self, name: &str) -> Result<Vec<String>, Error> {
        let path = self.dir.join(self.file(name)?);
        let bytes = std::fs::read(&path).map_err(|e| Error::Module {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let modinfo = modinfo(&bytes).map_err(|why| Error::Module {
            path: path.clone(),
            why,
        })?;
        Ok(depends_of(&modinfo))
    }
}

/// The `.modinfo` section of an ELF module.
fn modinfo(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let elf = goblin::elf::Elf::parse(bytes).map_err(|e| format!("not an ELF object: {e}"))?;
    for sh in &elf.section_headers {
        if elf.shdr_strtab.get_at(sh.sh_name) == Some(".modinfo") {
            let start = usize::try_from(sh.sh_offset).map_err(|e| e.to_string())?;
            let len = usize::try_from(sh.sh_size).map_err(|e| e.to_string())?;
            return bytes
                .get(start..start.saturating_add(len))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| "its .modinfo section is outside the file".to_owned());
        }
    }
    Err("it has no .modinfo section".to_owned())
}

/// The names in a `.modinfo` section's `depends=` entry (NUL-separated `key=value`s).
pub fn depends_of(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|b| *b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect()
}

/// The load order of `roots` and their dependencies: each module after everything it
/// depends on, each once, in the order a depth-first walk of the roots (as given) and
/// their `depends` (as listed) first reaches them. Returns paths relative to the catalog's
/// directory.
pub fn resolve(
    roots: &[&str],
    depends: &mut dyn FnMut(&str) -> Result<Vec<String>, Error>,
    catalog: &Catalog,
) -> Result<Vec<PathBuf>, Error> {
    let mut order: Vec<String> = Vec::new();
    let mut done = BTreeSet::new();
    for root in roots {
        // An explicit stack, so a long chain cannot overflow ours; `on_path` finds cycles.
        let mut on_path: BTreeSet<String> = BTreeSet::new();
        let mut stack: Vec<(String, Option<Vec<String>>)> = vec![(canonical(root), None)];
        while let Some((name, pending)) = stack.pop() {
            if done.contains(&name) {
                continue;
            }
            let mut pending = match pending {
                Some(p) => p,
                None => {
                    catalog.file(&name)?;
                    on_path.insert(name.clone());
                    let mut deps: Vec<String> =
                        depends(&name)?.iter().map(|d| canonical(d)).collect();
                    deps.reverse();
                    deps
                }
            };
            match pending.pop() {
                Some(dep) if done.contains(&dep) => stack.push((name, Some(pending))),
                Some(dep) => {
                    if on_path.contains(&dep) {
                        return Err(Error::Inconsistent {
                            dir: catalog.dir.clone(),
                            why: format!("modules {name} and {dep} depend on each other"),
                        });
                    }
                    stack.push((name, Some(pending)));
                    stack.push((dep, None));
                }
                None => {
                    on_path.remove(&name);
                    done.insert(name.clone());
                    order.push(name);
                }
            }
        }
    }
    order
        .iter()
        .map(|name| catalog.file(name).map(Path::to_owned))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn catalog(names: &[&str]) -> Catalog {
        Catalog::from_files(
            Path::new("/m"),
            names
                .iter()
                .map(|n| (n.to_string(), PathBuf::from(format!("kernel/{n}.ko")))),
        )
        .unwrap()
    }

    fn deps(
        table: &'static [(&'static str, &'static [&'static str])],
    ) -> impl FnMut(&str) -> Result<Vec<String>, Error> {
        move |name| {
            Ok(table
                .iter()
                .find(|(n, _)| canonical(n) == name)
                .map(|(_, d)| d.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default())
        }
    }

    #[test]
    fn dependencies_first_each_once() {
        // The shape of the Debian 6.1 kernel's virtio and dm-verity modules.
        let c = catalog(&[
            "virtio_ring",
            "virtio",
            "virtio_blk",
            "virtio_net",
            "failover",
            "net_failover",
            "dm-mod",
            "dm-bufio",
            "reed_solomon",
            "dm-verity",
        ]);
        let mut d = deps(&[
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("virtio", &["virtio_ring"]),
            ("virtio_net", &["net_failover", "virtio", "virtio_ring"]),
            ("net_failover", &["failover"]),
            ("dm_verity", &["dm-bufio", "dm-mod", "reed_solomon"]),
        ]);
        let order = resolve(&["virtio_blk", "dm-verity", "virtio_net"], &mut d, &c).unwrap();
        let names: Vec<String> = order
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_blk",
                "dm-bufio",
                "dm-mod",
                "reed_solomon",
                "dm-verity",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn missing_and_cyclic_modules_are_errors() {
        let c = catalog(&["a", "b"]);
        let mut none = deps(&[]);
        assert!(matches!(
            resolve(&["zz"], &mut none, &c),
            Err(Error::Missing { name, .. }) if name == "zz"
        ));
        let mut cycle = deps(&[("a", &["b"]), ("b", &["a"])]);
        assert!(matches!(
            resolve(&["a"], &mut cycle, &c),
            Err(Error::Inconsistent { .. })
        ));
    }

    #[test]
    fn depends_entry() {
        let info = b"license=GPL\0depends=virtio,virtio_ring\0intree=Y\0";
        assert_eq!(depends_of(info), ["virtio", "virtio_ring"]);
        assert!(depends_of(b"depends=\0").is_empty());
    }
}
