//! `kiln test [REF]`: the lifecycle's "test" step. Runs `[image.test]` against an image —
//! `command` once in a one-off instance (it must exit 0), `http` on a started instance (it
//! must answer 2xx) — all within `timeout`, and records a test attestation next to the image
//! in the store (`attestations/`, which the daemon's tested gate reads) and attached to it as
//! an in-toto statement (an OCI referrer), passed or failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Args;
use kiln_control::oneshot::{Finished, output_tail, run_once};
use kiln_runtime::health::http_get_status;
use kiln_runtime::{Engines, InstanceSpec, InstanceState, Provider};
use serde_json::json;

use super::instance::{StoreImages, engines, tokio_runtime};
use super::signals::{Interrupted, StopSignals};
use crate::output::Output;

/// `kiln test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The image: a tag or a manifest digest (default: the spec's latest build, NAME:latest)
    pub reference: Option<String>,

    /// The spec whose [image.test] runs
    #[arg(
        short = 'f',
        long = "file",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub file: PathBuf,
}

/// How much of a failing test's output is kept in the attestation.
const OUTPUT_TAIL: usize = 4096;

/// The result of one test.
struct TestResult {
    record: serde_json::Value,
    passed: bool,
    /// What to tell the user when it failed.
    failure: Option<String>,
}

/// What a test run found, its attestation recorded.
pub struct Tested {
    /// The image tested.
    pub digest: kiln_image::Digest,
    /// Every test passed.
    pub passed: bool,
    /// Each failed test's explanation, with its output's tail.
    pub failures: Vec<String>,
    /// The attestation recorded.
    pub attestation: serde_json::Value,
    /// Where it was recorded.
    pub path: PathBuf,
    /// How long the tests took.
    pub duration: Duration,
}

/// Runs `kiln test`.
pub fn test(args: &TestArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let spec = match super::spec::load(&args.file, out)? {
        Ok(spec) => spec,
        Err(code) => return Ok(code),
    };
    let reference = args
        .reference
        .clone()
        .unwrap_or_else(|| format!("{}:latest", spec.name));
    let tested = match run_tests(&spec, &args.file, &reference, state) {
        Err(e) => match e.downcast_ref::<Interrupted>() {
            Some(Interrupted(stop)) => {
                out.say(&format!("{e}: the test instance is destroyed"));
                return Ok(stop.exit_code());
            }
            None => return Err(e),
        },
        Ok(tested) => tested,
    };
    let Tested {
        digest,
        passed,
        failures,
        attestation,
        path,
        duration,
    } = tested;
    if out.json {
        out.data(&attestation)?;
    }
    for failure in &failures {
        out.report(&format!("{failure}\n"));
    }
    if passed {
        if !out.json {
            out.say(&format!(
                "image {} passed its tests in {} (attestation {})",
                digest.short(),
                humantime::format_duration(Duration::from_millis(millis(duration))),
                path.display()
            ));
        }
        Ok(ExitCode::SUCCESS)
    } else {
        out.error(&anyhow::anyhow!(
            "image {} failed its tests (attestation {})",
            digest.short(),
            path.display()
        ));
        Ok(ExitCode::FAILURE)
    }
}

