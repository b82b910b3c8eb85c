//! `describe` against real repositories made by the `git` program (in the tests only: the
//! crate itself never runs it). Every case also asks `git status --porcelain` and checks that
//! kiln's `clean` is git's answer, so the two cannot drift apart unnoticed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_git::{GitError, Source, describe};

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

/// Runs git in `dir` with no system or global configuration, so a developer's settings
/// (a default branch, signing, hooks) cannot change what the tests make.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .args([
            "-c",
            "user.name=kiln test",
            "-c",
            "user.email=test@kiln.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "protocol.file.allow=always",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A temporary directory holding one repository at `<tmp>/repo`.
struct Repo {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Repo {
    /// An empty repository: `git init`, nothing committed.
    fn init() -> Repo {
        let tmp = tempfile::tempdir().unwrap();
        // Canonical, so `root` compares equal whatever symlinks the temp directory is under.
        let dir = tmp.path().canonicalize().unwrap().join("repo");
        std::fs::create_dir(&dir).unwrap();
        git(&dir, &["init", "-q"]);
        Repo { _tmp: tmp, dir }
    }

    /// A repository with one commit of `a.txt`, `src/main.rs` and a `.gitignore` of `*.log`
    /// and `target/`.
    fn committed() -> Repo {
        let repo = Repo::init();
        repo.write("a.txt", "alpha\n");
        repo.write("src/main.rs", "fn main() {}\n");
        repo.write(".gitignore", "*.log\ntarget/\n");
        repo.git(&["add", "."]);
        repo.git(&["commit", "-q", "-m", "first"]);
        repo
    }

    fn git(&self, args: &[&str]) -> String {
        git(&self.dir, args)
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }

    /// `describe(path)`, which must find this repository, checked against git's own status.
    fn describe_at(&self, path: &Path) -> Source {
        let source = describe(path).unwrap().expect("inside a work tree");
        let porcelain = porcelain(&source.root);
        assert_eq!(
            source.clean,
            porcelain.is_empty(),
            "kiln says clean = {}, git status --porcelain says {porcelain:?}",
            source.clean
        );
        source
    }

    fn describe(&self) -> Source {
        self.describe_at(&self.dir)
    }
}

/// `git status --porcelain`, one line per change; untracked files always shown.
fn porcelain(dir: &Path) -> Vec<String> {
    git(dir, &["status", "--porcelain", "--untracked-files=normal"])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_clean_tree_names_its_commit_and_branch() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    let source = repo.describe();
    assert_eq!(source.root, repo.dir);
    assert_eq!(source.commit.as_deref(), Some(repo.head().as_str()));
    assert_eq!(source.commit.as_ref().map(String::len), Some(40));
    assert_eq!(source.branch.as_deref(), Some("main"));
    assert!(source.clean);
    assert!(source.dirty_paths.is_empty());
    assert_eq!(source.dirty_count, 0);
    assert_eq!(source.remote, None);
}

#[test]
fn a_modified_file_is_dirty_even_when_written_right_after_the_commit_with_the_same_size() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    // Same length as "alpha\n", and within the index's timestamp granularity: only a content
    // check (git's racy-entry rule) tells this apart from the committed file.
    repo.write("a.txt", "omega\n");
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["a.txt"]);
}

#[test]
fn a_staged_file_is_dirty() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    repo.write("new.txt", "new\n");
    repo.git(&["add", "new.txt"]);
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["new.txt"]);
}

#[test]
fn a_staged_change_that_the_work_tree_undoes_is_still_dirty() {
    if !git_available() {
        return;
    }
    // The work tree equals HEAD again, but the index holds the staged change (git: `MM`):
    // comparing the work tree with HEAD alone would call this clean.
    let repo = Repo::committed();
    repo.write("a.txt", "changed\n");
    repo.git(&["add", "a.txt"]);
    repo.write("a.txt", "alpha\n");
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["a.txt"]);
}

