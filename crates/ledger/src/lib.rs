//! The ledger: kiln's durable state in one SQLite file (WAL, `synchronous=FULL`).
//!
//! It holds the releases of every app (only ever added), the current rollout state of each
//! app, per-app apply locks, and an append-only event log in which every entry carries the
//! hash of the previous one, so [`Ledger::verify`] can prove that nothing was edited, deleted
//! or reordered.
//!
//! **Invariant:** releases and events are never updated or deleted — SQLite triggers refuse
//! it, and the hash chain exposes anyone who bypasses the triggers.
//!
//! **Invariant:** the file and its WAL and shared-memory files are `0600`: the ledger holds
//! every release's configuration. [`Ledger::open`] creates the file so before SQLite opens it
//! (SQLite gives the WAL and shared-memory files the database file's mode) and tightens the
//! files of an older kiln, whatever the process umask.
//!
//! **API boundary:** no HTTP, no providers, no clocks: callers pass the time in (milliseconds
//! since the Unix epoch), which keeps every function deterministic under test.

pub mod anchor;
mod chain;
mod event;
mod schema;

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

pub use anchor::{AnchorFiles, AnchorReport, Checkpoint, Head, Notary, when};
pub use chain::{GENESIS, VerifyError, VerifyReport};
/// The ledger key's public half (`kiln_sign`'s), for callers that pin one.
pub use kiln_sign::PublicKey;

/// Where the key and checkpoints a verification reads come from, for its messages.
struct Sources {
    key: String,
    checkpoints: std::path::PathBuf,
}

