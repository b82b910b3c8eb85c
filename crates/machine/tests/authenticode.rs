//! Authenticode signatures against the standard tools: `sbverify` (sbsigntool), which
//! recomputes the image's digest, accepts ours with the signing certificate and refuses them
//! with another, and our `digest()` of an image `sbsign` signed is the one `sbverify` accepts
//! there too — for systemd-boot's stub and for a unified kernel image built the way kiln
//! builds it, with and without a gap between sections. Signing is deterministic. And the
//! judge that counts: OVMF with Secure Boot on and Debian's snakeoil certificate enrolled
//! starts our signed image and refuses one signed by another key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_machine::authenticode::{self, Error, Signer};
use kiln_machine::tools::STUB;
use kiln_machine::uki;

const SNAKEOIL_KEY: &str = "/usr/share/ovmf/PkKek-1-snakeoil.key";
const SNAKEOIL_CERT: &str = "/usr/share/ovmf/PkKek-1-snakeoil.pem";

/// False with a note when a tool is missing, a panic under `CI=true`.
fn present() -> bool {
    let tools = [
        ("sbsign", "sbsigntool"),
        ("sbverify", "sbsigntool"),
        ("openssl", "openssl"),
        ("objcopy", "binutils"),
        ("objdump", "binutils"),
    ];
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|&(_, package)| package)
        .collect();
    if !Path::new(STUB).exists() {
        missing.push("systemd-boot-efi");
    }
    if !Path::new(SNAKEOIL_KEY).exists() {
        missing.push("ovmf");
    }
    missing.dedup();
    if missing.is_empty() {
        return true;
    }
    let why = format!("apt-get install {}", missing.join(" "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the Authenticode test's tools are missing: {why}");
    }
    eprintln!("note: skipping the Authenticode test ({why})");
    false
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The keys of the test: Debian's OVMF snakeoil key (decrypted; its certificate is enrolled
/// in `OVMF_VARS_4M.snakeoil.fd`) and a fresh 2048-bit key with a self-signed certificate.
struct Keys {
    snakeoil_key: PathBuf,
    fresh_key: PathBuf,
    fresh_cert: PathBuf,
}

fn keys(dir: &Path) -> Keys {
    let snakeoil_key = dir.join("snakeoil.key");
    ok(
        "openssl",
        &[
            "pkey",
            "-passin",
            "pass:snakeoil",
            "-in",
            SNAKEOIL_KEY,
            "-out",
            s(&snakeoil_key),
        ],
    );
    let fresh_key = dir.join("fresh.key");
    let fresh_cert = dir.join("fresh.pem");
    ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=kiln test db key",
            "-days",
            "2",
            "-keyout",
            s(&fresh_key),
            "-out",
            s(&fresh_cert),
        ],
    );
    Keys {
        snakeoil_key,
        fresh_key,
        fresh_cert,
    }
}

fn signer(key: &Path, cert: &Path) -> Signer {
    Signer::from_pem(
        &std::fs::read_to_string(key).unwrap(),
        &std::fs::read_to_string(cert).unwrap(),
    )
    .unwrap()
}

/// A unified kernel image made by `uki::build`, as kiln makes it: the stub with an
/// os-release, a command line, a "kernel" and an "initramfs" of odd sizes.
fn unified_kernel_image(dir: &Path) -> PathBuf {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd");
    let mut x: u32 = 1;
    let mut bytes = |n: usize| {
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect::<Vec<u8>>()
    };
    std::fs::write(&kernel, bytes(300_001)).unwrap();
    std::fs::write(&initrd, bytes(70_003)).unwrap();
    let work = dir.join("uki-work");
    std::fs::create_dir_all(&work).unwrap();
    let out = dir.join("uki.efi");
    let parts = uki::Parts {
        stub: Path::new(STUB),
        kernel: &kernel,
        initrd: &initrd,
        cmdline: "console=ttyS0 roothash=0123456789abcdef verity=on",
    };
    uki::build(
        Path::new("objdump"),
        Path::new("objcopy"),
        &parts,
        None,
        &work,
        &out,
    )
    .unwrap();
    out
}

/// The image with 0x200 bytes of 0xcc inserted after its first section (and the later
/// sections' file offsets moved up): a gap between sections that no hash covers, in an
/// image that still runs.
fn with_gap(pe: &[u8]) -> Vec<u8> {
    let u16_at = |at: usize| u16::from_le_bytes([pe[at], pe[at + 1]]) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(pe[at..at + 4].try_into().unwrap());
    let lfanew = u32_at(0x3c) as usize;
    let count = u16_at(lfanew + 6);
    let table = lfanew + 24 + u16_at(lfanew + 20);
    let first_end = u32_at(table + 20) + u32_at(table + 16);
    let mut out = pe[..first_end as usize].to_vec();
    out.extend_from_slice(&[0xcc; 0x200]);
    out.extend_from_slice(&pe[first_end as usize..]);
    for i in 0..count {
        let pointer = table + 40 * i + 20;
        if u32_at(pointer) >= first_end {
            out[pointer..pointer + 4].copy_from_slice(&(u32_at(pointer) + 0x200).to_le_bytes());
        }
    }
    // The COFF symbol table, if any, moves too.
    let symbols = lfanew + 12;
    if u32_at(symbols) >= first_end {
        out[symbols..symbols + 4].copy_from_slice(&(u32_at(symbols) + 0x200).to_le_bytes());
    }
    out
}

