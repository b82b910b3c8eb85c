//! The anchored ledger against real files: rollout documents are bound to the chain, the
//! daemon's checkpoints are signed outside the database, and the issue's attacks — an edit
//! with every hash recomputed, a release erased and the chain re-chained, the last events
//! deleted — are caught and named, as are a forged, missing or unreadable checkpoint file.
//! An older ledger (schema 1) still opens, is migrated and verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kiln_ledger::{AnchorFiles, Event, Ledger, NewRelease, Start, VerifyError};
use serde_json::json;
use sha2::{Digest, Sha256};

fn release(image: &str) -> NewRelease {
    NewRelease {
        image: image.to_owned(),
        config: json!({"replicas": 2}),
        spec_digest: "sha256:spec".to_owned(),
        source_commit: None,
        actor: "tester@host".to_owned(),
    }
}

fn routed(release: u64) -> Event {
    Event::RouteChanged {
        weights: [(release, 100)].into(),
        instances: 2,
    }
}

struct State {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    files: AnchorFiles,
}

/// A state directory whose ledger a daemon started (anchored) and then used: two releases,
/// rollout documents, events, a checkpoint on each release and one at the end (seq 10).
fn anchored() -> State {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let files = AnchorFiles::in_state(dir.path());
    let mut l = Ledger::open(&db).unwrap();
    // 1: ledger.anchored
    assert!(matches!(
        l.start(&files, None, 500).unwrap().unwrap(),
        Start::Anchored { entries: 0, .. }
    ));
    // 2, 3
    l.record_release("hello", release("sha256:aaa"), 1_000)
        .unwrap();
    l.put_rollout("hello", &json!({"release": 1}), 1_001)
        .unwrap();
    l.checkpoint(1_002).unwrap().unwrap();
    // 4, 5, 6
    l.append("hello", &routed(1), 2_000).unwrap();
    l.record_release("hello", release("sha256:bbb"), 3_000)
        .unwrap();
    l.put_rollout("hello", &json!({"release": 2}), 3_001)
        .unwrap();
    l.checkpoint(3_002).unwrap().unwrap();
    // 7..10
    for i in 0..4 {
        l.append("hello", &routed(2), 4_000 + i).unwrap();
    }
    l.checkpoint(5_000).unwrap().unwrap();
    assert_eq!(l.head().unwrap().0, 10);
    State {
        _dir: dir,
        db,
        files,
    }
}

fn raw(path: &std::path::Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "DROP TRIGGER IF EXISTS events_no_update; DROP TRIGGER IF EXISTS events_no_delete;
         DROP TRIGGER IF EXISTS releases_no_update; DROP TRIGGER IF EXISTS releases_no_delete;",
    )
    .unwrap();
    c
}

