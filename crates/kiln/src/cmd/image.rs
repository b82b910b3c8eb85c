//! Image commands: `kiln build`, `kiln images`, `kiln image inspect|export|import|push`,
//! `kiln gc`.
//!
//! Thin over `kiln-image`: parse arguments, call the library, print. The store lives at
//! `<state>/images` and the build cache at `<state>/cache/build`. `kiln gc` here has no
//! releases to retain yet; once the ledger is wired in, the daemon passes their digests.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_image::archive::{self, ExportFormat};
use kiln_image::{BuildCache, BuildOptions, Progress, Store};
use kiln_machine::disk::Format as DiskFormat;
use serde_json::json;

use crate::output::Output;

/// `kiln build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The spec file
    #[arg(
        short = 'f',
        long = "file",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub file: PathBuf,

    /// Worker threads (default: all cores; never changes the digest)
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Attach no SBOM and no provenance to the image (the image's digest is the same)
    #[arg(long)]
    pub no_attest: bool,

    #[command(flatten)]
    pub signing: super::sign::BuildSignArgs,
}

/// `kiln image …`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// The `kiln image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Show an image's manifest, config, layers and tags
    Inspect {
        /// A tag (NAME or NAME:TAG) or a manifest digest (sha256:…, or a unique prefix)
        reference: String,
    },
    /// Write an image out as an OCI layout, an oci-archive, a docker-archive, a rootfs, or a
    /// bootable machine disk (raw or qcow2: kiln as the init, the root sealed by dm-verity)
    Export(ExportArgs),
    /// Bring images in from an OCI layout directory, an oci-archive or a docker-archive
    Import {
        /// The directory or tarball
        path: PathBuf,
    },
    /// Push an image to a registry over the OCI Distribution API, by digest: only the blobs
    /// the registry lacks are sent (what the swarm provider does for `[target] registry`)
    Push(PushArgs),
}

/// `kiln image export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A tag or a manifest digest
    pub reference: String,
    /// Output format: oci, oci-archive, docker-archive, rootfs, raw or qcow2 (a bootable
    /// disk: needs --kernel; its provenance and SBOM, in-toto statements, are written to
    /// PATH.provenance.intoto.json and PATH.sbom.intoto.json and attached to the image)
    #[arg(long, value_name = "FORMAT")]
    pub format: ExportTo,
    /// Where to write (must not exist, except an OCI layout to add to)
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: PathBuf,
    /// The disk's kernel: a vmlinuz-<release> file (its modules in ../lib/modules/<release>
    /// or /lib/modules/<release>) or a Debian linux-image-<release>_*.deb (raw and qcow2 only)
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The spec whose [service] the disk's app gets: writable paths, tmpfs_size,
    /// stop_grace, env, memory, cpus, pids, user, [service.health] (checked by the guest's
    /// init) and [service.secrets] (names only: the machine is given the values at boot,
    /// with QEMU's -fw_cfg name=opt/kiln/secrets/NAME,file=PATH) [default: writable /tmp,
    /// 64 MiB, 5s, no limits, no health check] (raw and qcow2 only)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// How the guest's eth0 gets its address: dhcp, or ADDR/PREFIX,GATEWAY (raw and qcow2
    /// only)
    #[arg(long, value_name = "dhcp|ADDR/PREFIX,GATEWAY", default_value = kiln_machine::disk::DEFAULT_IP)]
    pub ip: String,
    /// The TCP port of the guest init's status endpoint (GET /health: 200 while the app
    /// runs and is healthy, 503 otherwise, with JSON); 0 for none (raw and qcow2 only)
    #[arg(long, value_name = "PORT", default_value_t = kiln_machine::disk::DEFAULT_STATUS_PORT)]
    pub status_port: u16,
    /// Sign the unified kernel image for UEFI Secure Boot with this RSA key (unencrypted
    /// PEM, PKCS#8 or PKCS#1): firmware whose db trusts --secure-boot-cert then boots only
    /// this kernel, initramfs and command line, root hash included (raw and qcow2 only)
    #[arg(long, value_name = "KEY.pem", requires = "secure_boot_cert")]
    pub secure_boot_key: Option<PathBuf>,
    /// The X.509 certificate (PEM) of --secure-boot-key, carried in the signature
    #[arg(long, value_name = "CERT.pem", requires = "secure_boot_key")]
    pub secure_boot_cert: Option<PathBuf>,
    /// Sign the disk's provenance and SBOM with --key: DSSE envelopes, written to
    /// PATH.provenance.dsse.json and PATH.sbom.dsse.json instead of the bare statements and
    /// attached to the image beside them, as `kiln build --sign` signs an image's (raw and
    /// qcow2 only)
    #[arg(long, requires = "key")]
    pub sign: bool,
    /// The signing key for --sign (OpenSSH ed25519 private key, unencrypted)
    #[arg(long, env = "KILN_SIGNING_KEY", value_name = "PATH")]
    pub key: Option<PathBuf>,
}

/// What `kiln image export` writes: an image format, or a machine disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportTo {
    /// An OCI layout, archive or rootfs.
    Image(ExportFormat),
    /// A bootable disk.
    Disk(DiskFormat),
}

