//! Bringing a branch of a followed repository into kiln's mirror of it.
//!
//! The mirror is a bare repository kiln owns, one per source. [`fetch`] adds to it the objects
//! the branch's commit needs and points `refs/heads/<branch>` at that commit; it never
//! removes anything, so every commit it ever returned can still be checked out (a rollback to
//! a commit the branch has since been force-pushed away from still works).
//!
//! A local repository (a path or `file://`) is read directly with gix and its missing
//! objects are copied one by one, parents before children, a tree's entries before the tree:
//! no process is spawned (gix's own `file://` transport would run `git-upload-pack`) and the
//! mirror never holds an object whose references it lacks, so a crash mid-copy leaves a
//! mirror the next fetch simply completes. `https://` and `ssh://` go through gix's network
//! client (`ssh` runs the `ssh` program, as git does).
//!
//! **Invariant:** if the mirror has an object, it has every object that object reaches.
//! **Invariant:** no error and no [`Commit`] carries a URL's password (or an HTTP user).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use gix::ObjectId;
use gix::bstr::ByteSlice;
use gix::objs::Write as _;

use crate::GitError;
use crate::url::{Kind, parse, redact};

/// How many bytes of a commit message a [`Commit`] keeps: enough for any real message,
/// bounded against a hostile one that would otherwise be copied into every event.
pub const MESSAGE_BYTES: usize = 4096;

/// A commit as the follower reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The commit's id, 40 lowercase hex digits.
    pub id: String,
    /// The author, `Name <email>`.
    pub author: String,
    /// The first line of the message.
    pub summary: String,
    /// The whole message, trimmed, cut to at most [`MESSAGE_BYTES`] bytes (at a character
    /// boundary).
    pub message: String,
    /// The author time, in Unix seconds.
    pub time: i64,
}

/// The name of the remote whose URL the mirror records, so that a checkout can name it.
pub(crate) const REMOTE: &str = "origin";

/// Brings `branch` of the repository at `url` into `mirror` (a bare repository kiln owns,
/// created on first use, parent directories included) and returns the commit the branch now
/// points at. The mirror records `url` as its `origin`, for [`crate::checkout`].
///
/// A local source is read directly; for `ssh://` and scp-like URLs gix runs `ssh` (honouring
/// the mirror's `core.sshCommand`, and otherwise the `ssh` configuration of the user kiln runs
/// as); `https://` verifies the server against the system's roots (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` are honoured). The mirror is opened isolated: no global or system git
/// configuration and no `GIT_*` variable changes what is fetched.
///
/// Blocking: call it from a thread that may block. One fetch per mirror at a time (the
/// caller serializes them); a network fetch cannot be interrupted and ends only when the
/// transport gives up.
pub fn fetch(url: &str, branch: &str, mirror: &Path) -> Result<Commit, GitError> {
    let (parsed, kind) = parse(url)?;
    let branch_ref = branch_ref(branch)?;
    let repo = open_or_init_mirror(mirror)?;
    let id = match kind {
        Kind::Local => fetch_local(&parsed, url, branch, &branch_ref, &repo)?,
        Kind::Https | Kind::Ssh => fetch_remote(url, kind, branch, &branch_ref, &repo)?,
    };
    set_origin(&repo, url)?;
    commit_info(&repo, id).map_err(|source| GitError::Mirror {
        what: "fetched commit",
        path: mirror.to_path_buf(),
        source,
    })
}

/// `refs/heads/<branch>`, if `branch` is a branch name git would accept.
fn branch_ref(branch: &str) -> Result<gix::refs::FullName, GitError> {
    let invalid = || GitError::InvalidBranch {
        branch: branch.to_owned(),
    };
    if branch.is_empty() || branch.starts_with('-') || branch.starts_with("refs/") {
        return Err(invalid());
    }
    gix::refs::FullName::try_from(format!("refs/heads/{branch}")).map_err(|_| invalid())
}