/// The chain's formula, as an attacker would copy it from the source.
fn entry_hash(prev: &str, seq: i64, at_ms: i64, app: &str, kind: &str, data: &str) -> String {
    let mut h = Sha256::new();
    for part in [prev, &seq.to_string(), &at_ms.to_string(), app, kind, data] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Renumbers every event from 1 and recomputes every link and hash: a consistent chain.
fn rechain(c: &rusqlite::Connection) {
    let rows: Vec<(i64, String, String, String)> = c
        .prepare("SELECT at_ms, app, kind, data FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    c.execute("DELETE FROM events", []).unwrap();
    let mut prev = kiln_ledger::GENESIS.to_owned();
    for (i, (at_ms, app, kind, data)) in rows.into_iter().enumerate() {
        let seq = i as i64 + 1;
        let hash = entry_hash(&prev, seq, at_ms, &app, &kind, &data);
        c.execute(
            "INSERT INTO events (seq, at_ms, app, kind, data, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            rusqlite::params![seq, at_ms, app, kind, data, prev, hash],
        )
        .unwrap();
        prev = hash;
    }
}

fn verify(s: &State) -> Result<kiln_ledger::VerifyReport, VerifyError> {
    Ledger::open_read_only(&s.db)
        .unwrap()
        .verify_anchored(&s.files)
        .unwrap()
}

#[test]
fn an_anchored_ledger_verifies_and_says_what_the_checkpoints_proved() {
    let s = anchored();
    let report = verify(&s).unwrap();
    assert_eq!(
        (report.events, report.releases, report.rollouts),
        (10, 2, 1)
    );
    let anchor = report.anchor.unwrap();
    assert_eq!(anchor.checked, 4);
    assert_eq!(anchor.set_aside, 0);
    assert_eq!(anchor.last.unwrap().seq, 10);
    assert_eq!(anchor.unsigned, 0);
    // The key is private; its public half sits beside it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&s.files.key)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let public = std::fs::read_to_string(&s.files.public).unwrap();
    assert!(public.starts_with("ssh-ed25519 "), "{public}");
}

#[test]
fn a_checkpoint_is_written_only_when_the_head_moved() {
    let s = anchored();
    let mut l = Ledger::open(&s.db).unwrap();
    assert!(matches!(
        l.start(&s.files, None, 6_000).unwrap().unwrap(),
        Start::Verified(_)
    ));
    let lines = || {
        std::fs::read_to_string(&s.files.checkpoints)
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines(), 4);
    assert!(l.checkpoint(6_001).unwrap().is_none());
    l.append("hello", &routed(2), 6_002).unwrap();
    assert_eq!(l.checkpoint(6_003).unwrap().unwrap().head.seq, 11);
    assert_eq!(lines(), 5);
}

#[test]
fn the_same_rollout_document_stored_again_adds_no_entry() {
    let mut l = Ledger::open_in_memory().unwrap();
    l.put_rollout("hello", &json!({"step": 1}), 1).unwrap();
    l.put_rollout("hello", &json!({"step": 1}), 2).unwrap();
    l.put_rollout("hello", &json!({"step": 1}), 3).unwrap();
    assert_eq!(l.events(None, None).unwrap().len(), 1);
    l.put_rollout("hello", &json!({"step": 2}), 4).unwrap();
    let events = l.events(None, None).unwrap();
    assert_eq!(events.len(), 2);
    assert!(matches!(
        events[1].event().unwrap(),
        Event::RolloutStored { .. }
    ));
    assert_eq!(l.verify().unwrap().unwrap().rollouts, 1);
}

#[test]
fn an_edited_rollout_document_is_named() {
    let s = anchored();
    raw(&s.db)
        .execute(
            "UPDATE rollouts SET state = '{\"release\":1}' WHERE app = 'hello'",
            [],
        )
        .unwrap();
    let err = verify(&s).unwrap_err();
    assert_eq!(err.seq, 6, "{err}");
    assert_eq!(err.what, "rollout document of hello");
    assert!(err.reason.contains("edited"), "{err}");
}

#[test]
fn an_older_rollout_document_put_back_is_named() {
    let s = anchored();
    // The attacker puts back release 1's document with the seq of the event that recorded it.
    raw(&s.db)
        .execute(
            "UPDATE rollouts SET state = '{\"release\":1}', chained_seq = 3 WHERE app = 'hello'",
            [],
        )
        .unwrap();
    let err = verify(&s).unwrap_err();
    assert_eq!(err.seq, 6, "{err}");
    assert!(err.reason.contains("older one was put back"), "{err}");
}

#[test]
fn a_deleted_rollout_document_is_named() {
    let s = anchored();
    raw(&s.db).execute("DELETE FROM rollouts", []).unwrap();
    let err = verify(&s).unwrap_err();
    assert_eq!(err.seq, 6, "{err}");
    assert!(err.reason.contains("deleted"), "{err}");
}

/// The issue's first attack: an image digest swapped in a release and its event, the chain
/// recomputed. The chain alone says ok; the checkpoints do not.
#[test]
fn a_consistently_rechained_edit_is_caught_by_the_checkpoints() {
    let s = anchored();
    let c = raw(&s.db);
    c.execute_batch(
        "UPDATE releases SET body = replace(body, 'sha256:bbb', 'sha256:evil');
         UPDATE events SET data = replace(data, 'sha256:bbb', 'sha256:evil') WHERE seq = 5;",
    )
    .unwrap();
    // The release.created event carries the row's digest: recompute it as well.
    let body: String = c
        .query_row("SELECT body FROM releases WHERE number = 2", [], |r| {
            r.get(0)
        })
        .unwrap();
    let digest = hex::encode(Sha256::digest(body.as_bytes()));
    let data: String = c
        .query_row("SELECT data FROM events WHERE seq = 5", [], |r| r.get(0))
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&data).unwrap();
    v["record_sha256"] = json!(digest);
    c.execute("UPDATE events SET data = ?1 WHERE seq = 5", [v.to_string()])
        .unwrap();
    rechain(&c);
    drop(c);
    // Without the anchor, the attack works (this is what `kiln verify` used to say).
    assert!(
        Ledger::open_read_only(&s.db)
            .unwrap()
            .verify()
            .unwrap()
            .is_ok()
    );
    let err = verify(&s).unwrap_err();
    assert_eq!(err.seq, 6, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("entry 6 does not match the checkpoint signed at"),
        "{text}"
    );
    assert!(text.contains("between 4 and 6"), "{text}");
    assert!(
        text.contains("entries after 3, the last checkpoint that matches, cannot be trusted"),
        "{text}"
    );
}

/// The second: release 2 erased (row and event) and the chain re-chained.
#[test]
fn an_erased_release_rechained_is_caught() {
    let s = anchored();
    let c = raw(&s.db);
    c.execute_batch(
        "DELETE FROM releases WHERE number = 2; DELETE FROM events WHERE seq = 5;
         UPDATE rollouts SET chained_seq = chained_seq - 1;",
    )
    .unwrap();
    rechain(&c);
    drop(c);
    let err = verify(&s).unwrap_err();
    assert_eq!(err.seq, 6, "{err}");
    assert!(
        err.reason.contains("does not match the checkpoint"),
        "{err}"
    );
}

/// The third: the last 3 events deleted.
#[test]
fn deleted_last_events_are_named() {
    let s = anchored();
    raw(&s.db)
        .execute("DELETE FROM events WHERE seq > 7", [])
        .unwrap();
    assert!(
        Ledger::open_read_only(&s.db)
            .unwrap()
            .verify()
            .unwrap()
            .is_ok()
    );
    let err = verify(&s).unwrap_err();
    assert_eq!(err.seq, 8, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("entries 8–10 are missing: the checkpoint signed at"),
        "{text}"
    );
    assert!(text.contains("says the chain reached 10"), "{text}");
}

#[test]
fn a_forged_checkpoint_is_named() {
    let s = anchored();
    let text = std::fs::read_to_string(&s.files.checkpoints).unwrap();
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[3]["seq"] = json!(9);
    let forged: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&s.files.checkpoints, forged).unwrap();
    let err = verify(&s).unwrap_err();
    assert!(err.what.contains("line 4"), "{err}");
    assert!(err.reason.contains("signature does not verify"), "{err}");
}

