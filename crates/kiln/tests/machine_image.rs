//! `kiln image export --format raw|qcow2`: the example image as a bootable disk, checked with
//! the tools that read each part: two exports give the same bytes, `qemu-img` accepts the
//! qcow2 (and finds the raw disk's content in it), `sfdisk` sees the three partitions,
//! `veritysetup` verifies the root against the printed root hash (and refuses it with one
//! byte flipped), and the unified kernel image on the ESP carries the command line and an
//! initramfs with kiln as `/init` and the app's `machine.json`.
//!
//! Booting the disk is another test's (it needs the guest init). The kernel is
//! `/tmp/kern/x/boot/vmlinuz-*` when a developer unpacked one there, else the package
//! Debian's `linux-image-amd64` depends on, downloaded once with `apt-get download` into
//! `target/machine-kernel/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{hello_binary, kiln};
use sha2::{Digest as _, Sha256};

/// The programs this test and the export drive, with their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("mkfs.erofs", "erofs-utils"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("objcopy", "binutils"),
    ("qemu-img", "qemu-utils"),
    ("veritysetup", "cryptsetup-bin"),
    ("sfdisk", "fdisk"),
    ("cpio", "cpio"),
];
const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|d| d.join(program).is_file())
}

/// Skips (with a note) outside CI when something is missing; panics under `CI=true`.
fn skip(why: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the machine image prerequisites are missing: {why}");
    }
    eprintln!("note: skipping the machine image test ({why})");
    true
}

/// A kernel: the developer's unpacked one, else Debian's current amd64 kernel package.
fn kernel() -> Result<PathBuf, String> {
    if let Ok(entries) = std::fs::read_dir("/tmp/kern/x/boot") {
        let mut found: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        found.sort();
        if let Some(k) = found.pop() {
            return Ok(k);
        }
    }
    let cache = common::root().join("target/machine-kernel");
    std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    let cached = || {
        std::fs::read_dir(&cache).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        })
    };
    if let Some(deb) = cached() {
        return Ok(deb);
    }
    // The metapackage's one linux-image-<release> dependency.
    let depends = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    let text = String::from_utf8_lossy(&depends.stdout);
    let package = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains('<'))
        .ok_or_else(|| format!("apt-cache depends linux-image-amd64 names no kernel: {text}"))?
        .to_owned();
    let status = Command::new("apt-get")
        .args(["download", &package])
        .current_dir(&cache)
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !status.success() {
        return Err(format!("apt-get download {package} failed ({status})"));
    }
    cached().ok_or_else(|| format!("apt-get download {package} left no .deb"))
}

