//! `examples/ci/deploy.sh`, the CI/CD example, run for real as a CI job runs it: `bash` with
//! this build's `kiln` on `PATH`, against a real `kiln serve` on the local provider (runc).
//!
//! The runs a pipeline goes through: the first applies release 1 and the app serves it; the
//! same commit again has nothing to do (exit 0, no new release); a changed spec, deployed from
//! a "runner" with a store of its own through `--host unix://…` (the code path of
//! `ssh://`: the image and its test attestation are sent), goes live as release 2; and a
//! commit whose `[image.test]` fails exits 1 before anything reaches the daemon, release 2
//! still serving; so does one whose rollout is rolled back, and its retry.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// The script under test.
fn script() -> PathBuf {
    root().join("examples/ci/deploy.sh")
}

/// What one run of the script did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `bash deploy.sh ARGS…` in `dir` with `KILN_STATE=state` and this build's `kiln` first on
/// `PATH`; no daemon is named unless `args` does (`KILN_HOST` and `KILN_CONTEXT` removed).
fn deploy(dir: &Path, state: &Path, args: &[&str]) -> Run {
    let kiln_dir = assert_cmd::cargo::cargo_bin("kiln")
        .parent()
        .unwrap()
        .to_owned();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(kiln_dir).chain(std::env::split_paths(&path)))
        .unwrap();
    let out = assert_cmd::Command::new("bash")
        .arg(script())
        .args(args)
        .current_dir(dir)
        .env("PATH", path)
        .env("KILN_STATE", state)
        .env("NO_COLOR", "1")
        .env_remove("KILN_HOST")
        .env_remove("KILN_CONTEXT")
        .env_remove("KILN")
        .timeout(Duration::from_secs(300))
        .output()
        .unwrap();
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("deploy.sh {args:?}: {}", run.show());
    run
}

/// What the app answers on `GET /`.
fn body(port: u16) -> String {
    let answer = raw_get(([127, 0, 0, 1], port).into(), "web", "/");
    answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or(answer)
}

/// The example app's spec: `env` is its `[service] env`, `test` the inside of its
/// `[image.test]`, `deploy` the inside of its `[deploy]`.
fn spec_with(dir: &Path, port: u16, env: &str, test: &str, deploy: &str) -> PathBuf {
    let spec = write_spec_with(dir, port, env, 1, &format!("[deploy]\n{deploy}\n"));
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "[service]\n",
        &format!("[image.test]\n{test}\n\n[service]\n"),
    );
    std::fs::write(&spec, text).unwrap();
    spec
}

/// [`spec_with`] testing `GET /healthz`, with a one-minute progress deadline.
fn spec(dir: &Path, port: u16, env: &str, test_extra: &str) -> PathBuf {
    spec_with(
        dir,
        port,
        env,
        &format!("http = \"/healthz\"\n{test_extra}"),
        "keep_previous = \"10m\"\nprogress_deadline = \"1m\"",
    )
}

