//! The ledger's SQL schema and its forward migrations, tracked by `PRAGMA user_version`.
//!
//! A migration is appended, never edited: a file written by an older kiln is brought forward
//! step by step, each step in its own transaction.

use rusqlite::{Connection, Transaction, params};

use crate::{Error, Event, Result, chain, sql};

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: releases, the event chain, locks, rollout state.
    "CREATE TABLE releases (
        app TEXT NOT NULL,
        number INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (app, number)
    ) STRICT;
    CREATE TRIGGER releases_no_update BEFORE UPDATE ON releases
        BEGIN SELECT RAISE(ABORT, 'releases are immutable'); END;
    CREATE TRIGGER releases_no_delete BEFORE DELETE ON releases
        BEGIN SELECT RAISE(ABORT, 'releases are immutable'); END;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        app TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    ) STRICT;
    CREATE INDEX events_app ON events (app, seq);
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
    CREATE TABLE locks (
        app TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        since_ms INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE rollouts (
        app TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    ) STRICT;",
    // 2: each rollout document names the chained `rollout.stored` event that carries its
    // digest (`adopt_rollouts` records one for every document an older kiln left).
    "ALTER TABLE rollouts ADD COLUMN chained_seq INTEGER;",
];

/// The version from which rollout documents are covered by the chain.
pub(crate) const ROLLOUTS_CHAINED: i64 = 2;

/// The schema version this build writes.
pub const CURRENT: i64 = MIGRATIONS.len() as i64;

pub(crate) fn version(conn: &Connection) -> Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("read schema version"))
}

pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let found = version(conn)?;
    if found > CURRENT {
        return Err(Error::TooNew {
            found,
            known: CURRENT,
        });
    }
    for (i, step) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction().map_err(sql("begin migration"))?;
        tx.execute_batch(step).map_err(sql("migrate schema"))?;
        if i as i64 + 1 == ROLLOUTS_CHAINED {
            adopt_rollouts(&tx)?;
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(sql("record schema version"))?;
        tx.commit().map_err(sql("commit migration"))?;
    }
    Ok(())
}

/// Binds the documents an older kiln stored to the chain, as they are at the upgrade: from
/// here on an edit of one is caught.
fn adopt_rollouts(tx: &Transaction<'_>) -> Result<()> {
    let rows: Vec<(String, String, i64)> = {
        let mut stmt = tx
            .prepare("SELECT app, state, updated_ms FROM rollouts ORDER BY app")
            .map_err(sql("prepare rollouts"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql("read rollouts"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(sql("read rollouts"))?
    };
    for (app, state, updated_ms) in rows {
        let event = Event::RolloutStored {
            sha256: chain::sha256_hex(state.as_bytes()),
        };
        let entry = chain::append(tx, &app, event.kind(), &event.data(), updated_ms)?;
        tx.execute(
            "UPDATE rollouts SET chained_seq = ?1 WHERE app = ?2",
            params![entry.seq as i64, app],
        )
        .map_err(sql("chain rollout state"))?;
    }
    Ok(())
}