impl std::str::FromStr for ExportTo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(ExportTo::Disk(DiskFormat::Raw)),
            "qcow2" => Ok(ExportTo::Disk(DiskFormat::Qcow2)),
            other => other.parse().map(ExportTo::Image).map_err(|_: String| {
                format!(
                    "unknown format {other:?}: expected oci, oci-archive, docker-archive, rootfs, raw or qcow2"
                )
            }),
        }
    }
}

/// `kiln image push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// A tag or a manifest digest
    pub reference: String,
    /// The repository: HOST[:PORT]/NAME, e.g. registry.example.com/team/app (no tag: the
    /// image is pushed, and pulled, by digest)
    pub repository: String,
    /// Plain HTTP even to a host that is not loopback (anyone on the path can read or alter
    /// the image)
    #[arg(long)]
    pub insecure: bool,
    /// A CA certificate (PEM) to trust besides the system's roots [default: <state>/push/ca.crt
    /// when there is one, as the swarm provider does]
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// `kiln gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only report what would be removed
    #[arg(long)]
    pub dry_run: bool,

    /// A manifest digest to keep even if untagged (repeatable)
    #[arg(long = "retain", value_name = "DIGEST")]
    pub retain: Vec<String>,
}

/// The images of every release the ledger records, when there is a ledger.
fn released_images(state: &Path) -> anyhow::Result<BTreeSet<kiln_image::Digest>> {
    let path = state.join("ledger.db");
    let mut out = BTreeSet::new();
    if !path.exists() {
        return Ok(out);
    }
    let ledger = kiln_ledger::Ledger::open_read_only(&path)
        .with_context(|| format!("cannot open the ledger {}", path.display()))?;
    for app in ledger.apps()? {
        for release in ledger.releases(&app)? {
            if let Ok(d) = kiln_image::Digest::parse(&release.body.image) {
                out.insert(d);
            }
        }
    }
    Ok(out)
}

/// Removes from the Docker Engine the images kiln loaded there whose image is no longer in
/// the store (nor retained) and that no container uses. Only when kiln has used an engine
/// from this state directory; returns the tags removed.
fn gc_engine(
    state: &Path,
    store: &Store,
    retained: &BTreeSet<kiln_image::Digest>,
) -> anyhow::Result<Vec<String>> {
    if !state.join("docker/engine").exists() {
        return Ok(Vec::new());
    }
    let mut keep: std::collections::HashSet<kiln_runtime::Digest> =
        retained.iter().cloned().collect();
    keep.extend(store.index()?.manifests.into_iter().map(|m| m.digest));
    let images = std::sync::Arc::new(super::instance::StoreImages::open(state)?);
    super::instance::tokio_runtime()?.block_on(async {
        let engines = kiln_runtime::Engines::new(state, "runc", images, None).await?;
        let docker = engines.docker(None).await?;
        docker
            .gc_images(&keep)
            .await
            .context("cannot remove unused images from the Docker Engine")
    })
}

pub(super) fn store(state: &Path) -> anyhow::Result<Store> {
    let root = state.join("images");
    Store::open(&root).with_context(|| format!("cannot open the image store at {}", root.display()))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn source_date_epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a whole number of seconds")),
        _ => Ok(0),
    }
}

