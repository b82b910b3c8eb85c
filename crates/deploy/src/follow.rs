//! What the git follower does with its branch's head: take it through build, test, plan and
//! apply, hold it back, or nothing. A pure function of what the follower remembers and the
//! commit the branch points at, so `kiln rollback` and the automation agree by construction:
//! a rolled-back commit is marked bad and the follower never applies it again, and a pinned
//! app waits for a newer commit (or for `kiln sync`) as its source's `resume` says.

use std::collections::BTreeSet;

/// `sync`: whether a planned commit is applied at once or waits for `kiln sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Build, test, plan and apply each new commit.
    #[default]
    Auto,
    /// Build, test and plan it; apply on `kiln sync`.
    Manual,
}

/// `resume`: what ends a pin a rollback put on a followed app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// A commit other than the bad one(s).
    #[default]
    NewCommit,
    /// Only `kiln sync`.
    Manual,
}

impl SyncMode {
    /// As written in `kiln source add --sync`.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Auto => "auto",
            SyncMode::Manual => "manual",
        }
    }
}

impl Resume {
    /// As written in `kiln source add --resume`.
    pub fn name(self) -> &'static str {
        match self {
            Resume::NewCommit => "new-commit",
            Resume::Manual => "manual",
        }
    }
}

/// What the follower remembers between passes (and across restarts).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Memory {
    /// The last head it decided about, whatever came of it: a commit that failed is not
    /// tried again until the branch moves.
    pub attempted: Option<String>,
    /// Commits rolled back from: never applied by the follower.
    pub bad: BTreeSet<String>,
    /// The commit whose rollback pinned the app, while it is pinned.
    pub pinned: Option<String>,
}

/// Why a head is held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// A rollback marked this very commit bad.
    Bad,
    /// The app is pinned and `resume = "manual"`: `kiln sync` resumes it.
    Pinned,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Held::Bad => "a rollback marked this commit bad: push a new commit",
            Held::Pinned => "pinned by a rollback (resume = \"manual\"): `kiln sync` resumes",
        })
    }
}

/// The decision for one head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The head was already decided about.
    Idle,
    /// Recorded once, not taken through the steps.
    Hold(Held),
    /// Take the head through the steps; `resumes` when that ends a pin.
    Run {
        /// It ends the pin a rollback put on the app.
        resumes: bool,
    },
}

/// What to do with `head` on a pass (a poll or a webhook).
pub fn next(m: &Memory, head: &str, resume: Resume) -> Next {
    if m.attempted.as_deref() == Some(head) {
        return Next::Idle;
    }
    if m.bad.contains(head) {
        return Next::Hold(Held::Bad);
    }
    match (&m.pinned, resume) {
        (Some(_), Resume::Manual) => Next::Hold(Held::Pinned),
        (Some(_), Resume::NewCommit) => Next::Run { resumes: true },
        (None, _) => Next::Run { resumes: false },
    }
}

/// What `kiln sync` does with `head`: run it (ending any pin) unless it is bad.
pub fn sync(m: &Memory, head: &str) -> Result<Next, Held> {
    if m.bad.contains(head) {
        return Err(Held::Bad);
    }
    Ok(Next::Run {
        resumes: m.pinned.is_some(),
    })
}

/// A rollback away from `commit`: mark it bad and pin the app.
pub fn rolled_back(m: &mut Memory, commit: &str) {
    m.bad.insert(commit.to_owned());
    m.pinned = Some(commit.to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(attempted: Option<&str>, bad: &[&str], pinned: Option<&str>) -> Memory {
        Memory {
            attempted: attempted.map(str::to_owned),
            bad: bad.iter().map(|s| (*s).to_owned()).collect(),
            pinned: pinned.map(str::to_owned),
        }
    }

    #[test]
    fn a_new_head_runs_and_a_decided_one_is_idle() {
        let m = memory(Some("a"), &[], None);
        assert_eq!(
            next(&m, "b", Resume::NewCommit),
            Next::Run { resumes: false }
        );
        assert_eq!(next(&m, "a", Resume::NewCommit), Next::Idle);
        assert_eq!(
            next(&Memory::default(), "a", Resume::Manual),
            Next::Run { resumes: false }
        );
    }

    #[test]
    fn a_rolled_back_commit_is_never_run_again() {
        let mut m = memory(Some("b"), &[], None);
        rolled_back(&mut m, "b");
        // Even once forgotten as attempted (a restart that lost nothing else, a re-push).
        m.attempted = None;
        for resume in [Resume::NewCommit, Resume::Manual] {
            assert_eq!(next(&m, "b", resume), Next::Hold(Held::Bad));
        }
        assert_eq!(sync(&m, "b"), Err(Held::Bad));
    }

    #[test]
    fn a_newer_commit_resumes_unless_resume_is_manual() {
        let m = memory(Some("b"), &["b"], Some("b"));
        assert_eq!(
            next(&m, "c", Resume::NewCommit),
            Next::Run { resumes: true }
        );
        assert_eq!(next(&m, "c", Resume::Manual), Next::Hold(Held::Pinned));
        assert_eq!(sync(&m, "c"), Ok(Next::Run { resumes: true }));
    }

    #[test]
    fn a_head_moved_back_to_an_older_good_commit_runs() {
        // A force-push back to the commit rolled back to: not bad, so it is taken (its plan
        // is then empty: it is what runs).
        let m = memory(Some("b"), &["b"], Some("b"));
        assert_eq!(
            next(&m, "a", Resume::NewCommit),
            Next::Run { resumes: true }
        );
    }
}
