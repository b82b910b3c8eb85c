//! The hash tree against `veritysetup` (cryptsetup-bin): byte-identical hash devices and
//! root hashes around the 128-hashes-per-block boundaries, and `veritysetup verify`
//! accepting ours and refusing one flipped data byte.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use kiln_machine::verity::{self, BLOCK_SIZE};

/// Whether `veritysetup` runs: false with a note when missing, a panic under `CI=true`.
fn veritysetup_present() -> bool {
    if Command::new("veritysetup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    let why = "veritysetup is missing (apt-get install cryptsetup-bin)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but {why}");
    }
    eprintln!("note: skipping the veritysetup test ({why})");
    false
}

/// `blocks` blocks of deterministic, non-repeating bytes (a 64-bit LCG), so every data
/// block and so every hash block differs.
fn data(blocks: u64) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ blocks;
    let mut out = Vec::with_capacity((blocks * BLOCK_SIZE) as usize);
    while (out.len() as u64) < blocks * BLOCK_SIZE {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

const GEOMETRY: [&str; 4] = [
    "--no-superblock",
    "--hash=sha256",
    "--data-block-size=4096",
    "--hash-block-size=4096",
];

fn veritysetup(args: &[&str], salt: &str, files: &[&Path]) -> std::process::Output {
    let mut cmd = Command::new("veritysetup");
    cmd.args(args).args(GEOMETRY).arg(format!("--salt={salt}"));
    cmd.args(files);
    cmd.output().unwrap()
}

/// `veritysetup format`'s tree and root hash for `data`, and `verify`'s answers for ours.
fn check(blocks: u64, salt: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("data");
    let theirs = dir.path().join("theirs");
    let ours = dir.path().join("ours");
    let mut bytes = data(blocks);
    std::fs::write(&data_path, &bytes).unwrap();
    let salt_hex = if salt.is_empty() {
        "-".to_owned()
    } else {
        hex::encode(salt)
    };

    let tree = verity::hash_tree(&mut bytes.as_slice(), blocks, salt).unwrap();
    assert_eq!(
        tree.hash_blocks(),
        verity::level_blocks(blocks).iter().sum::<u64>()
    );
    std::fs::write(&ours, tree.bytes()).unwrap();

    let out = veritysetup(&["format"], &salt_hex, &[&data_path, &theirs]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "format: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no root hash in {stdout}"));
    assert_eq!(tree.root_hex(), root, "{blocks} blocks: root hash");
    let their_bytes = std::fs::read(&theirs).unwrap();
    assert_eq!(
        their_bytes.len(),
        tree.bytes().len(),
        "{blocks} blocks: hash device size"
    );
    assert!(
        their_bytes == tree.bytes(),
        "{blocks} blocks: hash device bytes differ"
    );

    let verify = |data: &Path| veritysetup(&["verify"], &salt_hex, &[data, &ours, Path::new(root)]);
    let out = verify(&data_path);
    assert!(
        out.status.success(),
        "{blocks} blocks: verify refused ours: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One flipped byte in the last data block: the one verity must now refuse.
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x01;
    std::fs::write(&data_path, &bytes).unwrap();
    let out = verify(&data_path);
    assert!(
        !out.status.success(),
        "{blocks} blocks: verify accepted a flipped byte"
    );
}

#[test]
fn veritysetup_writes_the_same_tree_and_root() {
    if !veritysetup_present() {
        return;
    }
    for blocks in [1, 127, 128, 129, 16385] {
        check(blocks, &[0x5a, 0x17, 0x00, 0xc3]);
    }
    // A longer salt, and none at all.
    check(130, &[0xab; 32]);
    check(2, b"");
}