pub fn build(args: &BuildArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let spec = match super::spec::load(&args.file, out)? {
        Ok(spec) => spec,
        Err(code) => return Ok(code),
    };
    let signer = super::sign::build_signer(&args.signing)?;
    let started = std::time::Instant::now();
    let built = build_spec_with(&spec, &args.file, args.threads, !args.no_attest, state, out)
        .with_context(|| format!("cannot build the image of {}", args.file.display()))?;
    super::sign::sign_built(signer.as_ref(), &built.digest, state, out)?;
    if out.json {
        out.data(&json!({
            "digest": built.digest,
            "size": built.size,
            "tag": built.tag,
            "config": built.config,
            "layers": built.layers,
        }))?;
    } else {
        if !out.quiet {
            eprintln!(
                "built {} ({}, {} layer(s)) in {:.2}s",
                built.tag.as_deref().unwrap_or("image"),
                human(built.size),
                built.layers.len(),
                started.elapsed().as_secs_f64()
            );
        }
        out.print(&format!("{}\n", built.digest));
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds a validated spec's image into the store, tags it `NAME:latest` and attaches its
/// SBOM and provenance, showing per-layer progress on stderr (shared by `kiln build`,
/// `plan`, `apply` and `up`). `file` is the spec file, as the user named it.
pub fn build_spec(
    spec: &kiln_spec::Spec,
    file: &Path,
    threads: Option<usize>,
    state: &Path,
    out: &Output,
) -> anyhow::Result<kiln_image::BuildOutput> {
    build_spec_with(spec, file, threads, true, state, out)
}

/// The git commit the spec's directory is checked out at, for the provenance: `origin`'s URL
/// (else the work tree's path), the commit, and whether the work tree was clean. `None`
/// outside a git work tree or before its first commit; a repository git cannot read is said
/// (a warning) and left out, so a policy that wants the source refuses the image.
fn git_source(file: &Path) -> Option<kiln_image::attest::provenance::Source> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let found = match kiln_git::describe(dir) {
        Ok(found) => found?,
        Err(e) => {
            tracing::warn!(error = %e, "the provenance names no source: cannot read the spec's git work tree");
            return None;
        }
    };
    if !found.clean {
        tracing::info!(
            changed = found.dirty_count,
            first = ?found.dirty_paths.first(),
            "the work tree has uncommitted changes: the provenance says so"
        );
    }
    Some(kiln_image::attest::provenance::Source {
        uri: found
            .remote
            .unwrap_or_else(|| format!("file://{}", found.root.display())),
        commit: found.commit?,
        clean: found.clean,
    })
}

/// RFC 3339 for a wall-clock instant, to the second.
fn rfc3339(t: std::time::SystemTime) -> String {
    kiln_image::oci::rfc3339(
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// The spec file as a provenance names it: as given, or its file name when given by an
/// absolute path, so two checkouts describe it alike.
fn spec_path(file: &Path) -> String {
    if file.is_absolute() {
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        file.display().to_string()
    }
}

/// What the provenance says of this invocation: the spec file (as named, or its file name
/// when named by an absolute path, so two checkouts describe it alike), its digest, the
/// source commit, kiln's version, a fresh id and the times.
fn invocation(
    file: &Path,
    started: std::time::SystemTime,
    source: Option<kiln_image::attest::provenance::Source>,
) -> anyhow::Result<kiln_image::attest::provenance::Invocation> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let spec_path = spec_path(file);
    // The kernel's random UUID: a fresh id per build without a random-number dependency.
    let invocation_id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_owned())
        .context("cannot read /proc/sys/kernel/random/uuid for the build's invocation id")?;
    Ok(kiln_image::attest::provenance::Invocation {
        spec_path,
        spec_digest: kiln_image::Digest::of(&bytes),
        source,
        kiln_version: env!("CARGO_PKG_VERSION").to_owned(),
        invocation_id,
        started_on: rfc3339(started),
        finished_on: rfc3339(std::time::SystemTime::now()),
    })
}

/// [`build_spec`], with or without attestations.
pub fn build_spec_with(
    spec: &kiln_spec::Spec,
    file: &Path,
    threads: Option<usize>,
    attest: bool,
    state: &Path,
    out: &Output,
) -> anyhow::Result<kiln_image::BuildOutput> {
    let wall_started = std::time::SystemTime::now();
    let store = store(state)?;
    let cache_dir = state.join("cache").join("build");
    let mut cache = BuildCache::open(&cache_dir)
        .with_context(|| format!("cannot open the build cache at {}", cache_dir.display()))?;
    let mut opts = BuildOptions {
        source_date_epoch: source_date_epoch()?,
        tag: Some(format!("{}:latest", spec.name)),
        attest,
        ..BuildOptions::default()
    };
    if let Some(t) = threads {
        opts.threads = t.max(1);
    }
    let tty = std::io::stderr().is_terminal();
    let quiet = out.quiet;
    let started = std::time::Instant::now();
    let verbose = out.verbose > 0;
    let mut progress = |p: Progress<'_>| {
        if quiet {
            return;
        }
        if verbose
            && !matches!(
                p,
                Progress::Base { layers: 0 } | Progress::Assembling { .. }
            )
        {
            eprint!("[{:7.3}s] ", started.elapsed().as_secs_f64());
        }
        match p {
            Progress::Base { layers } if layers > 0 => eprintln!("base: {layers} layer(s) reused"),
            Progress::Base { .. } => {}
            Progress::Hashing { files } => eprintln!("hashing {files} changed file(s)"),
            Progress::Compressing { units } => eprintln!("compressing {units} unit(s)"),
            Progress::Assembling { source } if verbose => eprintln!(
                "[{:7.3}s] writing layer {source}",
                started.elapsed().as_secs_f64()
            ),
            Progress::Assembling { .. } => {}
            Progress::Layer(l) => {
                let state = if l.cache_hit {
                    "cached".to_owned()
                } else {
                    format!("{}/{} units compressed", l.units_compressed, l.units)
                };
                let line = format!(
                    "layer {}: {} entries, {} → {} ({state}) {}",
                    l.source,
                    l.files,
                    human(l.bytes),
                    human(l.size),
                    l.digest.short()
                );
                if tty {
                    eprintln!("\x1b[2K{line}");
                } else {
                    eprintln!("{line}");
                }
            }
        }
    };
    // The work tree as the build starts: a change made while it runs is the next build's.
    let source = if attest { git_source(file) } else { None };
    let built = kiln_image::build(&spec.image, &store, &mut cache, &opts, &mut progress)?;
    if let Some(record) = &built.record {
        let inv = invocation(file, wall_started, source)?;
        kiln_image::attest::attach_build(&store, record, &inv).with_context(|| {
            format!("cannot attach the SBOM and provenance to {}", built.digest)
        })?;
    }
    Ok(built)
}