/// The whole verification on what was read: the chain, release records and rollout
/// documents ([`chain::check`]), and the checkpoints against `key`.
fn verify_stored(
    stored: &chain::Stored,
    key: std::result::Result<Option<kiln_sign::PublicKey>, String>,
    checkpoints: std::result::Result<Option<Vec<Checkpoint>>, String>,
    sources: &Sources,
) -> std::result::Result<VerifyReport, VerifyError> {
    let walked = chain::walk(stored);
    let entries = walked.hashes.len() as u64;
    let anchored = check_anchor(&walked.hashes, key, &checkpoints, sources);
    // A break accepted by someone (a `ledger.broken_accepted` entry) stands only when a signed
    // reset checkpoint covers that entry: nobody without the key can add one.
    let covered = match (&anchored, walked.last_acceptance, &checkpoints) {
        (Ok(Some(report)), Some(a), Ok(Some(all))) => {
            report.last.as_ref().is_some_and(|h| h.seq >= a)
                && all
                    .iter()
                    .rev()
                    .find(|c| c.head.reset)
                    .is_some_and(|c| c.head.seq >= a)
        }
        _ => false,
    };
    let accepted = |seq| covered && walked.accepted_entries.contains(&seq);
    let mut report = match chain::check(stored, &accepted) {
        Ok(r) => r,
        // An entry's own break (edited, unlinked, out of place) names the exact entry: it
        // comes first. A release or rollout document that no longer matches the chain is often
        // the consequence of entries rewritten or cut, which the checkpoints name.
        Err(e) if e.what.starts_with("event ") => return Err(e),
        Err(e) => {
            return Err(match anchored {
                Err(a) if entries > 0 && a.seq != 0 => a,
                _ => e,
            });
        }
    };
    match anchored {
        Ok(a) => {
            report.anchor = a;
            Ok(report)
        }
        // Nothing to prove yet; a malformed file is still reported.
        Err(e)
            if entries == 0
                && (e.what == "ledger key" || (e.what == "checkpoints" && e.seq == 0)) =>
        {
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

fn check_anchor(
    hashes: &[String],
    key: std::result::Result<Option<kiln_sign::PublicKey>, String>,
    checkpoints: &std::result::Result<Option<Vec<Checkpoint>>, String>,
    sources: &Sources,
) -> std::result::Result<Option<AnchorReport>, VerifyError> {
    let entries = hashes.len();
    let problem = |what: &str, reason: String| VerifyError {
        seq: 0,
        what: what.to_owned(),
        reason,
    };
    let key = match key {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Err(problem(
                "ledger key",
                format!(
                    "no ledger key at {}: nothing signed the chain's {entries} entries (a daemon makes the key at its first start)",
                    sources.key
                ),
            ));
        }
        Err(e) => return Err(problem("ledger key", e)),
    };
    let checkpoints = match checkpoints {
        Ok(Some(c)) if !c.is_empty() || entries == 0 => c,
        Ok(_) => {
            return Err(problem(
                "checkpoints",
                format!(
                    "no checkpoint in {}: nothing signed the chain's {entries} entries",
                    sources.checkpoints.display()
                ),
            ));
        }
        Err(e) => return Err(problem("checkpoint file", e.clone())),
    };
    anchor::check(hashes, &key, checkpoints, &sources.checkpoints).map(Some)
}

/// Checks an export of [`Ledger::export`] offline, as `kiln verify` checks a ledger: the chain
/// recomputed from the events' exact text, every release record and rollout document digest
/// against it, every checkpoint with the export's ledger key, or with `key` when given (a
/// copy kept elsewhere: then the export's own key must be that one).
pub fn verify_export(
    doc: &serde_json::Value,
    key: Option<&kiln_sign::PublicKey>,
) -> std::result::Result<VerifyReport, VerifyError> {
    let bad = |reason: String| VerifyError {
        seq: 0,
        what: "export".to_owned(),
        reason,
    };
    if doc["format"] != EXPORT_FORMAT {
        return Err(bad(format!(
            "its format is {}, not {EXPORT_FORMAT}",
            doc["format"]
        )));
    }
    let array = |field: &str| {
        doc[field]
            .as_array()
            .ok_or_else(|| bad(format!("it has no {field} array")))
    };
    let text = |v: &serde_json::Value, field: &str| -> std::result::Result<String, VerifyError> {
        v[field]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("a {field} is not a string: {v}")))
    };
    let int = |v: &serde_json::Value, field: &str| -> std::result::Result<i64, VerifyError> {
        v[field]
            .as_i64()
            .ok_or_else(|| bad(format!("a {field} is not a number: {v}")))
    };
    let mut rows = Vec::new();
    for e in array("events")? {
        rows.push(chain::Row {
            seq: int(e, "seq")?,
            at_ms: int(e, "at_ms")?,
            app: text(e, "app")?,
            kind: text(e, "kind")?,
            data: text(e, "data")?,
            prev_hash: text(e, "prev_hash")?,
            hash: text(e, "hash")?,
        });
    }
    let mut releases = Vec::new();
    for r in array("releases")? {
        releases.push((text(r, "app")?, int(r, "number")?, text(r, "record")?));
    }
    let rollouts = if doc["schema"].as_i64().unwrap_or(0) >= schema::ROLLOUTS_CHAINED {
        let mut docs = Vec::new();
        for r in array("rollouts")? {
            docs.push((
                text(r, "app")?,
                text(r, "sha256")?,
                r["chained_seq"].as_i64(),
            ));
        }
        Some(docs)
    } else {
        None
    };
    let stored = chain::Stored {
        rows,
        releases,
        rollouts,
    };
    let exported_key = match &doc["ledger_key"] {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(k) => kiln_sign::PublicKey::parse_openssh(k)
            .map(Some)
            .map_err(|e| format!("the export's ledger_key is not a public key: {e}")),
        other => Err(format!(
            "the export's ledger_key is not a public key: {other}"
        )),
    };
    let key = match (key, exported_key) {
        (Some(given), Ok(Some(k))) if *given != k => {
            return Err(VerifyError {
                seq: 0,
                what: "ledger key".to_owned(),
                reason: format!(
                    "the export was signed with {}, not the key given ({})",
                    k.fingerprint(),
                    given.fingerprint()
                ),
            });
        }
        (Some(given), _) => Ok(Some(given.clone())),
        (None, exported) => exported,
    };
    let checkpoints = serde_json::from_value::<Vec<Checkpoint>>(doc["checkpoints"].clone())
        .map(Some)
        .map_err(|e| format!("the export's checkpoints do not read: {e}"));
    let sources = Sources {
        key: "the export's ledger_key".to_owned(),
        checkpoints: std::path::PathBuf::from("the export's checkpoints"),
    };
    verify_stored(&stored, key, checkpoints, &sources)
}