#[test]
fn the_ci_script_deploys_changes_skips_no_change_and_fails_on_a_failing_test_or_rollout() {
    if !runc_prerequisites() {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _daemon = Daemon::start(&state);
    let port = free_port();
    let file = spec(dir.path(), port, "HELLO_VERSION = \"v1\"", "");
    let file = file.to_str().unwrap();

    // 1. A runner on the daemon's host (its state): build, test, plan (changes), apply.
    let run = deploy(dir.path(), &state, &[file]);
    assert_eq!(run.code, Some(0), "{}", run.show());
    for step in [
        "==> kiln build",
        "==> kiln test",
        "==> kiln plan",
        "==> kiln apply",
    ] {
        assert!(run.stdout.contains(step), "no {step:?}: {}", run.show());
    }
    assert!(
        run.stdout
            .contains(&format!("web release 1 is live on http://127.0.0.1:{port}")),
        "{}",
        run.show()
    );
    assert_eq!(body(port), "hello from v1");

    // 2. The same commit again: the plan finds nothing to do; no release is recorded.
    let run = deploy(dir.path(), &state, &[file]);
    assert_eq!(run.code, Some(0), "{}", run.show());
    assert!(
        run.stdout
            .contains("deploy: nothing to do: web already runs"),
        "{}",
        run.show()
    );
    assert!(!run.stdout.contains("==> kiln apply"), "{}", run.show());
    let s = status(&state);
    assert_eq!((&s["release"], &s["live"]), (&1.into(), &1.into()), "{s:#}");

    // 3. A changed spec, from a runner elsewhere: its own store, the daemon named by --host.
    let runner = dir.path().join("runner");
    let host = format!("unix://{}", state.join("kiln.sock").display());
    spec(dir.path(), port, "HELLO_VERSION = \"v2\"", "");
    let run = deploy(dir.path(), &runner, &["--host", &host, file]);
    assert_eq!(run.code, Some(0), "{}", run.show());
    assert!(
        run.stdout.contains("and the test attestation"),
        "the image went to the daemon with its test attestation: {}",
        run.show()
    );
    assert!(
        run.stdout.contains("web release 2 is live"),
        "{}",
        run.show()
    );
    assert_eq!(body(port), "hello from v2");

    // 4. A commit whose image fails its test (its /healthz answers 503; a short test timeout,
    // as it can never pass): exit 1 after the test, nothing planned or applied.
    spec(
        dir.path(),
        port,
        "HELLO_VERSION = \"v3\"",
        "timeout = \"3s\"\n",
    );
    let text = std::fs::read_to_string(file).unwrap().replacen(
        "[image]\n",
        "[image]\nenv = { HELLO_NEVER_HEALTHY = \"1\" }\n",
        1,
    );
    std::fs::write(file, text).unwrap();
    let run = deploy(dir.path(), &runner, &["--host", &host, file]);
    assert_eq!(run.code, Some(1), "{}", run.show());
    assert!(run.stderr.contains("failed its tests"), "{}", run.show());
    assert!(!run.stdout.contains("==> kiln plan"), "{}", run.show());
    let s = status(&state);
    assert_eq!((&s["release"], &s["live"]), (&2.into(), &2.into()), "{s:#}");
    assert_eq!(body(port), "hello from v2");

    // 5. A commit whose image passes its test but whose instances never become healthy:
    // release 3 is recorded, rolled back at its progress deadline (it can never be met),
    // and the job fails; release 2 keeps serving.
    spec_with(
        dir.path(),
        port,
        "HELLO_VERSION = \"v4\", HELLO_NEVER_HEALTHY = \"1\"",
        "command = [\"/hello\", \"migrate\"]",
        "keep_previous = \"10m\"\nprogress_deadline = \"2s\"",
    );
    let run = deploy(dir.path(), &runner, &["--host", &host, file]);
    assert_eq!(run.code, Some(1), "{}", run.show());
    assert!(run.stdout.contains("==> kiln apply"), "{}", run.show());
    assert!(
        run.stderr.contains("release 3 was rolled back"),
        "{}",
        run.show()
    );
    let s = status(&state);
    assert_eq!((&s["release"], &s["live"]), (&3.into(), &2.into()), "{s:#}");
    assert_eq!(body(port), "hello from v2");

    // 6. The same commit again (a retried job) must not pass as "nothing to do": the plan
    // compares with the live release 2, so it is applied again and fails again.
    let run = deploy(dir.path(), &runner, &["--host", &host, file]);
    assert_eq!(run.code, Some(1), "{}", run.show());
    assert!(
        run.stderr.contains("release 4 was rolled back"),
        "{}",
        run.show()
    );
    let s = status(&state);
    assert_eq!((&s["release"], &s["live"]), (&4.into(), &2.into()), "{s:#}");
    assert_eq!(body(port), "hello from v2");
}

#[test]
fn the_ci_script_refuses_bad_arguments_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    for args in [
        &["--bogus"][..],
        &["a.toml", "b.toml"],
        &["--host"],
        &["missing.toml"],
    ] {
        let run = deploy(dir.path(), &state, args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.show());
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.show());
    }
}

