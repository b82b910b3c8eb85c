//! The hash chain over the event log.
//!
//! Entry `n` stores `hash = sha256(prev_hash ‖ seq ‖ at_ms ‖ app ‖ kind ‖ data)` where
//! `prev_hash` is entry `n-1`'s hash ([`GENESIS`] for the first) and `data` is the exact JSON
//! text stored. Editing any byte of an entry changes its hash; deleting or reordering entries
//! breaks the sequence or the links. Release rows are covered through the digest their
//! `release.created` event carries.

use rusqlite::{Connection, Transaction, params};
use sha2::{Digest, Sha256};

use crate::{Entry, Error, Result, sql};

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What `verify` checked when everything was intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Events walked.
    pub events: u64,
    /// Releases checked against their events.
    pub releases: u64,
    /// Rollout documents checked against their events (0 in a ledger older than schema 2).
    pub rollouts: u64,
    /// Hash of the last entry (the chain's head).
    pub head: String,
    /// Problems found before a `ledger.broken_accepted` entry that a signed checkpoint
    /// covers: accepted by someone, reported, not failing.
    pub accepted: Vec<VerifyError>,
    /// What the signed checkpoints proved, when they were checked.
    pub anchor: Option<crate::anchor::AnchorReport>,
}

/// The first thing `verify` found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct VerifyError {
    /// The sequence number of the first bad entry (or of the event of a bad release); 0 when
    /// no entry is involved.
    pub seq: u64,
    /// What the entry is (`event release.created of hello`, `release hello#3`).
    pub what: String,
    /// What is wrong with it.
    pub reason: String,
}

impl VerifyError {
    fn describe(&self) -> String {
        match self.seq {
            0 => format!("ledger {}: {}", self.what, self.reason),
            seq => format!("ledger entry {seq} ({}): {}", self.what, self.reason),
        }
    }
}

/// The chain as stored, for checking checkpoints against: `hashes[i]` is entry `i + 1`'s.
pub(crate) struct Walked {
    pub hashes: Vec<String>,
    /// The last `ledger.broken_accepted` entry.
    pub last_acceptance: Option<u64>,
    /// The entries every `ledger.broken_accepted` accepted as they are.
    pub accepted_entries: std::collections::BTreeSet<u64>,
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn entry_hash(prev: &str, seq: u64, at_ms: i64, app: &str, kind: &str, data: &str) -> String {
    let mut h = Sha256::new();
    // Fields are length-prefixed so no two different entries hash the same input.
    for part in [prev, &seq.to_string(), &at_ms.to_string(), app, kind, data] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

pub(crate) fn append(
    tx: &Transaction<'_>,
    app: &str,
    kind: &str,
    data: &serde_json::Value,
    at_ms: i64,
) -> Result<Entry> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(sql("read chain head"))?;
    let (seq, prev_hash) = match last {
        Some((seq, hash)) => (u64::try_from(seq).unwrap_or(0) + 1, hash),
        None => (1, GENESIS.to_owned()),
    };
    let text = data.to_string();
    let hash = entry_hash(&prev_hash, seq, at_ms, app, kind, &text);
    tx.execute(
        "INSERT INTO events (seq, at_ms, app, kind, data, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![seq as i64, at_ms, app, kind, text, prev_hash, hash],
    )
    .map_err(sql("append event"))?;
    Ok(Entry {
        seq,
        at_ms,
        app: app.to_owned(),
        kind: kind.to_owned(),
        data: data.clone(),
        prev_hash,
        hash,
    })
}

/// One event row as stored.
pub(crate) struct Row {
    pub seq: i64,
    pub at_ms: i64,
    pub app: String,
    pub kind: String,
    pub data: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Everything `verify` checks, as stored: read from the database ([`read`]) or from an
/// export.
pub(crate) struct Stored {
    pub rows: Vec<Row>,
    /// (app, number, the record's exact text).
    pub releases: Vec<(String, i64, String)>,
    /// (app, SHA-256 of the document's exact text, `chained_seq`); `None` before schema 2.
    pub rollouts: Option<Vec<(String, String, Option<i64>)>>,
}

/// Reads what `verify` checks.
pub(crate) fn read(conn: &Connection) -> Result<Stored> {
    let rows = rows(conn, None)?;
    let mut stmt = conn
        .prepare("SELECT app, number, body FROM releases ORDER BY app, number")
        .map_err(sql("prepare releases"))?;
    let releases = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(sql("read releases"))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(sql("read releases"))?;
    let rollouts = if crate::schema::version(conn)? >= crate::schema::ROLLOUTS_CHAINED {
        let mut stmt = conn
            .prepare("SELECT app, state, chained_seq FROM rollouts ORDER BY app")
            .map_err(sql("prepare rollouts"))?;
        let docs = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })
            .map_err(sql("read rollouts"))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(sql("read rollouts"))?;
        Some(
            docs.into_iter()
                .map(|(app, state, chained)| (app, sha256_hex(state.as_bytes()), chained))
                .collect(),
        )
    } else {
        None
    };
    Ok(Stored {
        rows,
        releases,
        rollouts,
    })
}

