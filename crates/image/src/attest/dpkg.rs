//! Which Debian package a host file came from, read from dpkg's own database
//! (`<admin>/status` and `<admin>/info/*.list`) rather than by running `dpkg -S`.
//!
//! Merged-`/usr` hosts reach one file by two names (`/lib/x86_64-linux-gnu/libc.so.6` and
//! `/usr/lib/x86_64-linux-gnu/libc.so.6`), and dpkg records whichever the package shipped,
//! so a path is looked up under both ([`aliases`]). Only installed packages count.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// An installed Debian package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DebPackage {
    /// `Package`.
    pub name: String,
    /// `Version`.
    pub version: String,
    /// `Architecture`.
    pub architecture: String,
}

impl DebPackage {
    /// Its package URL: `pkg:deb/debian/NAME@VERSION?arch=ARCH`.
    pub fn purl(&self) -> String {
        format!(
            "pkg:deb/debian/{}@{}?arch={}",
            purl_escape(&self.name),
            purl_escape(&self.version),
            purl_escape(&self.architecture)
        )
    }
}

/// Percent-encodes what a purl component may not hold as is (`+` and `:` in Debian
/// versions and names among them).
fn purl_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The installed packages in a `status` file, by `(name, architecture)`.
pub fn parse_status(text: &str) -> BTreeMap<(String, String), DebPackage> {
    let mut out = BTreeMap::new();
    for para in text.split("\n\n") {
        let mut name = None;
        let mut version = None;
        let mut arch = None;
        let mut installed = false;
        for line in para.lines() {
            // Continuation lines (descriptions, conffiles) start with a space.
            if line.starts_with([' ', '\t']) {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "Package" => name = Some(value.to_owned()),
                "Version" => version = Some(value.to_owned()),
                "Architecture" => arch = Some(value.to_owned()),
                "Status" => installed = value.split_whitespace().last() == Some("installed"),
                _ => {}
            }
        }
        if let (Some(name), Some(version), Some(architecture), true) =
            (name, version, arch, installed)
        {
            out.insert(
                (name.clone(), architecture.clone()),
                DebPackage {
                    name,
                    version,
                    architecture,
                },
            );
        }
    }
    out
}

/// The package a `info/` list file belongs to: `libc6:amd64.list` → (`libc6`, `amd64`),
/// `base-files.list` → (`base-files`, none).
pub fn list_package(file_name: &str) -> Option<(&str, Option<&str>)> {
    let stem = file_name.strip_suffix(".list")?;
    match stem.split_once(':') {
        Some((name, arch)) => Some((name, Some(arch))),
        None => Some((stem, None)),
    }
}

/// The top-level directories a merged-`/usr` host links into `/usr`.
const MERGED: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// The names a path may have in dpkg's lists on a merged-`/usr` host: itself, and its
/// `/usr` (or non-`/usr`) twin when it is under a merged directory.
pub fn aliases(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let s = path.to_string_lossy();
    for dir in MERGED {
        let short = format!("/{dir}/");
        let long = format!("/usr/{dir}/");
        if let Some(rest) = s.strip_prefix(&long) {
            out.push(PathBuf::from(format!("{short}{rest}")));
        } else if let Some(rest) = s.strip_prefix(&short) {
            out.push(PathBuf::from(format!("{long}{rest}")));
        }
    }
    out
}

/// The installed package owning each of `paths`, from the dpkg database at `admin`. A path
/// no package lists is absent from the answer; a missing database answers nothing (a host
/// that is not Debian).
pub fn owners(admin: &Path, paths: &[PathBuf]) -> io::Result<BTreeMap<PathBuf, DebPackage>> {
    let status = match fs::read_to_string(admin.join("status")) {
        Ok(s) => parse_status(&s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e),
    };
    let mut wanted: BTreeMap<String, PathBuf> = BTreeMap::new();
    for p in paths {
        for a in aliases(p) {
            wanted
                .entry(a.to_string_lossy().into_owned())
                .or_insert_with(|| p.clone());
        }
    }
    let info = admin.join("info");
    let mut lists: Vec<String> = Vec::new();
    for entry in fs::read_dir(&info)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".list") {
            lists.push(name);
        }
    }
    lists.sort();
    let mut out = BTreeMap::new();
    for list in lists {
        let Some((name, arch)) = list_package(&list) else {
            continue;
        };
        let pkg = match arch {
            Some(a) => status.get(&(name.to_owned(), a.to_owned())),
            // An unqualified list is the package's only instance.
            None => status.iter().find(|((n, _), _)| n == name).map(|(_, p)| p),
        };
        let Some(pkg) = pkg else { continue };
        let text = fs::read_to_string(info.join(&list))?;
        for line in text.lines() {
            if let Some(original) = wanted.get(line) {
                out.entry(original.clone()).or_insert_with(|| pkg.clone());
            }
        }
        if out.len() == paths.len() {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const STATUS: &str = "\
Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Version: 2.36-9+deb12u10
Description: GNU C Library: Shared libraries
 Contains the standard libraries.
 .
 More: text

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: libgcc-s1
Status: install ok installed
Architecture: amd64
Version: 12.2.0-14
";

    #[test]
    fn status_keeps_installed_packages_only() {
        let s = parse_status(STATUS);
        assert_eq!(s.len(), 2);
        let libc = &s[&("libc6".to_owned(), "amd64".to_owned())];
        assert_eq!(libc.version, "2.36-9+deb12u10");
        assert!(!s.contains_key(&("gone".to_owned(), "amd64".to_owned())));
        assert_eq!(
            libc.purl(),
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=amd64"
        );
    }

    #[test]
    fn list_names_and_usr_merge_aliases() {
        assert_eq!(
            list_package("libc6:amd64.list"),
            Some(("libc6", Some("amd64")))
        );
        assert_eq!(list_package("base-files.list"), Some(("base-files", None)));
        assert_eq!(list_package("libc6:amd64.md5sums"), None);
        assert_eq!(
            aliases(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6")),
            vec![
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
            ]
        );
        assert_eq!(
            aliases(Path::new("/lib64/ld-linux-x86-64.so.2"))[1],
            PathBuf::from("/usr/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(aliases(Path::new("/opt/x")).len(), 1);
    }

    #[test]
    fn owners_reads_the_lists_under_either_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("info")).unwrap();
        fs::write(dir.path().join("status"), STATUS).unwrap();
        fs::write(
            dir.path().join("info/libc6:amd64.list"),
            "/.\n/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu/libc.so.6\n/lib64/ld-linux-x86-64.so.2\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("info/libgcc-s1.list"),
            "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1\n",
        )
        .unwrap();
        // A package no longer installed lists a path too: it does not own it.
        fs::write(dir.path().join("info/gone:amd64.list"), "/usr/bin/gone\n").unwrap();
        let asked = [
            PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
            PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            PathBuf::from("/usr/bin/gone"),
        ];
        let o = owners(dir.path(), &asked).unwrap();
        assert_eq!(o[&asked[0]].name, "libc6");
        assert_eq!(o[&asked[1]].name, "libgcc-s1");
        assert_eq!(o[&asked[2]].name, "libc6");
        assert!(!o.contains_key(&asked[3]));
        // No database: no owners, no error.
        assert!(owners(&dir.path().join("none"), &asked).unwrap().is_empty());
    }
}
