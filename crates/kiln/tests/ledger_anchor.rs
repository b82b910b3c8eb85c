//! The anchored ledger end to end (issue 18): a real daemon with real instances signs the
//! chain's head outside the database; the issue's three attacks on the ledger file — an image
//! digest swapped in a release and its event with every hash recomputed, release 2 erased and
//! the chain re-chained, the last 3 events deleted — and an edited rollout document are each
//! caught by `kiln verify` (exit 1, naming the entry) and by `kiln serve`, which refuses to
//! start until `--accept-broken-ledger`, which is recorded and lets later starts pass.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, apply, build, free_port, kiln, runc_prerequisites, serial, write_spec};
use predicates::str::contains;
use sha2::{Digest, Sha256};

/// The files an attacker rewrites, and a copy to start each attack from.
const LEDGER_FILES: [&str; 4] = [
    "ledger.db",
    "ledger.db-wal",
    "ledger.db-shm",
    "ledger.checkpoints",
];

fn snapshot(state: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in LEDGER_FILES {
        if state.join(f).exists() {
            std::fs::copy(state.join(f), to.join(f)).unwrap();
        }
    }
}

fn restore(from: &Path, state: &Path) {
    for f in LEDGER_FILES {
        let _ = std::fs::remove_file(state.join(f));
        if from.join(f).exists() {
            std::fs::copy(from.join(f), state.join(f)).unwrap();
        }
    }
}

/// SIGTERM, as systemd stops it, and waits: a clean stop signs the head.
fn stop(daemon: &mut Daemon) {
    let mut child = daemon.child.take().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "the daemon stopped with {exit}");
}

/// The ledger file with its triggers dropped, as someone with the file and sqlite3 has it.
fn tamper(state: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(state.join("ledger.db")).unwrap();
    c.execute_batch(
        "DROP TRIGGER IF EXISTS events_no_update; DROP TRIGGER IF EXISTS events_no_delete;
         DROP TRIGGER IF EXISTS releases_no_update; DROP TRIGGER IF EXISTS releases_no_delete;",
    )
    .unwrap();
    c
}