fn rows(conn: &Connection, app: Option<&str>) -> Result<Vec<Row>> {
    let mut stmt = conn
        .prepare(
            "SELECT seq, at_ms, app, kind, data, prev_hash, hash FROM events
             WHERE ?1 IS NULL OR app = ?1 ORDER BY seq",
        )
        .map_err(sql("prepare events"))?;
    let rows = stmt
        .query_map([app], |r| {
            Ok(Row {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                app: r.get(2)?,
                kind: r.get(3)?,
                data: r.get(4)?,
                prev_hash: r.get(5)?,
                hash: r.get(6)?,
            })
        })
        .map_err(sql("read events"))?;
    rows.collect::<std::result::Result<Vec<_>, _>>()
        .map_err(sql("read events"))
}

/// Every entry exactly as stored (its data as the text hashed), for an export.
pub(crate) fn export_events(conn: &Connection) -> Result<Vec<serde_json::Value>> {
    Ok(rows(conn, None)?
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "seq": r.seq, "at_ms": r.at_ms, "app": r.app, "kind": r.kind,
                "data": r.data, "prev_hash": r.prev_hash, "hash": r.hash,
            })
        })
        .collect())
}

pub(crate) fn events(
    conn: &Connection,
    app: Option<&str>,
    limit: Option<usize>,
) -> Result<Vec<Entry>> {
    let all = rows(conn, app)?;
    let skip = limit.map_or(0, |l| all.len().saturating_sub(l));
    all.into_iter()
        .skip(skip)
        .map(|r| {
            let data = serde_json::from_str(&r.data).map_err(|e| Error::Corrupt {
                what: format!("event {}", r.seq),
                detail: e.to_string(),
            })?;
            Ok(Entry {
                seq: u64::try_from(r.seq).unwrap_or(0),
                at_ms: r.at_ms,
                app: r.app,
                kind: r.kind,
                data,
                prev_hash: r.prev_hash,
                hash: r.hash,
            })
        })
        .collect()
}

/// The chain as stored (no checks), for the anchor's checks.
pub(crate) fn walk(stored: &Stored) -> Walked {
    let all = &stored.rows;
    let acceptances: Vec<&Row> = all
        .iter()
        .filter(|r| r.kind == "ledger.broken_accepted")
        .collect();
    let last_acceptance = acceptances.last().and_then(|r| u64::try_from(r.seq).ok());
    let accepted_entries = acceptances
        .iter()
        .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.data).ok())
        .flat_map(|d| {
            d["entries"]
                .as_array()
                .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
                .unwrap_or_else(Vec::new)
        })
        .collect();
    Walked {
        hashes: all.iter().map(|r| r.hash.clone()).collect(),
        last_acceptance,
        accepted_entries,
    }
}

/// Checks the chain end to end, every release row and every rollout document. A problem at
/// an entry `accept` takes (one a covered `ledger.broken_accepted` lists) is reported in
/// [`VerifyReport::accepted`] instead of failing.
pub(crate) fn verify(
    conn: &Connection,
    accept: &dyn Fn(u64) -> bool,
) -> Result<std::result::Result<VerifyReport, VerifyError>> {
    Ok(check(&read(conn)?, accept))
}