/// Opens the mirror, or makes it: in a sibling directory renamed into place once complete,
/// so a crash never leaves a half-made mirror under the real name.
fn open_or_init_mirror(mirror: &Path) -> Result<gix::Repository, GitError> {
    let err = |what: &'static str| {
        move |source: crate::Cause| GitError::Mirror {
            what,
            path: mirror.to_path_buf(),
            source,
        }
    };
    // Missing, or an empty directory someone made for it: make the repository. (A rename
    // onto an empty directory replaces it.)
    let absent = match std::fs::read_dir(mirror) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => std::fs::symlink_metadata(mirror).is_err(),
    };
    if absent {
        let staging = crate::sibling(mirror, "init").map_err(|e| err("path")(e.into()))?;
        if let Some(parent) = staging.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err("parent directory")(e.into()))?;
        }
        crate::remove_any(&staging).map_err(|e| err("stale staging directory")(e.into()))?;
        gix::init_bare(&staging).map_err(|e| err("new repository")(e.into()))?;
        std::fs::rename(&staging, mirror).map_err(|e| err("new repository")(e.into()))?;
    }
    let repo = gix::open_opts(mirror, gix::open::Options::isolated())
        .map_err(|e| err("repository")(e.into()))?;
    if repo.workdir().is_some() {
        return Err(err("repository")(
            "it has a work tree; a mirror must be a bare repository".into(),
        ));
    }
    Ok(repo)
}

/// Records `url` as the mirror's `origin` (only when it changed), replacing the config file
/// whole so a crash leaves the old one or the new one.
fn set_origin(repo: &gix::Repository, url: &str) -> Result<(), GitError> {
    let path = repo.git_dir().join("config");
    let err = |source: crate::Cause| GitError::Mirror {
        what: "config",
        path: path.clone(),
        source,
    };
    let mut config =
        gix::config::File::from_path_no_includes(path.clone(), gix::config::Source::Local)
            .map_err(|e| err(e.into()))?;
    if config
        .string_by("remote", Some(REMOTE.into()), "url")
        .is_some_and(|current| current == url)
    {
        return Ok(());
    }
    config
        .set_raw_value_by("remote", Some(REMOTE.into()), "url", url)
        .map_err(|e| err(e.into()))?;
    let mut bytes = Vec::new();
    config.write_to(&mut bytes).map_err(|e| err(e.into()))?;
    crate::write_replace(&path, &bytes).map_err(|e| err(e.into()))
}

/// Copies what `branch` of the local repository at `url` reaches into `mirror` and points the
/// mirror's branch at it. No process, no protocol: both are repositories on this host.
fn fetch_local(
    parsed: &gix::Url,
    url: &str,
    branch: &str,
    branch_ref: &gix::refs::FullName,
    mirror: &gix::Repository,
) -> Result<ObjectId, GitError> {
    let path = gix::path::from_bstr(parsed.path.as_bstr())
        .map(std::borrow::Cow::into_owned)
        .map_err(|e| GitError::NotARepository {
            url: redact(url),
            source: e.into(),
        })?;
    let source = open_local(&path, url)?;
    let fetch_err = |source: crate::Cause| GitError::Fetch {
        url: redact(url),
        branch: branch.to_owned(),
        source,
    };
    let mut reference = source
        .try_find_reference(branch_ref.as_ref())
        .map_err(|e| fetch_err(e.into()))?
        .ok_or_else(|| GitError::NoBranch {
            url: redact(url),
            branch: branch.to_owned(),
        })?;
    let tip = reference
        .peel_to_id()
        .map_err(|e| fetch_err(e.into()))?
        .detach();
    copy_reachable(&source, mirror, tip).map_err(fetch_err)?;
    mirror
        .reference(
            branch_ref.as_ref(),
            tip,
            gix::refs::transaction::PreviousValue::Any,
            "kiln: fetch",
        )
        .map_err(|e| GitError::Mirror {
            what: "branch",
            path: mirror.git_dir().to_path_buf(),
            source: e.into(),
        })?;
    Ok(tip)
}

/// The local repository at `path`: a bare repository, a `.git` directory or a work tree.
fn open_local(path: &Path, url: &str) -> Result<gix::Repository, GitError> {
    let not_a_repository = |source: crate::Cause| GitError::NotARepository {
        url: redact(url),
        source,
    };
    // `gix::open` would take a path inside a work tree's `.git`, or follow a `.git` file;
    // kiln wants exactly the repository named, and a missing path said plainly.
    std::fs::metadata(path).map_err(|e| not_a_repository(e.into()))?;
    gix::open_opts(path, gix::open::Options::isolated()).map_err(|e| not_a_repository(e.into()))
}