/// The chain's formula, copied from the source as an attacker would.
fn entry_hash(prev: &str, seq: i64, at_ms: i64, app: &str, kind: &str, data: &str) -> String {
    let mut h = Sha256::new();
    for part in [prev, &seq.to_string(), &at_ms.to_string(), app, kind, data] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Renumbers every event from 1 and recomputes every link and hash.
fn rechain(c: &rusqlite::Connection) {
    let rows: Vec<(i64, String, String, String)> = c
        .prepare("SELECT at_ms, app, kind, data FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    c.execute("DELETE FROM events", []).unwrap();
    let mut prev = "0".repeat(64);
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

/// The seq of release `number`'s `release.created` event.
fn release_event(c: &rusqlite::Connection, number: u64) -> i64 {
    c.query_row(
        "SELECT seq FROM events WHERE kind = 'release.created' AND json_extract(data, '$.number') = ?1",
        [number as i64],
        |r| r.get(0),
    )
    .unwrap()
}

/// `kiln verify` fails (exit 1) with a message holding every one of `needles`, and so does
/// `kiln serve`, before it serves anything.
fn caught(state: &Path, needles: &[&str]) {
    let mut verify = kiln(state).arg("verify").assert().code(1);
    let mut serve = kiln(state)
        .arg("serve")
        .timeout(Duration::from_secs(60))
        .assert()
        .code(1);
    for n in needles {
        verify = verify.stderr(contains(*n));
        serve = serve.stderr(contains(*n));
    }
    serve.stderr(contains("--accept-broken-ledger"));
}

struct Deployed {
    _dir: tempfile::TempDir,
    state: PathBuf,
    clean: PathBuf,
    daemon: Daemon,
}

/// A daemon that applied release 1 and release 2 of the example app and was stopped
/// cleanly; `clean` holds a copy of its ledger files.
fn deployed() -> Deployed {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let mut daemon = Daemon::start(&state);
    let spec = write_spec(dir.path(), port, "v1", 1);
    let image = build(&state, &spec);
    apply(&state, &spec, &image);
    write_spec(dir.path(), port, "v2", 1);
    apply(&state, &spec, &image);
    stop(&mut daemon);
    kiln(&state)
        .arg("verify")
        .assert()
        .success()
        .stdout(contains("ledger ok"))
        .stdout(contains("signed by ledger key SHA256:"))
        .stdout(contains("0 entries since the last"));
    let db = rusqlite::Connection::open(state.join("ledger.db")).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    let checkpoints = std::fs::read_to_string(state.join("ledger.checkpoints"))
        .unwrap()
        .lines()
        .count();
    eprintln!(
        "two releases: {} entries, {} of them rollout.stored; {checkpoints} checkpoints",
        count("SELECT COUNT(*) FROM events"),
        count("SELECT COUNT(*) FROM events WHERE kind = 'rollout.stored'")
    );
    drop(db);
    let clean = dir.path().join("clean");
    snapshot(&state, &clean);
    Deployed {
        _dir: dir,
        state,
        clean,
        daemon,
    }
}

#[test]
fn the_issues_attacks_on_the_ledger_are_caught_by_verify_and_at_daemon_start() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let mut d = deployed();
    let state = d.state.clone();

    // 1. An image digest swapped in release 2 and its event, every hash recomputed.
    let c = tamper(&state);
    let seq = release_event(&c, 2);
    let evil = format!("sha256:{}", "e".repeat(64));
    let body: String = c
        .query_row("SELECT body FROM releases WHERE number = 2", [], |r| {
            r.get(0)
        })
        .unwrap();
    let mut release: serde_json::Value = serde_json::from_str(&body).unwrap();
    release["image"] = serde_json::json!(evil);
    let body = release.to_string();
    c.execute("UPDATE releases SET body = ?1 WHERE number = 2", [&body])
        .unwrap();
    let data: String = c
        .query_row("SELECT data FROM events WHERE seq = ?1", [seq], |r| {
            r.get(0)
        })
        .unwrap();
    let mut event: serde_json::Value = serde_json::from_str(&data).unwrap();
    event["image"] = serde_json::json!(evil);
    event["record_sha256"] = serde_json::json!(hex::encode(Sha256::digest(body.as_bytes())));
    c.execute(
        "UPDATE events SET data = ?1 WHERE seq = ?2",
        rusqlite::params![event.to_string(), seq],
    )
    .unwrap();
    rechain(&c);
    drop(c);
    // The checkpoint signed with release 2 names its entry.
    caught(
        &state,
        &[&format!(
            "entry {seq} does not match the checkpoint signed at"
        )],
    );

    // 2. Release 2 erased (its row and its event) and the chain re-chained.
    restore(&d.clean, &state);
    let c = tamper(&state);
    let seq = release_event(&c, 2);
    c.execute("DELETE FROM releases WHERE number = 2", [])
        .unwrap();
    c.execute("DELETE FROM events WHERE seq = ?1", [seq])
        .unwrap();
    c.execute(
        "UPDATE rollouts SET chained_seq = chained_seq - 1 WHERE chained_seq > ?1",
        [seq],
    )
    .unwrap();
    rechain(&c);
    drop(c);
    caught(
        &state,
        &[&format!(
            "entry {seq} does not match the checkpoint signed at"
        )],
    );

    // 3. The last 3 events deleted: the checkpoint signed at the clean stop says more.
    restore(&d.clean, &state);
    let c = tamper(&state);
    let head: i64 = c
        .query_row("SELECT MAX(seq) FROM events", [], |r| r.get(0))
        .unwrap();
    c.execute("DELETE FROM events WHERE seq > ?1", [head - 3])
        .unwrap();
    drop(c);
    let missing = format!("entries {}–{head} are missing", head - 2);
    caught(
        &state,
        &[&missing, &format!("says the chain reached {head}")],
    );

    // 4. The rollout document a restarted daemon acts on, edited.
    restore(&d.clean, &state);
    let c = tamper(&state);
    c.execute(
        "UPDATE rollouts SET state = replace(state, '\"replicas\":1', '\"replicas\":3') WHERE app = 'web'",
        [],
    )
    .unwrap();
    drop(c);
    caught(&state, &["rollout document of web", "edited"]);

    // Accepted (the last 3 events deleted): the daemon starts, records what was broken and
    // who accepted it, and signs a checkpoint so later starts pass.
    restore(&d.clean, &state);
    let c = tamper(&state);
    c.execute("DELETE FROM events WHERE seq > ?1", [head - 3])
        .unwrap();
    drop(c);
    d.daemon = Daemon::start_with(&state, &["--accept-broken-ledger"]);
    let out = kiln(&state)
        .args(["history", "--json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let events: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
    let accepted = events
        .iter()
        .find(|e| e["kind"] == "ledger.broken_accepted")
        .expect("a ledger.broken_accepted event");
    assert!(
        accepted["data"]["problem"]
            .as_str()
            .unwrap()
            .contains(&missing),
        "{accepted}"
    );
    assert!(
        accepted["data"]["actor"]
            .as_str()
            .unwrap()
            .starts_with("root@"),
        "{accepted}"
    );
    kiln(&state)
        .arg("verify")
        .assert()
        .success()
        .stdout(contains("older checkpoints set aside by an accepted break"));
    // The export carries the checkpoints and the key; the last checkpoint verifies with
    // OpenSSH's own tool.
    let export = d.state.with_extension("export.json");
    kiln(&state)
        .args(["history", "--export"])
        .arg(&export)
        .assert()
        .success();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    assert_eq!(doc["format"], "kiln-ledger-export/v1");
    assert_eq!(doc["verify"]["ok"], true, "{:#}", doc["verify"]);
    // Every event, with its hash (the daemon may have recorded more since).
    let exported = doc["events"].as_array().unwrap();
    assert!(exported.len() >= events.len());
    for (e, x) in events.iter().zip(exported) {
        assert_eq!((&e["seq"], &e["hash"]), (&x["seq"], &x["hash"]));
    }
    ssh_keygen_verifies(&doc, d.state.parent().unwrap());
    // Checked offline, against the key as kept elsewhere; an edit of the export is named.
    let key = state.join("keys/ledger.pub");
    kiln(&state)
        .args(["verify", "--ledger-export"])
        .arg(&export)
        .arg("--ledger-key")
        .arg(&key)
        .assert()
        .success()
        .stdout(contains("ledger ok"));
    let mut edited = doc.clone();
    let data = edited["events"][1]["data"]
        .as_str()
        .unwrap()
        .replace("sha256:", "sha256:0");
    edited["events"][1]["data"] = serde_json::json!(data);
    let edited_file = d.state.with_extension("edited.json");
    std::fs::write(&edited_file, edited.to_string()).unwrap();
    kiln(&state)
        .args(["verify", "--ledger-export"])
        .arg(&edited_file)
        .arg("--ledger-key")
        .arg(&key)
        .assert()
        .code(1)
        .stderr(contains("ledger entry 2"))
        .stderr(contains("edited"));
    // Another key than the one kept: the whole ledger is refused, locally too.
    let other = d.state.with_extension("other");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(made.success());
    let other_pub = other.with_extension("other.pub");
    for args in [
        vec![
            "verify".into(),
            "--ledger-export".into(),
            export.clone().into_os_string(),
        ],
        vec!["verify".into()],
    ] {
        kiln(&state)
            .args(&args)
            .arg("--ledger-key")
            .arg(&other_pub)
            .assert()
            .code(1)
            .stderr(contains("not the key given"));
    }

    stop(&mut d.daemon);
    kiln(&state).arg("verify").assert().success();
    d.daemon = Daemon::start(&state);
    kiln(&state).arg("verify").assert().success();
}

/// `ssh-keygen -Y verify` (namespace `kiln-ledger`) accepts the export's last checkpoint
/// with the export's ledger key.
fn ssh_keygen_verifies(doc: &serde_json::Value, dir: &Path) {
    let last = doc["checkpoints"].as_array().unwrap().last().unwrap();
    let signers = dir.join("allowed_signers");
    std::fs::write(
        &signers,
        format!("ledger@kiln {}\n", doc["ledger_key"].as_str().unwrap()),
    )
    .unwrap();
    let sig = dir.join("checkpoint.sig");
    std::fs::write(&sig, last["signature"].as_str().unwrap()).unwrap();
    // What is signed, as documented: `{"seq":N,"hash":"…","at_ms":T}`, `,"reset":true` last
    // when set.
    let head = format!(
        r#"{{"seq":{},"hash":"{}","at_ms":{}{}}}"#,
        last["seq"],
        last["hash"].as_str().unwrap(),
        last["at_ms"],
        if last["reset"] == true {
            r#","reset":true"#
        } else {
            ""
        }
    );
    let mut child = std::process::Command::new("ssh-keygen")
        .args([
            "-Y",
            "verify",
            "-n",
            "kiln-ledger",
            "-I",
            "ledger@kiln",
            "-f",
        ])
        .arg(&signers)
        .arg("-s")
        .arg(&sig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(head.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ssh-keygen -Y verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
