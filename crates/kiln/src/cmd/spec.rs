//! Commands about the spec itself: `kiln validate`, `kiln schema`, `kiln init`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use kiln_spec::{AppName, LoadError, Spec, Strategy};
use serde_json::json;

use crate::cli::{InitArgs, SchemaArgs, SpecFile};
use crate::output::Output;

/// Loads a spec for a command that needs a valid one; on problems prints them and fails.
pub fn load(file: &Path, out: &Output) -> anyhow::Result<Result<Spec, ExitCode>> {
    match Spec::load(file) {
        Ok(spec) => Ok(Ok(spec)),
        Err(LoadError::Invalid(report)) => {
            out.report(&report.render(out.color));
            let n = report.diagnostics.len();
            out.error(&anyhow::anyhow!(
                "{} has {n} problem{}",
                report.file,
                if n == 1 { "" } else { "s" }
            ));
            Ok(Err(ExitCode::FAILURE))
        }
        Err(e @ LoadError::Read { .. }) => Err(e.into()),
    }
}

pub fn validate(args: &SpecFile, out: &Output) -> anyhow::Result<ExitCode> {
    let file = args.file.display().to_string();
    if !out.json {
        return Ok(match load(&args.file, out)? {
            Ok(spec) => {
                out.say(&format!("{file}: ok ({})", summary(&spec)));
                if out.verbose > 0 && !out.quiet {
                    out.print(&details(&spec));
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        });
    }
    match Spec::load(&args.file) {
        Ok(spec) => {
            out.data(&json!({
                "file": file,
                "valid": true,
                "app": spec.name.as_str(),
                "strategy": spec.deploy.strategy.name(),
                "diagnostics": [],
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(LoadError::Invalid(report)) => {
            out.data(&json!({
                "file": file,
                "valid": false,
                "diagnostics": report.to_json(),
            }))?;
            Ok(ExitCode::FAILURE)
        }
        Err(e @ LoadError::Read { .. }) => Err(e.into()),
    }
}

fn summary(spec: &Spec) -> String {
    let replicas = spec.service.replicas;
    let steps = match &spec.deploy.strategy {
        Strategy::Canary { steps, .. } => {
            let w: Vec<String> = steps.iter().map(|s| format!("{}%", s.weight)).collect();
            format!(" {}", w.join("→"))
        }
        _ => String::new(),
    };
    format!(
        "app {}, {} layer{}, {replicas} replica{}, {}{steps}, listening on {}",
        spec.name,
        spec.image.copies.len(),
        if spec.image.copies.len() == 1 {
            ""
        } else {
            "s"
        },
        if replicas == 1 { "" } else { "s" },
        spec.deploy.strategy.name(),
        spec.route.listen,
    )
}

/// The effective configuration, defaults included, for `kiln validate -v`.
fn details(spec: &Spec) -> String {
    use std::fmt::Write as _;
    let d = humantime::format_duration;
    let mut s = String::new();
    let i = &spec.image;
    let _ = writeln!(
        s,
        "image:   base {:?}, compression {:?}",
        i.base, i.compression
    );
    for c in &i.copies {
        let _ = writeln!(
            s,
            "  copy   {} -> {} (owner {}:{})",
            c.from.display(),
            c.to,
            c.owner.uid,
            c.owner.gid
        );
    }
    let v = &spec.service;
    let writable: Vec<String> = v
        .tmpfs()
        .map(|(path, size)| match size % (1 << 20) {
            0 => format!("{path} ({}MiB)", size >> 20),
            _ => format!("{path} ({size} bytes)"),
        })
        .collect();
    let _ = writeln!(
        s,
        "service: port {}, {} replicas, writable [{}], stop grace {}",
        v.port,
        v.replicas,
        writable.join(", "),
        d(v.stop_grace)
    );
    let _ = writeln!(
        s,
        "sealed:  user {}, pids {}, seccomp {}, network {}",
        v.user
            .as_deref()
            .unwrap_or("the image's (65534:65534 when it has none)"),
        v.pids,
        v.seccomp.as_str(),
        v.network.as_str()
    );
    let h = &v.health;
    let _ = writeln!(
        s,
        "health:  {} every {}, timeout {}, healthy after {}, unhealthy after {}, start period {}",
        h.path
            .as_deref()
            .map_or("TCP connect".to_owned(), |p| format!("GET {p}")),
        d(h.interval),
        d(h.timeout),
        h.healthy_threshold,
        h.unhealthy_threshold,
        d(h.start_period)
    );
    let dp = &spec.deploy;
    let _ = writeln!(
        s,
        "deploy:  {:?}, surge {:?}, unavailable {:?}, deadline {}, keep previous {}",
        dp.strategy,
        dp.max_surge,
        dp.max_unavailable,
        d(dp.progress_deadline),
        d(dp.keep_previous)
    );
    let r = &spec.route;
    let _ = writeln!(
        s,
        "route:   {} hosts {:?}, tls {}, sticky {:?}, drain {}, request timeout {}",
        r.listen,
        r.hosts,
        if r.tls.is_some() { "on" } else { "off" },
        r.sticky,
        d(r.drain_timeout),
        d(r.request_timeout)
    );
    let _ = writeln!(
        s,
        "target:  {:?} ({})",
        spec.target.provider, spec.target.runtime
    );
    s
}

pub fn schema(args: &SchemaArgs, out: &Output) -> anyhow::Result<ExitCode> {
    if args.markdown {
        out.print(&kiln_spec::reference_markdown());
    } else {
        out.data(&kiln_spec::json_schema())?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn init(args: &InitArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let name = match &args.name {
        Some(n) => AppName::new(n).with_context(|| {
            format!("invalid app name {n:?}: use a lowercase letter, then up to 39 lowercase letters, digits or `-`")
        })?,
        None => default_name(&args.file),
    };
    let text = STARTER.replace("{name}", name.as_str());
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            anyhow::bail!(
                "{} already exists; kiln init never overwrites a spec",
                args.file.display()
            )
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create {}", args.file.display()));
        }
    };
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", args.file.display()))?;
    if out.json {
        out.data(&json!({"file": args.file.display().to_string(), "app": name.as_str()}))?;
    } else {
        out.say(&format!(
            "wrote {} for app {name}; check it with `kiln validate -f {}`",
            args.file.display(),
            args.file.display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The app name derived from the spec's directory: lowercased, other characters as `-`.
fn default_name(file: &Path) -> AppName {
    let dir = std::path::absolute(file)
        .ok()
        .and_then(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let mut name: String = dir
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .skip_while(|c| !c.is_ascii_lowercase())
        .take(40)
        .collect();
    while name.ends_with('-') {
        name.pop();
    }
    AppName::new(&name).unwrap_or_default()
}

/// The starter spec `kiln init` writes. It validates as written.
const STARTER: &str = r#"# kiln.toml: the whole desired state of one app. Reference: docs/config.md, or
# `kiln schema --markdown`. Check it with `kiln validate`.

name = "{name}"

[image]
base = "scratch"          # or "oci:PATH[:TAG]", "docker-archive:PATH", "rootfs:PATH"
entrypoint = ["/app"]
# Each [[image.copy]] becomes one layer. `from` is relative to this file and must exist.
# [[image.copy]]
# from = "target/release/app"
# to = "/app"
# mode = "0755"

# [image.test]
# http = "/healthz"       # must answer 2xx on a started instance
# timeout = "30s"

[service]
port = 8080               # the app listens on $PORT; kiln sets it
replicas = 2
writable = ["/tmp"]       # everything else is read-only; each tmpfs is 64MiB (tmpfs_size)
# env = { LOG_LEVEL = "info" }
# memory = "256MiB"
# Sealed by default: the image's user (65534 when it has none), pids = 512, the seccomp
# allowlist. Weakening it is a line here: user = "root", seccomp = "unconfined".

[service.health]
path = "/healthz"         # TCP connect when absent
interval = "1s"

[deploy]
strategy = "rolling"      # or "blue-green", "canary"
max_surge = 1
max_unavailable = 0
keep_previous = "10m"     # previous release stays warm for instant rollback
# For a canary:
# strategy = "canary"
# [[deploy.steps]]
# weight = 10
# pause = "30s"
# [[deploy.steps]]
# weight = 100
# [deploy.analysis]
# max_error_rate = "1%"
# max_p99 = "300ms"

[route]
listen = "127.0.0.1:8080"
"#;