fn prerequisites() -> Option<PathBuf> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(p, _)| !on_path(p))
        .map(|(_, pkg)| *pkg)
        .chain((!Path::new(STUB).is_file()).then_some("systemd-boot-efi"))
        .collect();
    if !missing.is_empty() {
        skip(&format!("apt-get install {}", missing.join(" ")));
        return None;
    }
    if !hello_binary().exists() {
        skip("the example is not built (cargo build --release -p hello)");
        return None;
    }
    match kernel() {
        Ok(k) => Some(k),
        Err(why) => {
            skip(&format!("no kernel: {why}"));
            None
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn export(
    state: &Path,
    image: &str,
    kernel: &Path,
    spec: &Path,
    format: &str,
    out: &Path,
) -> serde_json::Value {
    export_with(state, image, kernel, spec, format, out, &[])
}

/// `kiln --json image export` of `image` as `format` with the spec and `extra` arguments.
fn export_with(
    state: &Path,
    image: &str,
    kernel: &Path,
    spec: &Path,
    format: &str,
    out: &Path,
    extra: &[&std::ffi::OsStr],
) -> serde_json::Value {
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let stdout = kiln(state)
        .args([
            "--json", "image", "export", image, "--format", format, "--kernel",
        ])
        .arg(kernel)
        .arg("-f")
        .arg(spec)
        .args(extra)
        .arg("-o")
        .arg(out)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    serde_json::from_slice(&stdout).unwrap()
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Bytes `start..start + len` (in 512-byte sectors) of `disk`, as a file.
fn extract(disk: &Path, start: u64, sectors: u64, to: &Path) {
    let bytes = std::fs::read(disk).unwrap();
    let at = (start * 512) as usize;
    std::fs::write(to, &bytes[at..at + (sectors * 512) as usize]).unwrap();
}

/// Whether spdx-tools and the in-toto bindings are there (a failure under `CI=true`).
fn attest_venv() -> bool {
    let there = [common::ATTEST_PYSPDXTOOLS, common::ATTEST_PYTHON]
        .iter()
        .all(|t| Path::new(t).is_file());
    if !there {
        skip_part("the attestation checkers (scripts/ci-setup.sh makes their venv)");
    }
    there
}

/// Skips one part of a test (with a note) outside CI; panics under `CI=true`.
fn skip_part(what: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {what} is missing"
    );
    eprintln!("note: not checked: {what} is missing");
}

/// The image's referrers, as `kiln image inspect` lists them.
fn referrers(state: &Path, image: &str) -> serde_json::Value {
    let out = kiln(state)
        .args(["--json", "image", "inspect", image])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    serde_json::from_slice::<serde_json::Value>(&out).unwrap()["referrers"].clone()
}

/// The statement files an export wrote beside `disk` (`kind`: `intoto` or `dsse`).
fn statement_files(disk: &Path, kind: &str) -> [PathBuf; 2] {
    ["provenance", "sbom"].map(|what| {
        let mut p = disk.as_os_str().to_owned();
        p.push(format!(".{what}.{kind}.json"));
        PathBuf::from(p)
    })
}

/// The provenance and SBOM two raw exports `a` and `b` wrote: the same bytes, about the
/// disk's own digest, naming what it was made from; the same statements attached to the
/// image; accepted by spdx-tools and the in-toto bindings.
fn check_attestations(
    state: &Path,
    image: &str,
    kernel: &Path,
    spec: &Path,
    a: &Path,
    first: &serde_json::Value,
    second: &serde_json::Value,
) {
    let files = statement_files(a, "intoto");
    assert_eq!(first["provenance"].as_str(), files[0].to_str());
    assert_eq!(first["sbom"].as_str(), files[1].to_str());
    for (x, y) in files.iter().zip(statement_files(
        Path::new(second["output"].as_str().unwrap()),
        "intoto",
    )) {
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(&y).unwrap(),
            "two exports wrote different {}",
            x.display()
        );
    }
    // The second export attached nothing new.
    for att in second["attached"].as_array().unwrap() {
        assert_eq!(att["new"], false, "{att}");
    }
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let (prov, sbom) = (read(&files[0]), read(&files[1]));
    let disk_sha256 = sha256_file(a);
    for s in [&prov, &sbom] {
        assert_eq!(s["subject"][0]["name"], "web.raw");
        assert_eq!(s["subject"][0]["digest"]["sha256"], disk_sha256.as_str());
    }
    // The provenance: the image, the kernel file, kiln as the init, the stub and every
    // module by digest; the command line and the verity root hash.
    let def = &prov["predicate"]["buildDefinition"];
    assert_eq!(def["buildType"], "https://kiln.dev/machine-export/v1");
    assert_eq!(def["externalParameters"]["format"], "raw");
    assert_eq!(
        def["externalParameters"]["spec"]["digest"]["sha256"],
        sha256_file(spec)
    );
    assert_eq!(def["internalParameters"]["cmdline"], first["cmdline"]);
    assert_eq!(
        def["internalParameters"]["verity"]["rootHash"],
        first["root_hash"]
    );
    let deps = def["resolvedDependencies"].as_array().unwrap();
    let dep = |name: &str| {
        deps.iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {deps:?}"))
    };
    assert_eq!(
        dep("image")["digest"]["sha256"],
        image.trim_start_matches("sha256:")
    );
    let kernel_name = kernel.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        dep(&format!("kernel:{kernel_name}"))["digest"]["sha256"],
        sha256_file(kernel)
    );
    if kernel_name.ends_with(".deb") {
        assert!(
            dep(&format!("kernel:{kernel_name}"))["annotations"]["debianPackage"]
                .as_str()
                .unwrap()
                .starts_with("pkg:deb/debian/linux-image-")
        );
    }
    // The init is the kiln binary that ran the export, named by the digest of the file as
    // given (the disk holds it stripped).
    assert_eq!(
        dep("init:kiln")["digest"]["sha256"],
        sha256_file(Path::new(env!("CARGO_BIN_EXE_kiln")))
    );
    assert_eq!(
        dep("stub")["digest"]["sha256"],
        sha256_file(Path::new(STUB))
    );
    let modules: Vec<&str> = deps
        .iter()
        .filter_map(|d| d["name"].as_str()?.strip_prefix("module:"))
        .collect();
    let loaded: Vec<&str> = first["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(modules, loaded);
    // The SBOM: the disk by its digest, containing the image, whose own SBOM it names.
    let doc = &sbom["predicate"];
    assert_eq!(
        doc["packages"][0]["checksums"][0]["checksumValue"],
        disk_sha256
    );
    assert_eq!(doc["packages"][1]["versionInfo"], image);
    assert!(
        doc["externalDocumentRefs"][0]["spdxDocument"]
            .as_str()
            .unwrap()
            .ends_with(image.trim_start_matches("sha256:")),
        "{doc}"
    );
    // Both attached to the image, as the statements written.
    let attached = referrers(state, image);
    for (att, file) in first["attached"].as_array().unwrap().iter().zip(&files) {
        let r = attached
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["manifest"] == att["manifest"])
            .unwrap_or_else(|| panic!("{att} is not among {attached}"));
        assert_eq!(r["payload"], format!("sha256:{}", sha256_file(file)));
    }
    if attest_venv() {
        let doc = a.parent().unwrap().join("disk.spdx.json");
        std::fs::write(&doc, serde_json::to_vec_pretty(&sbom["predicate"]).unwrap()).unwrap();
        common::assert_spdx_tools_accept(&doc);
        // No run metadata: the disk's provenance has no time and no invocation id.
        common::assert_in_toto_accepts_provenance(&files[0], false);
    }
}

