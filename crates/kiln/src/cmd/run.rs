//! `kiln run REF`: one instance in the foreground, like `docker run --rm`. It prints where
//! the instance listens, streams its output, reports health changes and drift, and on
//! Ctrl-C/SIGTERM stops it (with the grace period) and destroys it. The instance is destroyed
//! on every way out of this command except kiln itself being killed — then a later kiln
//! finds it under `<state>/instances` and adopts it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kiln_runtime::{Engines, Health, InstanceId, InstanceSpec, Provider};
use kiln_spec::TargetSpec;
use kiln_spec::{HealthCheck, Network, Seccomp, ServiceSpec, Writable};

use super::instance::{StoreImages, engines, spec_if_present, tokio_runtime};
use super::signals::StopSignals;
use crate::output::Output;

/// `kiln run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The image: a tag (NAME or NAME:TAG) or a manifest digest (sha256:…, or a unique prefix)
    pub reference: String,

    /// The port to give the instance in $PORT (default: a free port kiln picks)
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,

    /// Set an environment variable in the instance (repeatable)
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,

    /// The spec whose [service] and [target] settings apply (ignored when it does not exist)
    #[arg(
        short = 'f',
        long = "file",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub file: PathBuf,
}

/// The `[service]` an image runs with when there is no spec: `/tmp` writable, a TCP health
/// check, the spec's own defaults otherwise (sealed: the image's user or 65534, a pids limit,
/// the seccomp allowlist).
pub fn default_service() -> ServiceSpec {
    ServiceSpec {
        port: 8080,
        replicas: 1,
        env: BTreeMap::new(),
        writable: vec![Writable::path("/tmp")],
        tmpfs_size: ServiceSpec::DEFAULT_TMPFS_SIZE,
        memory: None,
        cpus: None,
        stop_grace: Duration::from_secs(10),
        init: true,
        health: HealthCheck {
            path: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 3,
            start_period: Duration::from_secs(30),
        },
        user: None,
        pids: ServiceSpec::DEFAULT_PIDS,
        seccomp: Seccomp::Default,
        network: Network::Kiln,
        capabilities: Vec::new(),
        allow_dangerous_capabilities: false,
        secrets: Vec::new(),
    }
}

/// Parses `-e K=V` flags; `PORT` is kiln's to set.
pub fn parse_env(flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for flag in flags {
        let (k, v) = flag
            .split_once('=')
            .with_context(|| format!("-e {flag:?}: expected KEY=VALUE"))?;
        let valid = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        anyhow::ensure!(valid, "-e {flag:?}: {k:?} is not a valid variable name");
        anyhow::ensure!(k != "PORT", "-e {flag:?}: PORT is set by kiln (use --port)");
        env.insert(k.to_owned(), v.to_owned());
    }
    Ok(env)
}