/// The GitHub Actions example as data (JSON of its YAML, read by PyYAML from the venv
/// `scripts/ci-setup.sh` makes for kubernetes-validate), or `None` with a note when that is
/// missing outside CI.
fn workflow() -> Option<serde_json::Value> {
    let python = std::env::var_os("KILN_CI_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kiln-ci"))
        .join("venv/bin/python");
    // YAML 1.1 reads the key `on` as true: put it back under its name.
    let program = "import json, sys, yaml\n\
                   d = yaml.safe_load(open(sys.argv[1]))\n\
                   d['on'] = d.pop(True)\n\
                   print(json.dumps(d))";
    let out = std::process::Command::new(&python)
        .args(["-c", program])
        .arg(root().join("examples/ci/github-actions.yml"))
        .output();
    match out {
        Ok(out) if out.status.success() => Some(serde_json::from_slice(&out.stdout).unwrap()),
        Ok(out) if python.exists() => panic!(
            "the workflow is not YAML PyYAML reads: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {} is missing (bash scripts/ci-setup.sh makes it)",
                python.display()
            );
            eprintln!(
                "note: not reading the workflow ({} is missing)",
                python.display()
            );
            None
        }
    }
}

/// The workflow deploys on a push to main, one run at a time, with the script and the
/// secrets its comments name; each `run:` is shellcheck-clean as the bash GitHub runs it.
#[test]
fn the_github_workflow_runs_the_script_on_a_push_to_main() {
    let Some(w) = workflow() else {
        return;
    };
    assert_eq!(w["on"]["push"]["branches"], serde_json::json!(["main"]));
    assert_eq!(w["concurrency"]["cancel-in-progress"], false);
    let job = &w["jobs"]["deploy"];
    assert_eq!(job["env"]["KILN_HOST"], "${{ secrets.KILN_HOST }}");
    let steps = job["steps"].as_array().unwrap();
    let runs: Vec<&str> = steps.iter().filter_map(|s| s["run"].as_str()).collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("bash ci/deploy.sh \"$KILN_SPEC\"")),
        "{runs:#?}"
    );
    let env: Vec<&serde_json::Value> = steps.iter().map(|s| &s["env"]).collect();
    for secret in ["KILN_SSH_KEY", "KILN_KNOWN_HOSTS"] {
        assert!(
            env.iter()
                .any(|e| e[secret] == format!("${{{{ secrets.{secret} }}}}")),
            "no step takes {secret} from its secret: {env:#?}"
        );
    }
    if !shellcheck_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, run) in runs.iter().enumerate() {
        // What GitHub runs: `bash --noprofile --norc -eo pipefail {0}`.
        let file = dir.path().join(format!("step{i}.sh"));
        std::fs::write(
            &file,
            format!("#!/usr/bin/env bash\nset -eo pipefail\n{run}"),
        )
        .unwrap();
        let out = std::process::Command::new("shellcheck")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{run}\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Whether shellcheck is here: a failure under `CI=true` when not (`scripts/ci-setup.sh`
/// installs it), else a note.
fn shellcheck_present() -> bool {
    if std::process::Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but shellcheck is missing (apt-get install shellcheck)"
    );
    eprintln!("note: skipping the shellcheck check (no shellcheck)");
    false
}

/// The script is shellcheck-clean (shellcheck comes with `scripts/ci-setup.sh`; missing under
/// `CI=true` is a failure, elsewhere a note).
#[test]
fn the_ci_script_is_shellcheck_clean() {
    if !shellcheck_present() {
        return;
    }
    let out = std::process::Command::new("shellcheck")
        .arg(script())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
