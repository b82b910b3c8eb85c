//! The GPT writer against util-linux's `sfdisk` (`--verify`, `--json`) and gdisk's
//! `sgdisk -v`: the disk reads back with exactly our types, names, GUIDs, starts and sizes;
//! two writes are byte-identical; each partition's bytes are its input. The disk carries a
//! verity root and its hash partition, which `veritysetup verify` accepts as read back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use kiln_machine::gpt::{self, Guid, Layout, Partition};
use kiln_machine::verity;

/// Whether every program in `tools` runs: false with a note when one is missing, a panic
/// under `CI=true`.
fn tools_present(tools: &[(&str, &str, &str)]) -> bool {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, arg, _)| {
            !Command::new(tool)
                .arg(arg)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(tool, _, package)| format!("{tool} (apt-get install {package})"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("missing: {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the GPT test's tools are {why}");
    }
    eprintln!("note: skipping the GPT test ({why})");
    false
}

fn run(program: &str, args: &[&str], disk: &Path) -> Output {
    let out = Command::new(program).args(args).arg(disk).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Distinct bytes per partition, so a misplaced one shows.
fn content(len: u64, tag: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ tag).collect()
}

fn write(layout: &Layout, contents: &[Vec<u8>]) -> Vec<u8> {
    let mut readers: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    let mut dyns: Vec<&mut dyn std::io::Read> = readers
        .iter_mut()
        .map(|r| r as &mut dyn std::io::Read)
        .collect();
    let mut disk = Vec::new();
    layout.write(&mut disk, &mut dyns).unwrap();
    disk
}

