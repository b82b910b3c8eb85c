//! kiln on a server, end to end with the real `kiln` binary: the manual pages the package
//! ships, the state directory kiln picks without `--state` (the system service's for root
//! outside a project), and the daemon's log lines in the systemd journal's format when its
//! stderr is the journal's stream. scripts/package-check.sh checks the installed package.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use assert_cmd::Command;
use common::*;

/// `kiln` with no `--state` and none of the variables that choose one, run in `cwd`.
fn kiln_in(cwd: &Path) -> Command {
    let mut cmd = Command::cargo_bin("kiln").unwrap();
    cmd.current_dir(cwd)
        .env_remove("KILN_STATE")
        .env_remove("KILN_SYSTEM_STATE")
        .env("NO_COLOR", "1");
    cmd
}

/// The commands `kiln --help` lists.
fn listed_commands() -> Vec<String> {
    let out = Command::cargo_bin("kiln")
        .unwrap()
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A command's line is indented two spaces; its wrapped description, more.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn man_pages_cover_kiln_and_every_listed_command() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let out = Command::cargo_bin("kiln")
        .unwrap()
        .args(["man", "--json", "--dir"])
        .arg(&pages)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let mut written: Vec<String> = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    let reported: Vec<String> = said["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        written, reported,
        "the pages written are the pages reported"
    );

    let commands = listed_commands();
    assert!(commands.len() > 20, "{commands:?}");
    assert!(!commands.contains(&"man".to_owned()), "`man` is hidden");
    for page in ["kiln".to_owned()]
        .into_iter()
        .chain(commands.iter().map(|c| format!("kiln-{c}")))
    {
        let text = std::fs::read_to_string(pages.join(format!("{page}.1")))
            .unwrap_or_else(|e| panic!("{page}.1: {e}; written: {written:?}"));
        assert!(text.contains(&format!(".TH {page} 1")), "{page}.1:\n{text}");
    }
    // Nested commands get theirs, hidden ones none.
    assert!(
        written.contains(&"kiln-image-export.1".to_owned()),
        "{written:?}"
    );
    assert!(
        !written.iter().any(|p| p.starts_with("kiln-man")),
        "{written:?}"
    );
    let serve = std::fs::read_to_string(pages.join("kiln-serve.1")).unwrap();
    assert!(serve.contains("\\-\\-api\\-listen"), "{serve}");
}

