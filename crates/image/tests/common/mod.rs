//! Fixtures shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use kiln_image::{BuildCache, BuildOptions, BuildOutput, Store};
use kiln_spec::{BaseImage, Compression, CopySpec, ImageSpec, Owner};

/// Deterministic pseudo-random bytes (xorshift), so fixtures need no data files.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn write(path: &Path, content: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A small tree with every kind of entry a copy can hold. `loose` gives it the modes a
/// umask of 002 would (group-writable), as a second checkout might have.
pub fn fixture_tree(root: &Path, loose: bool) {
    let (f, x, d) = if loose {
        (0o664, 0o775, 0o775)
    } else {
        (0o644, 0o755, 0o755)
    };
    fs::create_dir_all(root).unwrap();
    write(&root.join("README.txt"), b"hello, kiln\n", f);
    write(&root.join("bin/app"), &bytes(1, 70_000), x);
    write(&root.join("data/big.bin"), &bytes(2, 600_000), f);
    write(&root.join("data/empty"), b"", f);
    let text: Vec<u8> = (0..20_000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    write(&root.join("data/text.log"), &text, f);
    let long = "a-very-long-directory-name-that-goes-on/".repeat(3)
        + "and-a-file-name-past-one-hundred-bytes.txt";
    write(&root.join(&long), b"long\n", f);
    write(&root.join("secret/key"), b"private\n", 0o600);
    write(&root.join("tmp/skip.tmp"), b"excluded\n", f);
    symlink("bin/app", root.join("app-link")).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    fs::hard_link(root.join("README.txt"), root.join("README.hardlink")).unwrap();
    for dir in ["", "bin", "data", "secret", "tmp"] {
        fs::set_permissions(root.join(dir), fs::Permissions::from_mode(d)).unwrap();
    }
}

pub fn copy(from: &Path, to: &str) -> CopySpec {
    CopySpec {
        from: from.to_path_buf(),
        to: to.to_owned(),
        mode: None,
        owner: Owner::default(),
        exclude: vec!["tmp/*.tmp".to_owned()],
        closure: false,
    }
}

pub fn spec(base: BaseImage, copies: Vec<CopySpec>, compression: Compression) -> ImageSpec {
    ImageSpec {
        base,
        entrypoint: Some(vec!["/app/bin/app".to_owned()]),
        cmd: None,
        env: BTreeMap::from([("MODE".to_owned(), "test".to_owned())]),
        workdir: Some("/app".to_owned()),
        user: None,
        labels: BTreeMap::from([(
            "org.opencontainers.image.title".to_owned(),
            "fixture".to_owned(),
        )]),
        compression,
        copies,
        test: None,
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub cache: BuildCache,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("images")).unwrap();
        let cache = BuildCache::open(dir.path().join("cache")).unwrap();
        Env { dir, store, cache }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn build(&mut self, spec: &ImageSpec, tag: &str) -> BuildOutput {
        self.build_with(spec, tag, 2)
    }

    pub fn build_with(&mut self, spec: &ImageSpec, tag: &str, threads: usize) -> BuildOutput {
        let opts = BuildOptions {
            tag: Some(tag.to_owned()),
            threads,
            ..BuildOptions::default()
        };
        kiln_image::build(spec, &self.store, &mut self.cache, &opts, &mut |_| {}).unwrap()
    }
}