#[test]
fn sfdisk_and_sgdisk_read_back_the_layout() {
    if !tools_present(&[
        ("sfdisk", "--version", "fdisk"),
        ("sgdisk", "--version", "gdisk"),
        ("veritysetup", "--version", "cryptsetup-bin"),
    ]) {
        return;
    }
    // An ESP whose length is not a whole sector, a verity-sealed root of 129 blocks (two
    // levels of hashes) and its hash tree.
    let root_blocks = 129;
    let salt = [0x42u8; 32];
    let root = content(root_blocks * verity::BLOCK_SIZE, 0x5a);
    let tree = verity::hash_tree(&mut root.as_slice(), root_blocks, &salt).unwrap();
    let contents = vec![
        content(3 * 1024 * 1024 + 123, 0x11),
        root,
        tree.bytes().to_vec(),
    ];
    let partitions = [
        (gpt::ESP, "esp"),
        (gpt::ROOT_X86_64, "root-x86-64"),
        (gpt::ROOT_VERITY_X86_64, "root-x86-64-verity"),
    ]
    .iter()
    .zip(&contents)
    .map(|((type_guid, name), c)| Partition {
        type_guid: *type_guid,
        name: (*name).to_owned(),
        len: c.len() as u64,
        unique_guid: None,
    })
    .collect::<Vec<_>>();
    let layout = gpt::layout(b"kiln machine test", &partitions).unwrap();
    let disk = write(&layout, &contents);
    assert_eq!(disk.len() as u64, layout.size());
    assert!(
        disk == write(
            &gpt::layout(b"kiln machine test", &partitions).unwrap(),
            &contents
        ),
        "two writes of the same inputs differ"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, &disk).unwrap();

    let verify = run("sfdisk", &["--verify"], &path);
    let said = String::from_utf8_lossy(&verify.stdout).into_owned()
        + &String::from_utf8_lossy(&verify.stderr);
    eprintln!("sfdisk --verify: {said}");
    assert!(said.contains("No errors detected."), "{said}");

    let json = run("sfdisk", &["--json"], &path);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let table = &json["partitiontable"];
    assert_eq!(table["label"], "gpt");
    assert_eq!(table["id"], layout.disk_guid.to_string());
    assert_eq!(table["sectorsize"], 512);
    assert_eq!(table["firstlba"], layout.first_usable_lba());
    assert_eq!(table["lastlba"], layout.last_usable_lba());
    let read: Vec<(String, String, String, u64, u64)> = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["type"].as_str().unwrap().to_owned(),
                p["name"].as_str().unwrap().to_owned(),
                p["uuid"].as_str().unwrap().to_owned(),
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let ours: Vec<(String, String, String, u64, u64)> = layout
        .partitions
        .iter()
        .map(|p| {
            (
                p.type_guid.to_string(),
                p.name.clone(),
                p.unique_guid.to_string(),
                p.first_lba,
                p.sectors,
            )
        })
        .collect();
    assert_eq!(read, ours);
    let guids: Vec<Guid> = read.iter().map(|p| p.2.parse().unwrap()).collect();
    assert_eq!(
        guids,
        (0..3)
            .map(|i| Guid::derive(b"kiln machine test", &format!("partition {i}")))
            .collect::<Vec<_>>()
    );

    // util-linux's own table names our type GUIDs as the Discoverable Partitions
    // Specification does.
    let types = Command::new("sfdisk")
        .args(["--label", "gpt", "--list-types"])
        .output()
        .unwrap();
    let types = String::from_utf8_lossy(&types.stdout);
    for (guid, name) in [
        (gpt::ESP, "EFI System"),
        (gpt::ROOT_X86_64, "Linux root (x86-64)"),
        (gpt::ROOT_VERITY_X86_64, "Linux root verity (x86-64)"),
    ] {
        let line = format!("{guid}  {name}");
        assert!(
            types.lines().any(|l| l.trim() == line),
            "{line} not in {types}"
        );
    }

    let sgdisk = run("sgdisk", &["-v"], &path);
    let said = String::from_utf8_lossy(&sgdisk.stdout);
    eprintln!("sgdisk -v: {said}");
    assert!(
        said.contains("No problems found") && !said.contains("Caution"),
        "{said}"
    );

    // Each partition holds its input, then zeros to its last sector.
    for (p, c) in layout.partitions.iter().zip(&contents) {
        let start = p.offset() as usize;
        let end = start + (p.sectors * gpt::SECTOR) as usize;
        assert!(
            &disk[start..start + c.len()] == c.as_slice(),
            "{} differs",
            p.name
        );
        assert!(
            disk[start + c.len()..end].iter().all(|&b| b == 0),
            "{} tail",
            p.name
        );
    }

    // The root and its hash partition, cut from the disk, pass `veritysetup verify`.
    let cut = |i: usize, name: &str| {
        let p = &layout.partitions[i];
        let file = dir.path().join(name);
        let start = p.offset() as usize;
        std::fs::write(&file, &disk[start..start + p.len as usize]).unwrap();
        file
    };
    let (root_file, hash_file) = (cut(1, "root"), cut(2, "hash"));
    let out = Command::new("veritysetup")
        .args(["verify", "--no-superblock", "--hash=sha256"])
        .args(["--data-block-size=4096", "--hash-block-size=4096"])
        .arg(format!("--salt={}", hex::encode(salt)))
        .args([&root_file, &hash_file])
        .arg(tree.root_hex())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn refuses_what_gpt_cannot_hold() {
    let p = |name: &str, len: u64| Partition {
        type_guid: gpt::ROOT_X86_64,
        name: name.to_owned(),
        len,
        unique_guid: None,
    };
    assert!(matches!(
        gpt::layout(b"s", &[p(&"x".repeat(37), 1)]),
        Err(gpt::Error::Name { index: 0, .. })
    ));
    assert!(matches!(
        gpt::layout(b"s", &[p("a", 1), p("b", 0)]),
        Err(gpt::Error::EmptyPartition { index: 1, .. })
    ));
    let mut twin = p("b", 1);
    twin.unique_guid = Some(Guid::derive(b"s", "partition 0"));
    assert!(matches!(
        gpt::layout(b"s", &[p("a", 1), twin]),
        Err(gpt::Error::DuplicateGuid {
            first: 0,
            second: 1,
            ..
        })
    ));
    assert!(matches!(
        gpt::layout(b"s", &[p("a", u64::MAX / 2), p("b", u64::MAX / 2)]),
        Err(gpt::Error::TooLarge { index: 1, .. })
    ));
    let layout = gpt::layout(b"s", &[p("a", 600)]).unwrap();
    let mut short: &[u8] = &[1u8; 599];
    let err = layout
        .write(&mut Vec::new(), &mut [&mut short])
        .unwrap_err();
    assert!(
        matches!(
            err,
            gpt::Error::ShortContent {
                got: 599,
                len: 600,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        layout.write(&mut Vec::new(), &mut []),
        Err(gpt::Error::ContentCount {
            expected: 1,
            got: 0
        })
    ));
}
