//! A machine image's disk, assembled: the image's root filesystem as erofs, its dm-verity
//! tree, an initramfs with kiln as `/init`, a unified kernel image on an EFI system
//! partition, and the GPT disk around them (`ESP | root | root verity`), raw or qcow2.
//! The layout and the command line are the contract with the guest init
//! (`docs/design/machine-images.md`).
//!
//! **Reproducible:** the same rootfs, kernel, init and [`App`] give the same disk bytes.
//! Each step is pinned: `mkfs.erofs -T0 -U <uuid from the image digest> -x -1` (no build
//! time, no xattrs; `--all-root` when not run as root, where the rootfs's owners are the
//! caller's), the verity salt is the SHA-256 of the erofs image, the initramfs is
//! [`crate::cpio`]'s (mtime 0, entries in a fixed order), `objcopy --strip-all` for the init,
//! the PE time stamp zeroed ([`crate::uki::reproducible`]), `mkfs.vfat --invariant` and
//! `mcopy -m` with every mtime set to 1980-01-01, GPT GUIDs derived from the image digest
//! and the root hash (the Discoverable Partitions Specification's way for the verity pair),
//! and `qemu-img convert` with no time in its output. Tools run with `LC_ALL=C TZ=UTC`.
//!
//! **API boundary:** this module (with [`crate::uki`] and [`crate::tools`]) is the crate's
//! one place that touches files and runs programs: only under the work directory it is
//! given and the output path; the output appears whole (written beside it, then renamed)
//! or not at all.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::gpt::{self, Guid, Partition};
use crate::modules::{self, Catalog};
use crate::tools::{self, Tool};
use crate::{cpio, uki, verity};

/// The disk's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The bytes of the disk.
    Raw,
    /// QEMU's copy-on-write format (`qemu-img convert -O qcow2`).
    Qcow2,
}

/// The app the guest init starts, as `/kiln/machine.json` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct App {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Its working directory.
    pub cwd: String,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// The paths mounted as tmpfs, the only ones it can write.
    pub writable: Vec<String>,
    /// Each tmpfs's size cap.
    pub tmpfs_size_bytes: u64,
    /// Time between SIGTERM and SIGKILL at power-off.
    pub stop_grace_ms: u64,
    /// The app's cgroup limits.
    pub limits: crate::guest::config::Limits,
    /// The secrets the platform must give at boot (names only).
    pub secrets: Vec<crate::guest::config::Secret>,
    /// The app's health check.
    pub health: Option<crate::guest::config::HealthJson>,
    /// The guest init's status endpoint's port.
    pub status_port: Option<u16>,
}

/// The port of the guest init's status endpoint (`GET /health`) unless the export says
/// another.
pub const DEFAULT_STATUS_PORT: u16 = 9901;

/// The guest's network unless the export says otherwise: an address from DHCP.
pub const DEFAULT_IP: &str = "dhcp";

/// Everything a disk is made of.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The image's filesystem, all layers applied.
    pub rootfs: &'a Path,
    /// The image's manifest digest (`sha256:…`), the seed of the disk's GUIDs.
    pub image_digest: &'a str,
    /// A `vmlinuz` file, or a Debian `linux-image-*.deb`.
    pub kernel: &'a Path,
    /// The static `kiln` binary, `/init` (stripped into the initramfs).
    pub init: &'a Path,
    /// The app.
    pub app: &'a App,
    /// `kiln.ip`: `dhcp` or `ADDR/PREFIX,GATEWAY`.
    pub ip: &'a str,
    /// Signs the unified kernel image for UEFI Secure Boot.
    pub secure_boot: Option<&'a crate::authenticode::Signer>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The output file's SHA-256, hex.
    pub sha256: String,
    /// The raw disk's SHA-256, hex: [`Exported::sha256`] for a raw export, the disk inside
    /// the qcow2 file for a qcow2 one (what `qemu-img convert -O raw` gives back).
    pub raw_sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// The raw disk's size in bytes.
    pub disk_size: u64,
    /// The verity root hash, hex.
    pub root_hash: String,
    /// The verity salt, hex.
    pub salt: String,
    /// The root filesystem's 4 KiB blocks.
    pub data_blocks: u64,
    /// The kernel command line in the unified kernel image.
    pub cmdline: String,
    /// The kernel's release (`6.1.0-57-amd64`).
    pub kernel_release: String,
    /// The module files, in load order.
    pub modules: Vec<String>,
    /// What the disk was made from, by SHA-256, for its provenance and SBOM.
    pub inputs: Inputs,
}

