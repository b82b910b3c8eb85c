#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Hostile tarballs: each class is refused with an error naming the entry, or contained
//! inside the root; nothing is ever written outside it. Also whiteouts, in all three modes.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use kiln_image::{Limits, UnpackError, UnpackOptions, WhiteoutMode, unpack};
use kiln_spec::{BaseImage, Compression};

/// One raw tar entry; the name is written byte for byte, bypassing the tar crate's checks,
/// as a hostile archive would be.
fn entry(name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_entry_type(kind);
    h.set_mtime(0);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    entry(name, tar::EntryType::Regular, "", data)
}

fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

struct Sandbox {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
}

/// `root` to unpack into, next to `outside`, which must stay untouched.
fn sandbox() -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), b"do not touch").unwrap();
    Sandbox {
        _dir: dir,
        root,
        outside,
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    out
}

fn assert_outside_untouched(s: &Sandbox) {
    assert_eq!(listing(&s.outside), vec!["secret".to_owned()]);
    assert_eq!(fs::read(s.outside.join("secret")).unwrap(), b"do not touch");
    assert_eq!(fs::metadata(s.outside.join("secret")).unwrap().nlink(), 1);
    let parent = s.root.parent().unwrap();
    assert_eq!(
        listing(parent),
        vec!["outside".to_owned(), "root".to_owned()]
    );
}

fn opts() -> UnpackOptions {
    UnpackOptions {
        whiteouts: WhiteoutMode::Apply,
        limits: Limits::default(),
        preserve_owners: false,
    }
}

fn run(
    s: &Sandbox,
    tar: &[u8],
    o: &UnpackOptions,
) -> Result<kiln_image::UnpackReport, UnpackError> {
    unpack(tar, &s.root, o)
}

#[test]
fn dot_dot_in_a_name_is_refused() {
    let s = sandbox();
    let err = run(&s, &archive(&[file("../outside/evil", b"x")]), &opts()).unwrap_err();
    assert!(matches!(err, UnpackError::PathTraversal { .. }), "{err}");
    assert!(err.to_string().contains("../outside/evil"), "{err}");
    let err = run(&s, &archive(&[file("a/../../evil", b"x")]), &opts()).unwrap_err();
    assert!(matches!(err, UnpackError::PathTraversal { .. }), "{err}");
    assert_outside_untouched(&s);
}

#[test]
fn absolute_names_are_contained() {
    let s = sandbox();
    let evil = format!("{}/evil", s.outside.display());
    run(
        &s,
        &archive(&[file(&evil, b"x"), file("/etc/passwd", b"root")]),
        &opts(),
    )
    .unwrap();
    assert_eq!(fs::read(s.root.join("etc/passwd")).unwrap(), b"root");
    assert!(s.root.join(evil.trim_start_matches('/')).is_file());
    assert_outside_untouched(&s);
}

#[test]
fn symlink_escapes_are_contained() {
    let s = sandbox();
    let outside = s.outside.display().to_string();
    let tar = archive(&[
        entry("abs", tar::EntryType::Symlink, &outside, b""),
        entry("rel", tar::EntryType::Symlink, "../../../../../../..", b""),
        entry("root", tar::EntryType::Symlink, "/", b""),
        file("rel/evil-rel", b"x"),
        file("root/evil-root", b"x"),
    ]);
    run(&s, &tar, &opts()).unwrap();
    // `rel` and `root` resolve to the unpack root itself.
    assert!(s.root.join("evil-rel").is_file());
    assert!(s.root.join("evil-root").is_file());
    // Through `abs` (an absolute path outside) the write either fails or lands inside.
    let r = run(&s, &archive(&[file("abs/pwned", b"x")]), &opts());
    if r.is_ok() {
        assert!(
            s.root
                .join(outside.trim_start_matches('/'))
                .join("pwned")
                .is_file()
        );
    }
    // A symlink that replaces a file is never followed by a later write to that name.
    let tar = archive(&[
        entry(
            "victim",
            tar::EntryType::Symlink,
            &format!("{outside}/secret"),
            b"",
        ),
        file("victim", b"overwritten?"),
    ]);
    run(&s, &tar, &opts()).unwrap();
    assert_eq!(fs::read(s.root.join("victim")).unwrap(), b"overwritten?");
    assert_outside_untouched(&s);
}

#[test]
fn hardlink_escapes_are_refused_or_contained() {
    let s = sandbox();
    let outside = s.outside.display().to_string();
    let err = run(
        &s,
        &archive(&[entry("h", tar::EntryType::Link, "../outside/secret", b"")]),
        &opts(),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::LinkEscape { .. }), "{err}");
    // An absolute target resolves inside the root, where there is no such file.
    let err = run(
        &s,
        &archive(&[entry(
            "h",
            tar::EntryType::Link,
            &format!("{outside}/secret"),
            b"",
        )]),
        &opts(),
    )
    .unwrap_err();
    assert!(
        matches!(err, UnpackError::LinkTargetMissing { .. }),
        "{err}"
    );
    // Through a symlink to the outside directory: resolved inside the root too.
    let r = run(
        &s,
        &archive(&[
            entry("s", tar::EntryType::Symlink, &outside, b""),
            entry("h2", tar::EntryType::Link, "s/secret", b""),
        ]),
        &opts(),
    );
    assert!(r.is_err(), "a link to the outside file must not be made");
    // A legitimate hardlink works.
    run(
        &s,
        &archive(&[
            file("a", b"data"),
            entry("b", tar::EntryType::Link, "a", b""),
        ]),
        &opts(),
    )
    .unwrap();
    assert_eq!(
        fs::metadata(s.root.join("a")).unwrap().ino(),
        fs::metadata(s.root.join("b")).unwrap().ino()
    );
    assert_outside_untouched(&s);
}