/// What `kiln doctor --json` in `cwd` says of the state directory: (dir, why).
fn state_choice(cwd: &Path, env: &[(&str, &Path)]) -> (String, String) {
    let mut cmd = kiln_in(cwd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Exit 1 when this host cannot run instances: the choice is printed all the same.
    let out = cmd.args(["doctor", "--json"]).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let checks = doc["checks"].as_array().unwrap();
    let line = checks.iter().find(|c| c["name"] == "state-dir").unwrap();
    let (dir, why) = (
        doc["state"]["dir"].as_str().unwrap().to_owned(),
        doc["state"]["why"].as_str().unwrap().to_owned(),
    );
    assert_eq!(line["detail"], format!("{dir}: {why}"));
    (dir, why)
}

#[test]
fn root_outside_a_project_uses_the_system_services_state() {
    let tmp = tempfile::tempdir().unwrap();
    let system = tmp.path().join("var-lib-kiln");
    std::fs::create_dir(&system).unwrap();
    std::fs::set_permissions(&system, std::fs::Permissions::from_mode(0o700)).unwrap();
    let away = tmp.path().join("elsewhere");
    let project = tmp.path().join("project");
    let used = tmp.path().join("used");
    for d in [&away, &project, &used] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(project.join("kiln.toml"), "").unwrap();
    std::fs::create_dir(used.join(".kiln")).unwrap();
    let sys = [("KILN_SYSTEM_STATE", system.as_path())];
    let here = |d: &Path| d.join(".kiln").display().to_string();

    if !is_root() {
        // Not root: never the system's, wherever kiln runs.
        let (dir, why) = state_choice(&away, &sys);
        assert_eq!(
            (dir, why.as_str()),
            (
                here(&away),
                "the default (not root, so not the system service's)"
            )
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but not root: the system state choice was not tested");
        }
        eprintln!("note: not root: only the non-root choice was tested");
        return;
    }
    let (dir, why) = state_choice(&away, &sys);
    assert_eq!(dir, system.display().to_string());
    assert_eq!(why, "the system service's (root, outside a project)");

    // A project, or a state directory already here, keeps its own.
    let (dir, why) = state_choice(&project, &sys);
    assert_eq!(
        (dir, why.as_str()),
        (here(&project), "the project's (./kiln.toml is here)")
    );
    let (dir, why) = state_choice(&used, &sys);
    assert_eq!(
        (dir, why.as_str()),
        (here(&used), "the project's (./.kiln is here)")
    );

    // KILN_STATE and --state win over all of it.
    let mine = tmp.path().join("mine");
    let (dir, why) = state_choice(&away, &[sys[0], ("KILN_STATE", mine.as_path())]);
    assert_eq!(
        (dir, why.as_str()),
        (mine.display().to_string(), "KILN_STATE")
    );
    let out = kiln_in(&away)
        .env("KILN_SYSTEM_STATE", &system)
        .env("KILN_STATE", &system)
        .arg("--state")
        .arg(&mine)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["state"]["dir"], mine.display().to_string());
    assert_eq!(doc["state"]["why"], "--state");

    // No system service's directory: the default, saying so.
    let gone = tmp.path().join("not-installed");
    let (dir, why) = state_choice(&away, &[("KILN_SYSTEM_STATE", gone.as_path())]);
    assert_eq!(dir, here(&away));
    assert_eq!(
        why,
        format!(
            "the default ({} does not exist: no system service installed)",
            gone.display()
        )
    );

    // A command that writes state writes it there, and nothing here.
    let out = kiln_in(&away)
        .env("KILN_SYSTEM_STATE", &system)
        .args(["images", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_dir(&system).unwrap().next().is_some(),
        "the store is in {system:?}"
    );
    assert!(!away.join(".kiln").exists());
    assert_eq!(std::fs::metadata(&system).unwrap().mode() & 0o7777, 0o700);
}

/// Runs `kiln serve` on a fresh state directory with stderr into a file and
/// `JOURNAL_STREAM=journal_stream(stderr file)`, until it says it serves, then SIGTERM;
/// returns what it wrote to stderr.
fn serve_log(journal_stream: impl Fn(&Path) -> String) -> String {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let log = tmp.path().join("stderr");
    let stderr = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .arg("--state")
        .arg(&state)
        .arg("serve")
        .env("JOURNAL_STREAM", journal_stream(&log))
        .env_remove("KILN_LOG")
        .env_remove("KILN_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    // Its first line on stdout says it serves (a SIGTERM before that is a stop during start).
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) if line.starts_with("kiln daemon serving") => {}
        other => {
            let _ = child.kill();
            panic!(
                "the daemon did not serve ({other:?}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {text}");
    text
}

/// `<dev>:<inode>` of `path`, as systemd sets JOURNAL_STREAM.
fn dev_ino(path: &Path) -> String {
    let md = std::fs::metadata(path).unwrap();
    format!("{}:{}", md.dev(), md.ino())
}

/// Whether `line` carries an RFC 3339 time, as the human format's lines start with.
fn has_time(line: &str) -> bool {
    let b = line.as_bytes();
    (0..b.len().saturating_sub(19)).any(|i| {
        b[i..i + 4].iter().all(u8::is_ascii_digit)
            && b[i + 4] == b'-'
            && b[i + 7] == b'-'
            && b[i + 10] == b'T'
            && b[i + 13] == b':'
    })
}

#[test]
fn the_daemon_logs_priorities_without_times_when_stderr_is_the_journal() {
    if !runc_prerequisites() {
        return;
    }
    let text = serve_log(dev_ino);
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let prio = line
            .strip_prefix('<')
            .and_then(|rest| rest.split_once('>'))
            .map(|(n, _)| n);
        assert!(
            matches!(prio, Some("3" | "4" | "6" | "7")),
            "a line without a priority: {line:?} in\n{text}"
        );
        assert!(!has_time(line), "a line with a time: {line:?}");
        assert!(!line.contains('\x1b'), "colour: {line:?}");
        assert!(
            !line.contains(" INFO ") && !line.contains(" WARN "),
            "{line:?}"
        );
    }
    // `kiln serve` logs at info: its open-file limit at start, at least.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("open-file limit")),
        "{text}"
    );

    // The variable alone is not the journal: it must name stderr itself (a child of a
    // service inherits it with stderr elsewhere). Another file's device and inode, here.
    let other = tempfile::NamedTempFile::new().unwrap();
    let other = dev_ino(other.path());
    let text = serve_log(|_| other.clone());
    let first = text.lines().next().unwrap_or_default();
    assert!(!first.starts_with('<'), "{text}");
    assert!(
        has_time(first) && first.contains("INFO"),
        "human lines: {text}"
    );
}

/// Under a `Type=notify` unit: `kiln serve` tells the service manager READY=1 once its API
/// answers, and STOPPING=1 when SIGTERM stops it.
#[test]
fn serve_tells_the_service_manager_when_it_is_ready_and_when_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let notify = tmp.path().join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kiln"))
        .arg("--state")
        .arg(&state)
        .arg("serve")
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means its API answers.
    assert!(std::os::unix::net::UnixStream::connect(state.join("kiln.sock")).is_ok());
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let n = manager.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}