/// A signed qcow2 export's envelopes: securesystemslib verifies each with the key, and the
/// provenance inside names the qcow2 file by digest and the raw disk as a byproduct.
fn check_signed_qcow2(q: &Path, out: &serde_json::Value, public: &str, raw_sha256: &str) {
    let fingerprint = out["signed_by"].as_str().unwrap();
    let files = statement_files(q, "dsse");
    assert!(!statement_files(q, "intoto")[0].exists());
    let dir = q.parent().unwrap();
    let payloads: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            let payload =
                common::sslib_verify(dir, &std::fs::read(f).unwrap(), public, fingerprint)
                    .unwrap_or_else(|| panic!("securesystemslib refused {}", f.display()));
            serde_json::from_slice(&payload).unwrap()
        })
        .collect();
    for p in &payloads {
        assert_eq!(p["subject"][0]["digest"]["sha256"], sha256_file(q));
    }
    let byproduct = &payloads[0]["predicate"]["runDetails"]["byproducts"][0];
    assert_eq!(byproduct["digest"]["sha256"], raw_sha256);
    // Attached too: each statement and its envelope.
    let kinds: Vec<&str> = out["attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["artifact_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "application/vnd.in-toto+json",
            "application/vnd.dsse.envelope.v1+json",
            "application/vnd.in-toto+json",
            "application/vnd.dsse.envelope.v1+json"
        ]
    );
}