#[test]
fn device_nodes_are_refused() {
    let s = sandbox();
    for kind in [tar::EntryType::Char, tar::EntryType::Block] {
        let err = run(&s, &archive(&[entry("dev/sda", kind, "", b"")]), &opts()).unwrap_err();
        assert!(matches!(err, UnpackError::DeviceNode { .. }), "{err}");
        assert!(err.to_string().contains("dev/sda"));
    }
    assert!(!s.root.join("dev/sda").exists());
    assert_outside_untouched(&s);
}

#[test]
fn absurd_sizes_and_counts_are_refused() {
    let s = sandbox();
    let small = UnpackOptions {
        limits: Limits {
            max_entries: 10,
            max_bytes: 1000,
            ..Limits::default()
        },
        ..opts()
    };
    let many: Vec<Vec<u8>> = (0..11).map(|i| file(&format!("f{i}"), b"")).collect();
    // The byte bound covers the whole stream, headers too: leave room for 11 headers.
    let roomy = UnpackOptions {
        limits: Limits {
            max_bytes: 100_000,
            ..small.limits
        },
        ..small
    };
    let err = run(&s, &archive(&many), &roomy).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooManyEntries { limit: 10 }),
        "{err}"
    );
    let err = run(&s, &archive(&[file("big", &[7u8; 1001])]), &small).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
    // A header claiming a terabyte, with no data behind it: refused before reading.
    let mut h = tar::Header::new_gnu();
    h.set_path("huge").unwrap();
    h.set_size(1 << 40);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 1024]);
    let err = run(&s, &tar, &opts()).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
    assert!(!s.root.join("huge").exists());
    // A truncated archive is malformed, not a panic.
    let err = run(&s, &file("trunc", &[1u8; 2000])[..700], &opts()).unwrap_err();
    assert!(
        matches!(err, UnpackError::Malformed { .. } | UnpackError::Io { .. }),
        "{err}"
    );
    assert_outside_untouched(&s);
}

fn layered(s: &Sandbox, mode: WhiteoutMode) -> kiln_image::UnpackReport {
    let o = UnpackOptions {
        whiteouts: mode,
        ..opts()
    };
    run(
        s,
        &archive(&[
            file("a/x", b"1"),
            file("a/y", b"2"),
            file("b", b"3"),
            file("c/keep", b"4"),
        ]),
        &o,
    )
    .unwrap();
    run(
        s,
        &archive(&[
            file("a/z", b"new"),
            file("a/.wh..wh..opq", b""),
            file(".wh.b", b""),
            file("c/.wh.gone", b""),
        ]),
        &o,
    )
    .unwrap()
}

#[test]
fn whiteouts_apply_onto_a_rootfs() {
    let s = sandbox();
    let report = layered(&s, WhiteoutMode::Apply);
    assert_eq!(
        listing(&s.root.join("a")),
        vec!["z".to_owned()],
        "opaque keeps this layer's z"
    );
    assert!(!s.root.join("b").exists());
    assert!(s.root.join("c/keep").exists());
    assert_eq!(report.whiteouts, vec!["b".to_owned(), "c/gone".to_owned()]);
    assert_eq!(report.opaque_dirs, vec!["a".to_owned()]);
    // A whiteout cannot name `..`.
    let err = run(&s, &archive(&[file("a/.wh...", b"")]), &opts()).unwrap_err();
    assert!(matches!(err, UnpackError::PathTraversal { .. }), "{err}");
    assert_outside_untouched(&s);
}

#[test]
fn whiteouts_recorded_write_nothing() {
    let s = sandbox();
    let report = layered(&s, WhiteoutMode::Record);
    assert!(s.root.join("b").exists());
    assert!(!s.root.join(".wh.b").exists());
    assert_eq!(report.whiteouts.len(), 2);
}

#[test]
fn whiteouts_become_overlayfs_whiteouts_as_root() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: overlay whiteouts need root (mknod, trusted.* xattrs)");
        return;
    }
    let s = sandbox();
    layered(&s, WhiteoutMode::Overlay);
    let m = fs::symlink_metadata(s.root.join("b")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), 0);
    let mut buf = [0u8; 8];
    let n = rustix::fs::getxattr(
        s.root.join("a").as_path(),
        "trusted.overlay.opaque",
        &mut buf,
    )
    .unwrap();
    assert_eq!(&buf[..n], b"y");
}

