//! `fetch` over `ssh://` and scp-like URLs against a real sshd the test runs on the loopback,
//! serving a bare repository made by the `git` program. gix runs the `ssh` program, as git
//! does; the mirror's `core.sshCommand` points it at the test's client configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_git::{GitError, checkout, describe, fetch};

const SSHD: &str = "/usr/sbin/sshd";

/// Root (sshd accepts the test's key for root), git, sshd, ssh and ssh-keygen: a note and
/// `false` when one is missing, a panic under `CI=true`.
fn prerequisites() -> bool {
    let have = |bin: &str, arg: &str| Command::new(bin).arg(arg).output().is_ok();
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    let sshd = Path::new(SSHD).exists();
    let found = [
        ("root", root),
        ("sshd", sshd),
        ("ssh", have("ssh", "-V")),
        ("ssh-keygen", Path::new("/usr/bin/ssh-keygen").exists()),
        ("git", have("git", "--version")),
    ];
    let missing: Vec<&str> = found
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but the ssh fetch test lacks {missing:?} (scripts/ci-setup.sh)");
    }
    eprintln!("skipping: the ssh fetch test lacks {missing:?}");
    false
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args([
            "-c",
            "user.name=Ada Lovelace",
            "-c",
            "user.email=ada@kiln.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test", "-f"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen failed");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child `sshd -D -e` on 127.0.0.1, accepting the test's key for root; the client
/// configuration also names it `kilntest`, for scp-like URLs (which cannot carry a port).
struct Sshd {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        std::fs::create_dir_all(dir).unwrap();
        keygen(&dir.join("host_ed25519"));
        keygen(&dir.join("id_ed25519"));
        std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys")).unwrap();
        // sshd's privilege separation directory (Debian makes it in its init script).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile none\nLogLevel INFO\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("ssh_config"),
            format!(
                "Host kilntest\n  HostName 127.0.0.1\n  Port {port}\n\
                 Host *\n  IdentityFile {d}/id_ed25519\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile {d}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  \
                 StrictHostKeyChecking accept-new\n  BatchMode yes\n  LogLevel ERROR\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        // Waits for the listener, not for a time: the deadline only ends a hung start.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sshd {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    /// A mirror made in advance with `core.sshCommand` naming the test's client config:
    /// what an operator would set for a key of kiln's own.
    fn mirror(&self, path: &Path) {
        std::fs::create_dir_all(path).unwrap();
        git(path, &["init", "-q", "--bare"]);
        let command = format!("ssh -F {}", self.dir.join("ssh_config").display());
        git(path, &["config", "core.sshCommand", &command]);
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default();
            eprintln!("--- sshd log ---\n{log}--- end of sshd log ---");
        }
    }
}

#[test]
fn fetch_over_ssh_then_check_out() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let sshd = Sshd::start(&root.join("ssh"));
    let bare = root.join("forge.git");
    std::fs::create_dir(&bare).unwrap();
    git(&bare, &["init", "-q", "--bare"]);
    let dev = root.join("dev");
    std::fs::create_dir(&dev).unwrap();
    git(&dev, &["init", "-q"]);
    std::fs::write(dev.join("kiln.toml"), "[app]\n").unwrap();
    git(&dev, &["add", "-A"]);
    git(&dev, &["commit", "-q", "-m", "over ssh"]);
    git(&dev, &["push", "-q", bare.to_str().unwrap(), "HEAD:main"]);
    let first = git(&dev, &["rev-parse", "HEAD"]).trim().to_owned();

    let url = format!("ssh://root@127.0.0.1:{}{}", sshd.port, bare.display());
    let mirror = root.join("mirror");
    sshd.mirror(&mirror);
    let commit = fetch(&url, "main", &mirror).unwrap();
    assert_eq!(commit.id, first);
    assert_eq!(commit.summary, "over ssh");
    assert_eq!(commit.author, "Ada Lovelace <ada@kiln.invalid>");

    // A new commit: the next fetch returns it.
    std::fs::write(dev.join("b.txt"), "b\n").unwrap();
    git(&dev, &["add", "-A"]);
    git(&dev, &["commit", "-q", "-m", "second"]);
    git(&dev, &["push", "-q", bare.to_str().unwrap(), "HEAD:main"]);
    let second = git(&dev, &["rev-parse", "HEAD"]).trim().to_owned();
    assert_eq!(fetch(&url, "main", &mirror).unwrap().id, second);

    let dest = root.join("work");
    checkout(&mirror, &second, &dest).unwrap();
    let source = describe(&dest).unwrap().unwrap();
    assert_eq!(source.commit.as_deref(), Some(second.as_str()));
    assert!(source.clean);
    assert_eq!(source.remote.as_deref(), Some(url.as_str()));
    assert_eq!(std::fs::read_to_string(dest.join("b.txt")).unwrap(), "b\n");

    // scp-like, through the client config's host alias.
    let scp = format!("root@kilntest:{}", bare.display());
    let mirror2 = root.join("mirror2");
    sshd.mirror(&mirror2);
    assert_eq!(fetch(&scp, "main", &mirror2).unwrap().id, second);

    // A branch the server does not have.
    let err = fetch(&url, "nope", &mirror).unwrap_err();
    assert!(matches!(err, GitError::NoBranch { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("branch nope does not exist in {url}")
    );

    // A path on the server that is no repository.
    let wrong = format!(
        "ssh://root@127.0.0.1:{}{}",
        sshd.port,
        root.join("nothing").display()
    );
    let err = fetch(&wrong, "main", &mirror).unwrap_err();
    assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
    assert!(err.to_string().contains(&wrong), "{err}");
}