/// A file a disk was made from: its name and its content's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    /// Its file name (no directory: two checkouts describe it alike), except for the host's
    /// own files, named by their full path ([`Inputs::stub`]).
    pub name: String,
    /// Its SHA-256, hex.
    pub sha256: String,
}

/// A Debian package by its control fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebControl {
    /// `Package`.
    pub package: String,
    /// `Version`.
    pub version: String,
    /// `Architecture`.
    pub architecture: String,
}

/// The inputs of a disk, each hashed as the export read it (the modules while they were
/// copied into the initramfs; the kernel, the init and the stub once each, files of a few
/// MiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The file `--kernel` named: a `vmlinuz-<release>` or a `.deb`.
    pub kernel: Hashed,
    /// For a `.deb`, its package (`dpkg-deb --field`).
    pub kernel_package: Option<DebControl>,
    /// The kernel image in the unified kernel image (the `.deb`'s `vmlinuz-*`, or the file
    /// `--kernel` named).
    pub vmlinuz: Hashed,
    /// The init as given ([`Input::init`], the `kiln` binary), before `objcopy
    /// --strip-all`.
    pub init: Hashed,
    /// The stripped init, `/init` in the initramfs, hex.
    pub init_stripped_sha256: String,
    /// systemd-boot's EFI stub (its full path as `name`: it is the host's file).
    pub stub: Hashed,
    /// The modules in the initramfs, in load order.
    pub modules: Vec<Hashed>,
}

