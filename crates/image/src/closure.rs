//! The shared-library closure of an ELF binary, found the way the dynamic loader finds it.
//!
//! For each `DT_NEEDED` name: the object's `DT_RPATH` (only when it has no `DT_RUNPATH`) and
//! the executable's, then `DT_RUNPATH`, then the directories of `/etc/ld.so.conf` (the input
//! of the loader's cache), then the system directories — skipping candidates of another ELF
//! class or machine, as the loader does. `$ORIGIN` expands to the directory of the object.
//! `LD_LIBRARY_PATH` is deliberately ignored: it would make the image depend on the shell.
//! Parsing is goblin's; this module only walks the search order.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use goblin::elf::Elf;

use crate::build::BuildError;

const SYSTEM_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

struct Object {
    is_64: bool,
    machine: u16,
    interpreter: Option<String>,
    needed: Vec<String>,
    rpath: Vec<String>,
    runpath: Vec<String>,
}

/// Parses `path` as an ELF object; `None` when it is not one. Only a regular file (after
/// symlinks) is read: a name that leads to `/dev/zero` or a FIFO is not an object.
fn parse(path: &Path) -> Result<Option<Object>, BuildError> {
    let meta = fs::metadata(path).map_err(BuildError::io("stat", path))?;
    if !meta.is_file() {
        return Ok(None);
    }
    let mut magic = Vec::with_capacity(4);
    fs::File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut magic))
        .map_err(BuildError::io("read", path))?;
    if magic != b"\x7fELF" {
        return Ok(None);
    }
    let bytes = fs::read(path).map_err(BuildError::io("read", path))?;
    let elf = Elf::parse(&bytes).map_err(|e| BuildError::Closure {
        binary: path.to_path_buf(),
        reason: format!("not a valid ELF file: {e}"),
    })?;
    let split = |v: &[&str]| -> Vec<String> {
        v.iter()
            .flat_map(|s| s.split(':'))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    Ok(Some(Object {
        is_64: elf.is_64,
        machine: elf.header.e_machine,
        interpreter: elf.interpreter.map(str::to_owned),
        needed: elf.libraries.iter().map(|s| (*s).to_owned()).collect(),
        rpath: split(&elf.rpaths),
        runpath: split(&elf.runpaths),
    }))
}

fn expand(dir: &str, origin: &Path) -> PathBuf {
    let o = origin.to_string_lossy();
    PathBuf::from(dir.replace("${ORIGIN}", &o).replace("$ORIGIN", &o))
}

/// Directories listed by `/etc/ld.so.conf` and the files it includes.
fn ld_so_conf_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    read_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
    dirs
}

fn read_conf(path: &Path, dirs: &mut Vec<PathBuf>, depth: u32) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    if depth > 8 {
        return;
    }
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include").map(str::trim) {
            // The only form in practice is DIR/*.conf.
            let pattern = Path::new(pattern);
            let (Some(dir), Some(file)) = (pattern.parent(), pattern.file_name()) else {
                continue;
            };
            let suffix = file.to_string_lossy().trim_start_matches('*').to_owned();
            let mut files: Vec<PathBuf> = fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(&suffix))
                .collect();
            files.sort();
            for f in files {
                read_conf(&f, dirs, depth + 1);
            }
        } else if line.starts_with('/') {
            dirs.push(PathBuf::from(line));
        }
    }
}

