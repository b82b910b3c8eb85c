//! Making a clean work tree of a fetched commit: the build context of a followed source.
//!
//! [`checkout`] builds the new tree beside the destination (`<dest>.new`), as a real git work
//! tree whose `.git` borrows the mirror's objects through `objects/info/alternates` (as
//! `git clone --shared` does, so no object is copied), then swaps it into place with one
//! `renameat2(RENAME_EXCHANGE)` and removes the old tree. A crash leaves the old tree or the
//! new one under `dest`, never a mix, and at most a stale `<dest>.new` the next checkout
//! removes first.
//!
//! Files are written by gix's checkout: regular files, the executable bit and symlinks (as
//! symlinks, never followed when later files are written), with `.gitattributes` filters
//! applied as git would so the tree is clean to `describe`. Every path component is
//! validated (`..`, `.git` and its NTFS/HFS aliases, `/` inside a name are refused), so a
//! hostile tree cannot write outside `dest`. Submodules are neither fetched nor checked out:
//! a gitlink becomes an empty directory, as `git clone` without `--recurse-submodules`
//! leaves it.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use gix::ObjectId;

use crate::GitError;
use crate::fetch::REMOTE;

/// Makes `dest` a clean work tree of `commit` (40 hex digits, a commit [`crate::fetch`]
/// brought into `mirror`): removes whatever `dest` held, writes the commit's files, and
/// leaves `dest` a git work tree with `HEAD` detached at `commit` and `origin` set to the
/// URL the mirror was fetched from, so [`crate::describe`] reports that commit, clean.
///
/// `dest`'s work tree keeps using `mirror`'s objects: the mirror must stay where it is.
///
/// Blocking: call it from a thread that may block.
pub fn checkout(mirror: &Path, commit: &str, dest: &Path) -> Result<(), GitError> {
    let id = parse_commit_id(commit)?;
    let mirror_repo =
        gix::open_opts(mirror, gix::open::Options::isolated()).map_err(|e| GitError::Mirror {
            what: "repository",
            path: mirror.to_path_buf(),
            source: e.into(),
        })?;
    let tree = commit_tree(&mirror_repo, id).map_err(|source| GitError::UnknownCommit {
        commit: commit.to_owned(),
        mirror: mirror.to_path_buf(),
        source,
    })?;
    let url = mirror_repo
        .config_snapshot()
        .string(format!("remote.{REMOTE}.url").as_str())
        .map(|url| url.to_string());
    // Absolute, so the work tree finds the objects whatever the daemon's directory is.
    let objects = std::fs::canonicalize(mirror_repo.objects.store_ref().path()).map_err(|e| {
        GitError::Mirror {
            what: "objects directory",
            path: mirror.to_path_buf(),
            source: e.into(),
        }
    })?;
    drop(mirror_repo);

    let err = |source: crate::Cause| GitError::Checkout {
        commit: commit.to_owned(),
        path: dest.to_path_buf(),
        source,
    };
    let staging = crate::sibling(dest, "new").map_err(|e| err(e.into()))?;
    let old = crate::sibling(dest, "old").map_err(|e| err(e.into()))?;
    // What a crash left behind: an unfinished tree, or an old one not yet removed.
    crate::remove_any(&staging).map_err(|e| err(e.into()))?;
    crate::remove_any(&old).map_err(|e| err(e.into()))?;
    if let Some(parent) = staging.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err(e.into()))?;
    }

    let written = write_tree(&staging, &objects, url.as_deref(), id, tree);
    if let Err(source) = written {
        // Best effort: the next checkout removes it anyway.
        let _ = crate::remove_any(&staging);
        return Err(err(source));
    }
    swap_into_place(&staging, dest, &old).map_err(err)
}

/// `commit` as an object id, if it is a full lowercase or uppercase hex SHA-1.
fn parse_commit_id(commit: &str) -> Result<ObjectId, GitError> {
    let invalid = || GitError::InvalidCommit {
        commit: commit.chars().take(80).collect(),
    };
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    ObjectId::from_hex(commit.to_ascii_lowercase().as_bytes()).map_err(|_| invalid())
}

/// The tree of commit `id` in `repo`, which must have it.
fn commit_tree(repo: &gix::Repository, id: ObjectId) -> Result<ObjectId, crate::Cause> {
    let object = repo
        .try_find_object(id)?
        .ok_or("the mirror does not have it (fetch it first)")?;
    if object.kind != gix::objs::Kind::Commit {
        return Err(format!("it is a {}, not a commit", object.kind).into());
    }
    Ok(object.try_into_commit()?.tree_id()?.detach())
}

