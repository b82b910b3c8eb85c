//! The newc writer against GNU `cpio`: `cpio -t` lists exactly the entries written, in
//! order; `cpio -i` extracts them with their modes, contents and symlink targets; the
//! same entries give the same bytes twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kiln_machine::cpio::{Device, Writer};

/// Whether GNU cpio runs: false with a note when missing, a panic under `CI=true`.
fn cpio_present() -> bool {
    if Command::new("cpio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    let why = "cpio is missing (apt-get install cpio)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {why}");
    }
    eprintln!("note: skipping the cpio test ({why})");
    false
}

/// Runs `cpio args` in `dir` with `archive` on its standard input.
fn cpio(args: &[&str], dir: &Path, archive: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new("cpio")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(archive).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cpio {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A small initramfs: directories, files (one empty, one of 5 bytes so padding shows, one
/// larger than the writer's buffer), and symlinks.
fn initramfs() -> Vec<u8> {
    let big: Vec<u8> = (0..100_003u32).map(|i| (i % 253) as u8).collect();
    let mut w = Writer::new(Vec::new());
    w.dir("bin", 0o755).unwrap();
    w.file("bin/kiln", 0o755, big.len() as u64, &mut big.as_slice())
        .unwrap();
    w.symlink("init", "bin/kiln").unwrap();
    w.dir("etc", 0o755).unwrap();
    w.file("etc/hostname", 0o644, 5, &mut &b"kiln\n"[..])
        .unwrap();
    w.file("etc/empty", 0o600, 0, &mut std::io::empty())
        .unwrap();
    w.dir("etc/secret", 0o700).unwrap();
    w.symlink("etc/secret/link", "../hostname").unwrap();
    w.finish().unwrap()
}

#[test]
fn gnu_cpio_lists_and_extracts_what_was_written() {
    if !cpio_present() {
        return;
    }
    let archive = initramfs();
    assert!(
        archive == initramfs(),
        "two archives of the same entries differ"
    );
    assert_eq!(archive.len() % 4, 0);

    let dir = tempfile::tempdir().unwrap();
    let listed = cpio(&["-t", "--quiet"], dir.path(), &archive);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "bin\nbin/kiln\ninit\netc\netc/hostname\netc/empty\netc/secret\netc/secret/link\n"
    );

    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    cpio(
        &[
            "-i",
            "--quiet",
            "--make-directories",
            "--preserve-modification-time",
            "--no-absolute-filenames",
        ],
        &root,
        &archive,
    );
    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_eq!(mode("bin"), 0o40755);
    assert_eq!(mode("bin/kiln"), 0o100755);
    assert_eq!(mode("etc/hostname"), 0o100644);
    assert_eq!(mode("etc/empty"), 0o100600);
    assert_eq!(mode("etc/secret"), 0o40700);
    assert_eq!(mode("init") & 0o170000, 0o120000);
    let big: Vec<u8> = (0..100_003u32).map(|i| (i % 253) as u8).collect();
    assert!(std::fs::read(root.join("bin/kiln")).unwrap() == big);
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"kiln\n");
    assert_eq!(std::fs::read(root.join("etc/empty")).unwrap(), b"");
    assert_eq!(
        std::fs::read_link(root.join("init")).unwrap(),
        Path::new("bin/kiln")
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/secret/link")).unwrap(),
        Path::new("../hostname")
    );
    assert_eq!(
        std::fs::read(root.join("etc/secret/link")).unwrap(),
        b"kiln\n"
    );
    // mtime 0 as written (cpio sets a directory's after extracting what it holds).
    let mtime = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap().mtime();
    assert_eq!(mtime("etc/hostname"), 0);
    assert_eq!(mtime("bin/kiln"), 0);
}

#[test]
fn gnu_cpio_lists_device_nodes() {
    if !cpio_present() {
        return;
    }
    let mut w = Writer::new(Vec::new());
    w.dir("dev", 0o755).unwrap();
    w.device("dev/console", 0o600, Device::Char, 5, 1).unwrap();
    w.device("dev/vda", 0o660, Device::Block, 254, 0).unwrap();
    let archive = w.finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Only listed: making device nodes needs root, and the test must not.
    let listed = cpio(
        &["-t", "-v", "--quiet", "--numeric-uid-gid"],
        dir.path(),
        &archive,
    );
    let listed = String::from_utf8_lossy(&listed.stdout);
    let lines: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // mode, links, uid, gid, then `major, minor` for a device.
    assert_eq!(lines[0][0], "drwxr-xr-x", "{listed}");
    assert_eq!(
        &lines[1][..6],
        ["crw-------", "1", "0", "0", "5,", "1"],
        "{listed}"
    );
    assert_eq!(lines[1].last(), Some(&"dev/console"), "{listed}");
    assert_eq!(
        &lines[2][..6],
        ["brw-rw----", "1", "0", "0", "254,", "0"],
        "{listed}"
    );
    assert_eq!(lines.len(), 3, "{listed}");
}
