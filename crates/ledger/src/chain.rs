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
    /// Hash of the last entry (the chain's head).
    pub head: String,
}

/// The first thing `verify` found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger entry {seq} ({what}): {reason}")]
pub struct VerifyError {
    /// The sequence number of the first bad entry (or of the event of a bad release).
    pub seq: u64,
    /// What the entry is (`event release.created of hello`, `release hello#3`).
    pub what: String,
    /// What is wrong with it.
    pub reason: String,
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

struct Row {
    seq: i64,
    at_ms: i64,
    app: String,
    kind: String,
    data: String,
    prev_hash: String,
    hash: String,
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

pub(crate) fn verify(conn: &Connection) -> Result<std::result::Result<VerifyReport, VerifyError>> {
    let mut prev = GENESIS.to_owned();
    let mut expected_seq: u64 = 1;
    let mut release_events = Vec::new();
    let all = rows(conn, None)?;
    for r in &all {
        let seq = u64::try_from(r.seq).unwrap_or(0);
        let what = format!("event {} of {}", r.kind, r.app);
        let fail = |reason: String| {
            Ok(Err(VerifyError {
                seq,
                what: what.clone(),
                reason,
            }))
        };
        if seq != expected_seq {
            return fail(format!(
                "expected entry {expected_seq} here: entries were deleted or reordered"
            ));
        }
        if r.prev_hash != prev {
            return fail("its link to the previous entry is broken".to_owned());
        }
        if entry_hash(&r.prev_hash, seq, r.at_ms, &r.app, &r.kind, &r.data) != r.hash {
            return fail("its content does not match its hash: it was edited".to_owned());
        }
        if r.kind == "release.created" {
            release_events.push((seq, r.app.clone(), r.data.clone()));
        }
        prev = r.hash.clone();
        expected_seq += 1;
    }

    // Every release row must match the digest its event recorded, and vice versa.
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
    for (app, number, body) in &releases {
        let found = release_events.iter().find(|(_, a, data)| {
            a == app
                && serde_json::from_str::<serde_json::Value>(data)
                    .ok()
                    .and_then(|d| d["number"].as_i64())
                    == Some(*number)
        });
        let Some((seq, _, data)) = found else {
            return Ok(Err(VerifyError {
                seq: 0,
                what: format!("release {app}#{number}"),
                reason: "no release.created event records it: it was added behind kiln's back"
                    .to_owned(),
            }));
        };
        let recorded = serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .and_then(|d| d["record_sha256"].as_str().map(str::to_owned));
        if recorded.as_deref() != Some(sha256_hex(body.as_bytes()).as_str()) {
            return Ok(Err(VerifyError {
                seq: *seq,
                what: format!("release {app}#{number}"),
                reason: "the release record does not match the digest in its event: it was edited"
                    .to_owned(),
            }));
        }
    }
    if releases.len() != release_events.len() {
        let (seq, app, _) =
            &release_events[releases.len().min(release_events.len().saturating_sub(1))];
        return Ok(Err(VerifyError {
            seq: *seq,
            what: format!("release of {app}"),
            reason: "an event records a release whose row is missing: it was deleted".to_owned(),
        }));
    }
    Ok(Ok(VerifyReport {
        events: expected_seq - 1,
        releases: releases.len() as u64,
        head: prev,
    }))
}