/// Signs `image` and checks the result with `sbverify` and against
/// `sbsign`'s signature of the same image.
fn check(name: &str, image: &[u8], dir: &Path, keys: &Keys) {
    let unsigned = dir.join(format!("{name}.efi"));
    std::fs::write(&unsigned, image).unwrap();
    let snakeoil = signer(&keys.snakeoil_key, Path::new(SNAKEOIL_CERT));
    let signed = authenticode::sign(image, &snakeoil).unwrap();
    let signed_path = dir.join(format!("{name}.signed.efi"));
    std::fs::write(&signed_path, &signed).unwrap();

    // Deterministic: the same bytes again, and a different key gives different bytes.
    assert_eq!(authenticode::sign(image, &snakeoil).unwrap(), signed);
    let fresh = signer(&keys.fresh_key, &keys.fresh_cert);
    let fresh_signed = authenticode::sign(image, &fresh).unwrap();
    assert_ne!(fresh_signed, signed);

    // sbverify: OK with the signing certificate, refused with another.
    let out = ok("sbverify", &["--cert", SNAKEOIL_CERT, s(&signed_path)]);
    assert!(out.contains("Signature verification OK"), "{name}: {out}");
    let other = run(
        "sbverify",
        &["--cert", s(&keys.fresh_cert), s(&signed_path)],
    );
    assert!(
        !other.status.success(),
        "{name}: sbverify accepted another certificate"
    );
    let fresh_path = dir.join(format!("{name}.fresh.efi"));
    std::fs::write(&fresh_path, &fresh_signed).unwrap();
    ok("sbverify", &["--cert", s(&keys.fresh_cert), s(&fresh_path)]);

    let ours = hex::encode(authenticode::digest(&signed).unwrap());

    // sbsign's signature of the same image carries the same digest.
    let sbsigned = dir.join(format!("{name}.sbsign.efi"));
    ok(
        "sbsign",
        &[
            "--key",
            s(&keys.snakeoil_key),
            "--cert",
            SNAKEOIL_CERT,
            "--output",
            s(&sbsigned),
            s(&unsigned),
        ],
    );
    ok("sbverify", &["--cert", SNAKEOIL_CERT, s(&sbsigned)]);
    let sbsigned = std::fs::read(&sbsigned).unwrap();
    assert_eq!(hex::encode(authenticode::digest(&sbsigned).unwrap()), ours);

    // Signed once is enough.
    assert!(matches!(
        authenticode::sign(&signed, &snakeoil),
        Err(Error::AlreadySigned { .. })
    ));
}

#[test]
fn signatures_verify_and_match_sbsign() {
    if !present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let stub = std::fs::read(STUB).unwrap();
    check("stub", &stub, dir.path(), &keys);
    let uki = std::fs::read(unified_kernel_image(dir.path())).unwrap();
    check("uki", &uki, dir.path(), &keys);
    check("uki-with-gap", &with_gap(&uki), dir.path(), &keys);
}