#[test]
fn a_missing_or_unreadable_checkpoint_file_is_reported() {
    let s = anchored();
    let text = std::fs::read_to_string(&s.files.checkpoints).unwrap();
    std::fs::write(&s.files.checkpoints, format!("{text}not json\n")).unwrap();
    let err = verify(&s).unwrap_err();
    assert!(err.to_string().contains("line 5 of"), "{err}");
    std::fs::remove_file(&s.files.checkpoints).unwrap();
    let err = verify(&s).unwrap_err();
    assert!(err.to_string().contains("nothing signed"), "{err}");
    // A daemon refuses it too, the key being there.
    let mut l = Ledger::open(&s.db).unwrap();
    assert!(l.start(&s.files, None, 9_000).unwrap().is_err());
}

#[test]
fn a_torn_last_line_is_left_out_and_cut_at_the_next_append() {
    let s = anchored();
    let mut text = std::fs::read_to_string(&s.files.checkpoints).unwrap();
    text.push_str("{\"seq\":11,\"ha");
    std::fs::write(&s.files.checkpoints, &text).unwrap();
    assert!(verify(&s).is_ok());
    let mut l = Ledger::open(&s.db).unwrap();
    l.start(&s.files, None, 9_000).unwrap().unwrap();
    l.append("hello", &routed(1), 9_001).unwrap();
    l.checkpoint(9_002).unwrap().unwrap();
    let text = std::fs::read_to_string(&s.files.checkpoints).unwrap();
    assert_eq!(text.lines().count(), 5);
    assert!(verify(&s).is_ok());
}