#[test]
fn an_untracked_file_is_dirty_and_an_untracked_directory_is_one_entry() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    repo.write("notes.md", "todo\n");
    repo.write("extra/one.txt", "1\n");
    repo.write("extra/two.txt", "2\n");
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["extra/", "notes.md"]);
    assert_eq!(source.dirty_count, 2);
}

#[test]
fn ignored_files_and_empty_directories_leave_the_tree_clean() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    repo.write("build.log", "noise\n");
    repo.write("target/release/app", "binary\n");
    std::fs::create_dir_all(repo.dir.join("empty/nested")).unwrap();
    let source = repo.describe();
    assert!(source.clean, "{:?}", source.dirty_paths);
}

#[test]
fn a_touched_but_unchanged_file_is_clean_and_describe_leaves_the_index_as_it_was() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    let file = repo.dir.join("a.txt");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let index = std::fs::read(repo.dir.join(".git/index")).unwrap();
    // Not through describe(), which would also ask git (and git refreshes the index).
    let source = describe(&repo.dir).unwrap().unwrap();
    assert!(source.clean, "{:?}", source.dirty_paths);
    // Read-only: git status would refresh the stale stat in the index; describe must not.
    assert_eq!(std::fs::read(repo.dir.join(".git/index")).unwrap(), index);
    assert!(porcelain(&repo.dir).is_empty());
}

#[test]
fn a_deleted_file_is_dirty() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    std::fs::remove_file(repo.dir.join("src/main.rs")).unwrap();
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["src/main.rs"]);
}

#[test]
fn a_file_whose_mode_changed_is_dirty() {
    if !git_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let repo = Repo::committed();
    let file = repo.dir.join("a.txt");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["a.txt"]);
}

#[test]
fn dirty_paths_are_bounded_but_the_count_is_not() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    for i in 0..25 {
        repo.write(&format!("new-{i:02}.txt"), "x\n");
    }
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_count, 25);
    assert_eq!(source.dirty_paths.len(), kiln_git::DIRTY_PATHS_SHOWN);
    assert_eq!(source.dirty_paths[0], "new-00.txt");
}

#[test]
fn a_detached_head_has_a_commit_and_no_branch() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    let first = repo.head();
    repo.write("a.txt", "second\n");
    repo.git(&["commit", "-q", "-am", "second"]);
    repo.git(&["checkout", "-q", "--detach", &first]);
    let source = repo.describe();
    assert_eq!(source.commit.as_deref(), Some(first.as_str()));
    assert_eq!(source.branch, None);
    assert!(source.clean);
}

#[test]
fn a_branch_other_than_main_is_named() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    repo.git(&["checkout", "-q", "-b", "feature/login"]);
    let source = repo.describe();
    assert_eq!(source.branch.as_deref(), Some("feature/login"));
}

#[test]
fn a_commit_behind_a_packed_ref_is_found() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    repo.git(&["pack-refs", "--all"]);
    repo.git(&["gc", "-q"]);
    assert!(!repo.dir.join(".git/refs/heads/main").exists());
    let source = repo.describe();
    assert_eq!(source.commit.as_deref(), Some(repo.head().as_str()));
    assert!(source.clean);
}

#[test]
fn a_repository_with_no_commit_yet_has_no_commit_rather_than_an_error() {
    if !git_available() {
        return;
    }
    let repo = Repo::init();
    let source = repo.describe();
    assert_eq!(source.commit, None);
    assert_eq!(source.branch.as_deref(), Some("main"));
    assert!(source.clean);

    repo.write("first.txt", "1\n");
    let source = repo.describe();
    assert_eq!(source.commit, None);
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["first.txt"]);

    repo.git(&["add", "first.txt"]);
    let source = repo.describe();
    assert_eq!(source.commit, None);
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["first.txt"]);
}

