//! `kiln pause`, `kiln resume`, `kiln maintenance`: the router's gate for an app, through the
//! daemon's API (which records and persists it).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use kiln_control::GateStatus;
use serde_json::{Value, json};

use super::deploy::{AppArg, app_name, block, client};
use crate::output::Output;

/// `kiln pause`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// The app (default: the name in ./kiln.toml)
    pub app: Option<String>,
    /// The longest a request is held; then it gets 503 (e.g. 30s, 2m)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub max_hold: Duration,
    /// The most requests held at once; a newer one pushes the oldest out with 503
    #[arg(long, default_value_t = 10_000)]
    pub max_held: usize,
}

/// `kiln maintenance`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["message", "off"])))]
pub struct MaintenanceArgs {
    /// The app (default: the name in ./kiln.toml)
    pub app: Option<String>,
    /// What people see (in an HTML page for browsers, as text otherwise)
    #[arg(long, short)]
    pub message: Option<String>,
    /// The 503's Retry-After (e.g. 60s, 10m)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub retry_after: Duration,
    /// End maintenance: requests reach the app again
    #[arg(long)]
    pub off: bool,
}

pub fn pause(args: &PauseArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = app_name(args.app.as_deref())?;
    let max_hold_ms = u64::try_from(args.max_hold.as_millis()).unwrap_or(u64::MAX);
    let body = json!({"max_hold_ms": max_hold_ms, "max_held": args.max_held});
    block(async {
        let v = client(state)
            .post(&format!("/v1/apps/{app}/pause"), &body)
            .await?;
        done(out, &v, &app)
    })
}

pub fn resume(args: &AppArg, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = app_name(args.app.as_deref())?;
    block(async {
        let v = client(state)
            .post(&format!("/v1/apps/{app}/resume"), &json!({}))
            .await?;
        done(out, &v, &app)
    })
}

pub fn maintenance(args: &MaintenanceArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = app_name(args.app.as_deref())?;
    let path = format!("/v1/apps/{app}/maintenance");
    block(async {
        let c = client(state);
        let v = match &args.message {
            Some(message) if !args.off => {
                let body = json!({"message": message, "retry_after_s": args.retry_after.as_secs()});
                c.put(&path, &body).await?
            }
            _ => c.delete(&path).await?,
        };
        done(out, &v, &app)
    })
}

fn done(out: &Output, v: &Value, app: &str) -> anyhow::Result<ExitCode> {
    if out.json {
        out.data(v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let gate: GateStatus = serde_json::from_value(v["gate"].clone()).unwrap_or_default();
    match gate_line(&gate) {
        Some(line) => out.say(&format!("{app}: {line}")),
        None => {
            let released = v["released"].as_u64().unwrap_or(0);
            out.say(&format!(
                "{app}: open; the router forwards its requests ({released} held request(s) let go)"
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The status line of a closed gate; `None` when open.
pub fn gate_line(gate: &GateStatus) -> Option<String> {
    match gate {
        GateStatus::Open => None,
        GateStatus::Paused {
            max_hold_ms,
            max_held,
            held,
        } => Some(format!(
            "paused: new requests held ({held} now, at most {max_held}, each at most {}); `kiln resume` lets them go",
            humantime::format_duration(Duration::from_millis(*max_hold_ms))
        )),
        GateStatus::Maintenance {
            message,
            retry_after_s,
        } => Some(format!(
            "in maintenance: requests get 503 {message:?} (Retry-After {retry_after_s}); `kiln maintenance --off` ends it"
        )),
    }
}