#[test]
fn keys_pkcs1_and_pkcs8_and_refused() {
    if !present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let cert = std::fs::read_to_string(&keys.fresh_cert).unwrap();
    // The same key as PKCS#1 (`RSA PRIVATE KEY`) signs the same bytes.
    let pkcs1 = dir.path().join("fresh.pkcs1.key");
    ok(
        "openssl",
        &[
            "pkey",
            "-traditional",
            "-in",
            s(&keys.fresh_key),
            "-out",
            s(&pkcs1),
        ],
    );
    let pkcs1 = std::fs::read_to_string(&pkcs1).unwrap();
    assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let stub = std::fs::read(STUB).unwrap();
    assert_eq!(
        authenticode::sign(&stub, &Signer::from_pem(&pkcs1, &cert).unwrap()).unwrap(),
        authenticode::sign(&stub, &signer(&keys.fresh_key, &keys.fresh_cert)).unwrap()
    );

    // The encrypted snakeoil key, as Debian ships it.
    let encrypted = std::fs::read_to_string(SNAKEOIL_KEY).unwrap();
    let snakeoil_cert = std::fs::read_to_string(SNAKEOIL_CERT).unwrap();
    let err = Signer::from_pem(&encrypted, &snakeoil_cert).unwrap_err();
    assert!(matches!(err, Error::EncryptedKey), "{err}");
    assert!(err.to_string().contains("openssl pkey"));
    // An encrypted PKCS#1 key (OpenSSL's traditional format).
    let traditional = dir.path().join("encrypted.pkcs1.key");
    ok(
        "openssl",
        &[
            "rsa",
            "-traditional",
            "-aes128",
            "-passout",
            "pass:x",
            "-in",
            s(&keys.fresh_key),
            "-out",
            s(&traditional),
        ],
    );
    let traditional = std::fs::read_to_string(&traditional).unwrap();
    assert!(matches!(
        Signer::from_pem(&traditional, &cert),
        Err(Error::EncryptedKey)
    ));

    // A key with another key's certificate.
    let snakeoil_key = std::fs::read_to_string(&keys.snakeoil_key).unwrap();
    assert!(matches!(
        Signer::from_pem(&snakeoil_key, &cert),
        Err(Error::KeyMismatch)
    ));
    // A chain: one certificate is the contract.
    let chain = format!("{snakeoil_cert}{cert}");
    let err = Signer::from_pem(&snakeoil_key, &chain)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the PEM holds 2 certificates"), "{err}");
    // A certificate where the key should be, and the other way round.
    let err = Signer::from_pem(&cert, &cert).unwrap_err().to_string();
    assert!(err.contains("PEM `CERTIFICATE`"), "{err}");
    let err = Signer::from_pem(&snakeoil_key, &snakeoil_key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a `CERTIFICATE`"), "{err}");
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd";

/// What the firmware did with the image on the disk.
#[derive(Debug, PartialEq, Eq)]
enum Boot {
    /// It loaded the image (the signature was accepted) and started it.
    Started,
    /// It refused to load it.
    Refused,
}

/// Boots OVMF with Secure Boot on and Debian's snakeoil certificate in `db` from an ESP
/// whose `EFI/BOOT/BOOTX64.EFI` is `image`, and reads from its serial console whether the
/// firmware's boot manager loaded the image.
fn firmware(image: &[u8], dir: &Path) -> Boot {
    let esp = dir.join("esp");
    std::fs::create_dir_all(esp.join("EFI/BOOT")).unwrap();
    std::fs::write(esp.join("EFI/BOOT/BOOTX64.EFI"), image).unwrap();
    let vars = dir.join("vars.fd");
    std::fs::copy(OVMF_VARS, &vars).unwrap();
    let serial = dir.join("serial.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,smm=on", "-m", "256", "-nodefaults"])
        .args(["-global", "driver=cfi.pflash01,property=secure,value=on"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,file={OVMF_CODE},readonly=on"
        ))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=1,file={}", s(&vars)))
        .arg("-drive")
        // vvfat: the directory as a FAT disk (`rw`, as an IDE disk cannot be read-only).
        .arg(format!("format=raw,file=fat:rw:{}", s(&esp)))
        .args(["-net", "none", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", s(&serial)))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.stderr")).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    // The boot manager says "loading BootNNNN" for the disk, then "starting" once
    // LoadImage (which checks the signature) succeeded, or "failed to load" if not.
    let verdict = loop {
        let log = std::fs::read(&serial).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        let disk = |what: &str| {
            log.lines()
                .any(|l| l.contains(what) && l.contains("HARDDISK"))
        };
        if disk("BdsDxe: starting") {
            break Some(Boot::Started);
        }
        if disk("BdsDxe: failed to load") {
            break Some(Boot::Refused);
        }
        if started.elapsed() > std::time::Duration::from_secs(300)
            || qemu.try_wait().unwrap().is_some()
        {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    verdict.unwrap_or_else(|| {
        panic!(
            "no verdict from the firmware: {}{}",
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()),
            String::from_utf8_lossy(&std::fs::read(dir.join("qemu.stderr")).unwrap_or_default())
        )
    })
}

#[test]
fn secure_boot_firmware_starts_only_what_its_key_signed() {
    if !present() {
        return;
    }
    if !Path::new(OVMF_CODE).exists()
        || run("sh", &["-c", "command -v qemu-system-x86_64"])
            .stdout
            .is_empty()
    {
        let why = "apt-get install qemu-system-x86 ovmf";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but the Secure Boot test's firmware is missing: {why}");
        }
        eprintln!("note: skipping the Secure Boot firmware test ({why})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let snakeoil = signer(&keys.snakeoil_key, Path::new(SNAKEOIL_CERT));
    let fresh = signer(&keys.fresh_key, &keys.fresh_cert);
    let uki = std::fs::read(unified_kernel_image(dir.path())).unwrap();
    let cases = [
        (
            "snakeoil",
            authenticode::sign(&uki, &snakeoil).unwrap(),
            Boot::Started,
        ),
        (
            "gap",
            authenticode::sign(&with_gap(&uki), &snakeoil).unwrap(),
            Boot::Started,
        ),
        (
            "fresh",
            authenticode::sign(&uki, &fresh).unwrap(),
            Boot::Refused,
        ),
        ("unsigned", uki.clone(), Boot::Refused),
    ];
    for (name, image, expected) in cases {
        let case = dir.path().join(name);
        std::fs::create_dir_all(&case).unwrap();
        let t = std::time::Instant::now();
        assert_eq!(firmware(&image, &case), expected, "{name}");
        eprintln!("{name}: {:?} in {:?}", expected, t.elapsed());
    }
}
