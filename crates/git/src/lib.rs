//! `kiln-git`: where a spec's sources come from, read from the git repository they live in.
//!
//! [`describe`] answers, for a file or directory, whether it is inside a git work tree and, if
//! so, which commit is checked out, on which branch, from which remote, and whether the work
//! tree is clean. `kiln build` records that in an image's provenance; a build from a dirty
//! tree is not the commit it names, so cleanliness is part of the answer, not an option.
//!
//! For the GitOps follower, [`fetch`] brings a branch of a followed repository into a bare
//! mirror kiln owns and [`checkout`] makes a clean work tree of one of its commits, the build
//! context; [`validate_url`] refuses a source URL kiln cannot follow before it is stored.
//!
//! It works with `gix` (gitoxide), never the `git` program: the answer must not depend on
//! which git, if any, is installed. A local source (a path or `file://`) is read directly,
//! with no process at all; `ssh://` runs the `ssh` program, as git does.
//!
//! **API boundary:** [`describe`] is read-only: it writes nothing to a repository, not even
//! the index stat refresh `git status` does. Only [`fetch`] (into its mirror) and
//! [`checkout`] (into its destination) write, and only there. Credentials never leave this
//! crate: a URL in an error or a [`Source`] is shown without its password (and, for HTTP,
//! without user or query).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use gix::bstr::{BString, ByteSlice};

mod checkout;
mod fetch;
mod url;

pub use checkout::checkout;
pub use fetch::{Commit, MESSAGE_BYTES, fetch};
pub use url::{redact, validate_url};

/// The cause of an error from gix, the file system or kiln's own checks, kept for the chain
/// the binary prints.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How many dirty paths a [`Source`] names; enough for a message, bounded for a huge tree.
pub const DIRTY_PATHS_SHOWN: usize = 10;

/// A work tree's source identity: what `describe` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The work tree's top directory (for a linked worktree, that worktree's own).
    pub root: PathBuf,
    /// The checked-out commit, 40 lowercase hex digits; `None` before the first commit.
    pub commit: Option<String>,
    /// The branch `HEAD` names (`main`, not `refs/heads/main`); `None` when detached.
    pub branch: Option<String>,
    /// No modified, staged, deleted or untracked (not ignored) file: what an empty
    /// `git status --porcelain` says, except that `status.showUntrackedFiles = no` does not
    /// hide untracked files here.
    pub clean: bool,
    /// `origin`'s fetch URL, without credentials; `None` when there is no `origin`.
    pub remote: Option<String>,
    /// The first [`DIRTY_PATHS_SHOWN`] changed paths, relative to `root`, `/`-separated and
    /// sorted; an untracked directory is one entry ending in `/`. Empty when clean.
    pub dirty_paths: Vec<String>,
    /// How many paths are changed in all (`dirty_paths` may show fewer).
    pub dirty_count: usize,
}

