//! `fetch` and `checkout`, the GitOps follower's two steps, against real repositories made by
//! the `git` program (in the tests only: the crate itself never runs it). A "forge" is a bare
//! repository the test pushes to, as a developer would.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_git::{GitError, MESSAGE_BYTES, checkout, describe, fetch, validate_url};

/// Whether the `git` program is here: a note and `false` without it, a panic under `CI=true`
/// (`scripts/ci-setup.sh` installs it).
fn git_available() -> bool {
    let found = Command::new("git")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but the git program is missing (scripts/ci-setup.sh installs it)");
        }
        eprintln!("skipping: these tests make repositories with the git program, which is missing");
    }
    found
}

/// Runs git in `dir` with no system or global configuration; `input` is its stdin.
fn git_with(dir: &Path, args: &[&str], input: Option<&[u8]>) -> String {
    let mut child = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env("GIT_AUTHOR_DATE", "1700000000 +0100")
        .env("GIT_COMMITTER_DATE", "1700000000 +0100")
        .args([
            "-c",
            "user.name=Ada Lovelace",
            "-c",
            "user.email=ada@kiln.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "core.symlinks=true",
        ])
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = input {
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn git(dir: &Path, args: &[&str]) -> String {
    git_with(dir, args, None)
}

/// A bare "forge" repository, a developer's clone of it, and room for kiln's mirror and
/// work tree, all in one temporary directory.
struct Forge {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    /// The bare repository kiln follows.
    bare: PathBuf,
    /// Where the test commits and pushes from.
    dev: PathBuf,
}

impl Forge {
    fn new() -> Forge {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let bare = root.join("forge.git");
        let dev = root.join("dev");
        std::fs::create_dir(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare"]);
        std::fs::create_dir(&dev).unwrap();
        git(&dev, &["init", "-q"]);
        git(&dev, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Forge {
            _tmp: tmp,
            root,
            bare,
            dev,
        }
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.dev.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Commits everything in the developer's tree and pushes `main`; returns the commit id.
    fn commit_and_push(&self, message: &str) -> String {
        git(&self.dev, &["add", "-A"]);
        git(&self.dev, &["commit", "-q", "--allow-empty", "-m", message]);
        git(&self.dev, &["push", "-q", "origin", "HEAD:main"]);
        git(&self.dev, &["rev-parse", "HEAD"]).trim().to_owned()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn file_url(&self) -> String {
        format!("file://{}", self.bare.display())
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn fetch_from_a_path_and_from_a_file_url_returns_the_branch_commit() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    forge.write("kiln.toml", "[app]\n");
    let first = forge.commit_and_push("First commit\n\nWith a body.");
    // An empty directory made for a mirror is as good as none.
    std::fs::create_dir(forge.path("m2")).unwrap();

    for (url, mirror) in [
        (forge.bare.to_str().unwrap().to_owned(), forge.path("m1")),
        (forge.file_url(), forge.path("m2")),
        // A work tree's path names its repository too.
        (forge.dev.to_str().unwrap().to_owned(), forge.path("m3")),
    ] {
        let commit = fetch(&url, "main", &mirror).unwrap();
        assert_eq!(commit.id, first, "{url}");
        assert_eq!(commit.author, "Ada Lovelace <ada@kiln.invalid>");
        assert_eq!(commit.summary, "First commit");
        assert_eq!(commit.message, "First commit\n\nWith a body.");
        assert_eq!(commit.time, 1_700_000_000);
        // The mirror is a bare repository git itself accepts, with the commit on the branch.
        assert_eq!(
            git(&mirror, &["rev-parse", "refs/heads/main"]).trim(),
            first
        );
        git(&mirror, &["fsck", "--strict", "--no-dangling"]);
        assert_eq!(
            git(&mirror, &["config", "remote.origin.url"]).trim(),
            url.as_str()
        );
    }
}

#[test]
fn a_second_fetch_after_a_push_returns_the_new_commit_and_keeps_the_old_one() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    forge.write("a.txt", "one\n");
    let first = forge.commit_and_push("one");
    let mirror = forge.path("mirror");
    assert_eq!(fetch(&forge.file_url(), "main", &mirror).unwrap().id, first);
    // Nothing new: the same commit again.
    assert_eq!(fetch(&forge.file_url(), "main", &mirror).unwrap().id, first);

    forge.write("a.txt", "two\n");
    forge.write("dir/b.txt", "b\n");
    let second = forge.commit_and_push("two");
    let commit = fetch(&forge.file_url(), "main", &mirror).unwrap();
    assert_eq!(commit.id, second);
    assert_eq!(commit.summary, "two");
    git(&mirror, &["fsck", "--strict", "--no-dangling"]);

    // A force-push away from `second`: the mirror's branch follows, and `second` stays
    // in the mirror (a rollback to it must still be possible).
    git(&forge.dev, &["reset", "-q", "--hard", &first]);
    forge.write("c.txt", "c\n");
    git(&forge.dev, &["add", "-A"]);
    git(&forge.dev, &["commit", "-q", "-m", "three"]);
    git(&forge.dev, &["push", "-q", "-f", "origin", "HEAD:main"]);
    let third = fetch(&forge.file_url(), "main", &mirror).unwrap();
    assert_eq!(third.summary, "three");
    let dest = forge.path("work");
    checkout(&mirror, &second, &dest).unwrap();
    assert_eq!(
        std::fs::read_to_string(dest.join("a.txt")).unwrap(),
        "two\n"
    );
}

#[test]
fn a_checkout_is_a_clean_detached_work_tree_of_the_commit_with_its_origin() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    forge.write("kiln.toml", "[app]\n");
    forge.write("src/main.rs", "fn main() {}\n");
    forge.write(".gitignore", "target/\n");
    let id = forge.commit_and_push("first");
    let mirror = forge.path("mirror");
    let dest = forge.path("work");

    for url in [forge.file_url(), forge.bare.to_str().unwrap().to_owned()] {
        fetch(&url, "main", &mirror).unwrap();
        checkout(&mirror, &id, &dest).unwrap();
        let source = describe(&dest).unwrap().expect("a work tree");
        assert_eq!(source.root, dest);
        assert_eq!(source.commit.as_deref(), Some(id.as_str()));
        assert_eq!(source.branch, None, "detached");
        assert!(source.clean, "{:?}", source.dirty_paths);
        assert_eq!(source.remote.as_deref(), Some(url.as_str()));
        assert_eq!(
            std::fs::read_to_string(dest.join("src/main.rs")).unwrap(),
            "fn main() {}\n"
        );
        // git agrees: clean, detached at the commit, objects borrowed from the mirror.
        assert_eq!(git(&dest, &["status", "--porcelain"]), "");
        assert_eq!(git(&dest, &["rev-parse", "HEAD"]).trim(), id);
        git(&dest, &["fsck", "--no-dangling"]);
        let alternates =
            std::fs::read_to_string(dest.join(".git/objects/info/alternates")).unwrap();
        assert_eq!(
            alternates.trim(),
            mirror.join("objects").to_str().unwrap(),
            "no object copied"
        );
        assert!(!forge.path("work.new").exists());
        assert!(!forge.path("work.old").exists());
    }
}

#[test]
fn checking_out_another_commit_replaces_the_files() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    forge.write("gone.txt", "deleted in the second commit\n");
    forge.write("run.sh", "#!/bin/sh\necho hi\n");
    forge.write("target.txt", "the link's target\n");
    let first = forge.commit_and_push("first");
    std::fs::remove_file(forge.dev.join("gone.txt")).unwrap();
    std::fs::set_permissions(
        forge.dev.join("run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("target.txt", forge.dev.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", forge.dev.join("abs-link")).unwrap();
    let second = forge.commit_and_push("second");

    let mirror = forge.path("mirror");
    fetch(forge.bare.to_str().unwrap(), "main", &mirror).unwrap();
    let dest = forge.path("work");
    checkout(&mirror, &first, &dest).unwrap();
    assert!(dest.join("gone.txt").exists());
    assert_eq!(mode(&dest.join("run.sh")) & 0o111, 0);
    // Something of the daemon's own in the old tree disappears too.
    std::fs::write(dest.join("untracked"), "x").unwrap();

    checkout(&mirror, &second, &dest).unwrap();
    assert!(!dest.join("gone.txt").exists(), "a deleted file disappears");
    assert!(!dest.join("untracked").exists());
    assert_eq!(mode(&dest.join("run.sh")) & 0o111, 0o111, "executable");
    let link = std::fs::symlink_metadata(dest.join("link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(dest.join("link")).unwrap(),
        Path::new("target.txt")
    );
    assert_eq!(
        std::fs::read_link(dest.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    let source = describe(&dest).unwrap().unwrap();
    assert_eq!(source.commit.as_deref(), Some(second.as_str()));
    assert!(source.clean, "{:?}", source.dirty_paths);

    // And back: the rollback direction.
    checkout(&mirror, &first, &dest).unwrap();
    assert!(dest.join("gone.txt").exists());
    assert!(std::fs::symlink_metadata(dest.join("link")).is_err());
    assert!(describe(&dest).unwrap().unwrap().clean);
}

#[test]
fn a_stale_staging_tree_from_a_crash_is_removed_first() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    forge.write("a.txt", "a\n");
    let id = forge.commit_and_push("first");
    let mirror = forge.path("mirror");
    fetch(&forge.file_url(), "main", &mirror).unwrap();
    let dest = forge.path("work");
    // A crash mid-checkout left an unfinished tree (read-only, as some checkouts are) and
    // one mid-swap left an old tree behind.
    std::fs::create_dir_all(forge.path("work.new/half")).unwrap();
    std::fs::write(forge.path("work.new/half/file"), "x").unwrap();
    std::fs::write(forge.path("work.old"), "x").unwrap();
    checkout(&mirror, &id, &dest).unwrap();
    assert!(!forge.path("work.new").exists());
    assert!(!forge.path("work.old").exists());
    assert!(describe(&dest).unwrap().unwrap().clean);
    // `dest` was a file: replaced too.
    let dest = forge.path("was-a-file");
    std::fs::write(&dest, "x").unwrap();
    checkout(&mirror, &id, &dest).unwrap();
    assert!(dest.join("a.txt").exists());
}

#[test]
fn a_missing_branch_is_an_error_naming_the_branch_and_url() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    forge.write("a.txt", "a\n");
    forge.commit_and_push("first");
    let url = forge.file_url();
    let err = fetch(&url, "nope", &forge.path("mirror")).unwrap_err();
    assert!(matches!(err, GitError::NoBranch { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("branch nope does not exist in {url}")
    );
    // An empty repository has no branch at all.
    let empty = forge.path("empty.git");
    std::fs::create_dir(&empty).unwrap();
    git(&empty, &["init", "-q", "--bare"]);
    let err = fetch(empty.to_str().unwrap(), "main", &forge.path("mirror")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("branch main does not exist in {}", empty.display())
    );
}

#[test]
fn a_url_that_is_no_repository_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let missing = root.join("missing");
    for url in [
        empty.to_str().unwrap().to_owned(),
        format!("file://{}", missing.display()),
    ] {
        let err = fetch(&url, "main", &root.join("mirror")).unwrap_err();
        assert!(matches!(err, GitError::NotARepository { .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("{url} is not a git repository"));
    }
    let err = fetch("http://example.com/app.git", "main", &root.join("mirror")).unwrap_err();
    assert!(matches!(err, GitError::InvalidUrl { .. }), "{err:?}");
    let err = fetch(empty.to_str().unwrap(), "a..b", &root.join("mirror")).unwrap_err();
    assert_eq!(err.to_string(), "invalid branch name \"a..b\"");
}

#[test]
fn a_commit_the_mirror_lacks_is_an_error_naming_it() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    forge.write("a.txt", "a\n");
    let id = forge.commit_and_push("first");
    let mirror = forge.path("mirror");
    fetch(&forge.file_url(), "main", &mirror).unwrap();
    let unknown = "1234567890123456789012345678901234567890";
    let err = checkout(&mirror, unknown, &forge.path("work")).unwrap_err();
    assert!(matches!(err, GitError::UnknownCommit { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "commit {unknown} cannot be checked out of the mirror at {}",
            mirror.display()
        )
    );
    // A tree is not a commit.
    let tree = git(&forge.dev, &["rev-parse", "HEAD^{tree}"]);
    let err = checkout(&mirror, tree.trim(), &forge.path("work")).unwrap_err();
    assert!(matches!(err, GitError::UnknownCommit { .. }), "{err:?}");
    let err = checkout(&mirror, "main", &forge.path("work")).unwrap_err();
    assert!(matches!(err, GitError::InvalidCommit { .. }), "{err:?}");
    // Nothing was left behind by the failed attempts.
    assert!(!forge.path("work").exists());
    checkout(&mirror, &id, &forge.path("work")).unwrap();
}

#[test]
fn a_long_message_is_bounded() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    let message = format!("Summary line\n\n{}", "é".repeat(10_000));
    let id = forge.commit_and_push(&message);
    let commit = fetch(&forge.file_url(), "main", &forge.path("mirror")).unwrap();
    assert_eq!(commit.id, id);
    assert_eq!(commit.summary, "Summary line");
    assert!(commit.message.len() <= MESSAGE_BYTES);
    assert!(commit.message.len() > MESSAGE_BYTES - 4);
    assert!(message.starts_with(&commit.message));
}

#[test]
fn a_submodule_is_left_an_empty_directory_and_the_tree_is_still_clean() {
    if !git_available() {
        return;
    }
    // Submodules are not fetched nor checked out: the gitlink's commit belongs to another
    // repository. git leaves such a submodule an empty directory, and so does kiln.
    let forge = Forge::new();
    forge.write("a.txt", "a\n");
    forge.write(
        ".gitmodules",
        "[submodule \"lib\"]\n\tpath = vendor/lib\n\turl = https://example.invalid/lib.git\n",
    );
    git(
        &forge.dev,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            "160000,1234567890123456789012345678901234567890,vendor/lib",
        ],
    );
    // Not `commit_and_push`: its `add -A` would stage the missing directory as a deletion.
    git(&forge.dev, &["add", "a.txt", ".gitmodules"]);
    git(&forge.dev, &["commit", "-q", "-m", "with a submodule"]);
    git(&forge.dev, &["push", "-q", "origin", "HEAD:main"]);
    let id = git(&forge.dev, &["rev-parse", "HEAD"]).trim().to_owned();
    assert!(git(&forge.dev, &["ls-tree", "-r", &id]).contains("160000 commit"));
    let mirror = forge.path("mirror");
    fetch(&forge.file_url(), "main", &mirror).unwrap();
    git(&mirror, &["fsck", "--strict", "--no-dangling"]);
    let dest = forge.path("work");
    checkout(&mirror, &id, &dest).unwrap();
    let lib = dest.join("vendor/lib");
    assert!(std::fs::symlink_metadata(&lib).unwrap().is_dir());
    assert_eq!(std::fs::read_dir(&lib).unwrap().count(), 0);
    let source = describe(&dest).unwrap().unwrap();
    assert!(source.clean, "{:?}", source.dirty_paths);
    assert_eq!(git(&dest, &["status", "--porcelain"]), "");
}

/// A tree entry as written raw: mode, name, object id.
type RawEntry<'a> = (&'a str, &'a str, &'a str);

/// Writes a tree object with exactly these raw entries (mode, name, id), which `git mktree`
/// would refuse; returns its id.
fn raw_tree(dir: &Path, entries: &[RawEntry]) -> String {
    let mut bytes = Vec::new();
    for (mode, name, id) in entries {
        bytes.extend_from_slice(format!("{mode} {name}\0").as_bytes());
        bytes.extend_from_slice(&hex::decode(id));
    }
    git_with(
        dir,
        &["hash-object", "-w", "-t", "tree", "--literally", "--stdin"],
        Some(&bytes),
    )
    .trim()
    .to_owned()
}

mod hex {
    pub fn decode(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }
}

/// Commits `tree` on `main` of the forge, bypassing every check git's porcelain would make.
fn push_raw_commit(forge: &Forge, tree: &str) -> String {
    let id = git(&forge.bare, &["commit-tree", tree, "-m", "hostile"])
        .trim()
        .to_owned();
    git(&forge.bare, &["update-ref", "refs/heads/main", &id]);
    id
}

/// Every file under `dir`, for checking that nothing appeared outside a checkout.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_hostile_tree_cannot_write_outside_the_checkout() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    let blob = git_with(
        &forge.bare,
        &["hash-object", "-w", "--stdin"],
        Some(b"pwned\n"),
    )
    .trim()
    .to_owned();
    let inner = raw_tree(&forge.bare, &[("100644", "pwned.txt", &blob)]);
    let outside = forge.path("outside");
    std::fs::create_dir(&outside).unwrap();
    let link_target = git_with(
        &forge.bare,
        &["hash-object", "-w", "--stdin"],
        Some(outside.to_str().unwrap().as_bytes()),
    )
    .trim()
    .to_owned();

    let cases: Vec<(&str, Vec<RawEntry>)> = vec![
        ("a tree named ..", vec![("40000", "..", &inner)]),
        ("a tree named .git", vec![("40000", ".git", &inner)]),
        ("a tree named .GIT", vec![("40000", ".GIT", &inner)]),
        (
            "a name with a slash",
            vec![("100644", "../pwned.txt", &blob)],
        ),
        (
            "an absolute name",
            vec![("100644", "/tmp/pwned.txt", &blob)],
        ),
        ("a tree named .", vec![("40000", ".", &inner)]),
        // A symlink to a directory outside, and a tree of the same name whose file would be
        // written through it if the link were followed.
        (
            "a symlink and a tree of the same name",
            vec![("120000", "link", &link_target), ("40000", "link", &inner)],
        ),
    ];
    for (what, entries) in cases {
        let tree = raw_tree(&forge.bare, &entries);
        let id = push_raw_commit(&forge, &tree);
        let mirror = forge.path("mirror");
        // The mirror may hold it (it is git's data, not kiln's files); writing it out is
        // what must not escape.
        let fetched = fetch(forge.bare.to_str().unwrap(), "main", &mirror).unwrap();
        assert_eq!(fetched.id, id, "{what}");
        let dest = forge.path("work");
        let result = checkout(&mirror, &id, &dest);
        assert!(
            matches!(result, Err(GitError::Checkout { .. })),
            "{what}: {result:?}"
        );
        let err = result.unwrap_err();
        let message = err.to_string();
        assert!(message.contains(dest.to_str().unwrap()), "{message}");
        assert_eq!(files_under(&outside), Vec::<PathBuf>::new(), "{what}");
        assert!(!forge.path("pwned.txt").exists(), "{what}");
        assert!(!Path::new("/tmp/pwned.txt").exists(), "{what}");
        assert!(!forge.path("work.new").exists(), "{what}: staging removed");
    }
}

#[test]
fn validate_url_accepts_the_four_kinds() {
    for url in [
        "/srv/git/app.git",
        "file:///srv/git/app.git",
        "https://example.com/org/app.git",
        "ssh://git@example.com/org/app.git",
        "git@example.com:org/app.git",
    ] {
        validate_url(url).unwrap();
    }
    for url in ["git://example.com/app", "http://example.com/app", ""] {
        assert!(validate_url(url).is_err(), "{url}");
    }
}

#[test]
fn an_https_password_never_reaches_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    // Port 1 on the loopback: refused at once, no network needed.
    let url = "https://alice:s3cret@127.0.0.1:1/app.git";
    let err = fetch(url, "main", &tmp.path().join("mirror")).unwrap_err();
    let mut chain = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        chain.push_str(&format!(": {c}"));
        cause = c.source();
    }
    assert!(!chain.contains("s3cret"), "{chain}");
    assert!(!chain.contains("alice"), "{chain}");
    assert!(chain.contains("127.0.0.1"), "{chain}");
}

/// The environment variable that makes [`child_fetch_with_no_programs`] run: it is the body
/// of [`local_fetch_and_checkout_run_no_program`], in a process of its own.
const CHILD: &str = "KILN_GIT_TEST_NO_PROGRAMS";

#[test]
fn local_fetch_and_checkout_run_no_program() {
    if !git_available() {
        return;
    }
    let forge = Forge::new();
    forge.write("a.txt", "a\n");
    let id = forge.commit_and_push("first");
    // A PATH with only traps: a `git`, `git-upload-pack` and `ssh` that record that they ran.
    // gix's file:// transport would run `git-upload-pack` from PATH.
    let trap = forge.path("trap");
    std::fs::create_dir(&trap).unwrap();
    let marker = forge.path("ran");
    for name in ["git", "git-upload-pack", "git-receive-pack", "ssh", "sh"] {
        let path = trap.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho {name} >> {}\nexit 1\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The test binary itself, running only the child test, with PATH = the traps: the
    // environment of this process is shared by all tests and must not change.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_fetch_with_no_programs",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PATH", &trap)
        .env(CHILD, &forge.root)
        .env("KILN_GIT_TEST_COMMIT", &id)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
    assert!(
        !marker.exists(),
        "a program ran: {}",
        std::fs::read_to_string(&marker).unwrap_or_default()
    );
    assert!(forge.path("work/a.txt").exists());
}

#[test]
fn child_fetch_with_no_programs() {
    let Some(root) = std::env::var_os(CHILD) else {
        return;
    };
    let root = PathBuf::from(root);
    let id = std::env::var("KILN_GIT_TEST_COMMIT").unwrap();
    for url in [
        format!("file://{}", root.join("forge.git").display()),
        root.join("forge.git").display().to_string(),
    ] {
        let commit = fetch(&url, "main", &root.join("mirror")).unwrap();
        assert_eq!(commit.id, id);
        checkout(&root.join("mirror"), &id, &root.join("work")).unwrap();
        let source = describe(&root.join("work")).unwrap().unwrap();
        assert!(source.clean);
    }
}
