//! The ledger against a real SQLite file: releases are numbered and immutable, the chain
//! verifies, and tampering of each kind is caught and named.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kiln_ledger::{Error, Event, Ledger, NewRelease};
use serde_json::json;

fn release(image: &str) -> NewRelease {
    NewRelease {
        image: image.to_owned(),
        config: json!({"env": {"HELLO_VERSION": "v1"}, "replicas": 2}),
        spec_digest: "sha256:spec".to_owned(),
        source_commit: Some("abc123".to_owned()),
        actor: "tester@host".to_owned(),
    }
}

/// A ledger file with 2 releases and a few events, and a raw connection to tamper with it.
fn populated() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut l = Ledger::open(&path).unwrap();
    l.record_release("hello", release("sha256:aaa"), 1_000)
        .unwrap();
    l.append("hello", &routed(1), 2_000).unwrap();
    l.record_release("hello", release("sha256:bbb"), 3_000)
        .unwrap();
    let drift = Event::DriftDetected {
        instance: "i-1".into(),
        findings: vec!["/etc/x modified".into()],
    };
    l.append("hello", &drift, 4_000).unwrap();
    l.append("other", &routed(1), 5_000).unwrap();
    (dir, path)
}

fn routed(release: u64) -> Event {
    Event::RouteChanged {
        weights: [(release, 100)].into(),
        instances: 2,
    }
}