/// The `format` of [`Ledger::export`]'s document.
pub const EXPORT_FORMAT: &str = "kiln-ledger-export/v1";

/// The `app` of the ledger's own entries (`ledger.anchored`, `ledger.broken_accepted`); no
/// app can be named so (an app name starts with a letter or digit).
pub const LEDGER_APP: &str = "_ledger";
pub use event::{Cause, Event, Measurement, StepMetrics, Verdict};

/// What can go wrong with the ledger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite failed; the message names the operation.
    #[error("ledger {op}: {source}")]
    Sqlite {
        /// What the ledger was doing.
        op: &'static str,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer kiln.
    #[error(
        "ledger schema version {found} is newer than this kiln understands ({known}); upgrade kiln"
    )]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// Another apply holds the app's lock.
    #[error(
        "app {app} is locked by {holder} since {since_ms} ms after the epoch; wait for it to finish"
    )]
    Locked {
        /// The app.
        app: String,
        /// Who holds it.
        holder: String,
        /// When it was taken.
        since_ms: i64,
    },
    /// A stored record could not be decoded (the file was edited by hand or is corrupt).
    #[error("ledger record {what} is corrupt: {detail}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The ledger's files could not be created or made private.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A name that cannot be stored as given.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// The value.
        value: String,
        /// Why.
        why: &'static str,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |source| Error::Sqlite { op, source }
}

/// Creates the database file `0600` when missing (SQLite takes an empty file for a new
/// database) and makes an existing one and its WAL and shared-memory files `0600`.
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { op, path, source }
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let mut shm = path.as_os_str().to_owned();
    shm.push("-shm");
    for file in [path.to_path_buf(), wal.into(), shm.into()] {
        match std::fs::metadata(&file) {
            Ok(md) if md.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(io("chmod 600", &file))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("stat", &file)(e)),
        }
    }
    Ok(())
}

/// A release to record; the ledger assigns its number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRelease {
    /// Manifest digest of the image (`sha256:…`).
    pub image: String,
    /// The runtime configuration instances of this release get (env, ports, limits…).
    pub config: serde_json::Value,
    /// Digest of the `kiln.toml` text the release came from.
    pub spec_digest: String,
    /// The git commit of the spec's tree, when it was in one.
    pub source_commit: Option<String>,
    /// Who asked for it (user@host, or "reconciler").
    pub actor: String,
}

/// A recorded release. Immutable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// The app.
    pub app: String,
    /// 1, 2, 3… per app.
    pub number: u64,
    /// When it was recorded, ms since the epoch.
    pub created_ms: i64,
    /// What was recorded.
    #[serde(flatten)]
    pub body: NewRelease,
}

/// One entry of the event log, as stored (its kind and data are an [`Event`]'s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// When it happened, ms since the epoch.
    pub at_ms: i64,
    /// The app it is about.
    pub app: String,
    /// What happened, e.g. `release.created`, `route.changed`, `drift.detected`.
    pub kind: String,
    /// The details, as JSON.
    pub data: serde_json::Value,
    /// Hash of the previous entry (hex), [`GENESIS`] for the first.
    pub prev_hash: String,
    /// Hash of this entry (hex).
    pub hash: String,
}

impl Entry {
    /// The typed event this entry records.
    pub fn event(&self) -> Result<Event> {
        Event::decode(&self.kind, &self.data).map_err(|e| Error::Corrupt {
            what: format!("event {} ({})", self.seq, self.kind),
            detail: e.to_string(),
        })
    }
}

/// The ledger file, open.
pub struct Ledger {
    conn: Connection,
    /// The daemon's signer, when attached: [`Ledger::verify`] then checks the checkpoints too.
    notary: Option<Notary>,
}

