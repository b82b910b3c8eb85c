//! GitOps end to end: a real daemon follows a real bare repository the test pushes to (the
//! `git` program makes the commits; kiln reads them with gix). One daemon serves the whole
//! story, in order: a commit goes live by itself; a commit whose `[image.test]` fails is
//! recorded with its output while the live release serves on, with no failed request under
//! load; `kiln rollback` pins the app (the bad commit is not re-applied across polls and a
//! restart) and a newer commit resumes; `resume = "manual"` waits for `kiln sync`;
//! `sync = "manual"` shows its plan and waits; a webhook with a valid signature fetches at
//! once, a forged one gets 401 and changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Load, free_port, hello_binary, kiln, runc_prerequisites, wait_until};
use serde_json::Value;

/// A work clone of a bare repository, committing as a fixed author.
struct Repo {
    bare: PathBuf,
    work: PathBuf,
    port: u16,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=Ada Lovelace",
            "-c",
            "user.email=ada@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .expect("git runs (apt-get install git)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl Repo {
    fn new(dir: &Path, port: u16) -> Repo {
        let bare = dir.join("origin.git");
        let work = dir.join("work");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        std::fs::copy(hello_binary(), work.join("hello")).unwrap();
        Repo { bare, work, port }
    }

    /// Commits a spec serving `version` (`extra_env` added to its env) and pushes it.
    fn push(&self, version: &str, extra_env: &str, message: &str) -> String {
        self.push_file("kiln.toml", &spec(self.port, version, extra_env), message)
    }

    /// Commits `text` as `name` and pushes it.
    fn push_file(&self, name: &str, text: &str, message: &str) -> String {
        std::fs::write(self.work.join(name), text).unwrap();
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", message]);
        git(&self.work, &["push", "-q", "origin", "main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

fn spec(port: u16, version: &str, extra_env: &str) -> String {
    format!(
        r#"name = "web"

[image]
entrypoint = ["/hello"]

[[image.copy]]
from = "hello"
to = "/hello"

[image.test]
command = ["/hello", "migrate"]
timeout = "30s"

[service]
replicas = 1
writable = ["/tmp"]
stop_grace = "2s"
env = {{ HELLO_VERSION = "{version}"{extra_env} }}

[service.health]
path = "/healthz"
interval = "100ms"
timeout = "100ms"
start_period = "10s"

[route]
listen = "127.0.0.1:{port}"
drain_timeout = "5s"
sticky = "none"

[deploy]
keep_previous = "10m"
progress_deadline = "1m"
"#
    )
}

fn get(port: u16) -> String {
    common::raw_get(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        "web",
        "/",
    )
}

/// The source's part of `kiln status web`.
fn source(s: &Value) -> &Value {
    &s["source"]
}

/// The release live and the commit it came from.
fn live_commit(s: &Value) -> Option<&str> {
    source(s)["live_commit"].as_str()
}

fn add_source(state: &Path, repo: &Repo, name: &str, extra: &[&str]) {
    kiln(state)
        .args(["source", "add", name, "--git"])
        .arg(&repo.bare)
        .args(["--interval", "2s"])
        .args(extra)
        .assert()
        .success();
}

fn remove_source(state: &Path, name: &str) {
    kiln(state)
        .args(["source", "remove", name])
        .assert()
        .success();
}

/// The `source.step` events of `commit`, as (step, result).
fn steps_of(state: &Path, commit: &str) -> Vec<(String, String)> {
    common::history(state)
        .into_iter()
        .filter(|e| e["kind"] == "source.step" && e["data"]["commit"] == commit)
        .map(|e| {
            (
                e["data"]["step"].as_str().unwrap().to_owned(),
                e["data"]["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn releases(state: &Path) -> usize {
    common::history(state)
        .iter()
        .filter(|e| e["kind"] == "release.created")
        .count()
}

/// One POST of `body` to the webhook of source `name` over the TCP API, with `signature`.
fn webhook(api: u16, name: &str, body: &str, signature: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", api)).unwrap();
    write!(
        s,
        "POST /v1/sources/{name}/webhook HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: push\r\nX-Hub-Signature-256: {signature}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_daemon_follows_a_branch_and_agrees_with_rollback() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let api = free_port();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken-for-the-api").unwrap();
    let repo = Repo::new(dir.path(), port);
    let mut daemon = Daemon::start_with(
        &state,
        &[
            "--api-listen",
            &format!("127.0.0.1:{api}"),
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    let long = Duration::from_secs(180);

    // 1. A pushed commit goes live by itself.
    let c1 = repo.push("v1", "", "first version");
    add_source(&state, &repo, "web", &[]);
    wait_until(&state, long, |s| {
        live_commit(s) == Some(c1.as_str()) && source(s)["last"]["step"] == "rollout"
    });
    assert!(get(port).contains("hello from v1"), "{}", get(port));
    let seen = steps_of(&state, &c1);
    for step in ["seen", "build", "test", "plan", "apply", "rollout"] {
        assert!(
            seen.iter().any(|(s, r)| s == step && r == "passed"),
            "{step} passed for {c1}: {seen:?}"
        );
    }
    let release_1 = common::status(&state)["release"].as_u64().unwrap();
    let first = common::history(&state)
        .into_iter()
        .find(|e| e["kind"] == "source.step" && e["data"]["step"] == "seen")
        .unwrap();
    assert_eq!(first["data"]["author"], "Ada Lovelace <ada@example.com>");
    assert_eq!(first["data"]["summary"], "first version");

    // 2. A commit whose test fails: recorded with its output, v1 serves on, nothing fails.
    let load = Load::start(port, 4);
    let c2 = repo.push("v2", ", HELLO_MIGRATION_FAILS = \"1\"", "a bad migration");
    wait_until(&state, long, |s| {
        source(s)["last"]["commit"]["id"] == c2.as_str() && source(s)["last"]["step"] == "test"
    });
    let s = common::status(&state);
    assert_eq!(source(&s)["last"]["result"], "failed", "{s:#}");
    let output = source(&s)["last"]["output"].as_str().unwrap();
    assert!(
        output.contains("migration failed"),
        "the test's output is kept: {output}"
    );
    let failed_event = common::history(&state)
        .into_iter()
        .find(|e| {
            e["kind"] == "source.step" && e["data"]["commit"] == c2 && e["data"]["step"] == "test"
        })
        .unwrap();
    assert_eq!(failed_event["data"]["result"], "failed");
    assert!(
        failed_event["data"]["output"]
            .as_str()
            .unwrap()
            .contains("migration failed")
    );
    assert_eq!(
        s["release"].as_u64(),
        Some(release_1),
        "no release for a failed test"
    );
    assert_eq!(live_commit(&s), Some(c1.as_str()));
    assert!(get(port).contains("hello from v1"));

    // A pusher cannot build the host's files into an image (nor name a program to run).
    let hostile = spec(port, "v2", "").replace(
        "[image.test]",
        "[[image.copy]]\nfrom = \"/etc/hostname\"\nto = \"/stolen\"\nallow_outside = true\n\n[image.test]",
    );
    let c2b = repo.push_file("kiln.toml", &hostile, "take the host's files");
    wait_until(&state, long, |s| {
        source(s)["last"]["commit"]["id"] == c2b.as_str()
    });
    let s = common::status(&state);
    assert_eq!(source(&s)["last"]["step"], "build", "{s:#}");
    assert_eq!(source(&s)["last"]["result"], "failed", "{s:#}");
    let why = source(&s)["last"]["output"].as_str().unwrap();
    assert!(why.contains("outside the repository"), "{why}");
    assert_eq!(s["release"].as_u64(), Some(release_1));

    // The next good commit goes live.
    let c3 = repo.push("v3", "", "fix the migration");
    wait_until(&state, long, |s| {
        live_commit(s) == Some(c3.as_str()) && s["phase"] == "completed"
    });
    assert!(get(port).contains("hello from v3"));
    let (ok, failed) = load.finish();
    assert!(ok > 0);
    assert_eq!(failed, 0, "requests failed while following the branch");

    // 3. `kiln rollback` pins the app: c3 is marked bad and not re-applied.
    kiln(&state).args(["rollback", "web"]).assert().success();
    wait_until(&state, long, |s| {
        live_commit(s) == Some(c1.as_str()) && source(s)["pinned"].is_string()
    });
    let pinned = common::status(&state);
    assert!(
        source(&pinned)["bad"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == c3.as_str())
    );
    let before = releases(&state);
    // Five polls (2 s each), then a daemon restart and more polls.
    std::thread::sleep(Duration::from_secs(11));
    daemon.kill();
    daemon.spawn();
    std::thread::sleep(Duration::from_secs(7));
    let s = common::status(&state);
    assert_eq!(live_commit(&s), Some(c1.as_str()), "{s:#}");
    assert!(source(&s)["pinned"].is_string(), "{s:#}");
    assert_eq!(releases(&state), before, "the bad commit was applied again");
    assert!(get(port).contains("hello from v1"));
    let text = kiln(&state)
        .args(["status", "web"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("pinned"), "{text}");

    // A commit that changes nothing the release is made of (a README) does not bring the
    // rolled-back release back.
    let readme = repo.push_file("README.md", "v3 again\n", "docs only");
    wait_until(&state, long, |s| {
        source(s)["last"]["commit"]["id"] == readme.as_str() && source(s)["last"]["step"] == "apply"
    });
    let s = common::status(&state);
    assert_eq!(source(&s)["last"]["result"], "skipped", "{s:#}");
    assert_eq!(live_commit(&s), Some(c1.as_str()));

    // A newer commit resumes following.
    let c4 = repo.push("v4", "", "after the rollback");
    wait_until(&state, long, |s| {
        live_commit(s) == Some(c4.as_str()) && s["phase"] == "completed"
    });
    assert!(source(&common::status(&state))["pinned"].is_null());
    assert!(
        common::history(&state)
            .iter()
            .any(|e| e["kind"] == "source.resumed" && e["data"]["commit"] == c4)
    );

    // 4. resume = "manual": after a rollback a newer commit waits for `kiln sync`.
    remove_source(&state, "web");
    add_source(&state, &repo, "web", &["--resume", "manual"]);
    kiln(&state).args(["rollback", "web"]).assert().success();
    wait_until(&state, long, |s| {
        source(s)["pinned"].is_string()
            && live_commit(s).is_some_and(|c| c != c4)
            && s["phase"] == "completed"
    });
    // The release live before c4's (a person may return to a commit the follower holds bad).
    let back = live_commit(&common::status(&state)).unwrap().to_owned();
    let c5 = repo.push("v5", "", "while pinned");
    wait_until(&state, long, |s| {
        source(s)["latest"]["id"] == c5.as_str() && source(s)["last"]["commit"]["id"] == c5.as_str()
    });
    let s = common::status(&state);
    assert_eq!(source(&s)["last"]["result"], "skipped", "{s:#}");
    assert_eq!(live_commit(&s), Some(back.as_str()));
    kiln(&state)
        .args(["sync", "web"])
        .timeout(long)
        .assert()
        .success();
    let s = common::status(&state);
    assert_eq!(live_commit(&s), Some(c5.as_str()), "{s:#}");
    assert!(source(&s)["pinned"].is_null());

    // 5. sync = "manual": a new commit is planned and waits.
    remove_source(&state, "web");
    add_source(&state, &repo, "web", &["--sync", "manual"]);
    let c6 = repo.push("v6", "", "wait for me");
    wait_until(&state, long, |s| {
        source(s)["waiting"]["commit"]["id"] == c6.as_str()
    });
    let plan = kiln(&state)
        .args(["plan", "web"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let plan = String::from_utf8(plan).unwrap();
    assert!(plan.contains("HELLO_VERSION"), "{plan}");
    assert!(plan.contains("kiln sync web"), "{plan}");
    assert_eq!(live_commit(&common::status(&state)), Some(c5.as_str()));
    assert!(get(port).contains("hello from v5"));
    kiln(&state)
        .args(["sync", "web"])
        .timeout(long)
        .assert()
        .success();
    assert_eq!(live_commit(&common::status(&state)), Some(c6.as_str()));
    assert!(get(port).contains("hello from v6"));

    // 6. Webhooks: a source that polls hourly fetches at once on a signed call.
    remove_source(&state, "web");
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, "a-webhook-secret-of-some-length\n").unwrap();
    kiln(&state)
        .args(["source", "add", "hooked", "--git"])
        .arg(&repo.bare)
        .args(["--interval", "1h", "--webhook-secret-file"])
        .arg(&secret)
        .assert()
        .success();
    // Its first pass finds c6 live: nothing to change.
    wait_until(&state, long, |s| {
        source(s)["name"] == "hooked" && source(s)["last"]["step"] == "plan"
    });
    let c7 = repo.push("v7", "", "pushed with a webhook");
    let body = r#"{"ref":"refs/heads/main"}"#;
    let forged = webhook(api, "hooked", body, "sha256=00000000");
    assert!(forged.starts_with("HTTP/1.1 401"), "{forged}");
    let wrong_key = kiln_control::sources::webhook::sign(b"not the secret at all", body.as_bytes());
    assert!(webhook(api, "hooked", body, &wrong_key).starts_with("HTTP/1.1 401"));
    std::thread::sleep(Duration::from_secs(3));
    let s = common::status(&state);
    assert_eq!(
        live_commit(&s),
        Some(c6.as_str()),
        "a refused call changes nothing"
    );
    assert_ne!(source(&s)["latest"]["id"], c7.as_str());
    assert_eq!(source(&s)["webhook_refused"], 2);
    let signed =
        kiln_control::sources::webhook::sign(b"a-webhook-secret-of-some-length", body.as_bytes());
    let called = Instant::now();
    let answer = webhook(api, "hooked", body, &signed);
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let fetched = wait_until(&state, long, |s| source(s)["latest"]["id"] == c7.as_str());
    eprintln!(
        "webhook to fetch: {fetched:?} (call answered in {:?})",
        called.elapsed()
    );
    wait_until(&state, long, |s| live_commit(s) == Some(c7.as_str()));
    assert!(get(port).contains("hello from v7"));

    kiln(&state).args(["down", "web"]).assert().success();
}

#[test]
fn a_source_is_refused_with_a_reason() {
    // No daemon needed to refuse bad input: the CLI checks before it sends.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for (args, says) in [
        (vec!["--git", "ftp://example.com/x.git"], "url"),
        (vec!["--git", "/tmp", "--path", "../kiln.toml"], "path"),
        (vec!["--git", "/tmp", "--interval", "100ms"], "interval"),
        (vec!["--git", "/tmp", "--branch", "a..b"], "branch"),
    ] {
        let out = kiln(&state)
            .args(["source", "add", "web"])
            .args(&args)
            .assert()
            .failure()
            .get_output()
            .clone();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_sources_file_declares_what_the_daemon_follows() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let port = free_port();
    let repo = Repo::new(dir.path(), port);
    let c1 = repo.push("v1", "", "declared");
    // Relative to the file: the repository next to it.
    let file = dir.path().join("sources.toml");
    std::fs::write(
        &file,
        "[[source]]\nname = \"web\"\ngit = \"origin.git\"\ninterval = \"2s\"\n",
    )
    .unwrap();
    let _daemon = Daemon::start_with(&state, &["--sources", file.to_str().unwrap()]);
    wait_until(&state, Duration::from_secs(180), |s| {
        live_commit(s) == Some(c1.as_str()) && s["phase"] == "completed"
    });
    assert!(get(port).contains("hello from v1"));
    let listed = kiln(&state)
        .args(["source", "list"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert!(String::from_utf8_lossy(&listed).contains("source web"));
    kiln(&state).args(["down", "web"]).assert().success();
}

#[test]
fn a_bad_sources_file_stops_the_daemon_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    for (text, says) in [
        (
            "[[source]]\nname = \"web\"\ngit = \"/tmp\"\nbranchh = \"x\"\n",
            "branchh",
        ),
        (
            "[[source]]\nname = \"web\"\ngit = \"/tmp\"\ninterval = \"soon\"\n",
            "interval",
        ),
        (
            "[[source]]\nname = \"Web!\"\ngit = \"/tmp\"\n",
            "source Web!: name",
        ),
    ] {
        let file = dir.path().join("sources.toml");
        std::fs::write(&file, text).unwrap();
        let out = kiln(&state)
            .args(["serve", "--sources"])
            .arg(&file)
            .timeout(Duration::from_secs(30))
            .assert()
            .failure()
            .get_output()
            .clone();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("sources.toml") && err.contains(says),
            "{says}: {err}"
        );
    }
}