fn raw(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

#[test]
fn releases_are_numbered_per_app_and_read_back() {
    let mut l = Ledger::open_in_memory().unwrap();
    let a1 = l.record_release("a", release("sha256:1"), 10).unwrap();
    let b1 = l.record_release("b", release("sha256:2"), 11).unwrap();
    let a2 = l.record_release("a", release("sha256:3"), 12).unwrap();
    assert_eq!((a1.number, b1.number, a2.number), (1, 1, 2));
    let all = l.releases("a").unwrap();
    assert_eq!(all, vec![a1, a2.clone()]);
    assert_eq!(l.release("a", 2).unwrap(), Some(a2));
    assert_eq!(l.release("a", 3).unwrap(), None);
    assert_eq!(l.apps().unwrap(), ["a", "b"]);
}

#[test]
fn intact_chain_verifies() {
    let (_d, path) = populated();
    let l = Ledger::open(&path).unwrap();
    let report = l.verify().unwrap().unwrap();
    assert_eq!(report.events, 5);
    assert_eq!(report.releases, 2);
    let events = l.events(None, None).unwrap();
    assert_eq!(report.head, events.last().unwrap().hash);
    assert_eq!(events[1].prev_hash, events[0].hash);
    assert_eq!(l.events(Some("other"), None).unwrap().len(), 1);
    assert_eq!(l.events(None, Some(2)).unwrap()[0].seq, 4);
}

#[test]
fn triggers_refuse_rewrites() {
    let (_d, path) = populated();
    let c = raw(&path);
    let e = c
        .execute("UPDATE events SET kind = 'x' WHERE seq = 1", [])
        .unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
    let e = c.execute("DELETE FROM releases", []).unwrap_err();
    assert!(e.to_string().contains("immutable"), "{e}");
}

/// Tampering that drops the triggers first, as someone with the file and sqlite3 could.
fn tamper(path: &std::path::Path, sql: &str) -> kiln_ledger::VerifyError {
    let c = raw(path);
    c.execute_batch(
        "DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete;
         DROP TRIGGER releases_no_update; DROP TRIGGER releases_no_delete;",
    )
    .unwrap();
    c.execute_batch(sql).unwrap();
    drop(c);
    Ledger::open(path).unwrap().verify().unwrap().unwrap_err()
}

#[test]
fn one_edited_byte_of_an_old_event_is_named() {
    let (_d, path) = populated();
    let err = tamper(
        &path,
        "UPDATE events SET data = replace(data, '/etc/x', '/etc/y') WHERE seq = 4",
    );
    assert_eq!(err.seq, 4);
    assert!(err.reason.contains("edited"), "{err}");
    assert_eq!(err.what, "event drift.detected of hello");
}

#[test]
fn deleted_event_is_found() {
    let (_d, path) = populated();
    let err = tamper(&path, "DELETE FROM events WHERE seq = 2");
    assert_eq!(err.seq, 3);
    assert!(err.reason.contains("deleted or reordered"), "{err}");
}

#[test]
fn reordered_events_are_found() {
    let (_d, path) = populated();
    let err = tamper(
        &path,
        "UPDATE events SET seq = 100 WHERE seq = 2; UPDATE events SET seq = 2 WHERE seq = 3;
         UPDATE events SET seq = 3 WHERE seq = 100;",
    );
    assert_eq!(err.seq, 2);
}

#[test]
fn edited_release_row_is_found() {
    let (_d, path) = populated();
    let err = tamper(
        &path,
        "UPDATE releases SET body = replace(body, 'sha256:aaa', 'sha256:evil') WHERE number = 1",
    );
    assert_eq!(err.seq, 1);
    assert!(err.what.contains("hello#1"), "{err}");
}

#[test]
fn deleted_release_row_is_found() {
    let (_d, path) = populated();
    let err = tamper(&path, "DELETE FROM releases WHERE number = 2");
    assert!(err.reason.contains("deleted"), "{err}");
}

#[test]
fn apply_lock_is_exclusive_until_released() {
    let mut l = Ledger::open_in_memory().unwrap();
    l.lock("hello", "apply by alice", 1).unwrap();
    match l.lock("hello", "apply by bob", 2) {
        Err(Error::Locked { holder, .. }) => assert_eq!(holder, "apply by alice"),
        other => panic!("expected Locked, got {other:?}"),
    }
    l.lock("other", "apply by bob", 2).unwrap();
    l.unlock("hello", "apply by bob").unwrap(); // not the holder: no effect
    assert!(l.lock("hello", "apply by bob", 3).is_err());
    l.unlock("hello", "apply by alice").unwrap();
    l.lock("hello", "apply by bob", 4).unwrap();
    assert_eq!(l.clear_locks().unwrap(), 2);
}

#[test]
fn rollout_state_is_replaced_not_appended() {
    let mut l = Ledger::open_in_memory().unwrap();
    assert_eq!(l.rollout("hello").unwrap(), None);
    l.put_rollout("hello", &json!({"step": 1}), 1).unwrap();
    l.put_rollout("hello", &json!({"step": 2}), 2).unwrap();
    assert_eq!(l.rollout("hello").unwrap(), Some(json!({"step": 2})));
}

#[test]
fn reopening_keeps_everything_and_schema_is_current() {
    let (_d, path) = populated();
    let l = Ledger::open(&path).unwrap();
    assert_eq!(l.schema_version().unwrap(), 2);
    assert_eq!(l.releases("hello").unwrap().len(), 2);
}

#[test]
fn a_newer_schema_is_refused() {
    let (_d, path) = populated();
    raw(&path).pragma_update(None, "user_version", 99).unwrap();
    match Ledger::open(&path) {
        Err(Error::TooNew { found: 99, .. }) => {}
        Err(other) => panic!("expected TooNew, got {other}"),
        Ok(_) => panic!("expected TooNew, got a ledger"),
    }
}

#[test]
fn bad_names_are_refused() {
    let mut l = Ledger::open_in_memory().unwrap();
    assert!(l.append("hello\nworld", &routed(1), 1).is_err());
    assert!(l.append("", &routed(1), 1).is_err());
    assert!(l.events(None, None).unwrap().is_empty());
}

#[test]
fn stored_entries_decode_to_the_events_appended() {
    let (_dir, path) = populated();
    let l = Ledger::open_read_only(&path).unwrap();
    let events: Vec<Event> = l
        .events(Some("hello"), None)
        .unwrap()
        .iter()
        .map(|e| e.event().unwrap())
        .collect();
    assert_eq!(events.len(), 4);
    assert_eq!(events[1], routed(1));
    assert!(events[3].is_drift());
    assert!(matches!(events[0], Event::ReleaseCreated { number: 1, .. }));
}

#[test]
fn a_read_only_ledger_cannot_be_written() {
    let (_dir, path) = populated();
    let mut l = Ledger::open_read_only(&path).unwrap();
    assert!(l.append("hello", &routed(2), 9_000).is_err());
    assert!(l.verify().unwrap().is_ok());
}

/// The issue: `ledger.db`, its WAL and its shared-memory file were 0644, so any local user
/// read every release's configuration.
#[test]
fn the_ledger_and_its_wal_are_the_owner_s_alone_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    // The test process runs under the usual 022 umask; the files must not care.
    let mut l = Ledger::open(&path).unwrap();
    l.record_release("hello", release("sha256:aaa"), 1_000)
        .unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.path().join(format!("ledger.db{suffix}"));
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    drop(l);
    // An older kiln's files are tightened when the ledger is opened again.
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.path().join(format!("ledger.db{suffix}"));
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let l = Ledger::open(&path).unwrap();
    assert_eq!(l.releases("hello").unwrap().len(), 1);
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.path().join(format!("ledger.db{suffix}"));
        if file.exists() {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
    }
}