#[test]
fn example_disk_is_reproducible_and_verity_sealed() {
    let Some(kernel) = prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = common::write_spec(dir.path(), common::free_port(), "v1", 1);
    let image = common::build(&state, &spec);

    let started = std::time::Instant::now();
    // Two exports under one file name in two directories: the statements name the disk
    // by its file name, so these must be byte for byte the same.
    let a = dir.path().join("a/web.raw");
    let first = export(&state, &image, &kernel, &spec, "raw", &a);
    eprintln!(
        "exported the example disk in {:.2}s (kiln's own {:.2}s, of which the disk {:.2}s; {} bytes)",
        started.elapsed().as_secs_f64(),
        first["seconds"].as_f64().unwrap(),
        first["export_seconds"].as_f64().unwrap(),
        first["size"]
    );
    let referrers_after_one = referrers(&state, &image);
    let b = dir.path().join("b/web.raw");
    let second = export(&state, &image, &kernel, &spec, "raw", &b);
    assert_eq!(first["sha256"], second["sha256"], "two exports differ");
    assert_eq!(first["sha256"].as_str().unwrap(), sha256_file(&a));
    assert_eq!(sha256_file(&a), sha256_file(&b));
    check_attestations(&state, &image, &kernel, &spec, &a, &first, &second);
    // The same bytes attached again are the same referrers: the store does not grow.
    assert_eq!(referrers(&state, &image), referrers_after_one);

    // qcow2, signed: qemu-img accepts it and finds the raw disk's content in it; its
    // provenance names the raw disk by digest, and the envelopes verify.
    let q = dir.path().join("d.qcow2");
    let third = if attest_venv() {
        let key = dir.path().join("signing.key");
        let public = kiln(&state)
            .args(["key", "generate"])
            .arg(&key)
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        let public = String::from_utf8(public).unwrap();
        let extra = ["--sign".as_ref(), "--key".as_ref(), key.as_os_str()];
        let third = export_with(&state, &image, &kernel, &spec, "qcow2", &q, &extra);
        check_signed_qcow2(&q, &third, public.trim(), &sha256_file(&a));
        third
    } else {
        export(&state, &image, &kernel, &spec, "qcow2", &q)
    };
    assert_eq!(third["root_hash"], first["root_hash"]);
    assert_eq!(third["raw_sha256"], first["sha256"]);
    run(Command::new("qemu-img").arg("check").arg(&q));
    run(Command::new("qemu-img").arg("compare").arg(&a).arg(&q));

    // The three partitions, by type and name.
    let table: serde_json::Value =
        serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(&a))).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    let shape: Vec<(&str, &str)> = parts
        .iter()
        .map(|p| (p["type"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        shape,
        [
            ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "esp"),
            ("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "root"),
            ("2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5", "root-verity"),
        ]
    );
    let part = |i: usize, name: &str| {
        let p = &parts[i];
        let to = dir.path().join(name);
        extract(
            &a,
            p["start"].as_u64().unwrap(),
            p["size"].as_u64().unwrap(),
            &to,
        );
        to
    };
    let (esp, root, hash) = (part(0, "esp.img"), part(1, "root.img"), part(2, "hash.img"));

    // dm-verity: the root verifies against the printed root hash; one flipped byte does not.
    let root_hash = first["root_hash"].as_str().unwrap();
    let verify = |data: &Path| {
        Command::new("veritysetup")
            .args(["verify", "--no-superblock"])
            .arg(format!("--data-blocks={}", first["data_blocks"]))
            .arg(format!("--salt={}", first["salt"].as_str().unwrap()))
            .arg(data)
            .arg(&hash)
            .arg(root_hash)
            .output()
            .unwrap()
    };
    // The root filesystem: `/` and the app open to the app's user (65534), owned by root.
    for (path, mode) in [("/", "0755"), ("/hello", "0755")] {
        let info = run(Command::new("dump.erofs")
            .arg(format!("--path={path}"))
            .arg(&root));
        assert!(
            info.contains(&format!("Uid: 0   Gid: 0  Access: {mode}/")),
            "{path}: {info}"
        );
    }
    let ok = verify(&root);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let mut bytes = std::fs::read(&root).unwrap();
    bytes[5000] ^= 1;
    let flipped = dir.path().join("flipped.img");
    std::fs::write(&flipped, &bytes).unwrap();
    assert!(
        !verify(&flipped).status.success(),
        "a flipped byte verified"
    );

    // The ESP's unified kernel image: the command line with the root hash, and the
    // initramfs with kiln as /init, the modules and the app's machine.json.
    let uki = dir.path().join("uki.efi");
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&esp)
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .arg(&uki));
    let cmdline = dir.path().join("cmdline");
    let initrd = dir.path().join("initrd");
    run(Command::new("objcopy")
        .arg(format!("--dump-section=.cmdline={}", cmdline.display()))
        .arg(format!("--dump-section=.initrd={}", initrd.display()))
        .arg(&uki)
        .arg(dir.path().join("uki.out")));
    let cmdline = std::fs::read_to_string(&cmdline).unwrap();
    assert_eq!(cmdline, first["cmdline"].as_str().unwrap());
    assert!(
        cmdline.contains(&format!("kiln.verity={root_hash} ")),
        "{cmdline}"
    );
    let listing = run(Command::new("cpio")
        .args(["-t", "--quiet", "-F"])
        .arg(&initrd));
    for entry in [
        "init",
        "dev/console",
        "kiln/machine.json",
        "lib/modules/virtio_blk.ko",
        "lib/modules/dm-verity.ko",
    ] {
        assert!(
            listing.lines().any(|l| l == entry),
            "{entry} not in the initramfs: {listing}"
        );
    }
    let json = run(Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "-F"])
        .arg(&initrd)
        .arg("kiln/machine.json"));
    let machine: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(machine["argv"], serde_json::json!(["/hello"]));
    assert!(
        machine["env"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("HELLO_VERSION=v1")),
        "{machine}"
    );
    assert_eq!(machine["writable"], serde_json::json!(["/tmp"]));
    assert_eq!(machine["stop_grace_ms"], 2000);
    assert_eq!(machine["modules"], first["modules"]);
}