/// Writes a complete work tree of `commit` (whose tree is `tree`) into the new directory
/// `dir`, and makes sure it is on disk before it is swapped in.
fn write_tree(
    dir: &Path,
    mirror_objects: &Path,
    url: Option<&str>,
    commit: ObjectId,
    tree: ObjectId,
) -> Result<(), crate::Cause> {
    std::fs::create_dir(dir)?;
    let repo = gix::init(dir)?;
    let git_dir = repo.git_dir().to_path_buf();
    drop(repo);

    // The mirror's objects, borrowed: the alternates file is read when the repository is
    // opened, so it is written first and the repository opened again below.
    let info = git_dir.join("objects").join("info");
    std::fs::create_dir_all(&info)?;
    let mut alternates = mirror_objects
        .to_str()
        .ok_or("the mirror's path is not UTF-8")?
        .to_owned();
    alternates.push('\n');
    std::fs::write(info.join("alternates"), alternates)?;

    let config_path = git_dir.join("config");
    let mut config =
        gix::config::File::from_path_no_includes(config_path.clone(), gix::config::Source::Local)?;
    // No reflog: a build context has no history of its own, and writing one would need a
    // committer identity the daemon does not have.
    config.set_raw_value_by("core", None, "logAllRefUpdates", "false")?;
    if let Some(url) = url {
        config.set_raw_value_by("remote", Some(REMOTE.into()), "url", url)?;
        config.set_raw_value_by(
            "remote",
            Some(REMOTE.into()),
            "fetch",
            format!("+refs/heads/*:refs/remotes/{REMOTE}/*").as_str(),
        )?;
    }
    let mut bytes = Vec::new();
    config.write_to(&mut bytes)?;
    std::fs::write(&config_path, bytes)?;

    let repo = gix::open_opts(dir, gix::open::Options::isolated())?;
    repo.reference(
        "HEAD",
        commit,
        gix::refs::transaction::PreviousValue::Any,
        "kiln: checkout",
    )?;
    let mut index = repo.index_from_tree(&tree)?;
    let mut options =
        repo.checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)?;
    options.destination_is_initially_empty = true;
    // One thread: the daemon has other work, and a build context is small.
    options.thread_limit = Some(1);
    let objects = repo.objects.clone().into_arc()?;
    let outcome = gix::worktree::state::checkout(
        &mut index,
        dir,
        objects,
        &gix::progress::Discard,
        &gix::progress::Discard,
        &AtomicBool::new(false),
        options,
    )?;
    if let Some(collision) = outcome.collisions.first() {
        return Err(format!(
            "{} of the commit's paths collide with another (the first: {:?})",
            outcome.collisions.len(),
            collision.path
        )
        .into());
    }
    if let Some(failed) = outcome.errors.first() {
        return Err(format!("cannot write {:?}: {}", failed.path, failed.error).into());
    }
    index.write(Default::default(), Default::default())?;
    git_modes(dir, true)?;

    // One sync of the file system rather than one per file: the tree must be whole on disk
    // before the rename makes it the tree, or a power cut could leave empty files in it.
    let dir_fd = std::fs::File::open(dir)?;
    rustix::fs::syncfs(&dir_fd)?;
    Ok(())
}

/// Gives every file and directory under `dir` (its `.git` aside) the mode git means: 0644, or
/// 0755 when executable, and 0755 for a directory, whatever the process's umask made of them.
/// A build copies modes into the image, so a daemon with umask 077 would otherwise build a
/// commit into another image than a person's checkout of it (and one an unprivileged
/// instance user cannot run). Symlinks are left alone, never followed.
fn git_modes(dir: &Path, top: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if top {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if top && entry.file_name() == ".git" {
            continue;
        }
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            git_modes(&path, false)?;
        } else if kind.is_file() {
            let executable = entry.metadata()?.permissions().mode() & 0o111 != 0;
            let mode = if executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// Puts `staging` at `dest` and removes whatever `dest` held. With an existing `dest` the two
/// are exchanged atomically; where the file system cannot exchange, `dest` is moved to `old`
/// first (a crash between the two renames leaves no `dest`; the next checkout makes it).
fn swap_into_place(staging: &Path, dest: &Path, old: &Path) -> Result<(), crate::Cause> {
    let exists = std::fs::symlink_metadata(dest).is_ok();
    if !exists {
        std::fs::rename(staging, dest)?;
    } else {
        let exchanged = rustix::fs::renameat_with(
            rustix::fs::CWD,
            staging,
            rustix::fs::CWD,
            dest,
            rustix::fs::RenameFlags::EXCHANGE,
        );
        match exchanged {
            // `staging` now holds the old tree.
            Ok(()) => crate::remove_any(staging)?,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                std::fs::rename(dest, old)?;
                std::fs::rename(staging, dest)?;
                crate::remove_any(old)?;
            }
            Err(errno) => return Err(std::io::Error::from(errno).into()),
        }
    }
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_a_full_hex_id_is_a_commit() {
        for bad in ["", "abc", "main", &"g".repeat(40), &"a".repeat(41)] {
            let err = parse_commit_id(bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid commit id "), "{err}");
        }
        let id = parse_commit_id(&"AB".repeat(20)).unwrap();
        assert_eq!(id.to_hex().to_string(), "ab".repeat(20));
    }
}