#[test]
fn outside_any_repository_there_is_no_source() {
    if !git_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The test's premise: the temporary directory is in no repository of its own.
    let premise = Command::new("git")
        .current_dir(tmp.path())
        .args(["rev-parse", "--is-inside-work-tree"])
        .output()
        .unwrap();
    assert!(
        !premise.status.success(),
        "{} is inside a git work tree; set TMPDIR elsewhere",
        tmp.path().display()
    );
    std::fs::write(tmp.path().join("kiln.toml"), "").unwrap();
    assert_eq!(describe(tmp.path()).unwrap(), None);
    assert_eq!(describe(&tmp.path().join("kiln.toml")).unwrap(), None);
}

#[test]
fn a_bare_repository_has_no_work_tree_so_no_source() {
    if !git_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    git(tmp.path(), &["init", "-q", "--bare", "bare.git"]);
    assert_eq!(describe(&tmp.path().join("bare.git")).unwrap(), None);
}

#[test]
fn a_path_in_a_subdirectory_or_a_file_finds_the_work_tree_root() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    repo.write("src/deep/er/kiln.toml", "");
    repo.git(&["add", "."]);
    repo.git(&["commit", "-q", "-m", "spec"]);
    for path in [
        repo.dir.join("src"),
        repo.dir.join("src/deep/er"),
        repo.dir.join("src/deep/er/kiln.toml"),
    ] {
        let source = repo.describe_at(&path);
        assert_eq!(source.root, repo.dir, "from {}", path.display());
        assert_eq!(source.commit.as_deref(), Some(repo.head().as_str()));
        assert!(source.clean);
    }
    // A change anywhere in the work tree makes it dirty, not only under the path asked about.
    repo.write("a.txt", "elsewhere\n");
    let source = repo.describe_at(&repo.dir.join("src/deep/er"));
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["a.txt"]);
}

#[test]
fn a_relative_file_name_is_resolved_from_the_current_directory() {
    if !git_available() {
        return;
    }
    // The current directory is this crate's, inside kiln's own repository when tests run from
    // a checkout; describe("Cargo.toml") must mean that file's directory, not fail on "".
    let here = std::env::current_dir().unwrap();
    let by_name = describe(Path::new("Cargo.toml")).unwrap();
    let by_dir = describe(&here).unwrap();
    assert_eq!(
        by_name.map(|s| (s.root, s.commit)),
        by_dir.map(|s| (s.root, s.commit))
    );
}

#[test]
fn a_linked_worktree_is_described_on_its_own() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    let linked = repo.dir.parent().unwrap().join("linked");
    repo.git(&[
        "worktree",
        "add",
        "-q",
        "-b",
        "feature",
        linked.to_str().unwrap(),
    ]);
    std::fs::write(linked.join("a.txt"), "changed in the linked worktree\n").unwrap();

    let source = describe(&linked).unwrap().unwrap();
    assert_eq!(source.root, linked);
    assert_eq!(source.branch.as_deref(), Some("feature"));
    assert_eq!(source.commit.as_deref(), Some(repo.head().as_str()));
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["a.txt"]);
    assert_eq!(source.clean, porcelain(&linked).is_empty());

    // The main work tree is unaffected by the linked one's change.
    let main = repo.describe();
    assert_eq!(main.branch.as_deref(), Some("main"));
    assert!(main.clean);
}

#[test]
fn a_changed_submodule_makes_the_tree_dirty() {
    if !git_available() {
        return;
    }
    let lib = Repo::committed();
    let repo = Repo::committed();
    repo.git(&[
        "submodule",
        "add",
        "-q",
        lib.dir.to_str().unwrap(),
        "vendor/lib",
    ]);
    repo.git(&["commit", "-q", "-m", "vendor lib"]);
    assert!(repo.describe().clean);

    // A new commit checked out in the submodule: the superproject's gitlink no longer matches.
    let sub = repo.dir.join("vendor/lib");
    std::fs::write(sub.join("a.txt"), "moved on\n").unwrap();
    git(&sub, &["commit", "-q", "-am", "moved on"]);
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["vendor/lib"]);
}