/// Runs `kiln run`.
pub fn run(args: &RunArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let spec = match spec_if_present(&args.file, out)? {
        Ok(spec) => spec,
        Err(code) => return Ok(code),
    };
    let env = parse_env(&args.env)?;
    let images = Arc::new(StoreImages::open(state)?);
    let digest = images.resolve_ref(&args.reference)?;
    let (app, service, target) = match &spec {
        Some(s) => (s.name.to_string(), s.service.clone(), s.target.clone()),
        None => (
            app_from_reference(&args.reference),
            default_service(),
            TargetSpec::default(),
        ),
    };
    let runtime = target.runtime.clone();
    let mut instance = InstanceSpec::from_service(digest, &app, &service);
    instance.target = target;
    instance.secrets = kiln_control::secrets::read_spec(&service.secrets)?;
    // A one-off: a daemon managing the same app leaves it alone.
    instance
        .labels
        .insert(kiln_control::ROLE_LABEL.to_owned(), "run".to_owned());
    instance.env.extend(env);
    instance.port = args.port;
    let grace = service.stop_grace;
    tokio_runtime()?.block_on(async {
        let provider = engines(state, &runtime, images).await?;
        let id = provider.create(instance).await?;
        let outcome = foreground(&provider, &id, grace, out).await;
        let destroyed = provider.destroy(&id).await;
        let outcome = outcome?;
        destroyed.with_context(|| format!("cannot destroy instance {id}"))?;
        if !out.quiet {
            eprintln!("kiln: instance {id} destroyed");
        }
        Ok(match outcome {
            Outcome::Stopped => ExitCode::SUCCESS,
            Outcome::Exited(Some(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Outcome::Exited(None) => ExitCode::FAILURE,
        })
    })
}

/// `hello:latest` → `hello`; digests → `run`.
fn app_from_reference(reference: &str) -> String {
    let name = reference.split(':').next().unwrap_or("run");
    if name == "sha256" || name.is_empty() {
        "run".to_owned()
    } else {
        name.to_owned()
    }
}

enum Outcome {
    /// The user asked to stop it.
    Stopped,
    /// It exited by itself.
    Exited(Option<i32>),
}

async fn foreground(
    provider: &Arc<Engines>,
    id: &InstanceId,
    grace: Duration,
    out: &Output,
) -> anyhow::Result<Outcome> {
    let mut signals = StopSignals::new()?;
    let mut drift = provider.drift_events();
    provider.start(id).await?;
    let obs = provider.observe(id).await?;
    let say = |line: String| {
        if !out.quiet {
            eprintln!("kiln: {line}");
        }
    };
    let logs = match provider.local().paths(id).log {
        log if log.exists() => log.display().to_string(),
        _ => format!("docker logs {id}"),
    };
    say(format!(
        "instance {id} of {} listening on http://{} (logs: {logs})",
        obs.image.short(),
        obs.addr,
    ));
    let mut health = provider.health(id).await?;
    let mut health_open = true;
    let mut offset = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let exited = provider.wait(id);
    tokio::pin!(exited);
    let outcome = loop {
        tokio::select! {
            _ = signals.recv() => break None,
            code = &mut exited => break Some(code?),
            changed = health.changed(), if health_open => {
                if changed.is_err() {
                    health_open = false;
                    continue;
                }
                let h = *health.borrow_and_update();
                if h != Health::Starting {
                    say(format!("instance {id} is {}", h.as_str()));
                }
            }
            report = drift.recv() => {
                if let Ok(report) = report && report.instance == *id {
                    for finding in &report.findings {
                        say(format!("drift on instance {id}: {finding}"));
                    }
                }
            }
            _ = tick.tick() => offset = pump_logs(provider, id, offset).await?,
        }
    };
    pump_logs(provider, id, offset).await?;
    match outcome {
        Some(code) => {
            say(format!(
                "instance {id} exited with {}",
                code.map_or("an unknown code".to_owned(), |c| format!("code {c}"))
            ));
            Ok(Outcome::Exited(code))
        }
        None => {
            say(format!(
                "stopping instance {id} (grace {})",
                humantime::format_duration(grace)
            ));
            provider.stop(id, grace).await?;
            Ok(Outcome::Stopped)
        }
    }
}

/// Copies new output to stdout; returns the next offset.
async fn pump_logs(provider: &Arc<Engines>, id: &InstanceId, from: u64) -> anyhow::Result<u64> {
    use std::io::Write;
    let chunk = provider.logs(id, from).await?;
    if !chunk.data.is_empty() {
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (a pipe whose reader left) must not stop the instance's cleanup.
        let _ = stdout.write_all(&chunk.data);
        let _ = stdout.flush();
    }
    Ok(chunk.next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flags_are_checked() {
        let env = parse_env(&["A=1".to_owned(), "B_2=x=y".to_owned()]).unwrap_or_default();
        assert_eq!(env.get("B_2").map(String::as_str), Some("x=y"));
        assert!(parse_env(&["NOEQUALS".to_owned()]).is_err());
        assert!(parse_env(&["1A=x".to_owned()]).is_err());
        assert!(parse_env(&["PORT=1".to_owned()]).is_err());
        assert_eq!(app_from_reference("hello:latest"), "hello");
        assert_eq!(app_from_reference("sha256:abc"), "run");
    }
}