#[test]
fn a_hostile_rootfs_tarball_base_is_refused_with_the_entry_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("traversal", archive(&[file("../evil", b"x")]), "../evil"),
        (
            "device",
            archive(&[entry("dev/kmem", tar::EntryType::Char, "", b"")]),
            "dev/kmem",
        ),
        (
            "hardlink",
            archive(&[entry("h", tar::EntryType::Link, "../../etc/shadow", b"")]),
            "../../etc/shadow",
        ),
    ];
    for (name, tar, needle) in cases {
        let path = dir.path().join(format!("{name}.tar"));
        fs::write(&path, &tar).unwrap();
        let mut env = common::Env::new();
        let spec = common::spec(BaseImage::Rootfs(path), vec![], Compression::Gzip);
        let err = kiln_image::build(
            &spec,
            &env.store,
            &mut env.cache,
            &Default::default(),
            &mut |_| {},
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("rootfs:") && msg.contains(needle),
            "{name}: {msg}"
        );
    }
}

/// kiln runs under umask 077 so its own files are private; the parents an archive does not
/// list are still 0755, or an image's non-root user could not reach its own files.
#[test]
fn unlisted_parents_are_0755_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    // Process-wide, and no other test here depends on the umask.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let s = sandbox();
    run(&s, &archive(&[file("usr/share/page.txt", b"hi")]), &opts()).unwrap();
    for dir in ["usr", "usr/share"] {
        let mode = fs::metadata(s.root.join(dir)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{dir}");
    }
    let mode = fs::metadata(s.root.join("usr/share/page.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
}

/// A PAX (`x`) or GNU long-name (`L`) header claiming `size` bytes, followed by `data`.
fn extension(kind: tar::EntryType, size: u64, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path("././@PaxHeader").unwrap();
    h.set_size(size);
    h.set_entry_type(kind);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn an_extension_header_claiming_gigabytes_is_refused_before_it_is_read() {
    let s = sandbox();
    for kind in [
        tar::EntryType::XHeader,
        tar::EntryType::GNULongName,
        tar::EntryType::XGlobalHeader,
    ] {
        // 2 GiB claimed, 1 KiB present: refused from the header alone (tar's own reader
        // would allocate and read up to the claim).
        let tar = archive(&[extension(kind, 2 << 30, &[b'a'; 1024])]);
        let err = run(&s, &tar, &opts()).unwrap_err();
        assert!(
            matches!(err, UnpackError::HeaderTooLarge { size, limit, .. }
                if size == 2 << 30 && limit == 1 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("2147483648"), "{err}");
        let err = kiln_image::check(&tar[..], &Limits::default()).unwrap_err();
        assert!(matches!(err, UnpackError::HeaderTooLarge { .. }), "{err}");
    }
    assert_outside_untouched(&s);
}

#[test]
fn long_names_and_pax_records_still_apply() {
    let s = sandbox();
    let long = format!("{}/file", "d".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    // A GNU header: the builder writes an `L` entry for the long name.
    b.append_data(&mut h, &long, &b"hi"[..]).unwrap();
    // A PAX `path` record naming the next entry.
    b.append_pax_extensions([("path", b"pax/named".as_slice())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("short").unwrap();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"pax"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    run(&s, &tar, &opts()).unwrap();
    assert_eq!(fs::read(s.root.join(&long)).unwrap(), b"hi");
    assert_eq!(fs::read(s.root.join("pax/named")).unwrap(), b"pax");
    assert!(!s.root.join("short").exists());
    let report = kiln_image::check(&tar[..], &Limits::default()).unwrap();
    assert_eq!((report.entries, report.bytes), (2, 5));
}

#[test]
fn a_pax_size_that_disagrees_with_the_header_is_refused() {
    let s = sandbox();
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("size", b"999999".as_slice())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    b.append_data(&mut h, "f", &b"abc"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let err = run(&s, &tar, &opts()).unwrap_err();
    assert!(matches!(err, UnpackError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("PAX size"), "{err}");
}

#[test]
fn a_stream_longer_than_the_bound_stops_there() {
    // Trailing data after the end marker still counts: `check` reads a layer to its end
    // (a caller hashes it), and a bomb may hide there.
    let mut tar = archive(&[file("f", b"abc")]);
    tar.extend_from_slice(&vec![0u8; 1 << 20]);
    let limits = Limits {
        max_bytes: 64 << 10,
        ..Limits::default()
    };
    let err = kiln_image::check(&tar[..], &limits).unwrap_err();
    assert!(
        matches!(err, UnpackError::StreamTooLong { limit } if limit == 64 << 10),
        "{err}"
    );
    // `check` refuses what `unpack` refuses, writing nothing.
    let err = kiln_image::check(
        &archive(&[entry("dev/sda", tar::EntryType::Block, "", b"")])[..],
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::DeviceNode { .. }), "{err}");
    let err = kiln_image::check(
        &archive(&[entry("l", tar::EntryType::Link, "../x", b"")])[..],
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::LinkEscape { .. }), "{err}");
}
