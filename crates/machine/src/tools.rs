//! The standard programs a disk export drives, found up front with the Debian package each
//! comes from, and run with their output captured so a failure shows what the tool said.
//!
//! **API boundary:** runs only the programs named in [`Tool`], never a shell.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A program (or file) the export needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tool {
    /// `mkfs.erofs`: the read-only root filesystem.
    MkfsErofs,
    /// `mkfs.vfat`: the EFI system partition.
    MkfsVfat,
    /// `mcopy`: files into the EFI system partition without mounting it.
    Mcopy,
    /// `objcopy`: the unified kernel image, and stripping the init.
    Objcopy,
    /// `objdump`: where the stub's sections end.
    Objdump,
    /// systemd-boot's EFI stub, the unified kernel image's code.
    Stub,
    /// `qemu-img`: the qcow2 format.
    QemuImg,
    /// `dpkg-deb`: a kernel named as a Debian package.
    DpkgDeb,
}

/// systemd-boot's x86-64 EFI stub (Debian's `systemd-boot-efi`).
pub const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

impl Tool {
    /// The program's name (or the file's path).
    pub fn program(self) -> &'static str {
        match self {
            Tool::MkfsErofs => "mkfs.erofs",
            Tool::MkfsVfat => "mkfs.vfat",
            Tool::Mcopy => "mcopy",
            Tool::Objcopy => "objcopy",
            Tool::Objdump => "objdump",
            Tool::Stub => STUB,
            Tool::QemuImg => "qemu-img",
            Tool::DpkgDeb => "dpkg-deb",
        }
    }

    /// The Debian package that has it.
    pub fn package(self) -> &'static str {
        match self {
            Tool::MkfsErofs => "erofs-utils",
            Tool::MkfsVfat => "dosfstools",
            Tool::Mcopy => "mtools",
            Tool::Objcopy | Tool::Objdump => "binutils",
            Tool::Stub => "systemd-boot-efi",
            Tool::QemuImg => "qemu-utils",
            Tool::DpkgDeb => "dpkg",
        }
    }

    /// Where it is: a file for [`Tool::Stub`], else the first `PATH` entry (and `/sbin`,
    /// `/usr/sbin`, where Debian puts `mkfs.*` outside root's `PATH`) that has it.
    pub fn find(self) -> Option<PathBuf> {
        let program = self.program();
        if program.starts_with('/') {
            return Path::new(program).is_file().then(|| PathBuf::from(program));
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    }
}

/// Tools that are missing, with the packages to install.
#[derive(Debug, thiserror::Error)]
#[error(
    "missing {}: apt-get install {}",
    .tools.join(", "),
    .packages.join(" ")
)]
pub struct Missing {
    /// The programs (or files) not found.
    pub tools: Vec<String>,
    /// Their Debian packages, each once.
    pub packages: Vec<String>,
}

/// The paths of `tools`, or every one that is missing at once.
pub fn find_all(tools: &[Tool]) -> Result<Vec<PathBuf>, Missing> {
    let mut found = Vec::new();
    let mut missing = Missing {
        tools: Vec::new(),
        packages: Vec::new(),
    };
    for t in tools {
        match t.find() {
            Some(p) => found.push(p),
            None => {
                missing.tools.push(t.program().to_owned());
                if !missing.packages.iter().any(|p| p == t.package()) {
                    missing.packages.push(t.package().to_owned());
                }
            }
        }
    }
    if missing.tools.is_empty() {
        Ok(found)
    } else {
        Err(missing)
    }
}

/// A tool that failed.
#[derive(Debug, thiserror::Error)]
#[error("{program} failed ({status}): {stderr}")]
pub struct Failed {
    /// The program and its arguments.
    pub program: String,
    /// How it ended.
    pub status: String,
    /// What it said (the end of stderr, else of stdout).
    pub stderr: String,
}

/// Runs `program` with `args` and an empty environment apart from `PATH`, `LC_ALL=C`,
/// `TZ=UTC` and `extra_env` (so the host's locale, time zone or tool settings cannot change
/// the bytes); returns its stdout.
pub fn run<I, S>(program: &Path, args: I, extra_env: &[(&str, &str)]) -> Result<Vec<u8>, Failed>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LC_ALL", "C")
        .env("TZ", "UTC");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| Failed {
        program: shown.clone(),
        status: "did not start".to_owned(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        let said = if out.stderr.is_empty() {
            &out.stdout
        } else {
            &out.stderr
        };
        let text = String::from_utf8_lossy(said);
        let tail: String = text
            .trim()
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(Failed {
            program: shown,
            status: out.status.to_string(),
            stderr: tail,
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_name_their_packages_once() {
        let e = Missing {
            tools: vec!["objcopy".into(), "objdump".into()],
            packages: vec!["binutils".into()],
        };
        assert_eq!(
            e.to_string(),
            "missing objcopy, objdump: apt-get install binutils"
        );
    }
}