#[test]
fn disk_formats_need_a_kernel_and_others_refuse_one() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("d.raw");
    // (the arguments after `image export web:latest`, what the usage error says)
    let refused: &[(&[&str], &str)] = &[
        (&["--format", "raw"], "need --kernel"),
        (
            &["--format", "oci", "--kernel", "/boot/vmlinuz"],
            "--kernel is for --format raw or qcow2",
        ),
        (
            &[
                "--format",
                "qcow2",
                "--kernel",
                "/boot/vmlinuz",
                "--ip",
                "10.0.2.15/24,10.0.2.2 init=/bin/sh",
            ],
            "is not dhcp or ADDR/PREFIX,GATEWAY",
        ),
        (
            &["--format", "oci", "--status-port", "80"],
            "--status-port is for --format raw or qcow2",
        ),
        (
            &[
                "--format",
                "oci",
                "--secure-boot-key",
                "k",
                "--secure-boot-cert",
                "c",
            ],
            "--secure-boot-key is for --format raw or qcow2",
        ),
        (
            &[
                "--format",
                "raw",
                "--kernel",
                "/boot/vmlinuz",
                "--secure-boot-key",
                "k",
            ],
            "--secure-boot-cert <CERT.pem>",
        ),
        // Signing is of a disk's attestations: an image format has none to sign.
        (
            &["--format", "oci", "--sign", "--key", "k"],
            "--sign is for --format raw or qcow2",
        ),
        (&["--format", "raw", "--sign"], "--key <PATH>"),
    ];
    for (args, says) in refused {
        kiln(&state)
            .env_remove("KILN_SIGNING_KEY")
            .args(["image", "export", "web:latest"])
            .args(*args)
            .arg("-o")
            .arg(&out)
            .assert()
            .code(2)
            .stderr(predicates::str::contains(*says));
    }
    assert!(!out.exists());
}

/// The accelerator QEMU boots with: `KILN_QEMU_ACCEL` when set; else KVM where `/dev/kvm`
/// exists and a probe shows it works; else TCG. `/dev/kvm` alone proves nothing: where
/// KVM is nested (this project's CI machines are Firecracker guests) QEMU aborts setting
/// an MSR, or the guest crawls, so the probe must see the firmware print within 10 s.
fn accel() -> String {
    static CHOSEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHOSEN
        .get_or_init(|| {
            if let Ok(a) = std::env::var("KILN_QEMU_ACCEL") {
                return a;
            }
            let works = Path::new("/dev/kvm").exists() && kvm_boots_firmware();
            let chosen = if works { "kvm" } else { "tcg" };
            eprintln!("machine image: /dev/kvm usable: {works}; booting with {chosen}");
            chosen.to_owned()
        })
        .clone()
}