/// Why a work tree could not be described. Each names the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The path given does not exist or cannot be read.
    #[error("cannot read {}", path.display())]
    Path {
        /// The path given to [`describe`].
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// A `.git` exists but is not a repository git could use (a truncated `HEAD`, say).
    #[error("{} is not a valid git repository", path.display())]
    Corrupt {
        /// The `.git` directory or file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: gix::Error,
    },
    /// The repository was found but could not be opened (its config, say).
    #[error("cannot open the git repository above {}", path.display())]
    Open {
        /// The path given to [`describe`].
        path: PathBuf,
        /// gix's error.
        #[source]
        source: gix::Error,
    },
    /// A part of the repository could not be read: `HEAD`, the index, the remote, the status.
    #[error("cannot read the {what} of the git repository at {}", path.display())]
    Read {
        /// What was being read.
        what: &'static str,
        /// The work tree's root.
        path: PathBuf,
        /// gix's error.
        #[source]
        source: gix::Error,
    },
    /// A source URL kiln cannot follow (see [`validate_url`]).
    #[error("invalid source url {url}: {reason}")]
    InvalidUrl {
        /// The URL, without credentials.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A URL of a kind this build of kiln cannot fetch.
    #[error("{scheme}:// sources are not supported by this build (source {url})")]
    Unsupported {
        /// The URL, without credentials.
        url: String,
        /// The URL's scheme.
        scheme: &'static str,
    },
    /// A branch name git would not accept.
    #[error("invalid branch name {branch:?}")]
    InvalidBranch {
        /// The name given.
        branch: String,
    },
    /// A commit id that is not 40 hex digits.
    #[error("invalid commit id {commit:?}: expected 40 hex digits")]
    InvalidCommit {
        /// The id given (at most 80 characters of it).
        commit: String,
    },
    /// A local source URL that names no repository.
    #[error("{url} is not a git repository")]
    NotARepository {
        /// The URL, without credentials.
        url: String,
        /// Why it could not be opened.
        #[source]
        source: Cause,
    },
    /// The repository has no such branch.
    #[error("branch {branch} does not exist in {url}")]
    NoBranch {
        /// The URL, without credentials.
        url: String,
        /// The branch asked for.
        branch: String,
    },
    /// Fetching a branch failed: reading the source, the network, or writing its objects.
    #[error("cannot fetch branch {branch} of {url}")]
    Fetch {
        /// The URL, without credentials.
        url: String,
        /// The branch being fetched.
        branch: String,
        /// What failed, with any credentials of the URL taken out.
        #[source]
        source: Cause,
    },
    /// kiln's mirror of a source could not be made, opened or written.
    #[error("cannot use the {what} of the mirror at {}", path.display())]
    Mirror {
        /// What part of it.
        what: &'static str,
        /// The mirror.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Cause,
    },
    /// [`checkout`] was given a commit the mirror does not have, or an object that is no
    /// commit.
    #[error("commit {commit} cannot be checked out of the mirror at {}", mirror.display())]
    UnknownCommit {
        /// The commit asked for.
        commit: String,
        /// The mirror.
        mirror: PathBuf,
        /// Why.
        #[source]
        source: Cause,
    },
    /// Writing a work tree failed (including a path in the commit that would escape it).
    #[error("cannot check out commit {commit} into {}", path.display())]
    Checkout {
        /// The commit being checked out.
        commit: String,
        /// The destination.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Cause,
    },
}

/// Describes the git work tree that `path` (a file or a directory) is in, or `None` when it
/// is in none (a bare repository has no work tree, so is none either).
///
/// Discovery walks up from `path` as git does, not past a file-system boundary, and ignores
/// `GIT_DIR` and the other environment overrides: the answer depends on `path` only.
pub fn describe(path: &Path) -> Result<Option<Source>, GitError> {
    let meta = std::fs::metadata(path).map_err(|source| GitError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    let start = if meta.is_dir() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    // Absolute and free of `..`, so `root` is too (gix keeps a relative start relative).
    let start = std::fs::canonicalize(&start).map_err(|source| GitError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    let repo = match gix::discover(&start) {
        Ok(repo) => repo,
        Err(err) if not_found(&err) => {
            check_no_broken_dot_git(&start)?;
            return Ok(None);
        }
        Err(source) => {
            return Err(GitError::Open {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let Some(root) = repo.workdir().map(Path::to_path_buf) else {
        return Ok(None);
    };
    let read = |what: &'static str| {
        let root = root.clone();
        move |source: gix::Error| GitError::Read {
            what,
            path: root,
            source,
        }
    };

    let head = repo.head().map_err(read("HEAD"))?;
    let commit = head.id().map(|id| id.detach().to_hex().to_string());
    let branch = head
        .referent_name()
        .map(|name| name.shorten().to_str_lossy().into_owned());
    let remote = match repo.try_find_remote("origin") {
        None => None,
        Some(found) => {
            let remote = found.map_err(read("remote origin"))?;
            remote
                .url(gix::remote::Direction::Fetch)
                .map(|url| without_credentials(url.clone()))
        }
    };

    // Read first (status would read it too, from the same cache) so that a damaged index is
    // named as such.
    repo.index_or_empty().map_err(read("index"))?;
    let changed = changed_paths(&repo).map_err(read("status"))?;
    Ok(Some(Source {
        root,
        commit,
        branch,
        clean: changed.is_empty(),
        remote,
        dirty_count: changed.len(),
        dirty_paths: changed.into_iter().take(DIRTY_PATHS_SHOWN).collect(),
    }))
}

/// Every path that `git status --porcelain` would list: staged (HEAD against the index),
/// modified, deleted, type-changed or conflicted (index against work tree), and untracked.
fn changed_paths(repo: &gix::Repository) -> Result<BTreeSet<String>, gix::Error> {
    // An untracked file is part of what a build reads, so a tree that has one is not the
    // commit it names: untracked files are looked for whatever `status.showUntrackedFiles`
    // says (with `no`, gix's status would not walk the directory at all).
    let dirwalk = repo
        .dirwalk_options()?
        .emit_untracked(gix::dir::walk::EmissionMode::CollapseDirectory);
    let status = repo
        .status(gix::progress::Discard)?
        .index_worktree_options_mut(|options| options.dirwalk_options = Some(dirwalk))
        // Renames are a change either way; finding them would only cost time.
        .index_worktree_rewrites(None)
        .tree_index_track_renames(gix::status::tree_index::TrackRenames::Disabled);
    let mut changed = BTreeSet::new();
    for item in status.into_iter(Vec::<BString>::new())? {
        let item = item?;
        let mut path = item.location().to_str_lossy().into_owned();
        match &item {
            gix::status::Item::TreeIndex(_) => {}
            // `summary` is `None` for what is not a change: an ignored or tracked directory
            // entry, or an entry whose stat alone changed.
            gix::status::Item::IndexWorktree(change) if change.summary().is_none() => continue,
            gix::status::Item::IndexWorktree(change) => {
                // An untracked directory is listed once, as git does: `dir/`.
                if let gix::status::index_worktree::Item::DirectoryContents { entry, .. } = change
                    && matches!(
                        entry.disk_kind,
                        Some(gix::dir::entry::Kind::Directory | gix::dir::entry::Kind::Repository)
                    )
                {
                    path.push('/');
                }
            }
        }
        changed.insert(path);
    }
    Ok(changed)
}

/// Whether gix found no repository at all (as opposed to failing to open one).
fn not_found(err: &gix::Error) -> bool {
    use gix::discover::upwards::Error as Upwards;
    matches!(
        err.downcast_any_ref::<Upwards>(),
        Some(
            Upwards::NoGitRepository { .. }
                | Upwards::NoGitRepositoryWithinCeiling { .. }
                | Upwards::NoGitRepositoryWithinFs { .. }
        )
    )
}

/// Git, like gix, skips a `.git` it cannot use and goes on looking upwards, so a repository
/// with a truncated `HEAD` reads as "not a repository". Claiming that a build has no source
/// when its `.git` is broken would be wrong, so the nearest `.git` on the way up, if any,
/// must be a repository or the answer is an error naming it.
fn check_no_broken_dot_git(start: &Path) -> Result<(), GitError> {
    for dir in start.ancestors() {
        let dot_git = dir.join(".git");
        if std::fs::symlink_metadata(&dot_git).is_err() {
            continue;
        }
        return match gix::discover::is_git(&dot_git) {
            Ok(_) => Ok(()),
            Err(source) => Err(GitError::Corrupt {
                path: dot_git,
                source,
            }),
        };
    }
    Ok(())
}

/// `url` as text, with nothing in it that could be a secret: never a password; for HTTP(S)
/// not the user either (a token is often passed as the user name) nor a query string. An SSH
/// user (`git@`) is kept: it is not a secret and the URL does not work without it.
fn without_credentials(mut url: gix::Url) -> String {
    url.set_password(None);
    if matches!(url.scheme, gix::url::Scheme::Http | gix::url::Scheme::Https) {
        url.set_user(None);
        if let Some(query) = url.path.find_byte(b'?') {
            url.path.truncate(query);
        }
    }
    url.to_bstring().to_str_lossy().into_owned()
}

/// `path` with `.<suffix>` added to its last component: a sibling on the same file system, so
/// a rename between the two is atomic.
fn sibling(path: &Path, suffix: &str) -> std::io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} has no final component", path.display()),
        )
    })?;
    let mut name = name.to_os_string();
    name.push(".");
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// Removes `path` whatever it is (a directory tree, a file, a symlink, which is not followed);
/// nothing there is not an error.
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    }
}

/// Replaces the file at `path` with `bytes`: temporary file, fsync, rename, fsync directory.
fn write_replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = sibling(path, "kiln-tmp")?;
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}
