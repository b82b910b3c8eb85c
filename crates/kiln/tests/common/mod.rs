//! Shared by the end-to-end tests that need root and real runc.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn hello_binary() -> PathBuf {
    root().join("target/x86_64-unknown-linux-gnu/release/hello")
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether the real-runc tests can run here; panics in CI (`CI=true`) when they cannot.
pub fn runc_prerequisites() -> bool {
    let root_user = is_root();
    let runc = std::process::Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let hello = hello_binary().exists();
    if root_user && runc && hello {
        return true;
    }
    let why = format!(
        "root={root_user} runc={runc} hello built={hello} (cargo build --release -p hello)"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the real-runc prerequisites are missing: {why}");
    }
    eprintln!("note: skipping real-runc test ({why})");
    false
}

/// The `kiln` binary with `--state state`.
pub fn kiln(state: &Path) -> Command {
    let mut cmd = Command::cargo_bin("kiln").unwrap();
    cmd.env_remove("KILN_STATE")
        .env("NO_COLOR", "1")
        .arg("--state")
        .arg(state);
    cmd
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
