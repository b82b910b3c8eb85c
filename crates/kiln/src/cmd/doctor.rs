//! `kiln doctor`: can this host run instances? Says which state directory kiln uses and why,
//! checks the OCI runtime binary, kernel overlayfs, the cgroup mode, privileges, the state
//! directory, inotify and the Docker Engine (a warning only: the docker provider needs it),
//! and for each problem prints exactly what to install or change. Exit 1 when a check fails.

use std::process::ExitCode;

use clap::Args;
use kiln_runtime::CheckStatus;
use serde_json::json;

use crate::output::Output;
use crate::state::Choice;

/// `kiln doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The OCI runtime binary to check (as `[target] runtime` names it)
    #[arg(long, default_value = "runc", value_name = "BINARY")]
    pub runtime: String,

    /// The Docker Engine to check (default: `$DOCKER_HOST` or the local socket)
    #[arg(long, value_name = "ADDR")]
    pub docker_host: Option<String>,
}

/// Runs `kiln doctor`.
pub fn doctor(args: &DoctorArgs, state: &Choice, out: &Output) -> anyhow::Result<ExitCode> {
    let mut checks = kiln_runtime::doctor(&args.runtime, &state.dir);
    // Which directory, next to whether it can hold instances.
    let at = checks
        .iter()
        .position(|c| c.name == "state")
        .unwrap_or(checks.len());
    checks.insert(
        at,
        kiln_runtime::Check {
            name: "state-dir",
            status: CheckStatus::Ok,
            detail: format!("{}: {}", state.dir.display(), state.why),
            fix: None,
        },
    );
    // The registry's CA (`kiln serve --registry-listen` off loopback), for the operator to
    // install on each node.
    let ca = state.dir.join("registry").join("ca.crt");
    if ca.exists() {
        checks.push(kiln_runtime::Check {
            name: "registry",
            status: CheckStatus::Ok,
            detail: format!(
                "CA {}: install it on each node as /etc/docker/certs.d/ADDR/ca.crt (ADDR: \
                 --registry-listen)",
                ca.display()
            ),
            fix: None,
        });
    }
    checks.push(
        super::instance::tokio_runtime()?.block_on(kiln_runtime::docker::engine_check(
            args.docker_host.as_deref(),
        )),
    );
    let failed = checks.iter().any(|c| c.status == CheckStatus::Fail);
    if out.json {
        out.data(&json!({
            "ok": !failed,
            "state": {"dir": state.dir, "why": state.why.to_string()},
            "checks": checks.iter().map(|c| json!({
                "name": c.name,
                "status": c.status.as_str(),
                "detail": c.detail,
                "fix": c.fix,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        for c in &checks {
            out.say(&format!(
                "{:<5} {:<11} {}",
                c.status.as_str(),
                c.name,
                c.detail
            ));
            if let Some(fix) = &c.fix {
                out.say(&format!("{:<17} fix: {fix}", ""));
            }
        }
    }
    if failed {
        out.error(&anyhow::anyhow!(
            "this host cannot run instances yet: apply the fixes above"
        ));
        Ok(ExitCode::FAILURE)
    } else {
        Ok(ExitCode::SUCCESS)
    }
}
