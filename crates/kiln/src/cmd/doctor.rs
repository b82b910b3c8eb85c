//! `kiln doctor`: can this host run instances? Checks the OCI runtime binary, kernel
//! overlayfs, the cgroup mode, privileges, the state directory and inotify, and for each
//! problem prints exactly what to install or change. Exit 1 when a check fails.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use kiln_runtime::CheckStatus;
use serde_json::json;

use crate::output::Output;

/// `kiln doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The OCI runtime binary to check (as `[target] runtime` names it)
    #[arg(long, default_value = "runc", value_name = "BINARY")]
    pub runtime: String,
}

/// Runs `kiln doctor`.
pub fn doctor(args: &DoctorArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let checks = kiln_runtime::doctor(&args.runtime, state);
    let failed = checks.iter().any(|c| c.status == CheckStatus::Fail);
    if out.json {
        out.data(&json!({
            "ok": !failed,
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