/// How a daemon's start found the ledger ([`Ledger::start`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// It verified, checkpoints included.
    Verified(VerifyReport),
    /// It had no ledger key yet: one was made and the chain (which verified) checkpointed.
    Anchored {
        /// The new key's fingerprint.
        key: String,
        /// Entries taken as found.
        entries: u64,
    },
    /// It failed verification, and the failure was accepted (and recorded).
    Accepted(VerifyError),
}

impl Ledger {
    /// Opens (creating and migrating when needed) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Ledger> {
        make_private(path)?;
        let conn = Connection::open(path).map_err(sql("open"))?;
        Ledger::setup(conn)
    }

    /// Opens an existing ledger for reading only (`kiln verify` and `kiln gc` without a
    /// daemon): nothing is created, migrated or written.
    pub fn open_read_only(path: &Path) -> Result<Ledger> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("open read-only"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql("set busy timeout"))?;
        let found = schema::version(&conn)?;
        if found > schema::CURRENT {
            return Err(Error::TooNew {
                found,
                known: schema::CURRENT,
            });
        }
        Ok(Ledger { conn, notary: None })
    }

    /// An in-memory ledger, for tests of code above it.
    pub fn open_in_memory() -> Result<Ledger> {
        let conn = Connection::open_in_memory().map_err(sql("open"))?;
        Ledger::setup(conn)
    }

    fn setup(mut conn: Connection) -> Result<Ledger> {
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql("set busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql("enable foreign keys"))?;
        schema::migrate(&mut conn)?;
        Ok(Ledger { conn, notary: None })
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<i64> {
        schema::version(&self.conn)
    }

    /// Records release N+1 of `app` and its `release.created` event in one transaction.
    pub fn record_release(
        &mut self,
        app: &str,
        release: NewRelease,
        now_ms: i64,
    ) -> Result<Release> {
        check_name("app", app)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let last: Option<i64> = tx
            .query_row(
                "SELECT MAX(number) FROM releases WHERE app = ?1",
                [app],
                |r| r.get(0),
            )
            .map_err(sql("read last release number"))?;
        let number = u64::try_from(last.unwrap_or(0)).unwrap_or(0) + 1;
        let record = Release {
            app: app.to_owned(),
            number,
            created_ms: now_ms,
            body: release,
        };
        let body = encode(&record.body)?;
        tx.execute(
            "INSERT INTO releases (app, number, created_ms, body) VALUES (?1, ?2, ?3, ?4)",
            params![app, number as i64, now_ms, body],
        )
        .map_err(sql("insert release"))?;
        // The event carries the release's digest, so editing the release row is caught by
        // `verify` even though the row itself is outside the chain.
        let event = Event::ReleaseCreated {
            number,
            image: record.body.image.clone(),
            actor: record.body.actor.clone(),
            record_sha256: chain::sha256_hex(body.as_bytes()),
        };
        chain::append(&tx, app, event.kind(), &event.data(), now_ms)?;
        tx.commit().map_err(sql("commit release"))?;
        Ok(record)
    }

    /// Every release of `app`, oldest first.
    pub fn releases(&self, app: &str) -> Result<Vec<Release>> {
        let mut stmt = self
            .conn
            .prepare("SELECT number, created_ms, body FROM releases WHERE app = ?1 ORDER BY number")
            .map_err(sql("prepare releases"))?;
        let rows = stmt
            .query_map([app], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(sql("read releases"))?;
        let mut out = Vec::new();
        for row in rows {
            let (number, created_ms, body) = row.map_err(sql("read release"))?;
            out.push(Release {
                app: app.to_owned(),
                number: u64::try_from(number).unwrap_or(0),
                created_ms,
                body: decode(&format!("release {app}#{number}"), &body)?,
            });
        }
        Ok(out)
    }

    /// Release `number` of `app`, if recorded.
    pub fn release(&self, app: &str, number: u64) -> Result<Option<Release>> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT created_ms, body FROM releases WHERE app = ?1 AND number = ?2",
                params![app, number as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read release"))?;
        row.map(|(created_ms, body)| {
            Ok(Release {
                app: app.to_owned(),
                number,
                created_ms,
                body: decode(&format!("release {app}#{number}"), &body)?,
            })
        })
        .transpose()
    }

    /// Appends one event to the log.
    pub fn append(&mut self, app: &str, event: &Event, now_ms: i64) -> Result<Entry> {
        check_name("app", app)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let entry = chain::append(&tx, app, event.kind(), &event.data(), now_ms)?;
        tx.commit().map_err(sql("commit event"))?;
        Ok(entry)
    }

    /// Events, oldest first; only `app`'s when given; at most the last `limit`.
    pub fn events(&self, app: Option<&str>, limit: Option<usize>) -> Result<Vec<Entry>> {
        chain::events(&self.conn, app, limit)
    }

    /// Walks the whole chain, every release's digest and every rollout document; with a
    /// notary attached ([`Ledger::attach_notary`]), the signed checkpoints too.
    pub fn verify(&self) -> Result<std::result::Result<VerifyReport, VerifyError>> {
        match &self.notary {
            Some(n) => self.verify_anchored(n.files()),
            None => chain::verify(&self.conn, &|_| false),
        }
    }

    /// [`Ledger::verify`] and the checkpoints of `files`: every signature with the ledger
    /// key, every checkpointed entry present with its hash. A ledger with entries and no key
    /// or no checkpoint file fails: nothing proves it.
    pub fn verify_anchored(
        &self,
        files: &AnchorFiles,
    ) -> Result<std::result::Result<VerifyReport, VerifyError>> {
        let stored = chain::read(&self.conn)?;
        let key = anchor::read_public(files);
        let checkpoints = anchor::read_checkpoints(&files.checkpoints);
        let sources = Sources {
            key: files.public.display().to_string(),
            checkpoints: files.checkpoints.clone(),
        };
        Ok(verify_stored(&stored, key, checkpoints, &sources))
    }

    /// The chain's head now: its last entry's number and hash (`0` and [`GENESIS`] when empty).
    pub fn head(&self) -> Result<(u64, String)> {
        let last: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read chain head"))?;
        Ok(last.map_or_else(
            || (0, GENESIS.to_owned()),
            |(seq, hash)| (u64::try_from(seq).unwrap_or(0), hash),
        ))
    }

    /// Gives the ledger the daemon's signer: [`Ledger::checkpoint`] signs with it and
    /// [`Ledger::verify`] checks its checkpoints.
    pub fn attach_notary(&mut self, notary: Notary) {
        self.notary = Some(notary);
    }

    /// The attached signer's public key.
    pub fn notary_key(&self) -> Option<&kiln_sign::PublicKey> {
        self.notary.as_ref().map(Notary::public)
    }

    /// Signs the chain's head as of `now_ms` and appends the checkpoint, when a notary is
    /// attached and the head moved since its last checkpoint. Returns what was written.
    pub fn checkpoint(&mut self, now_ms: i64) -> Result<Option<Checkpoint>> {
        let (seq, hash) = self.head()?;
        let Some(notary) = self.notary.as_mut() else {
            return Ok(None);
        };
        if notary
            .last()
            .is_some_and(|h| h.seq == seq && h.hash == hash)
        {
            return Ok(None);
        }
        notary
            .sign(Head {
                seq,
                hash,
                at_ms: now_ms,
                reset: false,
            })
            .map(Some)
    }

    /// What a daemon does with its ledger before it acts on it: verify it, checkpoints
    /// included, and attach the notary of `files`. A ledger without a key yet (a first start,
    /// or one by an older kiln) gets one and a first checkpoint, recorded as
    /// `ledger.anchored`, when its chain verifies. A ledger that fails is refused (`Err`
    /// inside) unless `accept` names who accepts it: then a `ledger.broken_accepted` entry
    /// records the problem and who, and a reset checkpoint is signed so later starts pass.
    pub fn start(
        &mut self,
        files: &AnchorFiles,
        accept: Option<&str>,
        now_ms: i64,
    ) -> Result<std::result::Result<Start, VerifyError>> {
        let notary = Notary::load(files)?;
        let signed_before = matches!(
            anchor::read_checkpoints(&files.checkpoints),
            Ok(Some(c)) if !c.is_empty()
        ) || self.anchored_before()?;
        let problem = match notary {
            // A first start cut short after the key was made and before anything was signed
            // with it: it goes on with that key.
            Some(n) if !signed_before => match self.anchor_first(n, now_ms)? {
                Ok(start) => return Ok(Ok(start)),
                Err(e) => e,
            },
            Some(n) => {
                // The checkpoints are checked with the public file; it must be the half of the
                // key this daemon signs with, or whoever can write it (and not read the key)
                // could re-sign a rewritten chain.
                let published = anchor::read_public(files);
                let verified = match published {
                    Ok(Some(k)) if &k != n.public() => Err(VerifyError {
                        seq: 0,
                        what: "ledger key".to_owned(),
                        reason: format!(
                            "{} is not the public half of {}: the checkpoints cannot be checked",
                            files.public.display(),
                            files.key.display()
                        ),
                    }),
                    _ => self.verify_anchored(files)?,
                };
                self.notary = Some(n);
                match verified {
                    Ok(report) => {
                        self.checkpoint(now_ms)?;
                        return Ok(Ok(Start::Verified(report)));
                    }
                    Err(e) => e,
                }
            }
            None if signed_before => VerifyError {
                seq: 0,
                what: "ledger key".to_owned(),
                reason: format!(
                    "the ledger key {} is missing, yet the ledger was signed with one: its checkpoints cannot be checked",
                    files.key.display()
                ),
            },
            None => match chain::verify(&self.conn, &|_| false)? {
                Ok(_) => {
                    let n = Notary::create(files)?;
                    match self.anchor_first(n, now_ms)? {
                        Ok(start) => return Ok(Ok(start)),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            },
        };
        let Some(actor) = accept else {
            return Ok(Err(problem));
        };
        let mut n = match self.notary.take() {
            Some(n) => n,
            None => Notary::create(files)?,
        };
        // Every entry whose own check fails is listed, not only the first: the acceptance
        // covers what was found, and nothing broken later.
        let entries = match chain::verify(&self.conn, &|_| true)? {
            Ok(report) => report.accepted.iter().map(|e| e.seq).collect(),
            Err(_) => Vec::new(),
        };
        let event = Event::BrokenAccepted {
            problem: problem.to_string(),
            actor: actor.to_owned(),
            key: n.public().fingerprint(),
            entries,
        };
        self.append(LEDGER_APP, &event, now_ms)?;
        let (seq, hash) = self.head()?;
        n.sign(Head {
            seq,
            hash,
            at_ms: now_ms,
            reset: true,
        })?;
        self.notary = Some(n);
        Ok(Ok(Start::Accepted(problem)))
    }

    /// The anchor files of the attached notary.
    pub fn anchor_files(&self) -> Option<&AnchorFiles> {
        self.notary.as_ref().map(Notary::files)
    }

    /// The whole ledger as one JSON document for auditors (format [`EXPORT_FORMAT`]): every
    /// release (its record as the exact text its `record_sha256` covers), every event as
    /// stored (`data` is the exact text hashed, so the chain can be recomputed), every
    /// rollout document's digest and the entry that recorded it, every checkpoint of `files`
    /// with its signature, the ledger's public key, and the verification's result.
    pub fn export(&self, files: &AnchorFiles, now_ms: i64) -> Result<serde_json::Value> {
        use serde_json::json;
        let mut releases = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT app, number, created_ms, body FROM releases ORDER BY app, number")
                .map_err(sql("prepare releases"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .map_err(sql("read releases"))?;
            for row in rows {
                let (app, number, created_ms, body) = row.map_err(sql("read release"))?;
                releases.push(json!({
                    "app": app, "number": number, "created_ms": created_ms,
                    "record": body, "record_sha256": chain::sha256_hex(body.as_bytes()),
                }));
            }
        }
        let mut rollouts = Vec::new();
        if self.schema_version()? >= schema::ROLLOUTS_CHAINED {
            let mut stmt = self
                .conn
                .prepare("SELECT app, state, updated_ms, chained_seq FROM rollouts ORDER BY app")
                .map_err(sql("prepare rollouts"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                })
                .map_err(sql("read rollouts"))?;
            for row in rows {
                let (app, state, updated_ms, chained_seq) = row.map_err(sql("read rollout"))?;
                rollouts.push(json!({
                    "app": app, "updated_ms": updated_ms, "chained_seq": chained_seq,
                    "sha256": chain::sha256_hex(state.as_bytes()),
                }));
            }
        }
        let checkpoints = match anchor::read_checkpoints(&files.checkpoints) {
            Ok(c) => json!(c.unwrap_or_default()),
            Err(e) => json!({ "error": e }),
        };
        let key = match anchor::read_public(files) {
            Ok(k) => json!(k.map(|k| k.to_openssh())),
            Err(e) => json!({ "error": e }),
        };
        Ok(json!({
            "format": EXPORT_FORMAT,
            "exported_ms": now_ms,
            "schema": self.schema_version()?,
            "genesis": GENESIS,
            "hash": "sha256 over (8-byte big-endian length, bytes) of prev_hash, seq, at_ms, app, kind, data",
            "checkpoint_namespace": anchor::NAMESPACE,
            "ledger_key": key,
            "releases": releases,
            "events": chain::export_events(&self.conn)?,
            "rollouts": rollouts,
            "checkpoints": checkpoints,
            "verify": verify_json(&self.verify_anchored(files)?),
        }))
    }

    /// A ledger's first anchoring with `n`: when the chain verifies, a `ledger.anchored` entry
    /// and a first (reset) checkpoint. `n` stays attached either way.
    fn anchor_first(
        &mut self,
        mut n: Notary,
        now_ms: i64,
    ) -> Result<std::result::Result<Start, VerifyError>> {
        if let Err(e) = chain::verify(&self.conn, &|_| false)? {
            self.notary = Some(n);
            return Ok(Err(e));
        }
        let key = n.public().fingerprint();
        let entries = self.head()?.0;
        let event = Event::LedgerAnchored {
            key: key.clone(),
            entries,
        };
        self.append(LEDGER_APP, &event, now_ms)?;
        let (seq, hash) = self.head()?;
        n.sign(Head {
            seq,
            hash,
            at_ms: now_ms,
            reset: true,
        })?;
        self.notary = Some(n);
        Ok(Ok(Start::Anchored { key, entries }))
    }

    fn anchored_before(&self) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM events WHERE app = ?1 AND kind = 'ledger.anchored')",
                [LEDGER_APP],
                |r| r.get(0),
            )
            .map_err(sql("read ledger entries"))
    }

    /// Takes the apply lock of `app` for `holder`, or says who has it.
    pub fn lock(&mut self, app: &str, holder: &str, now_ms: i64) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let current: Option<(String, i64)> = tx
            .query_row(
                "SELECT holder, since_ms FROM locks WHERE app = ?1",
                [app],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read lock"))?;
        if let Some((holder_now, since_ms)) = current {
            return Err(Error::Locked {
                app: app.to_owned(),
                holder: holder_now,
                since_ms,
            });
        }
        tx.execute(
            "INSERT INTO locks (app, holder, since_ms) VALUES (?1, ?2, ?3)",
            params![app, holder, now_ms],
        )
        .map_err(sql("take lock"))?;
        tx.commit().map_err(sql("commit lock"))
    }

    /// Gives back the lock of `app` if `holder` has it.
    pub fn unlock(&mut self, app: &str, holder: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM locks WHERE app = ?1 AND holder = ?2",
                params![app, holder],
            )
            .map(|_| ())
            .map_err(sql("drop lock"))
    }

    /// Drops every lock: called by a daemon at start, since it is the only writer of its
    /// state directory and locks of a previous, dead daemon are stale.
    pub fn clear_locks(&mut self) -> Result<usize> {
        self.conn
            .execute("DELETE FROM locks", [])
            .map_err(sql("clear locks"))
    }

    /// Stores the current rollout state of `app` (a document owned by the deploy crate).
    ///
    /// A document that differs from the stored one is bound to the chain in the same
    /// transaction: a `rollout.stored` event carries its digest and the row names that
    /// event, so an edit behind kiln's back is caught by `verify`. Storing the same document
    /// again writes nothing, so a caller that persists on every pass does not grow the log.
    pub fn put_rollout(&mut self, app: &str, state: &serde_json::Value, now_ms: i64) -> Result<()> {
        check_name("app", app)?;
        let text = encode(state)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let stored: Option<(String, Option<i64>)> = tx
            .query_row(
                "SELECT state, chained_seq FROM rollouts WHERE app = ?1",
                [app],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read rollout state"))?;
        if let Some((old, Some(_))) = &stored
            && *old == text
        {
            return Ok(());
        }
        let event = Event::RolloutStored {
            sha256: chain::sha256_hex(text.as_bytes()),
        };
        let entry = chain::append(&tx, app, event.kind(), &event.data(), now_ms)?;
        tx.execute(
            "INSERT INTO rollouts (app, state, updated_ms, chained_seq) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(app) DO UPDATE SET state = excluded.state,
                updated_ms = excluded.updated_ms, chained_seq = excluded.chained_seq",
            params![app, text, now_ms, entry.seq as i64],
        )
        .map_err(sql("store rollout state"))?;
        tx.commit().map_err(sql("commit rollout state"))
    }

    /// The current rollout state of `app`, if any.
    pub fn rollout(&self, app: &str) -> Result<Option<serde_json::Value>> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT state FROM rollouts WHERE app = ?1", [app], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("read rollout state"))?;
        text.map(|t| decode(&format!("rollout state of {app}"), &t))
            .transpose()
    }

    /// Every app that has a release or an event.
    pub fn apps(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT app FROM releases UNION SELECT app FROM events WHERE app != ?1 ORDER BY 1",
            )
            .map_err(sql("prepare apps"))?;
        let rows = stmt
            .query_map([LEDGER_APP], |r| r.get(0))
            .map_err(sql("read apps"))?;
        rows.collect::<std::result::Result<Vec<String>, _>>()
            .map_err(sql("read apps"))
    }
}