/// Runs `spec`'s `[image.test]` on the image `reference` names and records the attestation
/// (the file the tested gate reads, and an in-toto statement attached to the image): what
/// `kiln test` and the daemon's git follower both do. A stop signal destroys the test
/// instance and ends it with [`Interrupted`].
pub fn run_tests(
    spec: &kiln_spec::Spec,
    file: &Path,
    reference: &str,
    state: &Path,
) -> anyhow::Result<Tested> {
    let Some(test) = spec.image.test.clone() else {
        anyhow::bail!(
            "{} has no [image.test]: add `command` or `http` to say how to test the image",
            file.display()
        );
    };
    let reference = reference.to_owned();
    let images = Arc::new(StoreImages::open(state)?);
    let digest = images.resolve_ref(&reference)?;
    let started_at = SystemTime::now();
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + test.timeout;
    let mut base = InstanceSpec::from_service(digest.clone(), spec.name.as_str(), &spec.service);
    base.target = spec.target.clone();
    base.secrets = kiln_control::secrets::read_spec(&spec.service.secrets)?;
    // A one-off: a daemon managing the same app leaves it alone.
    base.labels
        .insert(kiln_control::ROLE_LABEL.to_owned(), "test".to_owned());
    let results = tokio_runtime()?.block_on(async {
        // Ctrl-C destroys the test instance before `test` ends.
        let mut signals = StopSignals::new()?;
        let provider = engines(state, &spec.target.runtime, images.clone()).await?;
        let mut results = Vec::new();
        if let Some(command) = &test.command {
            let mut instance = base.clone();
            instance.command = Some(command.clone());
            instance.health = None;
            let run = command_test(&provider, instance, command, deadline, &mut signals);
            results.push(run.await?);
        }
        if let Some(path) = &test.http {
            let mut instance = base.clone();
            instance.health = None;
            let run = http_test(&provider, instance, path, deadline, &mut signals);
            results.push(run.await?);
        }
        anyhow::Ok(results)
    });
    let results = results?;
    let passed = results.iter().all(|r| r.passed);
    let duration = t0.elapsed();
    let time = started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| kiln_image::oci::rfc3339(d.as_secs()))
        .unwrap_or_default();
    let attestation = json!({
        "type": "kiln.test/v1",
        "image": digest.as_str(),
        "reference": reference,
        "result": if passed { "passed" } else { "failed" },
        "tests": results.iter().map(|r| r.record.clone()).collect::<Vec<_>>(),
        "timeout_ms": millis(test.timeout),
        "duration_ms": millis(duration),
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "time": time,
    });
    let path = images
        .store()
        .write_attestation(&digest, &attestation)
        .with_context(|| format!("cannot record the test attestation of {digest}"))?;
    // The same result as an in-toto statement attached to the image (an OCI referrer), so
    // it travels with the image and a signer can sign it; the file above stays what the
    // daemon's tested gate reads.
    let outcome = if passed {
        kiln_image::attest::TestOutcome::Passed
    } else {
        kiln_image::attest::TestOutcome::Failed
    };
    let statement = kiln_image::attest::test_statement(
        &digest,
        spec.name.as_str(),
        outcome,
        attestation["tests"].clone(),
        env!("CARGO_PKG_VERSION"),
        &time,
        millis(duration),
    );
    kiln_image::attest::attach_statement(images.store(), &digest, &statement)
        .with_context(|| format!("cannot attach the test attestation to {digest}"))?;
    Ok(Tested {
        digest,
        passed,
        failures: results.into_iter().filter_map(|r| r.failure).collect(),
        attestation,
        path,
        duration,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Starts the test instance `id`, then does `work` unless a stop signal comes first. The start
/// itself is not cut short: one dropped half-way could leave a process behind.
async fn start_then<T>(
    provider: &Arc<Engines>,
    id: &kiln_runtime::InstanceId,
    signals: &mut StopSignals,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    provider.start(id).await?;
    tokio::select! {
        biased;
        stop = signals.recv() => Err(Interrupted(stop).into()),
        done = work => done,
    }
}

async fn command_test(
    provider: &Arc<Engines>,
    instance: InstanceSpec,
    command: &[String],
    deadline: tokio::time::Instant,
    signals: &mut StopSignals,
) -> anyhow::Result<TestResult> {
    let mut stop = None;
    let interrupt = async { stop = Some(signals.recv().await) };
    let one = run_once(
        provider.as_ref(),
        instance,
        deadline,
        OUTPUT_TAIL,
        interrupt,
    )
    .await
    .context("cannot run the test command")?;
    if let Some(stop) = stop {
        return Err(Interrupted(stop).into());
    }
    if let Some(e) = one.destroy_error {
        anyhow::bail!("cannot destroy test instance {}: {e}", one.id);
    }
    let output = one.output;
    let (exit_code, timed_out) = match one.finished {
        Finished::Exited(code) => (code, false),
        Finished::TimedOut | Finished::Interrupted => (None, true),
    };
    let shown = shell_words(command);
    let passed = exit_code == Some(0);
    let failure = (!passed).then(|| {
        let why = if timed_out {
            "did not finish within the test timeout".to_owned()
        } else {
            match exit_code {
                Some(c) => format!("exited with code {c}"),
                None => "exited with an unknown code".to_owned(),
            }
        };
        format!(
            "test command `{shown}` {why}; its output:\n{}",
            indent(&output)
        )
    });
    Ok(TestResult {
        record: json!({
            "kind": "command",
            "command": command,
            "exit_code": exit_code,
            "timed_out": timed_out,
            "passed": passed,
            "output": if passed { serde_json::Value::Null } else { json!(output) },
        }),
        passed,
        failure,
    })
}

async fn http_test(
    provider: &Arc<Engines>,
    instance: InstanceSpec,
    path: &str,
    deadline: tokio::time::Instant,
    signals: &mut StopSignals,
) -> anyhow::Result<TestResult> {
    let id = provider.create(instance).await?;
    let probe = async {
        let addr = provider.observe(&id).await?.addr;
        let mut last;
        let mut delay = Duration::from_millis(5);
        loop {
            match http_get_status(addr, path).await {
                Ok(status) if (200..300).contains(&status) => return anyhow::Ok(Ok(status)),
                Ok(status) => last = format!("answered {status}"),
                Err(e) => last = e,
            }
            let obs = provider.observe(&id).await?;
            if matches!(obs.state, InstanceState::Exited | InstanceState::Vanished) {
                return Ok(Err(format!(
                    "the instance exited (code {}) before answering",
                    obs.exit_code
                        .map_or("unknown".to_owned(), |c| c.to_string())
                )));
            }
            if tokio::time::Instant::now() + delay >= deadline {
                return Ok(Err(format!(
                    "no 2xx within the test timeout (last: {last})"
                )));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    };
    let outcome = start_then(provider, &id, signals, probe).await;
    let output = output_tail(provider.as_ref(), &id, OUTPUT_TAIL).await;
    let destroyed = provider.destroy(&id).await;
    let outcome = outcome?;
    destroyed.with_context(|| format!("cannot destroy test instance {id}"))?;
    let passed = outcome.is_ok();
    Ok(TestResult {
        record: json!({
            "kind": "http",
            "path": path,
            "status": outcome.as_ref().ok(),
            "passed": passed,
            "error": outcome.as_ref().err(),
            "output": if passed { serde_json::Value::Null } else { json!(output) },
        }),
        passed,
        failure: outcome.err().map(|why| {
            format!(
                "test GET {path}: {why}; instance output:\n{}",
                indent(&output)
            )
        }),
    })
}

fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn indent(text: &str) -> String {
    if text.trim().is_empty() {
        return "  (no output)".to_owned();
    }
    text.lines()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