/// Whether OVMF under KVM writes to its serial console within 10 s.
fn kvm_boots_firmware() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("probe.console");
    let Ok(mut child) = Command::new("qemu-system-x86_64")
        .args([
            "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256",
        ])
        .args([
            "-bios",
            OVMF,
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut printed = false;
    while std::time::Instant::now() < deadline {
        if std::fs::metadata(&console).is_ok_and(|m| m.len() > 0) {
            printed = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    printed
}

/// A QEMU booting a disk, its serial console in a file, its monitor on a socket.
struct Vm {
    child: std::process::Child,
    console: PathBuf,
    monitor: PathBuf,
    started: std::time::Instant,
}

impl Vm {
    /// Boots `disk` with the guest's port 8080 at `port` and its status port 9901 at
    /// `status` on the host's loopback, and `extra` arguments for QEMU. With `secure_boot`,
    /// the firmware is Debian's OVMF with Secure Boot on and its snakeoil key enrolled
    /// (PK, KEK and db), so only an image signed with that key boots.
    fn boot(
        disk: &Path,
        dir: &Path,
        name: &str,
        (port, status): (u16, u16),
        secure_boot: bool,
        extra: &[String],
    ) -> Vm {
        let console = dir.join(format!("{name}.console"));
        let monitor = dir.join(format!("{name}.monitor"));
        let firmware: Vec<String> = if secure_boot {
            let vars = dir.join(format!("{name}.vars.fd"));
            std::fs::copy(SNAKEOIL_VARS, &vars).unwrap();
            vec![
                "-machine".into(),
                "q35,smm=on".into(),
                "-global".into(),
                "driver=cfi.pflash01,property=secure,value=on".into(),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={SNAKEOIL_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            ]
        } else {
            vec!["-machine".into(), "q35".into(), "-bios".into(), OVMF.into()]
        };
        let child = Command::new("qemu-system-x86_64")
            .args(&firmware)
            .args(["-accel", &accel(), "-m", "512", "-smp", "1"])
            // KVM's default CPU model lacks features the host has; TCG keeps QEMU's.
            .args(if accel() == "kvm" {
                &["-cpu", "host"][..]
            } else {
                &[]
            })
            .args(["-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                disk.display()
            ))
            .args([
                "-netdev",
                &format!(
                    "user,id=n,hostfwd=tcp:127.0.0.1:{port}-:8080,hostfwd=tcp:127.0.0.1:{status}-:9901"
                ),
            ])
            .args(["-device", "virtio-net-pci,netdev=n"])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        Vm {
            child,
            console,
            monitor,
            started: std::time::Instant::now(),
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until `done` says yes about the console (or the VM stops, or `limit` passes).
    fn wait_console(&mut self, limit: Duration, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let text = self.console();
            if done(&text) {
                return;
            }
            let exited = self.child.try_wait().unwrap().is_some();
            assert!(
                !exited && std::time::Instant::now() < deadline,
                "{what}: not seen on the console ({}):\n{text}",
                if exited {
                    "the VM stopped"
                } else {
                    "timed out"
                }
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for `message` on the console, then for the machine to power itself off.
    fn refuses(&mut self, what: &str, message: &str) {
        self.wait_console(Duration::from_secs(300), what, |c| c.contains(message));
        assert!(
            self.wait_exit(Duration::from_secs(60)),
            "{what}: it did not power off:\n{}",
            self.console()
        );
    }

    /// Waits for QEMU to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Sends `command` to QEMU's monitor and waits for its prompt to come back, so that the
    /// command was read before the connection closes (QEMU can drop what a client wrote just
    /// before hanging up).
    fn monitor(&self, command: &str) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.monitor).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut seen = Vec::new();
        let mut prompts = |s: &mut std::os::unix::net::UnixStream, want: usize| {
            let mut buf = [0u8; 4096];
            while seen.windows(7).filter(|w| w == b"(qemu) ").count() < want {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
        };
        prompts(&mut s, 1);
        writeln!(s, "{command}").unwrap();
        prompts(&mut s, 2);
    }

    /// Presses the ACPI power button until QEMU exits (a press the guest takes before it
    /// listens is lost), for at most `limit`.
    fn power_off(&mut self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            self.monitor("system_powerdown");
            if self.wait_exit(Duration::from_secs(15)) {
                return true;
            }
        }
        false
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request through the VM's forwarded port: the status and the body, or `None`
/// while nothing answers.
fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vm\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let (_, body) = out.split_once("\r\n\r\n")?;
    Some((status, body.to_owned()))
}

const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// Debian's OVMF for Secure Boot with its test ("snakeoil") key enrolled, and that key.
const SNAKEOIL_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd";
const SNAKEOIL_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd";
const SNAKEOIL_KEY: &str = "/usr/share/ovmf/PkKek-1-snakeoil.key";
const SNAKEOIL_CERT: &str = "/usr/share/ovmf/PkKek-1-snakeoil.pem";

#[test]
fn example_disk_boots_serves_stays_sealed_and_powers_off() {
    let Some(kernel) = prerequisites() else {
        return;
    };
    if !on_path("qemu-system-x86_64")
        || !Path::new(OVMF).is_file()
        || !Path::new(SNAKEOIL_VARS).is_file()
    {
        skip("apt-get install qemu-system-x86 ovmf");
        return;
    }
    if !on_path("sbverify") || !on_path("openssl") {
        skip("apt-get install sbsigntool openssl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The app as a sealed machine: limits, a health check, and two secrets the platform
    // gives at boot (the page it serves from /run/secrets, and its version in its env).
    let spec = common::write_spec_with(
        dir.path(),
        common::free_port(),
        r#"HELLO_PAGE = "/run/secrets/GREETING""#,
        1,
        "[deploy]\nkeep_previous = \"10m\"\n",
    );
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "[service]\n",
        "[service]\nmemory = \"48MiB\"\ncpus = 0.5\npids = 64\n",
    );
    let text = format!(
        "{text}\n[service.secrets]\nGREETING = {{ env = \"KILN_TEST_GREETING\" }}\nHELLO_VERSION = {{ env = \"KILN_TEST_VERSION\", expose_env = true }}\n"
    );
    std::fs::write(&spec, text).unwrap();
    let image = common::build(&state, &spec);
    let disk = dir.path().join("disk.raw");
    export(&state, &image, &kernel, &spec, "raw", &disk);

    // Signed for Secure Boot with the key Debian's test firmware trusts (its snakeoil key,
    // decrypted here: kiln takes an unencrypted PEM key). Signed twice: the same bytes.
    let key = dir.path().join("db.key");
    run(Command::new("openssl")
        .args([
            "pkey",
            "-passin",
            "pass:snakeoil",
            "-in",
            SNAKEOIL_KEY,
            "-out",
        ])
        .arg(&key));
    let sign_with = [
        "--secure-boot-key".as_ref(),
        key.as_os_str(),
        "--secure-boot-cert".as_ref(),
        SNAKEOIL_CERT.as_ref(),
    ];
    let signed = dir.path().join("signed.raw");
    let exported = export_with(&state, &image, &kernel, &spec, "raw", &signed, &sign_with);
    let again = dir.path().join("signed-again.raw");
    let second = export_with(&state, &image, &kernel, &spec, "raw", &again, &sign_with);
    assert_eq!(
        exported["sha256"], second["sha256"],
        "a signed export is reproducible"
    );
    assert_eq!(sha256_file(&signed), sha256_file(&again));
    // The disk's provenance names the certificate whose key signed it.
    let der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in", SNAKEOIL_CERT])
        .output()
        .unwrap();
    assert!(der.status.success());
    let provenance = |disk: &Path| -> serde_json::Value {
        let mut path = disk.as_os_str().to_owned();
        path.push(".provenance.intoto.json");
        let text = std::fs::read_to_string(PathBuf::from(path)).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let internal = |p: &serde_json::Value| {
        p["predicate"]["buildDefinition"]["internalParameters"]["secureBoot"].clone()
    };
    assert_eq!(
        internal(&provenance(&signed)),
        serde_json::json!({"signed": true, "certificateSha256": hex::encode(Sha256::digest(&der.stdout))})
    );
    assert_eq!(
        internal(&provenance(&disk)),
        serde_json::json!({"signed": false})
    );
    std::fs::remove_file(&again).unwrap();
    // sbsigntool's verifier accepts the unified kernel image's signature with that
    // certificate, and not with another.
    let uki = dir.path().join("BOOTX64.EFI");
    run(Command::new("mcopy")
        .arg("-i")
        .arg(format!("{}@@1048576", signed.display()))
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .arg(&uki));
    let ok = Command::new("sbverify")
        .args(["--cert", SNAKEOIL_CERT])
        .arg(&uki)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let other_key = dir.path().join("other.key");
    let other_cert = dir.path().join("other.pem");
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not the db key", "-keyout"])
        .arg(&other_key)
        .arg("-out")
        .arg(&other_cert));
    let wrong = Command::new("sbverify")
        .arg("--cert")
        .arg(&other_cert)
        .arg(&uki)
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "verified with another certificate");

    let greeting = dir.path().join("greeting");
    std::fs::write(&greeting, "a secret greeting\n").unwrap();
    let secrets = [
        "-fw_cfg".to_owned(),
        format!("name=opt/kiln/secrets/GREETING,file={}", greeting.display()),
        "-fw_cfg".to_owned(),
        "name=opt/kiln/secrets/HELLO_VERSION,string=v-from-fw-cfg".to_owned(),
    ];

    // It boots under Secure Boot, through OVMF and the signed unified kernel image, gets its
    // address from QEMU's DHCP server, and the app answers with the page its secret holds.
    let (port, status_port) = (common::free_port(), common::free_port());
    let ports = (port, status_port);
    let mut vm = Vm::boot(&signed, dir.path(), "good", ports, true, &secrets);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let answered = loop {
        if let Some((200, body)) = http(port, "GET", "/") {
            break body;
        }
        assert!(
            vm.child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline,
            "the app never answered:\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "machine image ({} accel): first 200 {:.1}s after qemu started",
        accel(),
        vm.started.elapsed().as_secs_f64()
    );
    assert_eq!(
        answered, "a secret greeting",
        "one trailing newline dropped"
    );
    let (status, version) = http(port, "GET", "/version").unwrap();
    assert_eq!(
        (status, version.as_str()),
        (200, "v-from-fw-cfg\n"),
        "expose_env"
    );
    let console = vm.console();
    assert!(
        console.contains("kiln: eth0 10.0.2.15/24 via 10.0.2.2 (dhcp, DNS 10.0.2.3)"),
        "{console}"
    );

    // Sealed: the root is read-only, the writable paths are not, the secrets are not.
    let (status, body) = http(port, "POST", "/write?path=/etc-was-written").unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("Read-only file system"), "{body}");
    let (status, body) = http(port, "POST", "/write?path=/tmp/scratch").unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(port, "POST", "/write?path=/run/secrets/GREETING").unwrap();
    assert_eq!(status, 500, "{body}");

    // The init's status endpoint: healthy once the spec's check passes, the image and root
    // hash it booted, and the limits as the kernel holds them for the app's cgroup.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let report: serde_json::Value = loop {
        match http(status_port, "GET", "/health") {
            Some((200, body)) => break serde_json::from_str(&body).unwrap(),
            other => assert!(
                std::time::Instant::now() < deadline,
                "the status endpoint never said healthy: {other:?}\n{}",
                vm.console()
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(report["health"], "healthy", "{report}");
    assert_eq!(report["secure_boot"], true, "{report}");
    assert!(image.starts_with("sha256:"), "{image}");
    assert_eq!(report["image"], image, "{report}");
    assert_eq!(report["root_hash"], exported["root_hash"], "{report}");
    assert_eq!(report["network"], "dhcp", "{report}");
    assert_eq!(report["address"], "10.0.2.15/24", "{report}");
    assert_eq!(
        report["cgroup"]["memory.max"],
        (48u64 << 20).to_string(),
        "{report}"
    );
    assert_eq!(report["cgroup"]["pids.max"], "64", "{report}");
    assert_eq!(report["cgroup"]["cpu.max"], "50000 100000", "{report}");
    let used: u64 = report["cgroup"]["memory.current"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(used > 0 && used < 48 << 20, "{report}");
    assert_eq!(
        http(status_port, "GET", "/").map(|(s, _)| s),
        Some(404),
        "only /health"
    );

    // An ACPI shutdown stops the app and powers the machine off.
    assert!(
        vm.power_off(Duration::from_secs(120)),
        "no power off:\n{}",
        vm.console()
    );
    let console = vm.console();
    assert!(console.contains("kiln:"), "{console}");
    drop(vm);

    // One byte flipped in the root partition: the boot refuses the root.
    let layout: serde_json::Value =
        serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(&signed))).unwrap();
    let root = &layout["partitiontable"]["partitions"][1];
    let start = root["start"].as_u64().unwrap() * 512;
    let tampered = dir.path().join("tampered.raw");
    std::fs::copy(&signed, &tampered).unwrap();
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tampered)
            .unwrap();
        let at = start + 4096 * 3 + 17;
        f.seek(SeekFrom::Start(at)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[b[0] ^ 0x01]).unwrap();
    }
    let free = || (common::free_port(), common::free_port());
    let mut vm = Vm::boot(&tampered, dir.path(), "tampered", free(), true, &secrets);
    vm.refuses("the verity refusal", "does not match its root hash");
    drop(vm);

    std::fs::remove_file(&tampered).unwrap();

    // Two machines at once: the unsigned disk under Secure Boot, which the firmware refuses
    // to start; and the signed one without one of its secrets, whose boot stops naming it
    // and how to give it.
    let mut unsigned = Vm::boot(&disk, dir.path(), "unsigned", free(), true, &secrets);
    let mut vm = Vm::boot(
        &signed,
        dir.path(),
        "no-secret",
        free(),
        true,
        &secrets[..2],
    );
    vm.refuses(
        "the missing secret",
        "kiln: reading the secrets: secret HELLO_VERSION: not given (run the machine with -fw_cfg name=opt/kiln/secrets/HELLO_VERSION,file=PATH)",
    );
    unsigned.wait_console(Duration::from_secs(300), "the firmware's refusal", |c| {
        c.contains("Access Denied")
    });
    assert!(
        !unsigned.console().contains("kiln:"),
        "{}",
        unsigned.console()
    );
}