#[test]
fn a_broken_ledger_is_refused_until_accepted_and_the_acceptance_is_recorded() {
    let s = anchored();
    raw(&s.db)
        .execute("DELETE FROM events WHERE seq > 7", [])
        .unwrap();
    let mut l = Ledger::open(&s.db).unwrap();
    let refused = l.start(&s.files, None, 9_000).unwrap().unwrap_err();
    assert_eq!(refused.seq, 8);
    drop(l);
    let mut l = Ledger::open(&s.db).unwrap();
    match l
        .start(&s.files, Some("root@host"), 9_001)
        .unwrap()
        .unwrap()
    {
        Start::Accepted(e) => assert_eq!(e, refused),
        other => panic!("expected Accepted, got {other:?}"),
    }
    let last = l.events(None, Some(1)).unwrap().remove(0);
    match last.event().unwrap() {
        Event::BrokenAccepted { problem, actor, .. } => {
            assert_eq!(actor, "root@host");
            assert!(problem.contains("entries 8–10 are missing"), "{problem}");
        }
        other => panic!("expected ledger.broken_accepted, got {other:?}"),
    }
    drop(l);
    // Later starts pass; the checkpoints before the acceptance are set aside.
    let report = verify(&s).unwrap();
    let anchor = report.anchor.unwrap();
    assert_eq!((anchor.set_aside, anchor.checked), (4, 1));
    let mut l = Ledger::open(&s.db).unwrap();
    assert!(matches!(
        l.start(&s.files, None, 9_002).unwrap().unwrap(),
        Start::Verified(_)
    ));
}

#[test]
fn an_accepted_break_in_the_chain_itself_is_reported_not_failing() {
    let s = anchored();
    raw(&s.db)
        .execute(
            "UPDATE events SET data = replace(data, '100', '99') WHERE seq = 4",
            [],
        )
        .unwrap();
    let mut l = Ledger::open(&s.db).unwrap();
    let refused = l.start(&s.files, None, 9_000).unwrap().unwrap_err();
    assert_eq!(refused.seq, 4);
    assert!(refused.reason.contains("edited"), "{refused}");
    l.start(&s.files, Some("root@host"), 9_001)
        .unwrap()
        .unwrap();
    drop(l);
    let report = verify(&s).unwrap();
    assert_eq!(report.accepted.len(), 1);
    assert_eq!(report.accepted[0].seq, 4);
    // A break after the acceptance still fails.
    raw(&s.db)
        .execute(
            "UPDATE events SET data = replace(data, '100', '98') WHERE seq = 8",
            [],
        )
        .unwrap();
    assert_eq!(verify(&s).unwrap_err().seq, 8);
}

#[test]
fn a_lost_key_is_refused_once_the_ledger_was_signed() {
    let s = anchored();
    std::fs::remove_file(&s.files.key).unwrap();
    std::fs::remove_file(&s.files.public).unwrap();
    let mut l = Ledger::open(&s.db).unwrap();
    let refused = l.start(&s.files, None, 9_000).unwrap().unwrap_err();
    assert!(refused.reason.contains("missing"), "{refused}");
    // Accepted: a new key signs from here on.
    l.start(&s.files, Some("root@host"), 9_001)
        .unwrap()
        .unwrap();
    drop(l);
    let anchor = verify(&s).unwrap().anchor.unwrap();
    assert_eq!(anchor.checked, 1);
}