/// Why a disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tools are missing.
    #[error(transparent)]
    Missing(#[from] tools::Missing),
    /// A tool failed.
    #[error(transparent)]
    Tool(#[from] tools::Failed),
    /// The kernel could not be found or understood.
    #[error("kernel {path}: {why}")]
    Kernel {
        /// The kernel the user named.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The modules could not be resolved.
    #[error(transparent)]
    Modules(#[from] modules::Error),
    /// The verity tree.
    #[error(transparent)]
    Verity(#[from] verity::Error),
    /// The initramfs.
    #[error("writing the initramfs")]
    Cpio(#[from] cpio::Error),
    /// The unified kernel image.
    #[error("making the unified kernel image")]
    Uki(#[from] uki::Error),
    /// The GPT disk.
    #[error("writing the disk")]
    Gpt(#[from] gpt::Error),
    /// The output exists.
    #[error("{0} already exists; choose a new path")]
    Exists(PathBuf),
    /// A path the guest mounts on is a file or a symbolic link in the image.
    #[error("{0} is a file or a symbolic link in the image: the machine mounts a directory there")]
    MountPoint(String),
    /// A file could not be read or written.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { what, path, source }
}

/// 1980-01-01, the earliest time FAT stores: every file's mtime on the ESP.
const FAT_EPOCH: u64 = 315_532_800;

/// The tools an export in `format` of `kernel` needs.
pub fn required_tools(format: Format, kernel: &Path) -> Vec<Tool> {
    let mut t = vec![
        Tool::MkfsErofs,
        Tool::MkfsVfat,
        Tool::Mcopy,
        Tool::Objcopy,
        Tool::Objdump,
        Tool::Stub,
    ];
    if format == Format::Qcow2 {
        t.push(Tool::QemuImg);
    }
    if is_deb(kernel) {
        t.push(Tool::DpkgDeb);
    }
    t
}

fn is_deb(kernel: &Path) -> bool {
    kernel.extension().is_some_and(|e| e == "deb")
}

/// The tools' paths, by [`Tool`].
struct Tools {
    paths: Vec<(Tool, PathBuf)>,
}

impl Tools {
    fn get(&self, t: Tool) -> &Path {
        self.paths
            .iter()
            .find(|(k, _)| *k == t)
            .map(|(_, p)| p.as_path())
            .unwrap_or(Path::new(""))
    }
}

/// Writes the disk of `input` to `out` in `format`, with scratch files under `work`
/// (which the caller removes).
pub fn export(
    input: &Input<'_>,
    format: Format,
    out: &Path,
    work: &Path,
) -> Result<Exported, Error> {
    if out.exists() {
        return Err(Error::Exists(out.to_owned()));
    }
    let needed = required_tools(format, input.kernel);
    let found = tools::find_all(&needed)?;
    let tools = Tools {
        paths: needed.into_iter().zip(found).collect(),
    };

    let (vmlinuz, moddir, kernel_release) = locate_kernel(input.kernel, &tools, work)?;
    let kernel_package = if is_deb(input.kernel) {
        Some(deb_control(&tools, input.kernel)?)
    } else {
        None
    };
    let catalog = Catalog::scan(&moddir)?;
    let mut roots = modules::ROOTS.to_vec();
    let mut mount_points = input.app.writable.clone();
    if !input.app.secrets.is_empty() {
        roots.push(modules::FW_CFG);
        mount_points.push(crate::guest::secrets::DIR.to_owned());
    }
    let order = modules::resolve(&roots, &mut |n| catalog.depends(n), &catalog)?;

    // The root: erofs, then its verity tree.
    let root = work.join("root.erofs");
    add_mount_points(input.rootfs, &mount_points)?;
    mkfs_erofs(&tools, input, &root)?;
    let root_len = std::fs::metadata(&root)
        .map_err(io_err("stat", &root))?
        .len();
    let data_blocks = verity::data_blocks(root_len)?;
    let salt: [u8; 32] = sha256_file(&root)?;
    let tree = {
        let mut r = BufReader::new(File::open(&root).map_err(io_err("open", &root))?);
        verity::hash_tree(&mut r, data_blocks, &salt)?
    };
    let root_hash = tree.root_hex();

    // The initramfs, then the unified kernel image with the root hash in its command line.
    let init = work.join("init");
    tools::run(
        tools.get(Tool::Objcopy),
        [
            Path::new("--strip-all").as_os_str(),
            input.init.as_os_str(),
            init.as_os_str(),
        ],
        &[],
    )?;
    let module_names: Vec<String> = order
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    // The guest init's own type: what it reads is what is written.
    let json = serde_json::to_vec(&machine_json(&module_names, input.app, input.image_digest))
        .map_err(|e| Error::Io {
            what: "encode",
            path: PathBuf::from("/kiln/machine.json"),
            source: e.into(),
        })?;
    let initrd = work.join("initrd.cpio");
    let (init_stripped, module_sha256s) =
        write_initramfs(&initrd, &init, &json, &moddir, &order, &module_names)?;
    let cmdline = format!(
        "console=ttyS0 panic=-1 kiln.verity={root_hash} kiln.salt={} kiln.data_blocks={data_blocks} kiln.ip={}",
        hex::encode(salt),
        input.ip
    );
    let efi = work.join("uki.efi");
    let uki_work = work.join("uki");
    std::fs::create_dir_all(&uki_work).map_err(io_err("create", &uki_work))?;
    uki::build(
        tools.get(Tool::Objdump),
        tools.get(Tool::Objcopy),
        &uki::Parts {
            stub: tools.get(Tool::Stub),
            kernel: &vmlinuz,
            initrd: &initrd,
            cmdline: &cmdline,
        },
        input.secure_boot,
        &uki_work,
        &efi,
    )?;
    let esp = work.join("esp.img");
    make_esp(&tools, &efi, work, &esp)?;
    let esp_len = std::fs::metadata(&esp).map_err(io_err("stat", &esp))?.len();

    // The disk. A single-block root has an empty tree; GPT wants the partition non-empty.
    let mut hash_bytes = tree.bytes().to_vec();
    if hash_bytes.is_empty() {
        hash_bytes.resize(verity::BLOCK_SIZE as usize, 0);
    }
    let rh = tree.root_hash();
    let mut first = [0u8; 16];
    first.copy_from_slice(&rh[..16]);
    let mut last = [0u8; 16];
    last.copy_from_slice(&rh[16..]);
    let layout = gpt::layout(
        input.image_digest.as_bytes(),
        &[
            Partition {
                type_guid: gpt::ESP,
                name: "esp".to_owned(),
                len: esp_len,
                unique_guid: None,
            },
            Partition {
                type_guid: gpt::ROOT_X86_64,
                name: "root".to_owned(),
                len: root_len,
                unique_guid: Some(uuid_shaped(first)),
            },
            Partition {
                type_guid: gpt::ROOT_VERITY_X86_64,
                name: "root-verity".to_owned(),
                len: hash_bytes.len() as u64,
                unique_guid: Some(uuid_shaped(last)),
            },
        ],
    )?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-disk-")
        .tempfile_in(parent)
        .map_err(io_err("create a file in", parent))?;
    let raw_path = match format {
        Format::Raw => tmp.path().to_owned(),
        Format::Qcow2 => work.join("disk.raw"),
    };
    let raw_sha256;
    {
        let file = File::create(&raw_path).map_err(io_err("create", &raw_path))?;
        // Hashed as it is written: a raw export's digest costs no second read of the disk.
        let mut w = Hashing {
            inner: BufWriter::with_capacity(1 << 20, file),
            sha256: Sha256::new(),
        };
        let mut esp_r = BufReader::new(File::open(&esp).map_err(io_err("open", &esp))?);
        let mut root_r = BufReader::new(File::open(&root).map_err(io_err("open", &root))?);
        let mut hash_r = hash_bytes.as_slice();
        layout.write(&mut w, &mut [&mut esp_r, &mut root_r, &mut hash_r])?;
        raw_sha256 = hex::encode(w.sha256.finalize());
        let file = w
            .inner
            .into_inner()
            .map_err(|e| io_err("write", &raw_path)(e.into_error()))?;
        file.sync_all().map_err(io_err("sync", &raw_path))?;
    }
    if format == Format::Qcow2 {
        tools::run(
            tools.get(Tool::QemuImg),
            [
                Path::new("convert").as_os_str(),
                "-q".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                raw_path.as_os_str(),
                tmp.path().as_os_str(),
            ],
            &[],
        )?;
        File::open(tmp.path())
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", tmp.path()))?;
    }
    let sha256 = match format {
        Format::Raw => raw_sha256.clone(),
        Format::Qcow2 => hex::encode(sha256_file(tmp.path())?),
    };
    let kernel = hashed(input.kernel)?;
    let inputs = Inputs {
        // The file `--kernel` named is the kernel image itself unless it is a package.
        vmlinuz: if kernel_package.is_some() {
            hashed(&vmlinuz)?
        } else {
            kernel.clone()
        },
        kernel,
        kernel_package,
        init: hashed(input.init)?,
        init_stripped_sha256: init_stripped,
        stub: Hashed {
            name: tools.get(Tool::Stub).display().to_string(),
            sha256: hex::encode(sha256_file(tools.get(Tool::Stub))?),
        },
        modules: module_names
            .iter()
            .zip(module_sha256s)
            .map(|(name, sha256)| Hashed {
                name: name.clone(),
                sha256,
            })
            .collect(),
    };
    let size = std::fs::metadata(tmp.path())
        .map_err(io_err("stat", tmp.path()))?
        .len();
    tmp.persist_noclobber(out).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            Error::Exists(out.to_owned())
        } else {
            io_err("rename to", out)(e.error)
        }
    })?;
    let perms = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    std::fs::set_permissions(out, perms).map_err(io_err("chmod", out))?;
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(Exported {
        sha256,
        raw_sha256,
        size,
        disk_size: layout.size(),
        root_hash,
        salt: hex::encode(salt),
        data_blocks,
        cmdline,
        kernel_release,
        modules: module_names,
        inputs,
    })
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    sha256: Sha256,
}

impl<W: io::Write> io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha256.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what comes through it.
struct HashingReader<R> {
    inner: R,
    sha256: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha256.update(&buf[..n]);
        Ok(n)
    }
}

/// `path` by file name and SHA-256.
fn hashed(path: &Path) -> Result<Hashed, Error> {
    Ok(Hashed {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: hex::encode(sha256_file(path)?),
    })
}

/// A `.deb`'s package, version and architecture (`dpkg-deb --field`).
fn deb_control(tools: &Tools, deb: &Path) -> Result<DebControl, Error> {
    let out = tools::run(
        tools.get(Tool::DpkgDeb),
        [
            Path::new("--field").as_os_str(),
            deb.as_os_str(),
            "Package".as_ref(),
            "Version".as_ref(),
            "Architecture".as_ref(),
        ],
        &[],
    )?;
    let text = String::from_utf8_lossy(&out);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::Kernel {
                path: deb.to_owned(),
                why: format!("the package's control file has no {name} field"),
            })
    };
    Ok(DebControl {
        package: field("Package")?,
        version: field("Version")?,
        architecture: field("Architecture")?,
    })
}

/// A GUID from 16 hash bytes with the RFC 4122 version-4 and variant bits set, as the
/// Discoverable Partitions Specification derives a verity pair's GUIDs from the root hash.
fn uuid_shaped(mut b: [u8; 16]) -> Guid {
    b[6] = (b[6] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    Guid::from_bytes(b)
}

fn sha256_file(path: &Path) -> Result<[u8; 32], Error> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// The kernel image, its modules directory and its release, from a `vmlinuz-<release>`
/// file (modules in `../lib/modules/<release>` beside its `boot`, else the host's
/// `/lib/modules/<release>`) or a Debian package (unpacked under `work`).
fn locate_kernel(
    kernel: &Path,
    tools: &Tools,
    work: &Path,
) -> Result<(PathBuf, PathBuf, String), Error> {
    let bad = |why: String| Error::Kernel {
        path: kernel.to_owned(),
        why,
    };
    if !kernel.is_file() {
        return Err(bad("not a file".to_owned()));
    }
    let vmlinuz = if is_deb(kernel) {
        let root = work.join("kernel");
        std::fs::create_dir_all(&root).map_err(io_err("create", &root))?;
        tools::run(
            tools.get(Tool::DpkgDeb),
            [
                Path::new("-x").as_os_str(),
                kernel.as_os_str(),
                root.as_os_str(),
            ],
            &[],
        )?;
        let boot = root.join("boot");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&boot)
            .map_err(|_| bad("the package has no /boot: is it a linux-image package?".to_owned()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        found.sort();
        match found.as_slice() {
            [one] => one.clone(),
            [] => return Err(bad("the package has no /boot/vmlinuz-*: is it a linux-image package (not the linux-image-amd64 metapackage)?".to_owned())),
            _ => return Err(bad("the package has more than one /boot/vmlinuz-*".to_owned())),
        }
    } else {
        kernel.to_owned()
    };
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .filter(|r| !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| {
            bad(
                "the kernel file is not named vmlinuz-<release>, so its modules cannot be found"
                    .to_owned(),
            )
        })?
        .to_owned();
    let mut candidates = Vec::new();
    if let Some(tree) = vmlinuz.parent().and_then(Path::parent) {
        candidates.push(tree.join("lib/modules").join(&release));
        candidates.push(tree.join("usr/lib/modules").join(&release));
    }
    candidates.push(Path::new("/lib/modules").join(&release));
    candidates.push(Path::new("/usr/lib/modules").join(&release));
    let moddir = candidates
        .iter()
        .find(|c| c.join("kernel").is_dir())
        .cloned()
        .ok_or_else(|| {
            bad(format!(
                "no modules directory for {release} (looked in {})",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    Ok((vmlinuz, moddir, release))
}

/// `mkfs.erofs` with every input that could vary pinned (see the module doc).
fn mkfs_erofs(tools: &Tools, input: &Input<'_>, out: &Path) -> Result<(), Error> {
    let uuid = Guid::derive(input.image_digest.as_bytes(), "erofs")
        .to_string()
        .to_lowercase();
    let mut args: Vec<std::ffi::OsString> = vec![
        "--quiet".into(),
        "-T0".into(),
        format!("-U{uuid}").into(),
        "-x".into(),
        "-1".into(),
    ];
    if !is_root() {
        args.push("--all-root".into());
    }
    args.push(out.as_os_str().to_owned());
    args.push(input.rootfs.as_os_str().to_owned());
    tools::run(tools.get(Tool::MkfsErofs), &args, &[])?;
    Ok(())
}

/// `/kiln/machine.json` as the guest init reads it: the modules in load order, then the app.
fn machine_json(modules: &[String], app: &App, image: &str) -> crate::guest::config::MachineJson {
    crate::guest::config::MachineJson {
        modules: modules.to_vec(),
        argv: app.argv.clone(),
        env: app.env.clone(),
        cwd: app.cwd.clone(),
        uid: app.uid,
        gid: app.gid,
        writable: app.writable.clone(),
        tmpfs_size_bytes: app.tmpfs_size_bytes,
        stop_grace_ms: app.stop_grace_ms,
        image: image.to_owned(),
        limits: app.limits,
        secrets: app.secrets.clone(),
        health: app.health.clone(),
        status_port: app.status_port,
    }
}

/// The directories the guest init mounts on, which a read-only root cannot gain once sealed:
/// `/dev`, `/proc` and each path given (the writable ones, `/run/secrets`), made in
/// `rootfs` where the image has none. A
/// component that is a symbolic link is refused, never followed (it would lead out of
/// `rootfs`, into the host's own tree); one that is a file is refused too.
fn add_mount_points(rootfs: &Path, writable: &[String]) -> Result<(), Error> {
    let mut paths: Vec<&str> = vec!["/dev", "/proc"];
    paths.extend(writable.iter().map(String::as_str));
    for path in paths {
        let mut at = rootfs.to_path_buf();
        for part in Path::new(path).components() {
            let std::path::Component::Normal(name) = part else {
                continue;
            };
            at.push(name);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(Error::MountPoint(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&at).map_err(io_err("create", &at))?;
                    let mode = if path == "/tmp" || path == "/var/tmp" {
                        0o1777
                    } else {
                        0o755
                    };
                    std::fs::set_permissions(
                        &at,
                        std::os::unix::fs::PermissionsExt::from_mode(mode),
                    )
                    .map_err(io_err("chmod", &at))?;
                }
                Err(e) => return Err(io_err("stat", &at)(e)),
            }
        }
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

/// The initramfs: the directories the init mounts on, `/dev/console`, `/init`, its
/// configuration and the modules, in that order. Returns the SHA-256 (hex) of `/init` and
/// of each module, hashed as they were copied in.
fn write_initramfs(
    out: &Path,
    init: &Path,
    json: &[u8],
    moddir: &Path,
    order: &[PathBuf],
    names: &[String],
) -> Result<(String, Vec<String>), Error> {
    let file = File::create(out).map_err(io_err("create", out))?;
    let mut w = cpio::Writer::new(BufWriter::with_capacity(1 << 20, file));
    for dir in [
        "dev",
        "proc",
        "sys",
        "sysroot",
        "tmp",
        "kiln",
        "lib",
        "lib/modules",
    ] {
        w.dir(dir, 0o755)?;
    }
    w.device("dev/console", 0o600, cpio::Device::Char, 5, 1)?;
    let add =
        |w: &mut cpio::Writer<_>, name: &str, mode: u32, path: &Path| -> Result<String, Error> {
            let f = File::open(path).map_err(io_err("open", path))?;
            let len = f.metadata().map_err(io_err("stat", path))?.len();
            let mut r = HashingReader {
                inner: BufReader::new(f),
                sha256: Sha256::new(),
            };
            w.file(name, mode, len, &mut r)?;
            Ok(hex::encode(r.sha256.finalize()))
        };
    let init_sha256 = add(&mut w, "init", 0o755, init)?;
    w.file(
        "kiln/machine.json",
        0o644,
        json.len() as u64,
        &mut &json[..],
    )?;
    let mut module_sha256s = Vec::with_capacity(order.len());
    for (rel, name) in order.iter().zip(names) {
        module_sha256s.push(add(
            &mut w,
            &format!("lib/modules/{name}"),
            0o644,
            &moddir.join(rel),
        )?);
    }
    let buf = w.finish()?;
    let file = buf
        .into_inner()
        .map_err(|e| io_err("write", out)(e.into_error()))?;
    file.sync_all().map_err(io_err("sync", out))?;
    Ok((init_sha256, module_sha256s))
}

/// The EFI system partition: FAT32 (`mkfs.vfat --invariant`), the image at
/// `/EFI/BOOT/BOOTX64.EFI` (`mcopy -m`, every mtime [`FAT_EPOCH`]); at least 64 MiB, and
/// room for the image and a quarter more.
fn make_esp(tools: &Tools, efi: &Path, work: &Path, out: &Path) -> Result<(), Error> {
    let tree = work.join("esp");
    let boot = tree.join("EFI/BOOT");
    std::fs::create_dir_all(&boot).map_err(io_err("create", &boot))?;
    let target = boot.join("BOOTX64.EFI");
    std::fs::copy(efi, &target).map_err(io_err("copy to", &target))?;
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(FAT_EPOCH);
    for p in [&target, &boot, &tree.join("EFI")] {
        let f = File::open(p).map_err(io_err("open", p))?;
        f.set_times(
            std::fs::FileTimes::new()
                .set_accessed(when)
                .set_modified(when),
        )
        .map_err(io_err("set the times of", p))?;
    }
    let efi_len = std::fs::metadata(efi).map_err(io_err("stat", efi))?.len();
    let mib = 1u64 << 20;
    let size = (efi_len + efi_len / 4 + 4 * mib)
        .next_multiple_of(mib)
        .max(64 * mib);
    let f = File::create(out).map_err(io_err("create", out))?;
    f.set_len(size).map_err(io_err("size", out))?;
    drop(f);
    tools::run(
        tools.get(Tool::MkfsVfat),
        [
            Path::new("-F").as_os_str(),
            "32".as_ref(),
            "-n".as_ref(),
            "ESP".as_ref(),
            "--invariant".as_ref(),
            out.as_os_str(),
        ],
        &[],
    )?;
    let mut image = std::ffi::OsString::from("-i");
    image.push(out.as_os_str());
    tools::run(
        tools.get(Tool::Mcopy),
        [
            Path::new("-s").as_os_str(),
            "-m".as_ref(),
            image.as_os_str(),
            tree.join("EFI").as_os_str(),
            "::/".as_ref(),
        ],
        &[("MTOOLS_SKIP_CHECK", "1")],
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn machine_json_has_the_contract_keys() {
        let app = App {
            argv: vec!["/hello".into()],
            env: vec!["PORT=8080".into()],
            cwd: "/".into(),
            uid: 65534,
            gid: 65534,
            writable: vec!["/tmp".into()],
            tmpfs_size_bytes: 64 << 20,
            stop_grace_ms: 5000,
            limits: crate::guest::config::Limits {
                memory_bytes: Some(64 << 20),
                cpu_millis: None,
                pids: Some(512),
            },
            secrets: vec![crate::guest::config::Secret {
                name: "DB_PASSWORD".into(),
                expose_env: false,
            }],
            health: None,
            status_port: Some(DEFAULT_STATUS_PORT),
        };
        let json = machine_json(&["virtio.ko".to_owned()], &app, "sha256:ab");
        let json = serde_json::to_string(&json).unwrap();
        assert_eq!(
            json,
            r#"{"modules":["virtio.ko"],"argv":["/hello"],"env":["PORT=8080"],"cwd":"/","uid":65534,"gid":65534,"writable":["/tmp"],"tmpfs_size_bytes":67108864,"stop_grace_ms":5000,"image":"sha256:ab","limits":{"memory_bytes":67108864,"cpu_millis":null,"pids":512},"secrets":[{"name":"DB_PASSWORD","expose_env":false}],"health":null,"status_port":9901}"#
        );
        // What the guest init accepts.
        let parsed: crate::guest::config::MachineJson = serde_json::from_str(&json).unwrap();
        assert!(crate::guest::config::Machine::try_from(parsed).is_ok());
    }

    #[test]
    fn verity_pair_guids_are_uuid_shaped() {
        let g = uuid_shaped([0xff; 16]).to_string();
        assert_eq!(g, "FFFFFFFF-FFFF-4FFF-BFFF-FFFFFFFFFFFF");
    }

    #[test]
    fn mount_points_are_made_and_a_symlink_is_never_followed() {
        let root = tempfile::tempdir().unwrap();
        add_mount_points(
            root.path(),
            &["/tmp".to_owned(), "/var/cache/app".to_owned()],
        )
        .unwrap();
        for made in ["dev", "proc", "tmp", "var/cache/app"] {
            assert!(root.path().join(made).is_dir(), "{made}");
        }
        let outside = tempfile::tempdir().unwrap();
        let hostile = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), hostile.path().join("data")).unwrap();
        let e = add_mount_points(hostile.path(), &["/data/x".to_owned()]).unwrap_err();
        assert!(e.to_string().contains("/data/x"), "{e}");
        assert!(
            !outside.path().join("x").exists(),
            "followed the link out of the rootfs"
        );
    }
}