/// [`verify`] on what was read.
pub(crate) fn check(
    stored: &Stored,
    accept: &dyn Fn(u64) -> bool,
) -> std::result::Result<VerifyReport, VerifyError> {
    let mut accepted = Vec::new();
    // The first problem not accepted ends the check; an accepted one is noted and the walk
    // goes on from the entry as stored.
    let mut note = |e: VerifyError| -> std::result::Result<(), VerifyError> {
        if e.seq != 0 && accept(e.seq) {
            accepted.push(e);
            Ok(())
        } else {
            Err(e)
        }
    };
    let mut prev = GENESIS.to_owned();
    let mut expected_seq: u64 = 1;
    let mut release_events = Vec::new();
    // The last `rollout.stored` of each app: (seq, digest).
    let mut rollout_events: std::collections::BTreeMap<String, (u64, Option<String>)> =
        std::collections::BTreeMap::new();
    for r in &stored.rows {
        let seq = u64::try_from(r.seq).unwrap_or(0);
        let what = format!("event {} of {}", r.kind, r.app);
        let problem = |reason: String| VerifyError {
            seq,
            what: what.clone(),
            reason,
        };
        let checked = if seq != expected_seq {
            Err(problem(format!(
                "expected entry {expected_seq} here: entries were deleted or reordered"
            )))
        } else if r.prev_hash != prev {
            Err(problem(
                "its link to the previous entry is broken".to_owned(),
            ))
        } else if entry_hash(&r.prev_hash, seq, r.at_ms, &r.app, &r.kind, &r.data) != r.hash {
            Err(problem(
                "its content does not match its hash: it was edited".to_owned(),
            ))
        } else {
            Ok(())
        };
        if let Err(e) = checked
            && let Err(e) = note(e)
        {
            return Err(e);
        }
        if r.kind == "release.created" {
            release_events.push((seq, r.app.clone(), r.data.clone()));
        }
        if r.kind == "rollout.stored" {
            let digest = serde_json::from_str::<serde_json::Value>(&r.data)
                .ok()
                .and_then(|d| d["sha256"].as_str().map(str::to_owned));
            rollout_events.insert(r.app.clone(), (seq, digest));
        }
        prev = r.hash.clone();
        expected_seq = seq + 1;
    }

    // Every release row must match the digest its event recorded, and vice versa.
    let releases = &stored.releases;
    let number_of = |data: &str| {
        serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .and_then(|d| d["number"].as_i64())
    };
    for (app, number, body) in releases {
        let found = release_events
            .iter()
            .find(|(_, a, data)| a == app && number_of(data) == Some(*number));
        let Some((seq, _, data)) = found else {
            return Err(VerifyError {
                seq: 0,
                what: format!("release {app}#{number}"),
                reason: "no release.created event records it: it was added behind kiln's back"
                    .to_owned(),
            });
        };
        let recorded = serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .and_then(|d| d["record_sha256"].as_str().map(str::to_owned));
        if recorded.as_deref() != Some(sha256_hex(body.as_bytes()).as_str())
            && let Err(e) = note(VerifyError {
                seq: *seq,
                what: format!("release {app}#{number}"),
                reason: "the release record does not match the digest in its event: it was edited"
                    .to_owned(),
            })
        {
            return Err(e);
        }
    }
    for (seq, app, data) in &release_events {
        let number = number_of(data);
        let present = releases
            .iter()
            .any(|(a, n, _)| a == app && Some(*n) == number);
        if !present
            && let Err(e) = note(VerifyError {
                seq: *seq,
                what: format!(
                    "release {app}#{}",
                    number.map_or_else(|| "?".to_owned(), |n| n.to_string())
                ),
                reason: "an event records a release whose row is missing: it was deleted"
                    .to_owned(),
            })
        {
            return Err(e);
        }
    }

    // Every rollout document must be the one the app's last `rollout.stored` recorded.
    let mut rollouts = 0;
    if let Some(docs) = &stored.rollouts {
        for (app, sha256, chained) in docs {
            rollouts += 1;
            let what = format!("rollout document of {app}");
            let last = rollout_events.get(app);
            let chained = chained.and_then(|s| u64::try_from(s).ok());
            let problem = match (last, chained) {
                (None, _) => Some(VerifyError {
                    seq: chained.unwrap_or(0),
                    what,
                    reason: "no rollout.stored event records it: it was written behind kiln's back"
                        .to_owned(),
                }),
                (Some((seq, _)), Some(c)) if c != *seq => Some(VerifyError {
                    seq: *seq,
                    what,
                    reason: format!(
                        "it names entry {c}, but entry {seq} recorded the app's last document: an older one was put back"
                    ),
                }),
                (Some((seq, _)), None) => Some(VerifyError {
                    seq: *seq,
                    what,
                    reason: "it names no event: it was written behind kiln's back".to_owned(),
                }),
                (Some((seq, digest)), Some(_)) if digest.as_deref() != Some(sha256.as_str()) => {
                    Some(VerifyError {
                        seq: *seq,
                        what,
                        reason: "it does not match the digest its event recorded: it was edited"
                            .to_owned(),
                    })
                }
                _ => None,
            };
            if let Some(p) = problem
                && let Err(e) = note(p)
            {
                return Err(e);
            }
        }
        for (app, (seq, _)) in &rollout_events {
            if !docs.iter().any(|(a, _, _)| a == app)
                && let Err(e) = note(VerifyError {
                    seq: *seq,
                    what: format!("rollout document of {app}"),
                    reason: "the document this entry recorded is missing: it was deleted"
                        .to_owned(),
                })
            {
                return Err(e);
            }
        }
    }
    Ok(VerifyReport {
        events: expected_seq - 1,
        releases: releases.len() as u64,
        rollouts,
        head: prev,
        accepted,
        anchor: None,
    })
}