/// Regression (review of issue 18): a public key file swapped for another key's, which anyone
/// who can write the state but not read the private key could do to re-sign a rewritten
/// chain, is refused at start.
#[test]
fn a_swapped_public_key_file_is_refused_at_start() {
    let s = anchored();
    let other = kiln_sign::SigningKey::generate();
    std::fs::write(&s.files.public, other.public().to_openssh()).unwrap();
    let mut l = Ledger::open(&s.db).unwrap();
    let refused = l.start(&s.files, None, 9_000).unwrap().unwrap_err();
    assert!(
        refused.reason.contains("is not the public half"),
        "{refused}"
    );
}

/// Regression (review of issue 18): a checkpoint time past the year 9999 is shown clamped,
/// not a panic in `kiln verify` or at daemon start.
#[test]
fn a_time_past_the_year_9999_is_shown_not_a_panic() {
    assert_eq!(kiln_ledger::when(i64::MAX), "9999-12-31T23:59:59.999Z");
    assert_eq!(kiln_ledger::when(-5), "1970-01-01T00:00:00.000Z");
}

/// A ledger written by the kiln before this change (schema 1: rollout documents outside the
/// chain) opens, is migrated, binds its documents as found, and verifies; an edit of a
/// document after that is caught.
#[test]
fn a_schema_1_ledger_is_migrated_and_its_documents_bound_as_found() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(SCHEMA_1).unwrap();
        let data = r#"{"instances":2,"weights":{"1":100}}"#;
        let hash = entry_hash(kiln_ledger::GENESIS, 1, 10, "hello", "route.changed", data);
        c.execute(
            "INSERT INTO events VALUES (1, 10, 'hello', 'route.changed', ?1, ?2, ?3)",
            rusqlite::params![data, kiln_ledger::GENESIS, hash],
        )
        .unwrap();
        c.execute(
            "INSERT INTO rollouts VALUES ('hello', '{\"release\":1}', 11)",
            [],
        )
        .unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
    }
    // Read-only, not migrated: it verifies as before (documents not covered yet).
    let report = Ledger::open_read_only(&db)
        .unwrap()
        .verify()
        .unwrap()
        .unwrap();
    assert_eq!((report.events, report.rollouts), (1, 0));
    let mut l = Ledger::open(&db).unwrap();
    assert_eq!(l.schema_version().unwrap(), 2);
    let report = l.verify().unwrap().unwrap();
    assert_eq!((report.events, report.rollouts), (2, 1));
    assert_eq!(l.rollout("hello").unwrap(), Some(json!({"release": 1})));
    // The first start of a daemon anchors it.
    let files = AnchorFiles::in_state(dir.path());
    assert!(matches!(
        l.start(&files, None, 20).unwrap().unwrap(),
        Start::Anchored { entries: 2, .. }
    ));
    drop(l);
    raw(&db)
        .execute("UPDATE rollouts SET state = '{\"release\":9}'", [])
        .unwrap();
    let err = Ledger::open_read_only(&db)
        .unwrap()
        .verify_anchored(&files)
        .unwrap()
        .unwrap_err();
    assert_eq!(err.seq, 2);
    assert!(err.reason.contains("edited"), "{err}");
}

/// The schema an older kiln wrote (migration 1, as released).
const SCHEMA_1: &str = "CREATE TABLE releases (
        app TEXT NOT NULL, number INTEGER NOT NULL, created_ms INTEGER NOT NULL,
        body TEXT NOT NULL, PRIMARY KEY (app, number)) STRICT;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, app TEXT NOT NULL, kind TEXT NOT NULL,
        data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL) STRICT;
    CREATE INDEX events_app ON events (app, seq);
    CREATE TABLE locks (app TEXT PRIMARY KEY, holder TEXT NOT NULL, since_ms INTEGER NOT NULL) STRICT;
    CREATE TABLE rollouts (app TEXT PRIMARY KEY, state TEXT NOT NULL, updated_ms INTEGER NOT NULL) STRICT;";