pub fn images(state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let list = store(state)?.images()?;
    if out.json {
        out.data(&serde_json::to_value(&list)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    out.say(&format!(
        "{:<32} {:<19} {:>10}  {}",
        "TAG", "DIGEST", "SIZE", "CREATED"
    ));
    for i in list {
        out.say(&format!(
            "{:<32} sha256:{} {:>10}  {}",
            i.tag,
            i.digest.short(),
            human(i.size),
            i.created.unwrap_or_default()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn image(args: &ImageArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    if let ImageCommand::Push(push) = &args.command {
        return push_cmd(push, state, out);
    }
    if let ImageCommand::Export(export) = &args.command {
        return export_cmd(export, state, out);
    }
    let store = store(state)?;
    match &args.command {
        ImageCommand::Inspect { reference } => {
            let info = store.inspect(reference)?;
            // The test attestation `kiln test` recorded next to the image, if any.
            let attestation = store.read_attestation(&info.digest)?;
            // Signatures and attestations attached to it (OCI referrers).
            let referrers = store.referrers(&info.digest)?;
            if out.json {
                let mut v = serde_json::to_value(&info)?;
                v["attestation"] = attestation.clone().unwrap_or(serde_json::Value::Null);
                v["referrers"] = serde_json::to_value(&referrers)?;
                out.data(&v)?;
            } else {
                match &attestation {
                    Some(a) => out.say(&format!(
                        "tested:  {} at {} (kiln {})",
                        a["result"].as_str().unwrap_or("?"),
                        a["time"].as_str().or(a["at"].as_str()).unwrap_or("?"),
                        a["kiln_version"].as_str().unwrap_or("?")
                    )),
                    None => out.say("tested:  never (run `kiln test`)"),
                }
                out.say(&format!("digest:  {}", info.digest));
                out.say(&format!("tags:    {}", info.tags.join(", ")));
                out.say(&format!("size:    {}", human(info.size)));
                if let Some(c) = info.config.get("created").and_then(|c| c.as_str()) {
                    out.say(&format!("created: {c}"));
                }
                out.say(&format!("config:  {}", info.manifest.config.digest));
                for (i, l) in info.manifest.layers.iter().enumerate() {
                    out.say(&format!(
                        "layer {i}: {} {} {}",
                        l.digest,
                        human(l.size),
                        l.media_type
                    ));
                }
                if let Some(c) = info.config.get("config") {
                    out.say(&format!("runtime: {}", serde_json::to_string(c)?));
                }
                for r in &referrers {
                    let kind = r
                        .annotations
                        .get(kiln_image::attest::ANNOTATION_PREDICATE_TYPE)
                        .map(|p| format!(" {p}"))
                        .unwrap_or_default();
                    let key = r
                        .annotations
                        .get(kiln_image::attest::ANNOTATION_KEY)
                        .map(|k| format!(" signed by {k}"))
                        .unwrap_or_default();
                    out.say(&format!(
                        "referrer: {} {}{kind}{key}",
                        r.manifest, r.artifact_type
                    ));
                }
            }
        }
        ImageCommand::Export(_) => {}
        ImageCommand::Import { path } => {
            let imported = archive::import(&store, path)
                .with_context(|| format!("cannot import {}", path.display()))?;
            if out.json {
                out.data(&serde_json::to_value(&imported)?)?;
            } else {
                for i in imported {
                    out.say(&format!("{} {}", i.manifest.digest, i.tags.join(", ")));
                }
            }
        }
        ImageCommand::Push(_) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln image export`: an image format through `kiln_image::archive`, or a machine disk
/// through `kiln_machine::disk` ([`export_disk`]).
fn export_cmd(args: &ExportArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let disk_only = |flag: &str| {
        out.error(&anyhow::anyhow!(
            "{flag} is for --format raw or qcow2 (a machine disk) only"
        ));
        Ok(ExitCode::from(2))
    };
    let format = match args.format {
        ExportTo::Image(format) => {
            if args.kernel.is_some() {
                return disk_only("--kernel");
            }
            if args.file.is_some() {
                return disk_only("-f/--file");
            }
            if args.ip != kiln_machine::disk::DEFAULT_IP {
                return disk_only("--ip");
            }
            if args.status_port != kiln_machine::disk::DEFAULT_STATUS_PORT {
                return disk_only("--status-port");
            }
            if args.secure_boot_key.is_some() {
                return disk_only("--secure-boot-key");
            }
            if args.sign {
                return disk_only("--sign");
            }
            format
        }
        ExportTo::Disk(format) => {
            // It goes into the kernel command line: nothing but an address may get there.
            if !valid_guest_ip(&args.ip) {
                out.error(&anyhow::anyhow!(
                    "--ip {:?} is not dhcp or ADDR/PREFIX,GATEWAY (IPv4, e.g. 10.0.2.15/24,10.0.2.2)",
                    args.ip,
                ));
                return Ok(ExitCode::from(2));
            }
            let Some(kernel) = &args.kernel else {
                out.error(&anyhow::anyhow!(
                    "--format raw and qcow2 need --kernel PATH: a vmlinuz-<release> file or a Debian linux-image-<release>_*.deb (apt-get download linux-image-<release>)"
                ));
                return Ok(ExitCode::from(2));
            };
            return export_disk(args, format, kernel, state, out);
        }
    };
    let store = store(state)?;
    let (reference, output) = (&args.reference, &args.output);
    let desc = archive::export(&store, reference, format, output)
        .with_context(|| format!("cannot export {reference} to {}", output.display()))?;
    if out.json {
        out.data(&json!({"digest": desc.digest, "output": output}))?;
    } else {
        out.say(&format!("exported {} to {}", desc.digest, output.display()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `ip` is `dhcp` or `ADDR/PREFIX,GATEWAY` in IPv4, what the guest init reads from
/// `kiln.ip`.
fn valid_guest_ip(ip: &str) -> bool {
    use std::net::Ipv4Addr;
    if ip == "dhcp" {
        return true;
    }
    let Some((cidr, gateway)) = ip.split_once(',') else {
        return false;
    };
    let Some((addr, prefix)) = cidr.split_once('/') else {
        return false;
    };
    addr.parse::<Ipv4Addr>().is_ok()
        && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
        && gateway.parse::<Ipv4Addr>().is_ok()
}

/// The app of a machine disk: argv, env, cwd and user from the image's OCI config; writable
/// paths, tmpfs size, stop grace, env, user, limits, health check and secrets' names on top
/// from the spec when one is named.
fn machine_app(
    config: &serde_json::Value,
    spec: Option<&kiln_spec::Spec>,
    status_port: u16,
) -> anyhow::Result<kiln_machine::disk::App> {
    use kiln_machine::guest::config::{HealthJson, Limits, Secret};
    let c = &config["config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv = strings(&c["Entrypoint"]);
    argv.extend(strings(&c["Cmd"]));
    if argv.is_empty() {
        anyhow::bail!(
            "the image has no Entrypoint or Cmd: a machine disk needs a program to start"
        );
    }
    let mut env = strings(&c["Env"]);
    let cwd = match c["WorkingDir"].as_str() {
        Some(d) if !d.is_empty() => d.to_owned(),
        _ => "/".to_owned(),
    };
    // As a sealed instance: the spec's user, else the image's, else 65534 (never root by
    // default).
    let (user, whose) = match spec.and_then(|s| s.service.user.as_deref()) {
        Some(user) => (user, "[service] user"),
        None => (c["User"].as_str().unwrap_or(""), "the image's user"),
    };
    let (uid, gid) = match user {
        "" => (65534, 65534),
        "root" => (0, 0),
        user => {
            let (u, g) = user.split_once(':').unwrap_or((user, "0"));
            match (u.parse::<u32>(), g.parse::<u32>()) {
                (Ok(u), Ok(g)) => (u, g),
                _ => anyhow::bail!(
                    "{whose} {user:?} is not a numeric UID[:GID]: machine disks do not read account names yet"
                ),
            }
        }
    };
    let mut app = kiln_machine::disk::App {
        argv,
        env: Vec::new(),
        cwd,
        uid,
        gid,
        writable: vec!["/tmp".to_owned()],
        tmpfs_size_bytes: kiln_spec::ServiceSpec::DEFAULT_TMPFS_SIZE,
        stop_grace_ms: 5000,
        limits: Limits::default(),
        secrets: Vec::new(),
        health: None,
        status_port: (status_port != 0).then_some(status_port),
    };
    if let Some(spec) = spec {
        let s = &spec.service;
        app.writable = s.writable.iter().map(|w| w.path.clone()).collect();
        // One size for every tmpfs in the guest's contract: the largest the spec gives.
        app.tmpfs_size_bytes = s
            .tmpfs()
            .map(|(_, size)| size)
            .max()
            .unwrap_or(s.tmpfs_size);
        app.stop_grace_ms = millis(s.stop_grace);
        for (k, v) in &s.env {
            env.retain(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) != k);
            env.push(format!("{k}={v}"));
        }
        app.limits = Limits {
            memory_bytes: s.memory,
            // Validated finite and positive by the spec; thousandths of a core.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            cpu_millis: s.cpus.map(|c| (c * 1000.0).round().max(1.0) as u64),
            pids: Some(s.pids),
        };
        app.secrets = s
            .secrets
            .iter()
            .map(|x| Secret {
                name: x.name.clone(),
                expose_env: x.expose_env,
            })
            .collect();
        let h = &s.health;
        app.health = Some(HealthJson {
            port: s.port,
            path: h.path.clone(),
            interval_ms: millis(h.interval),
            timeout_ms: millis(h.timeout),
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
            start_period_ms: millis(h.start_period),
        });
        if app.status_port == Some(s.port) {
            anyhow::bail!(
                "--status-port {status_port} is the app's own port ([service] port): choose another"
            );
        }
    }
    app.env = env;
    Ok(app)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `kiln image export --format raw|qcow2`: the image's rootfs as a bootable, verity-sealed
/// disk with this kiln binary as its init.
fn export_disk(
    args: &ExportArgs,
    format: DiskFormat,
    kernel: &Path,
    state: &Path,
    out: &Output,
) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let spec = match &args.file {
        Some(file) => match super::spec::load(file, out)? {
            Ok(spec) => Some(spec),
            Err(code) => return Ok(code),
        },
        None => None,
    };
    // A bad key fails now, not after the disk is written.
    let signer = super::sign::build_signer(&super::sign::BuildSignArgs {
        sign: args.sign,
        key: args.key.clone(),
    })?;
    let attestation_paths = attestation_paths(&args.output, signer.is_some());
    for p in std::iter::once(&args.output).chain(&attestation_paths) {
        if p.exists() {
            anyhow::bail!("{} already exists; choose a new path", p.display());
        }
    }
    let store = store(state)?;
    let info = store.inspect(&args.reference)?;
    let app = machine_app(&info.config, spec.as_ref(), args.status_port)?;
    let secure_boot = match (&args.secure_boot_key, &args.secure_boot_cert) {
        (Some(key), Some(cert)) => Some(secure_boot_signer(key, cert)?),
        _ => None,
    };
    let init = std::env::current_exe().context("cannot find this kiln binary, the disk's init")?;
    let parent = args
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Scratch space beside the output: the rootfs and the partitions are as big as the disk.
    let work = tempfile::Builder::new()
        .prefix(".kiln-export-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a work directory in {}", parent.display()))?;
    let rootfs = work.path().join("rootfs");
    archive::export(&store, info.digest.as_str(), ExportFormat::Rootfs, &rootfs)
        .with_context(|| format!("cannot unpack {}", info.digest))?;
    // The guest's `/`: made under kiln's umask 077, it would shut out an app that is not
    // root; layers give modes to what they hold, never to the root itself.
    std::fs::set_permissions(&rootfs, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", rootfs.display()))?;
    let input = kiln_machine::disk::Input {
        rootfs: &rootfs,
        image_digest: info.digest.as_str(),
        kernel,
        init: &init,
        app: &app,
        ip: &args.ip,
        secure_boot: secure_boot.as_ref(),
    };
    let disk_work = work.path().join("disk");
    std::fs::create_dir_all(&disk_work)
        .with_context(|| format!("cannot create {}", disk_work.display()))?;
    let done = kiln_machine::disk::export(&input, format, &args.output, &disk_work).with_context(
        || {
            format!(
                "cannot export {} as a disk to {}",
                info.digest,
                args.output.display()
            )
        },
    )?;
    let exported_secs = started.elapsed().as_secs_f64();
    let record = disk_record(&store, &info, args, format, &done, secure_boot.as_ref())?;
    let attested = attest_disk(
        &store,
        &info.digest,
        &record,
        signer.as_ref(),
        &attestation_paths,
    )
    .with_context(|| {
        format!(
            "cannot write or attach the provenance and SBOM of {}",
            args.output.display()
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    if out.json {
        out.data(&json!({
            "digest": info.digest,
            "output": args.output,
            "provenance": attestation_paths[0],
            "sbom": attestation_paths[1],
            "signed_by": signer.as_ref().map(|k| k.public().fingerprint()),
            "attached": attested,
            "export_seconds": exported_secs,
            "raw_sha256": done.raw_sha256,
            "format": match format { DiskFormat::Raw => "raw", DiskFormat::Qcow2 => "qcow2" },
            "sha256": done.sha256,
            "size": done.size,
            "disk_size": done.disk_size,
            "root_hash": done.root_hash,
            "salt": done.salt,
            "data_blocks": done.data_blocks,
            "cmdline": done.cmdline,
            "kernel": done.kernel_release,
            "modules": done.modules,
            "secure_boot_signed": secure_boot.is_some(),
            "seconds": secs,
        }))?;
    } else {
        out.say(&format!(
            "exported {} to {} ({}, kernel {}, {} modules) in {secs:.2}s",
            info.digest,
            args.output.display(),
            human(done.size),
            done.kernel_release,
            done.modules.len()
        ));
        out.say(&format!("sha256:    {}", done.sha256));
        out.say(&format!("root hash: {}", done.root_hash));
        let signed = signer
            .as_ref()
            .map(|k| format!(", signed by {}", k.public().fingerprint()))
            .unwrap_or_default();
        out.say(&format!(
            "provenance and SBOM{signed}: {} and {}, attached to {}",
            attestation_paths[0].display(),
            attestation_paths[1].display(),
            info.digest
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The Secure Boot signer of `--secure-boot-key` and `--secure-boot-cert`.
fn secure_boot_signer(
    key: &Path,
    cert: &Path,
) -> anyhow::Result<kiln_machine::authenticode::Signer> {
    let read = |path: &Path, flag: &str| {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let (key_pem, cert_pem) = (
        read(key, "--secure-boot-key")?,
        read(cert, "--secure-boot-cert")?,
    );
    kiln_machine::authenticode::Signer::from_pem(&key_pem, &cert_pem).with_context(|| {
        format!(
            "--secure-boot-key {} with --secure-boot-cert {}",
            key.display(),
            cert.display()
        )
    })
}

/// Where a disk's provenance and SBOM go: beside it, `PATH.provenance.intoto.json` and
/// `PATH.sbom.intoto.json`, or `.dsse.json` when signed.
fn attestation_paths(disk: &Path, signed: bool) -> [PathBuf; 2] {
    let kind = if signed { "dsse" } else { "intoto" };
    ["provenance", "sbom"].map(|what| {
        let mut p = disk.as_os_str().to_owned();
        p.push(format!(".{what}.{kind}.json"));
        PathBuf::from(p)
    })
}

/// The Debian package dpkg says installed `path`, if any; a dpkg database that cannot be
/// read names none (the documents say less, the export goes on).
fn dpkg_owner(path: &Path) -> Option<kiln_image::attest::DebPackage> {
    let path = std::fs::canonicalize(path).ok()?;
    let admin = Path::new(kiln_image::attest::DPKG_ADMIN_DIR);
    match kiln_image::attest::dpkg::owners(admin, std::slice::from_ref(&path)) {
        Ok(mut found) => found.remove(&path),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot read the dpkg database: the disk's documents name no package for this file");
            None
        }
    }
}

/// What the disk's provenance and SBOM say, from the export and the store.
fn disk_record(
    store: &Store,
    info: &kiln_image::ImageInfo,
    args: &ExportArgs,
    format: DiskFormat,
    done: &kiln_machine::disk::Exported,
    secure_boot: Option<&kiln_machine::authenticode::Signer>,
) -> anyhow::Result<kiln_image::attest::disk::DiskRecord> {
    use kiln_image::Digest;
    use kiln_image::attest::disk::{DiskInput, DiskRecord, SpecFile};
    let sha256 = |hex: &str| {
        Digest::parse(&format!("sha256:{hex}"))
            .with_context(|| format!("the export's digest {hex:?} is not SHA-256 hex"))
    };
    let input = |h: &kiln_machine::disk::Hashed| -> anyhow::Result<DiskInput> {
        Ok(DiskInput {
            name: h.name.clone(),
            sha256: sha256(&h.sha256)?,
        })
    };
    let inputs = &done.inputs;
    let spec = match &args.file {
        Some(file) => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            Some(SpecFile {
                path: spec_path(file),
                digest: Digest::of(&bytes),
            })
        }
        None => None,
    };
    let kernel_package = match &inputs.kernel_package {
        Some(c) => Some(kiln_image::attest::DebPackage {
            name: c.package.clone(),
            version: c.version.clone(),
            architecture: c.architecture.clone(),
        }),
        None => args.kernel.as_deref().and_then(dpkg_owner),
    };
    Ok(DiskRecord {
        file_name: args
            .output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format: match format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
        .to_owned(),
        sha256: sha256(&done.sha256)?,
        raw_sha256: sha256(&done.raw_sha256)?,
        image: info.digest.clone(),
        image_name: info
            .tags
            .iter()
            .find_map(|t| t.rsplit_once(':').map(|(n, _)| n.to_owned()))
            .unwrap_or_else(|| "image".to_owned()),
        image_sbom: kiln_image::attest::image_sbom(store, &info.digest)?,
        // The image's own creation time (its build's SOURCE_DATE_EPOCH), never the clock.
        created: info
            .config
            .get("created")
            .and_then(|c| c.as_str())
            .map_or_else(|| kiln_image::oci::rfc3339(0), str::to_owned),
        ip: args.ip.clone(),
        spec,
        kernel: input(&inputs.kernel)?,
        kernel_release: done.kernel_release.clone(),
        kernel_package,
        vmlinuz: input(&inputs.vmlinuz)?,
        init: input(&inputs.init)?,
        init_stripped: sha256(&inputs.init_stripped_sha256)?,
        stub: input(&inputs.stub)?,
        stub_package: dpkg_owner(Path::new(&inputs.stub.name)),
        modules: inputs.modules.iter().map(input).collect::<Result<_, _>>()?,
        root_hash: done.root_hash.clone(),
        salt: done.salt.clone(),
        data_blocks: done.data_blocks,
        cmdline: done.cmdline.clone(),
        disk_size: done.disk_size,
        secure_boot_certificate: secure_boot
            .map(kiln_machine::authenticode::Signer::certificate_sha256),
        kiln_version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// One attestation of a disk, as attached to its image.
#[derive(Debug, serde::Serialize)]
struct DiskAttestation {
    predicate_type: &'static str,
    artifact_type: &'static str,
    manifest: kiln_image::Digest,
    /// False when the same bytes were attached before (an export of the same inputs).
    new: bool,
}

/// Writes the disk's provenance and SBOM to `paths` (DSSE envelopes when `key` is given),
/// then attaches them to `image`: the statements as an image's own are, and the envelopes
/// beside them. The same inputs give the same bytes, so exporting twice attaches nothing
/// new.
fn attest_disk(
    store: &Store,
    image: &kiln_image::Digest,
    record: &kiln_image::attest::disk::DiskRecord,
    key: Option<&kiln_sign::SigningKey>,
    paths: &[PathBuf; 2],
) -> anyhow::Result<Vec<DiskAttestation>> {
    use kiln_image::attest::{
        ARTIFACT_DSSE, ARTIFACT_IN_TOTO, PREDICATE_PROVENANCE, PREDICATE_SBOM, disk,
    };
    let tool = format!("kiln-{}", record.kiln_version);
    let statements = [
        (PREDICATE_PROVENANCE, disk::provenance_statement(record)),
        (PREDICATE_SBOM, disk::sbom_statement(record, &tool)),
    ];
    // Everything is made before anything is written or attached: a failure to sign leaves
    // neither a file nor a referrer behind.
    let mut made = Vec::with_capacity(2);
    for (predicate_type, statement) in statements {
        let bytes = kiln_image::oci::canonical_json(&statement)?;
        let envelope = match key {
            Some(key) => Some(
                kiln_sign::dsse::Envelope::try_sign(ARTIFACT_IN_TOTO, bytes.clone(), key)?
                    .to_json(),
            ),
            None => None,
        };
        made.push((predicate_type, bytes, envelope));
    }
    for ((_, bytes, envelope), path) in made.iter().zip(paths) {
        // `-o disk.raw` names no directory: the statements go beside it, here.
        let at = match path.parent() {
            Some(p) if p.as_os_str().is_empty() => Path::new(".").join(path),
            _ => path.clone(),
        };
        kiln_durable::write(&at, envelope.as_ref().unwrap_or(bytes))
            .and_then(|()| {
                // Public documents, as readable as the disk beside them.
                std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            })
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let before: BTreeSet<kiln_image::Digest> = store
        .referrers(image)?
        .into_iter()
        .map(|r| r.manifest)
        .collect();
    let mut attached = Vec::new();
    for (predicate_type, bytes, envelope) in made {
        let manifest =
            kiln_image::attest::attach_statement_bytes(store, image, predicate_type, &bytes)?;
        attached.push(DiskAttestation {
            predicate_type,
            artifact_type: ARTIFACT_IN_TOTO,
            new: !before.contains(&manifest),
            manifest,
        });
        if let (Some(envelope), Some(key)) = (envelope, key) {
            let manifest =
                super::sign::attach_envelope(store, image, key, &envelope, Some(predicate_type))?;
            attached.push(DiskAttestation {
                predicate_type,
                artifact_type: ARTIFACT_DSSE,
                new: !before.contains(&manifest),
                manifest,
            });
        }
    }
    Ok(attached)
}

/// `kiln image push`: the swarm provider's push, from the command line.
fn push_cmd(args: &PushArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    use kiln_runtime::push::{PushOptions, Repository, push};
    let repo = match Repository::parse(&args.repository) {
        Ok(r) => r,
        Err(e) => {
            out.error(&anyhow::Error::new(e));
            return Ok(ExitCode::from(2));
        }
    };
    let images = super::instance::StoreImages::open(state)?;
    let image = images.resolve_ref(&args.reference)?;
    let opts = PushOptions {
        insecure: args.insecure,
        ca_file: args.ca.clone().or_else(|| {
            let ca = state.join(kiln_runtime::push::EXTRA_CA);
            ca.is_file().then_some(ca)
        }),
    };
    let pushed = super::instance::tokio_runtime()?
        .block_on(push(&images, &image, &repo, &opts))
        .with_context(|| format!("cannot push {image} to {repo}"))?;
    if out.json {
        out.data(&json!({
            "reference": pushed.reference,
            "digest": image,
            "manifests_sent": pushed.manifests_sent,
            "manifests_present": pushed.manifests_present,
            "blobs_sent": pushed.blobs_sent,
            "blobs_present": pushed.blobs_present,
            "bytes_sent": pushed.bytes_sent,
        }))?;
    } else if pushed.manifests_sent == 0 {
        out.say(&format!("{} is already there", pushed.reference));
    } else {
        out.say(&format!(
            "pushed {}: {} blobs sent ({}), {} already there",
            pushed.reference,
            pushed.blobs_sent,
            human(pushed.bytes_sent),
            pushed.blobs_present
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(args: &GcArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let store = store(state)?;
    let mut retained = BTreeSet::new();
    for r in &args.retain {
        retained.insert(kiln_image::Digest::parse(r)?);
    }
    // Every recorded release stays runnable: a rollback must find its image.
    retained.extend(released_images(state)?);
    let report = store.gc(&retained, args.dry_run)?;
    let engine_removed = if args.dry_run {
        Vec::new()
    } else {
        gc_engine(state, &store, &retained)?
    };
    for tag in &engine_removed {
        out.say(&format!("removed {tag} from the Docker Engine"));
    }
    if out.json {
        out.data(&serde_json::to_value(&report)?)?;
    } else {
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for (d, size) in &report.removed {
            out.say(&format!("{verb} {d} ({})", human(*size)));
        }
        out.say(&format!(
            "{verb} {} blob(s), {}; kept {}",
            report.removed.len(),
            human(report.freed),
            report.kept
        ));
    }
    Ok(ExitCode::SUCCESS)
}