#[test]
fn status_show_untracked_files_no_does_not_hide_untracked_files() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    repo.git(&["config", "status.showUntrackedFiles", "no"]);
    repo.write("notes.md", "todo\n");
    // Not through describe(): git would (as configured) hide the file; kiln does not.
    let source = describe(&repo.dir).unwrap().unwrap();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["notes.md"]);
}

#[test]
fn the_remote_is_origins_url_without_credentials() {
    if !git_available() {
        return;
    }
    let cases = [
        (
            "https://alice:s3cret@git.example.com/team/app.git",
            "https://git.example.com/team/app.git",
        ),
        // A token passed as the user name, and one in a query string.
        (
            "https://ghp_token123@git.example.com/team/app.git?private_token=abc",
            "https://git.example.com/team/app.git",
        ),
        (
            "http://git.example.com:8080/app.git",
            "http://git.example.com:8080/app.git",
        ),
        (
            "ssh://deploy:hunter2@git.example.com:2222/srv/app.git",
            "ssh://deploy@git.example.com:2222/srv/app.git",
        ),
        (
            "git@git.example.com:team/app.git",
            "git@git.example.com:team/app.git",
        ),
        ("file:///srv/git/app.git", "file:///srv/git/app.git"),
    ];
    for (configured, expected) in cases {
        let repo = Repo::committed();
        repo.git(&["remote", "add", "origin", configured]);
        let source = repo.describe();
        assert_eq!(
            source.remote.as_deref(),
            Some(expected),
            "from {configured}"
        );
        let text = format!("{source:?}");
        for secret in ["s3cret", "ghp_token123", "private_token", "hunter2"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}

#[test]
fn only_origin_counts_as_the_remote() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    repo.git(&[
        "remote",
        "add",
        "upstream",
        "https://git.example.com/upstream.git",
    ]);
    assert_eq!(repo.describe().remote, None);
}

#[test]
fn a_path_that_does_not_exist_is_an_error_naming_it() {
    let missing = Path::new("/nonexistent/kiln/app/kiln.toml");
    let err = describe(missing).unwrap_err();
    assert!(matches!(err, GitError::Path { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot read /nonexistent/kiln/app/kiln.toml"
    );
}

#[test]
fn a_truncated_index_is_an_error_naming_the_repository() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    let index = repo.dir.join(".git/index");
    let bytes = std::fs::read(&index).unwrap();
    std::fs::write(&index, &bytes[..bytes.len() / 2]).unwrap();
    let err = describe(&repo.dir).unwrap_err();
    assert!(
        matches!(err, GitError::Read { what: "index", .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(repo.dir.to_str().unwrap()), "{message}");
    assert_eq!(
        message,
        format!(
            "cannot read the index of the git repository at {}",
            repo.dir.display()
        )
    );
    // The cause says what is wrong, for the error chain the binary prints.
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(!cause.is_empty());
}

#[test]
fn a_truncated_head_is_an_error_naming_the_repository() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    std::fs::write(repo.dir.join(".git/HEAD"), "").unwrap();
    let err = describe(&repo.dir).unwrap_err();
    assert!(
        matches!(err, GitError::Read { what: "HEAD", .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read the HEAD of the git repository at {}",
            repo.dir.display()
        )
    );
}

#[test]
fn a_dot_git_that_is_no_repository_is_an_error_naming_it_not_no_repository() {
    if !git_available() {
        return;
    }
    // git itself skips such a `.git` and reports "not a git repository"; a build would then
    // claim no source at all, so kiln names the broken `.git` instead.
    let repo = Repo::committed();
    std::fs::remove_file(repo.dir.join(".git/HEAD")).unwrap();
    for path in [repo.dir.clone(), repo.dir.join("src/main.rs")] {
        let err = describe(&path).unwrap_err();
        assert!(matches!(err, GitError::Corrupt { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "{} is not a valid git repository",
                repo.dir.join(".git").display()
            )
        );
    }

    // A linked worktree whose repository has gone: its `.git` file names a missing directory.
    let tmp = tempfile::tempdir().unwrap();
    let orphan = tmp.path().canonicalize().unwrap();
    std::fs::write(
        orphan.join(".git"),
        "gitdir: /nonexistent/repo/.git/worktrees/x\n",
    )
    .unwrap();
    let err = describe(&orphan).unwrap_err();
    assert!(matches!(err, GitError::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(orphan.join(".git").to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn garbage_in_head_or_a_missing_commit_is_an_error_not_a_panic() {
    if !git_available() {
        return;
    }
    // HEAD naming a branch whose file holds no object id.
    let repo = Repo::committed();
    std::fs::write(repo.dir.join(".git/refs/heads/main"), "not a hash\n").unwrap();
    let err = describe(&repo.dir).unwrap_err();
    assert!(
        err.to_string().contains(repo.dir.to_str().unwrap()),
        "{err}"
    );

    // HEAD naming a commit the object database does not have.
    let repo = Repo::committed();
    std::fs::write(
        repo.dir.join(".git/refs/heads/main"),
        "1234567890123456789012345678901234567890\n",
    )
    .unwrap();
    let err = describe(&repo.dir).unwrap_err();
    assert!(
        err.to_string().contains(repo.dir.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn files_converted_on_checkout_by_gitattributes_are_clean() {
    if !git_available() {
        return;
    }
    // Stored with LF, checked out with CRLF: the work tree's bytes differ from the blob's,
    // and only applying the attributes' conversion shows that nothing changed.
    let repo = Repo::init();
    repo.write(".gitattributes", "*.txt text eol=crlf\n");
    repo.write("crlf.txt", "one\ntwo\n");
    repo.git(&["add", "."]);
    repo.git(&["commit", "-q", "-m", "crlf"]);
    std::fs::remove_file(repo.dir.join("crlf.txt")).unwrap();
    repo.git(&["checkout", "--", "crlf.txt"]);
    assert_eq!(
        std::fs::read(repo.dir.join("crlf.txt")).unwrap(),
        b"one\r\ntwo\r\n"
    );
    let source = repo.describe();
    assert!(source.clean, "{:?}", source.dirty_paths);

    repo.write("crlf.txt", "one\r\ntwo\r\nthree\r\n");
    let source = repo.describe();
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["crlf.txt"]);
}

#[test]
fn a_repository_owned_by_another_user_is_still_described() {
    if !git_available() {
        return;
    }
    // The daemon may run as root over a developer's checkout (and a developer over a
    // checkout root made): git refuses such a repository ("dubious ownership") unless it is
    // listed in safe.directory; reading its commit and status needs no such trust.
    let root_user = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root_user {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but this test needs root to hand a repository to another user");
        }
        eprintln!("skipping: needs root to hand a repository to another user");
        return;
    }
    let repo = Repo::committed();
    let head = repo.head();
    repo.write("untracked.txt", "x\n");
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&repo.dir)
        .status()
        .unwrap();
    assert!(chown.success());
    let source = describe(&repo.dir).unwrap().unwrap();
    assert_eq!(source.commit.as_deref(), Some(head.as_str()));
    assert!(!source.clean);
    assert_eq!(source.dirty_paths, ["untracked.txt"]);
}

#[test]
fn a_symlink_to_the_work_tree_describes_the_real_path() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    let link = repo.dir.parent().unwrap().join("link");
    std::os::unix::fs::symlink(&repo.dir, &link).unwrap();
    let source = describe(&link.join("src")).unwrap().unwrap();
    assert_eq!(source.root, repo.dir);
    assert!(source.clean);
}

#[test]
fn an_origin_url_gix_cannot_parse_is_an_error_naming_the_repository_not_a_panic() {
    if !git_available() {
        return;
    }
    let repo = Repo::committed();
    // git stores any text; this one has a scheme and no host.
    repo.git(&["config", "remote.origin.url", "https://"]);
    let err = describe(&repo.dir).unwrap_err();
    assert!(
        matches!(
            err,
            GitError::Read {
                what: "remote origin",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read the remote origin of the git repository at {}",
            repo.dir.display()
        )
    );
}