/// The last events cut include the entry of the current rollout document: the missing
/// entries are named, not the document that lost its entry.
#[test]
fn deleted_last_events_with_a_rollout_document_among_them_are_named_as_missing() {
    let s = anchored();
    let mut l = Ledger::open(&s.db).unwrap();
    l.start(&s.files, None, 6_000).unwrap().unwrap();
    l.put_rollout("hello", &json!({"release": 2, "step": 1}), 6_001)
        .unwrap();
    l.append("hello", &routed(2), 6_002).unwrap();
    l.append("hello", &routed(2), 6_003).unwrap();
    l.checkpoint(6_004).unwrap().unwrap();
    drop(l);
    raw(&s.db)
        .execute("DELETE FROM events WHERE seq > 10", [])
        .unwrap();
    let err = verify(&s).unwrap_err();
    assert!(
        err.to_string().contains("entries 11–13 are missing"),
        "{err}"
    );
}

/// An export checks offline as the ledger does: intact, it verifies; an event edited in it,
/// events cut from it, or a key other than the one kept elsewhere, and it does not.
#[test]
fn an_export_verifies_offline_and_its_tampering_is_named() {
    let s = anchored();
    let l = Ledger::open_read_only(&s.db).unwrap();
    let doc = l.export(&s.files, 7_000).unwrap();
    drop(l);
    assert_eq!(doc["verify"]["ok"], true, "{:#}", doc["verify"]);
    let key = kiln_ledger::PublicKey::parse_openssh(
        std::fs::read_to_string(&s.files.public).unwrap().trim(),
    )
    .unwrap();
    let report = kiln_ledger::verify_export(&doc, Some(&key)).unwrap();
    assert_eq!(
        (report.events, report.releases, report.rollouts),
        (10, 2, 1)
    );

    let mut edited = doc.clone();
    let data = edited["events"][3]["data"]
        .as_str()
        .unwrap()
        .replace("100", "99");
    edited["events"][3]["data"] = json!(data);
    let err = kiln_ledger::verify_export(&edited, Some(&key)).unwrap_err();
    assert_eq!(err.seq, 4, "{err}");
    assert!(err.reason.contains("edited"), "{err}");

    let mut cut = doc.clone();
    cut["events"].as_array_mut().unwrap().truncate(7);
    let err = kiln_ledger::verify_export(&cut, Some(&key)).unwrap_err();
    assert!(
        err.to_string().contains("entries 8–10 are missing"),
        "{err}"
    );

    let other =
        kiln_ledger::Notary::create(&AnchorFiles::in_state(tempfile::tempdir().unwrap().path()))
            .unwrap()
            .public()
            .clone();
    let err = kiln_ledger::verify_export(&doc, Some(&other)).unwrap_err();
    assert!(err.reason.contains("not the key given"), "{err}");
}

/// A first start killed after the key was written and before anything was signed: the next
/// start goes on with that key rather than refusing a ledger nothing ever signed.
#[test]
fn a_first_start_cut_short_after_the_key_was_made_goes_on_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let files = AnchorFiles::in_state(dir.path());
    let mut l = Ledger::open(&db).unwrap();
    l.record_release("hello", release("sha256:aaa"), 1_000)
        .unwrap();
    let made = kiln_ledger::Notary::create(&files).unwrap();
    let key = made.public().fingerprint();
    drop(made);
    match l.start(&files, None, 2_000).unwrap().unwrap() {
        Start::Anchored { key: used, entries } => assert_eq!((used, entries), (key, 1)),
        other => panic!("expected Anchored, got {other:?}"),
    }
    drop(l);
    let s = State {
        _dir: dir,
        db,
        files,
    };
    assert_eq!(verify(&s).unwrap().anchor.unwrap().checked, 1);
}