/// Copies every object `tip` reaches that `mirror` lacks, so that each object is written
/// only after all those it references: the mirror's invariant holds at every moment.
///
/// An object the mirror has is not walked into: by the invariant, all it reaches is there.
/// Gitlinks (submodule commits) are not objects of this repository and are not followed.
fn copy_reachable(
    source: &gix::Repository,
    mirror: &gix::Repository,
    tip: ObjectId,
) -> Result<(), crate::Cause> {
    let hash = source.object_hash();
    // Depth-first with an explicit stack, an object pushed again once its children are
    // done: history and trees may be deep, the thread's stack is not.
    let mut stack = vec![(tip, false)];
    let mut seen = HashSet::new();
    while let Some((id, children_done)) = stack.pop() {
        if children_done {
            copy_object(source, mirror, id)?;
            continue;
        }
        if !seen.insert(id) || mirror.has_object(id) {
            continue;
        }
        let object = source
            .find_object(id)
            .map_err(|e| format!("cannot read object {id}: {e}"))?;
        stack.push((id, true));
        match object.kind {
            gix::objs::Kind::Commit => {
                let commit = gix::objs::CommitRef::from_bytes(&object.data, hash)
                    .map_err(|e| format!("cannot decode commit {id}: {e}"))?;
                stack.push((commit.tree(), false));
                stack.extend(commit.parents().map(|parent| (parent, false)));
            }
            gix::objs::Kind::Tree => {
                for entry in gix::objs::TreeRefIter::from_bytes(&object.data, hash) {
                    let entry = entry.map_err(|e| format!("cannot decode tree {id}: {e}"))?;
                    let child = entry.oid.to_owned();
                    if entry.mode.is_blob_or_symlink() {
                        // A blob references nothing: copied at once, read once.
                        if seen.insert(child) && !mirror.has_object(child) {
                            copy_object(source, mirror, child)?;
                        }
                    } else if entry.mode.is_tree() {
                        stack.push((child, false));
                    }
                }
            }
            gix::objs::Kind::Tag => {
                let tag = gix::objs::TagRef::from_bytes(&object.data, hash)
                    .map_err(|e| format!("cannot decode tag {id}: {e}"))?;
                stack.push((tag.target(), false));
            }
            gix::objs::Kind::Blob => {}
        }
    }
    Ok(())
}

/// Writes one object of `source` into `mirror`, checking that its bytes hash to its id (a
/// corrupt source must not become a corrupt mirror).
fn copy_object(
    source: &gix::Repository,
    mirror: &gix::Repository,
    id: ObjectId,
) -> Result<(), crate::Cause> {
    let object = source
        .find_object(id)
        .map_err(|e| format!("cannot read object {id}: {e}"))?;
    let written = mirror
        .objects
        .write_buf(object.kind, &object.data)
        .map_err(|e| format!("cannot write object {id} into the mirror: {e}"))?;
    if written != id {
        return Err(format!("object {id} is corrupt: its content hashes to {written}").into());
    }
    Ok(())
}

/// Fetches `branch` over the network into the mirror with gix's client.
fn fetch_remote(
    url: &str,
    kind: Kind,
    branch: &str,
    branch_ref: &gix::refs::FullName,
    mirror: &gix::Repository,
) -> Result<ObjectId, GitError> {
    if kind == Kind::Https {
        https_ready(url)?;
    }
    let fetch_err = |source: crate::Cause| GitError::Fetch {
        url: redact(url),
        branch: branch.to_owned(),
        source: redact_source(source, url),
    };
    let spec = format!("+{branch_ref}:{branch_ref}");
    let remote = mirror
        .remote_at(url)
        .map_err(|e| fetch_err(e.into()))?
        .with_refspecs(Some(spec.as_str()), gix::remote::Direction::Fetch)
        .map_err(|e| fetch_err(e.into()))?;
    let connection = remote
        .connect(gix::remote::Direction::Fetch)
        .map_err(|e| fetch_err(e.into()))?;
    let prepare = connection
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(|e| fetch_err(e.into()))?;
    let advertised = prepare.ref_map().mappings.iter().any(|mapping| {
        mapping
            .remote
            .as_name()
            .is_some_and(|name| name == branch_ref.as_bstr())
    });
    if !advertised {
        return Err(GitError::NoBranch {
            url: redact(url),
            branch: branch.to_owned(),
        });
    }
    prepare
        .receive(gix::progress::Discard, &AtomicBool::new(false))
        .map_err(|e| fetch_err(e.into()))?;
    let mut reference = mirror
        .find_reference(branch_ref.as_ref())
        .map_err(|e| fetch_err(e.into()))?;
    Ok(reference
        .peel_to_id()
        .map_err(|e| fetch_err(e.into()))?
        .detach())
}