/// Host paths the loader would open to run `binary`: the interpreter and every library,
/// transitively. Empty for a static binary.
pub(crate) fn resolve(binary: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let Some(exe) = parse(binary)? else {
        return Err(BuildError::Closure {
            binary: binary.to_path_buf(),
            reason: "`closure = true` needs an ELF binary".to_owned(),
        });
    };
    let conf_dirs = ld_so_conf_dirs();
    let mut out: BTreeSet<PathBuf> = BTreeSet::new();
    if let Some(interp) = &exe.interpreter {
        check_interpreter(binary, Path::new(interp), exe.is_64, exe.machine)?;
        out.insert(PathBuf::from(interp));
    }
    let exe_origin = binary.parent().unwrap_or(Path::new("/")).to_path_buf();
    let exe_rpath: Vec<PathBuf> = if exe.runpath.is_empty() {
        exe.rpath.iter().map(|d| expand(d, &exe_origin)).collect()
    } else {
        Vec::new()
    };
    let mut queue: VecDeque<(PathBuf, Object)> = VecDeque::new();
    let (is_64, machine) = (exe.is_64, exe.machine);
    queue.push_back((binary.to_path_buf(), exe));
    let mut seen_names: BTreeSet<String> = BTreeSet::new();
    while let Some((path, obj)) = queue.pop_front() {
        let origin = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut search: Vec<PathBuf> = Vec::new();
        if obj.runpath.is_empty() {
            search.extend(obj.rpath.iter().map(|d| expand(d, &origin)));
            search.extend(exe_rpath.iter().cloned());
        }
        search.extend(obj.runpath.iter().map(|d| expand(d, &origin)));
        search.extend(conf_dirs.iter().cloned());
        search.extend(SYSTEM_DIRS.iter().map(PathBuf::from));
        for name in &obj.needed {
            if !seen_names.insert(name.clone()) {
                continue;
            }
            let found = if name.contains('/') {
                let p = expand(name, &origin);
                parse(&p)?.map(|o| (p, o))
            } else {
                find(name, &search, is_64, machine)?
            };
            let Some((lib_path, lib)) = found else {
                return Err(BuildError::LibraryNotFound {
                    library: name.clone(),
                    needed_by: path.clone(),
                });
            };
            out.insert(lib_path.clone());
            queue.push_back((lib_path, lib));
        }
    }
    Ok(out.into_iter().collect())
}

/// The loader the kernel runs for `binary` must be an ELF file of the same class and
/// machine, symlinks resolved: a script, a device or a missing file named by `PT_INTERP`
/// would otherwise be baked into the image (or read whole) as if it were the loader.
fn check_interpreter(
    binary: &Path,
    interp: &Path,
    is_64: bool,
    machine: u16,
) -> Result<(), BuildError> {
    let refuse = |why: String| BuildError::Closure {
        binary: binary.to_path_buf(),
        reason: format!("its interpreter {}{why}", interp.display()),
    };
    if !interp.is_absolute() {
        return Err(refuse(" is not an absolute path".to_owned()));
    }
    let resolved = fs::canonicalize(interp).map_err(|e| refuse(format!(": {e}")))?;
    let shown = if resolved == interp {
        String::new()
    } else {
        format!(" (resolved to {})", resolved.display())
    };
    match parse(&resolved)? {
        Some(o) if o.is_64 == is_64 && o.machine == machine => Ok(()),
        Some(_) => Err(refuse(format!(
            "{shown} is an ELF file of another class or machine"
        ))),
        None => Err(refuse(format!("{shown} is not an ELF file"))),
    }
}

fn find(
    name: &str,
    search: &[PathBuf],
    is_64: bool,
    machine: u16,
) -> Result<Option<(PathBuf, Object)>, BuildError> {
    for dir in search {
        let candidate = dir.join(name);
        if !candidate.is_file() {
            continue;
        }
        if let Some(obj) = parse(&candidate)?
            && obj.is_64 == is_64
            && obj.machine == machine
        {
            return Ok(Some((candidate, obj)));
        }
    }
    Ok(None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_interpreter_must_be_an_elf_file() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("app");
        let script = dir.path().join("loader.sh");
        fs::write(&script, "#!/bin/sh\n").unwrap();
        let link = dir.path().join("loader-link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        for (interp, says) in [
            (script.as_path(), "is not an ELF file"),
            (link.as_path(), "(resolved to /dev/zero) is not an ELF file"),
            (Path::new("/nonexistent/ld.so"), "No such file"),
            (Path::new("relative/ld.so"), "is not an absolute path"),
        ] {
            let err = check_interpreter(&bin, interp, true, goblin::elf::header::EM_X86_64)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
            assert!(err.contains(&interp.display().to_string()), "{err}");
        }
        // A real loader passes, when this host has one.
        let ld = Path::new("/lib64/ld-linux-x86-64.so.2");
        if ld.exists() {
            check_interpreter(&bin, ld, true, goblin::elf::header::EM_X86_64).unwrap();
        }
    }

    #[test]
    fn only_regular_files_are_parsed() {
        assert!(parse(Path::new("/dev/zero")).unwrap().is_none());
    }
}