/// The result of a verification as the API and `kiln verify --json` give it: `ok`, and
/// either what was checked (`events`, `releases`, `rollouts`, `head`, `accepted` problems,
/// `anchor`: the key, checkpoints checked and set aside, the last one, entries after it) or
/// the problem (`seq`, `what`, `reason`, `message`).
pub fn verify_json(result: &std::result::Result<VerifyReport, VerifyError>) -> serde_json::Value {
    use serde_json::json;
    match result {
        Ok(r) => json!({
            "ok": true,
            "events": r.events,
            "releases": r.releases,
            "rollouts": r.rollouts,
            "head": r.head,
            "accepted": r.accepted.iter().map(|e| json!({
                "seq": e.seq, "what": e.what, "reason": e.reason, "message": e.to_string(),
            })).collect::<Vec<_>>(),
            "anchor": r.anchor.as_ref().map(|a| json!({
                "key": a.key,
                "checked": a.checked,
                "set_aside": a.set_aside,
                "last": a.last,
                "unsigned": a.unsigned,
            })),
        }),
        Err(e) => json!({
            "ok": false, "seq": e.seq, "what": e.what, "reason": e.reason, "message": e.to_string(),
        }),
    }
}

fn check_name(what: &'static str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what,
            value: value.to_owned(),
            why: "use letters, digits, `-`, `_` or `.`",
        })
    }
}

fn encode<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Corrupt {
        what: "new record".to_owned(),
        detail: e.to_string(),
    })
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}