/// Makes sure reqwest's rustls has a crypto provider: ring, installed as the process default
/// unless the process already chose one.
#[cfg(feature = "https")]
fn https_ready(_url: &str) -> Result<(), GitError> {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing one is fine: there is one then.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    Ok(())
}

/// Without the `https` feature, an `https://` source is refused plainly.
#[cfg(not(feature = "https"))]
fn https_ready(url: &str) -> Result<(), GitError> {
    Err(GitError::Unsupported {
        url: redact(url),
        scheme: "https",
    })
}

/// A network error's text with the URL's password (and user, for HTTP) taken out: gix's
/// transport errors may quote the URL as given.
fn redact_source(source: crate::Cause, url: &str) -> crate::Cause {
    let Ok(parsed) = gix::url::parse(url.as_bytes().as_bstr()) else {
        return source;
    };
    let mut secrets = Vec::new();
    if let Some(password) = parsed.password().filter(|p| !p.is_empty()) {
        secrets.push(password.to_owned());
    }
    if matches!(
        parsed.scheme,
        gix::url::Scheme::Https | gix::url::Scheme::Http
    ) && let Some(user) = parsed.user().filter(|u| !u.is_empty())
    {
        secrets.push(user.to_owned());
    }
    if secrets.is_empty() {
        return source;
    }
    // The whole chain, flattened: a cause below could quote the URL too.
    let mut text = source.to_string();
    let mut cause = source.source();
    while let Some(err) = cause {
        text.push_str(": ");
        text.push_str(&err.to_string());
        cause = err.source();
    }
    for secret in secrets {
        text = text.replace(&secret, "***");
    }
    text.into()
}

/// What the follower reports of commit `id`, read from `repo`.
pub(crate) fn commit_info(repo: &gix::Repository, id: ObjectId) -> Result<Commit, crate::Cause> {
    let object = repo
        .find_object(id)
        .map_err(|e| format!("cannot read commit {id}: {e}"))?;
    if object.kind != gix::objs::Kind::Commit {
        return Err(format!("{id} is a {}, not a commit", object.kind).into());
    }
    let commit = gix::objs::CommitRef::from_bytes(&object.data, repo.object_hash())
        .map_err(|e| format!("cannot decode commit {id}: {e}"))?;
    let author = commit
        .author()
        .map_err(|e| format!("cannot decode the author of commit {id}: {e}"))?
        .trim();
    let time = author
        .time()
        .map_err(|e| format!("cannot decode the author time of commit {id}: {e}"))?;
    let message = bounded(commit.message.to_str_lossy().trim(), MESSAGE_BYTES);
    let summary = message.lines().next().unwrap_or_default().trim().to_owned();
    Ok(Commit {
        id: id.to_hex().to_string(),
        author: format!(
            "{} <{}>",
            author.name.to_str_lossy(),
            author.email.to_str_lossy()
        ),
        summary,
        message,
        time: time.seconds,
    })
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn bounded(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn branch_names_git_would_refuse_are_refused() {
        for bad in [
            "",
            "-x",
            "a..b",
            "a b",
            "refs/heads/main",
            "x.lock",
            "a~1",
            "a:b",
        ] {
            let err = branch_ref(bad).unwrap_err();
            assert_eq!(err.to_string(), format!("invalid branch name {bad:?}"));
        }
        for good in ["main", "release/1.2", "feature-x"] {
            branch_ref(good).unwrap();
        }
    }

    #[test]
    fn a_message_is_cut_at_a_character_boundary() {
        assert_eq!(bounded("héllo", 2), "h");
        assert_eq!(bounded("héllo", 3), "hé");
        assert_eq!(bounded("abc", 10), "abc");
    }

    #[cfg(not(feature = "https"))]
    #[test]
    fn without_the_https_feature_an_https_source_is_refused_plainly() {
        let tmp = std::env::temp_dir().join("kiln-git-no-https-mirror");
        let err = fetch("https://tok@example.com/app.git", "main", &tmp).unwrap_err();
        assert_eq!(
            err.to_string(),
            "https:// sources are not supported by this build (source https://example.com/app.git)"
        );
        let _ = std::fs::remove_dir_all(tmp);
    }

    #[test]
    fn network_errors_lose_the_password_and_http_user() {
        let err: crate::Cause = "cannot connect to https://alice:s3cret@example.com/x".into();
        let text = redact_source(err, "https://alice:s3cret@example.com/x").to_string();
        assert_eq!(text, "cannot connect to https://***:***@example.com/x");
    }
}
