//! The commands that talk to the daemon: `plan`, `apply`, `status`, `history`, `verify`,
//! `rollback`, `promote`, `abort`, `scale`, `down`, `logs`, `drift`, and `up`, which starts
//! a daemon in-process when none is running.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use kiln_control::client::{Client, ClientError};
use kiln_control::{AppStatus, ApplyRequest, ReleaseConfig};
use kiln_ledger::{Entry, Event};
use kiln_spec::Spec;
use serde_json::{Value, json};

use super::daemon::Daemon;
use super::signals::StopSignals;
use crate::cli::SpecFile;
use crate::output::Output;

/// `kiln plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// A followed app: show the plan of the commit its source holds for `kiln sync`
    /// (instead of building ./kiln.toml)
    #[arg(conflicts_with = "file")]
    pub app: Option<String>,
    #[command(flatten)]
    pub spec: SpecFile,
    /// Exit 0 when nothing would change, 2 when something would (1 on errors)
    #[arg(long)]
    pub detailed_exitcode: bool,
}

/// `kiln apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub spec: SpecFile,
    /// Release this image (a manifest digest in the store) instead of building
    #[arg(long, value_name = "DIGEST")]
    pub image: Option<String>,
    /// Return once the release is recorded, without waiting for the rollout
    #[arg(long)]
    pub no_wait: bool,
}

/// `kiln up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub spec: SpecFile,
    /// The OCI runtime binary (when `up` starts the daemon)
    #[arg(long, default_value = "runc", value_name = "BIN")]
    pub runtime: String,
    /// Serve the dashboard on this TCP address (when `up` starts the daemon), as `kiln serve
    /// --ui-listen` does
    #[arg(long, value_name = "ADDR")]
    pub ui_listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token the dashboard's actions need; without it the dashboard
    /// is read-only
    #[arg(long, value_name = "FILE", requires = "ui_listen")]
    pub token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub router: super::daemon::RouterArgs,
}

/// Commands that name an app (default: the `name` in ./kiln.toml).
#[derive(Debug, Args)]
pub struct AppArg {
    /// The app (default: the name in ./kiln.toml)
    pub app: Option<String>,
}

/// `kiln history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Only this app's events
    pub app: Option<String>,
    /// Only the last N events
    #[arg(short = 'n', long, value_name = "N")]
    pub limit: Option<usize>,
    /// The whole ledger as one JSON document for auditors (releases, events with their
    /// hashes, rollout document digests, signed checkpoints, the ledger key), to FILE or
    /// standard output (`-`)
    #[arg(
        long,
        value_name = "FILE",
        num_args = 0..=1,
        default_missing_value = "-",
        conflicts_with_all = ["app", "limit"]
    )]
    pub export: Option<std::path::PathBuf>,
}

/// `kiln verify`'s ledger flags.
#[derive(Debug, Args)]
pub struct LedgerVerifyArgs {
    /// Check a `kiln history --export` document offline instead of this state's ledger
    #[arg(long, value_name = "FILE")]
    pub ledger_export: Option<std::path::PathBuf>,
    /// The ledger's public key as kept elsewhere (an OpenSSH `ssh-ed25519 …` line): the
    /// checkpoints must be signed with it
    #[arg(long, value_name = "FILE")]
    pub ledger_key: Option<std::path::PathBuf>,
}

/// `kiln rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The app (default: the name in ./kiln.toml)
    pub app: Option<String>,
    /// The release to return to (default: the previous one)
    #[arg(long, value_name = "N")]
    pub to: Option<u64>,
    /// Roll back even when the target cannot run against the live database schema
    /// (recorded in the ledger)
    #[arg(long)]
    pub force: bool,
    /// Return at once, without waiting for a cold rollback's rollout
    #[arg(long)]
    pub no_wait: bool,
}

/// `kiln scale`.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The app
    pub app: String,
    /// Instances of the live release
    pub replicas: u32,
}

/// `kiln logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// An app (all its instances) or one instance id
    pub target: Option<String>,
    /// Keep printing new output
    #[arg(short, long)]
    pub follow: bool,
}

/// A client of the daemon this command talks to (`remote::choose`).
pub(super) fn client(state: &Path) -> Client {
    super::remote::client(state)
}

pub(super) fn block<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    super::instance::tokio_runtime()?.block_on(f)
}

/// The app a command is about: as given, or the `name` of ./kiln.toml.
pub(super) fn app_name(app: Option<&str>) -> anyhow::Result<String> {
    if let Some(a) = app {
        return Ok(a.to_owned());
    }
    let text = std::fs::read_to_string("kiln.toml")
        .context("name the app (no ./kiln.toml to take its name from)")?;
    let name = text.lines().find_map(|l| {
        let l = l.trim();
        let v = l
            .strip_prefix("name")?
            .trim_start()
            .strip_prefix('=')?
            .trim();
        Some(v.trim_matches('"').to_owned())
    });
    name.filter(|n| !n.is_empty())
        .context("name the app (./kiln.toml has no `name`)")
}

/// The commit checked out in the git work tree holding `dir` (none outside one, before its
/// first commit, or when the repository cannot be read: the release records no source then).
fn git_commit(dir: &Path) -> Option<String> {
    kiln_git::describe(dir)
        .ok()
        .flatten()
        .and_then(|s| s.commit)
}

fn load(file: &Path, out: &Output) -> anyhow::Result<Result<Spec, ExitCode>> {
    super::spec::load(file, out)
}

/// Builds (or takes `image`), checks the test attestation, and forms the apply request.
fn release_request(
    spec: &Spec,
    file: &Path,
    image: Option<&str>,
    state: &Path,
    out: &Output,
) -> anyhow::Result<ApplyRequest> {
    let digest = match image {
        Some(d) => d.to_owned(),
        None => super::image::build_spec(spec, file, None, state, out)?
            .digest
            .to_string(),
    };
    if spec.image.test.is_some() {
        let store = kiln_image::Store::open(state.join("images"))?;
        let parsed = kiln_image::Digest::parse(&digest)
            .with_context(|| format!("{digest:?} is not an image digest"))?;
        let attestation = store.read_attestation(&parsed)?;
        let passed = attestation.as_ref().and_then(|a| a["result"].as_str()) == Some("passed");
        anyhow::ensure!(
            passed,
            "image {digest} has not passed its tests and {} has [image.test]: run `kiln test -f {} {digest}` first",
            file.display(),
            file.display()
        );
    }
    let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    Ok(ApplyRequest {
        image: digest,
        config: ReleaseConfig::from_spec(spec),
        spec_digest: kiln_runtime::Digest::of(&text).to_string(),
        source_commit: git_commit(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }),
        // The daemon records who the connection says applies (the socket peer's user).
        actor: String::new(),
    })
}

pub fn plan(args: &PlanArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    if let Some(app) = &args.app {
        return super::source::waiting_plan(app, state, out);
    }
    let spec = match load(&args.spec.file, out)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let mut req = release_request_untested(&spec, &args.spec.file, state, out)?;
    let current = block(async {
        let c = client(state);
        // The daemon reads the secrets (as an apply would) and redacts secret-looking env
        // values: the running release shows them so, and values never come back.
        let asked = kiln_control::dto::FingerprintRequest {
            secrets: req.config.service.secrets.clone(),
            env: req.config.service.env.clone(),
        };
        let prints: kiln_control::dto::Fingerprints = serde_json::from_value(
            c.post("/v1/fingerprints", &serde_json::to_value(&asked)?)
                .await?,
        )?;
        for (name, s) in &mut req.config.service.secrets {
            s.fingerprint = prints.secrets.get(name).cloned();
        }
        req.config.service.env = prints.env;
        match c.get(&format!("/v1/apps/{}", spec.name)).await {
            Ok(v) => Ok(Some(serde_json::from_value::<AppStatus>(v)?)),
            Err(ClientError::Api { status, .. }) if status == hyper::StatusCode::NOT_FOUND => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    })?;
    let strategy = spec.deploy.strategy.name();
    // After an aborted rollout the live release is what a spec is compared with.
    let live_release = match &current {
        Some(cur) if cur.phase == "aborted" && cur.live.is_some_and(|l| l != cur.release) => {
            block(async {
                let v = client(state)
                    .get(&format!("/v1/apps/{}/releases", spec.name))
                    .await?;
                Ok(serde_json::from_value::<Vec<kiln_ledger::Release>>(v)?)
            })?
        }
        _ => Vec::new(),
    };
    let current_plan = current
        .as_ref()
        .map(|cur| kiln_control::plan_current(cur, &live_release))
        .transpose()?;
    let next = kiln_control::plan_next(&spec, &req.image, &req.config)?;
    let changes: Vec<String> = kiln_deploy::plan(current_plan.as_ref(), &next)
        .iter()
        .map(ToString::to_string)
        .collect();
    if out.json {
        out.data(&json!({"app": spec.name.as_str(), "changes": changes, "current_release": current.as_ref().map(|c| c.release)}))?;
    } else if changes.is_empty() {
        out.say(&format!(
            "{}: no changes; release {} is what {} describes",
            spec.name,
            current_plan.as_ref().map_or(0, |c| c.release),
            args.spec.file.display()
        ));
    } else {
        let next = current.as_ref().map_or(1, |c| c.release + 1);
        out.say(&format!(
            "{}: apply would record release {next} and roll it out ({strategy}):",
            spec.name
        ));
        for c in &changes {
            out.say(&format!("  {c}"));
        }
        if let Some(cur) = &current {
            out.say(&format!(
                "  instances: create {} of release {next}; release {} stays warm for rollback",
                spec.service.replicas, cur.release
            ));
        }
    }
    Ok(if args.detailed_exitcode && !changes.is_empty() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// For `plan`: the image digest and config apply would use, without requiring tests.
fn release_request_untested(
    spec: &Spec,
    file: &Path,
    state: &Path,
    out: &Output,
) -> anyhow::Result<ApplyRequest> {
    let quiet = out.quieter();
    let built = super::image::build_spec(spec, file, None, state, &quiet)?;
    Ok(ApplyRequest {
        image: built.digest.to_string(),
        config: ReleaseConfig::from_spec(spec),
        spec_digest: String::new(),
        source_commit: None,
        actor: String::new(),
    })
}

pub fn apply(args: &ApplyArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let spec = match load(&args.spec.file, out)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let req = release_request(&spec, &args.spec.file, args.image.as_deref(), state, out)?;
    block(async {
        let c = client(state);
        let transfer = send_if_remote(&c, &spec, &req, state, out).await?;
        let number = submit(&c, spec.name.as_str(), &req, transfer.as_ref(), out).await?;
        if args.no_wait {
            return Ok(ExitCode::SUCCESS);
        }
        wait(&c, spec.name.as_str(), number, out).await
    })
}

/// With a daemon elsewhere, sends it the release's image (only the blobs it lacks) and says
/// what was sent; `None` with the local daemon, whose store is this one.
async fn send_if_remote(
    c: &Client,
    spec: &Spec,
    req: &ApplyRequest,
    state: &Path,
    out: &Output,
) -> anyhow::Result<Option<super::remote::Transfer>> {
    if !super::remote::is_remote() {
        return Ok(None);
    }
    let t = super::remote::send_image(
        c,
        state,
        &req.image,
        &format!("{}:latest", spec.name),
        spec.image.test.is_some(),
    )
    .await?;
    super::remote::report(&t, out);
    Ok(Some(t))
}

async fn submit(
    c: &Client,
    app: &str,
    req: &ApplyRequest,
    transfer: Option<&super::remote::Transfer>,
    out: &Output,
) -> anyhow::Result<u64> {
    let mut v = c
        .post(
            &format!("/v1/apps/{app}/releases"),
            &serde_json::to_value(req)?,
        )
        .await?;
    if let Some(t) = transfer {
        v["transfer"] = serde_json::to_value(t)?;
    }
    let number = v["number"]
        .as_u64()
        .context("the daemon did not say the release number")?;
    if out.json {
        out.data(&v)?;
    } else {
        out.say(&format!(
            "{app}: release {number} recorded (image {})",
            req.image
        ));
    }
    Ok(number)
}

/// Follows a rollout until it completes (exit 0) or aborts (exit 1), printing each change.
async fn wait(c: &Client, app: &str, release: u64, out: &Output) -> anyhow::Result<ExitCode> {
    let mut last = String::new();
    let started = std::time::Instant::now();
    loop {
        let s: AppStatus = serde_json::from_value(c.get(&format!("/v1/apps/{app}")).await?)?;
        let line = progress_line(&s);
        if line != last && !out.json {
            out.say(&format!(
                "  [{:5.1}s] {line}",
                started.elapsed().as_secs_f64()
            ));
            last = line;
        }
        if s.release == release {
            match s.phase.as_str() {
                "completed" => {
                    if !out.json {
                        out.say(&format!(
                            "{app}: release {release} is live on http://{}",
                            s.listen
                        ));
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                "aborted" => {
                    out.error(&anyhow::anyhow!(
                        "{app}: release {release} was rolled back: {}",
                        s.reason.as_deref().unwrap_or("aborted")
                    ));
                    return Ok(ExitCode::FAILURE);
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn progress_line(s: &AppStatus) -> String {
    let healthy = |r: u64| {
        s.instances
            .iter()
            .filter(|i| i.release == Some(r) && i.health == "healthy")
            .count()
    };
    let weights: Vec<String> = s
        .weights
        .iter()
        .map(|(r, w)| format!("r{r} {w}%"))
        .collect();
    let mut line = format!(
        "{} · r{} {}/{} healthy",
        s.phase,
        s.release,
        healthy(s.release),
        s.replicas
    );
    if let Some(st) = s.stable {
        line.push_str(&format!(", r{st} {} healthy", healthy(st)));
    }
    line.push_str(&format!(
        " · route {}",
        if weights.is_empty() {
            "empty".to_owned()
        } else {
            weights.join(", ")
        }
    ));
    match (&s.awaiting_decision, s.awaiting_promotion) {
        (Some(why), _) => line.push_str(&format!(
            " · awaiting a decision: {why}; `kiln promote` or `kiln abort`"
        )),
        (None, true) => line.push_str(" · waiting for `kiln promote`"),
        (None, false) => {}
    }
    line
}

pub fn status(args: &AppArg, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    block(async {
        let c = client(state);
        let apps: Vec<String> = match &args.app {
            Some(a) => vec![a.clone()],
            None => serde_json::from_value(c.get("/v1/apps").await?)?,
        };
        let mut all = Vec::new();
        for app in &apps {
            all.push(c.get(&format!("/v1/apps/{app}")).await?);
        }
        if out.json {
            out.data(&Value::Array(all))?;
            return Ok(ExitCode::SUCCESS);
        }
        if all.is_empty() {
            out.say("no apps are running; start one with `kiln apply` or `kiln up`");
        }
        for v in all {
            let s: AppStatus = serde_json::from_value(v)?;
            print_status(&s, out);
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn print_status(s: &AppStatus, out: &Output) {
    out.say(&format!(
        "{}  live release {}  ({} of release {}: {})  on http://{}",
        s.app,
        s.live.map_or("none".to_owned(), |l| l.to_string()),
        s.strategy,
        s.release,
        s.phase,
        s.listen
    ));
    if let Some(r) = &s.reason {
        out.say(&format!("  reason: {r}"));
    }
    if let Some(why) = &s.unserved {
        out.say(&format!(
            "  not served: {why} (tried again on each reconcile pass)"
        ));
    }
    if let Some(gate) = super::pause::gate_line(&s.gate) {
        out.say(&format!("  {gate}"));
    }
    out.say(&format!("  {}", progress_line(s)));
    if let Some(source) = &s.source {
        super::source::print_source(source, out);
    }
    out.say(&format!(
        "  {:<20} {:>3} {:<8} {:<9} {:<21} {:>7} routed",
        "instance", "rel", "state", "health", "address", "age"
    ));
    for i in &s.instances {
        out.say(&format!(
            "  {:<20} {:>3} {:<8} {:<9} {:<21} {:>7} {}{}",
            i.id,
            i.release.map_or("?".to_owned(), |r| r.to_string()),
            i.state,
            i.health,
            i.addr,
            age(i.age_ms),
            if i.routed { "yes" } else { "no" },
            i.drift
                .as_ref()
                .map_or(String::new(), |d| format!("  DRIFT: {d}"))
        ));
    }
}

fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn when(ms: i64) -> String {
    kiln_ledger::when(ms)
}

pub fn history(args: &HistoryArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    if let Some(to) = &args.export {
        return export_ledger(to, state, out);
    }
    block(async {
        let mut path = "/v1/events?".to_owned();
        if let Some(a) = &args.app {
            path.push_str(&format!("app={a}&"));
        }
        if let Some(n) = args.limit {
            path.push_str(&format!("limit={n}"));
        }
        let events = client(state).get(&path).await?;
        if out.json {
            out.data(&events)?;
            return Ok(ExitCode::SUCCESS);
        }
        let entries: Vec<Entry> = serde_json::from_value(events)?;
        for e in &entries {
            out.say(&format!(
                "{:>5} {} {:<12} {:<26} {}",
                e.seq,
                when(e.at_ms),
                e.app,
                e.kind,
                summary(e)
            ));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One line for an entry: its event's own words, or its raw data when it was written before
/// events were typed.
fn summary(e: &Entry) -> String {
    match e.event() {
        Ok(event) => event.to_string(),
        Err(_) => e.data.to_string(),
    }
}

/// `kiln history --export FILE`: asks the daemon, or reads the ledger when none runs here.
fn export_ledger(to: &Path, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let doc = block(async {
        let c = client(state);
        if super::remote::is_remote() || c.alive().await {
            return Ok(c.get("/v1/ledger/export").await?);
        }
        let path = state.join("ledger.db");
        anyhow::ensure!(
            path.exists(),
            "no ledger at {}: nothing has been deployed with this --state",
            path.display()
        );
        let ledger = kiln_ledger::Ledger::open_read_only(&path)?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Ok(ledger.export(
            &kiln_ledger::AnchorFiles::in_state(state),
            i64::try_from(now).unwrap_or(i64::MAX),
        )?)
    })?;
    let mut text = serde_json::to_vec_pretty(&doc)?;
    text.push(b'\n');
    if to == Path::new("-") {
        use std::io::Write;
        std::io::stdout()
            .write_all(&text)
            .context("cannot write the export to standard output")?;
    } else {
        kiln_durable::write(to, &text)
            .with_context(|| format!("cannot write the export to {}", to.display()))?;
        out.say(&format!(
            "ledger exported to {}: {} events, {} checkpoints; verification: {}",
            to.display(),
            doc["events"].as_array().map_or(0, Vec::len),
            doc["checkpoints"].as_array().map_or(0, Vec::len),
            if doc["verify"]["ok"] == true {
                "ok".to_owned()
            } else {
                doc["verify"]["message"]
                    .as_str()
                    .unwrap_or("failed")
                    .to_owned()
            }
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: &LedgerVerifyArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let pinned = match &args.ledger_key {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the ledger key {}", file.display()))?;
            Some(
                kiln_ledger::PublicKey::parse_openssh(text.trim())
                    .with_context(|| format!("{} is not an OpenSSH public key", file.display()))?,
            )
        }
        None => None,
    };
    if let Some(file) = &args.ledger_export {
        let text = std::fs::read(file)
            .with_context(|| format!("cannot read the export {}", file.display()))?;
        let doc: Value = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let v = kiln_ledger::verify_json(&kiln_ledger::verify_export(&doc, pinned.as_ref()));
        return report_verify(&v, out);
    }
    let v = block(async {
        let c = client(state);
        // A daemon elsewhere is only asked: its ledger is not on this machine.
        if super::remote::is_remote() || c.alive().await {
            return Ok(c.get("/v1/verify").await?);
        }
        // No daemon: read the ledger file directly.
        let path = state.join("ledger.db");
        anyhow::ensure!(
            path.exists(),
            "no ledger at {}: nothing has been deployed with this --state",
            path.display()
        );
        let ledger = kiln_ledger::Ledger::open_read_only(&path)?;
        let files = kiln_ledger::AnchorFiles::in_state(state);
        Ok(kiln_ledger::verify_json(&ledger.verify_anchored(&files)?))
    })?;
    let v = match (&pinned, v["anchor"]["key"].as_str()) {
        (Some(k), Some(used)) if k.fingerprint() != used => json!({
            "ok": false,
            "seq": 0,
            "what": "ledger key",
            "reason": format!("the checkpoints are signed with {used}, not the key given ({})", k.fingerprint()),
            "message": format!("ledger key: the checkpoints are signed with {used}, not the key given ({})", k.fingerprint()),
        }),
        _ => v,
    };
    report_verify(&v, out)
}

/// Prints a verification (`kiln_ledger::verify_json`'s) and gives its exit code.
fn report_verify(v: &Value, out: &Output) -> anyhow::Result<ExitCode> {
    if out.json {
        out.data(v)?;
    } else if v["ok"] == true {
        out.say(&format!(
            "ledger ok: {} events, {} releases and {} rollout documents verified; chain head {}",
            v["events"],
            v["releases"],
            v["rollouts"],
            v["head"].as_str().unwrap_or("")
        ));
        let a = &v["anchor"];
        if let Some(key) = a["key"].as_str() {
            let last = &a["last"];
            out.say(&format!(
                "signed by ledger key {key}: {} checkpoints match{}; {} entries since the last",
                a["checked"],
                last["seq"].as_u64().map_or_else(String::new, |seq| format!(
                    ", the last at entry {seq} signed {}",
                    when(last["at_ms"].as_i64().unwrap_or(0))
                )),
                a["unsigned"]
            ));
            if a["set_aside"].as_u64().unwrap_or(0) > 0 {
                out.say(&format!(
                    "{} older checkpoints set aside by an accepted break (see ledger.broken_accepted in kiln history)",
                    a["set_aside"]
                ));
            }
        }
        for e in v["accepted"].as_array().into_iter().flatten() {
            out.say(&format!(
                "accepted earlier, not failing: {}",
                e["message"].as_str().unwrap_or("")
            ));
        }
    } else {
        out.error(&anyhow::anyhow!(
            "{}",
            v["message"]
                .as_str()
                .unwrap_or("the ledger does not verify")
        ));
    }
    Ok(if v["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn rollback(args: &RollbackArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = app_name(args.app.as_deref())?;
    block(async {
        let c = client(state);
        let v = c
            .post(
                &format!("/v1/apps/{app}/rollback"),
                &json!({"to": args.to, "force": args.force}),
            )
            .await?;
        if out.json {
            out.data(&v)?;
        }
        let (from, to) = (
            v["from"].as_u64().unwrap_or(0),
            v["to"].as_u64().unwrap_or(0),
        );
        if v["warm"] == true {
            out.say(&format!(
                "{app}: rolled back from release {from} to {to} (warm: route switched in {} µs)",
                v["switch_us"]
            ));
            Ok(ExitCode::SUCCESS)
        } else {
            out.say(&format!(
                "{app}: release {to} is not warm; rolling it out again (no rebuild)"
            ));
            if args.no_wait {
                return Ok(ExitCode::SUCCESS);
            }
            wait(&c, &app, to, out).await
        }
    })
}

fn simple(
    state: &Path,
    out: &Output,
    path: String,
    body: Value,
    done: String,
) -> anyhow::Result<ExitCode> {
    block(async {
        let v = client(state).post(&path, &body).await?;
        if out.json {
            out.data(&v)?;
        } else {
            out.say(&done);
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn promote(args: &AppArg, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = app_name(args.app.as_deref())?;
    simple(
        state,
        out,
        format!("/v1/apps/{app}/promote"),
        json!({}),
        format!("{app}: promotion requested"),
    )
}

pub fn abort(args: &AppArg, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = app_name(args.app.as_deref())?;
    simple(
        state,
        out,
        format!("/v1/apps/{app}/abort"),
        json!({}),
        format!("{app}: abort requested; traffic returns to the stable release"),
    )
}

pub fn scale(args: &ScaleArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = &args.app;
    simple(
        state,
        out,
        format!("/v1/apps/{app}/scale"),
        json!({"replicas": args.replicas}),
        format!("{app}: scaling to {} instance(s)", args.replicas),
    )
}

pub fn down(args: &AppArg, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let app = app_name(args.app.as_deref())?;
    block(async {
        let v = client(state).delete(&format!("/v1/apps/{app}")).await?;
        if out.json {
            out.data(&v)?;
        } else {
            out.say(&format!(
                "{app}: stopped; {} instance(s) destroyed",
                v["instances_destroyed"]
            ));
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn logs(args: &LogsArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let target = app_name(args.target.as_deref())?;
    block(async {
        let c = client(state);
        let instances: Vec<String> = match c.get(&format!("/v1/apps/{target}/instances")).await {
            Ok(v) => serde_json::from_value(v)?,
            Err(ClientError::Api { status, .. }) if status == hyper::StatusCode::NOT_FOUND => {
                vec![target.clone()]
            }
            Err(e) => return Err(e.into()),
        };
        let many = instances.len() > 1;
        let mut offsets: std::collections::BTreeMap<String, u64> =
            std::collections::BTreeMap::new();
        loop {
            for id in &instances {
                let from = offsets.get(id).copied().unwrap_or(0);
                let chunk = match c.get(&format!("/v1/instances/{id}/logs?from={from}")).await {
                    Ok(v) => v,
                    Err(ClientError::Api { message, .. }) if args.follow => {
                        let _ = message;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let data = chunk["data"].as_str().unwrap_or("");
                for line in data.lines() {
                    if many {
                        out.print(&format!("{id} | {line}\n"));
                    } else {
                        out.print(&format!("{line}\n"));
                    }
                }
                offsets.insert(id.clone(), chunk["next"].as_u64().unwrap_or(from));
            }
            if !args.follow || out.stdout_closed() {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

pub fn drift(args: &AppArg, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    block(async {
        let mut path = "/v1/events?".to_owned();
        if let Some(a) = &args.app {
            path.push_str(&format!("app={a}"));
        }
        let entries: Vec<Entry> = serde_json::from_value(client(state).get(&path).await?)?;
        // An entry written before events were typed does not decode; it is not drift.
        let found: Vec<(&Entry, Event)> = entries
            .iter()
            .filter_map(|e| Some((e, e.event().ok()?)))
            .filter(|(_, event)| event.is_drift())
            .collect();
        if out.json {
            let raw: Vec<&Entry> = found.iter().map(|(e, _)| *e).collect();
            out.data(&json!(raw))?;
        } else if found.is_empty() {
            out.say("no drift found");
        } else {
            for (e, event) in found {
                let what = match &event {
                    Event::DriftDetected { .. } => format!("found on {event}"),
                    _ => format!("replaced: {event}"),
                };
                out.say(&format!("{} {:<12} {what}", when(e.at_ms), e.app));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn up(args: &UpArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let spec = match load(&args.spec.file, out)? {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let app = spec.name.to_string();
    out.say(&format!("==> building {app}"));
    let built = super::image::build_spec(&spec, &args.spec.file, None, state, out)?;
    let digest = built.digest.to_string();
    if spec.image.test.is_some() {
        out.say(&format!("==> testing {digest}"));
        let code = super::test::test(
            &super::test::TestArgs {
                reference: Some(digest.clone()),
                file: args.spec.file.clone(),
            },
            state,
            out,
        )?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
    }
    let req = release_request(&spec, &args.spec.file, Some(&digest), state, out)?;
    let spec_ref = &spec;
    block(async {
        // Caught from here on: Ctrl-C during the rollout or while following stops cleanly.
        let mut signals = StopSignals::new()?;
        let c = client(state);
        // Nothing is started yet: a signal just ends `up`.
        let daemon = tokio::select! {
            biased;
            stop = signals.recv() => return Ok(stop.exit_code()),
            daemon = connect_or_start(&c, args, state, out) => daemon?,
        };
        let outcome = tokio::select! {
            biased;
            stop = signals.recv() => {
                out.say(&format!("==> interrupted while rolling out {app}"));
                if daemon.is_none() {
                    out.say(&format!(
                        "==> the kiln daemon on {} goes on with the rollout: kiln status {app}",
                        c.describe()
                    ));
                }
                Ok(stop.exit_code())
            }
            r = roll_out(&c, spec_ref, &req, state, out) => r,
        };
        let outcome = match outcome {
            Ok(code) if code == ExitCode::SUCCESS => {
                let file = args.spec.file.display();
                let listen = spec.route.listen;
                let stops = if daemon.is_some() {
                    "the app and the daemon"
                } else {
                    "following (the app keeps running)"
                };
                // The spec's own keys, never an example's: what a person would change
                // for a new release of this app.
                let edit = match spec.service.env.keys().next() {
                    Some(key) => format!("[service.env] {key} in {file}"),
                    None => format!("[image] or [service] in {file}"),
                };
                out.say(&format!(
                    "\n{app} is up on http://{listen} — try, in another terminal:\n  \
                     kiln status {app}\n  \
                     (edit {edit}) then: kiln build -f {file}; \
                     kiln test -f {file}; kiln apply -f {file}\n  \
                     kiln rollback {app}\n  \
                     kiln history {app}\n\
                     Streaming events; Ctrl-C stops {stops}."
                ));
                tokio::select! {
                    biased;
                    _ = signals.recv() => Ok(code),
                    r = follow(&c, &app, out) => r.map(|()| code),
                }
            }
            other => other,
        };
        if let Some(d) = daemon {
            out.say(&format!(
                "==> stopping {app} and the daemon (Ctrl-C again leaves {app} running)"
            ));
            let stopping = async {
                let _ = c.delete(&format!("/v1/apps/{app}")).await;
                d.stop().await;
            };
            tokio::select! {
                biased;
                _ = signals.recv() => out.say(&format!(
                    "==> left {app} running: `kiln serve` takes it over, `kiln down {app}` stops it"
                )),
                () = stopping => {}
            }
        }
        outcome
    })
}

/// The kiln daemon already serving `state`, or `None` once one is started in this process.
async fn connect_or_start(
    c: &Client,
    args: &UpArgs,
    state: &Path,
    out: &Output,
) -> anyhow::Result<Option<Daemon>> {
    if c.alive().await {
        out.say(&format!("==> using the kiln daemon on {}", c.describe()));
        if args.ui_listen.is_some() {
            out.say(
                "==> --ui-listen is left to that daemon: start it with `kiln serve --ui-listen`",
            );
        }
        return Ok(None);
    }
    // A daemon elsewhere is never started from here: say why it cannot be reached.
    if super::remote::is_remote() {
        c.get("/v1/health").await?;
    }
    out.say("==> starting a kiln daemon in this process");
    let daemon = Daemon::start(
        state,
        &args.runtime,
        args.router.choice(state)?,
        super::daemon::Listen {
            api: None,
            ui: match args.ui_listen {
                Some(addr) => Some(super::daemon::UiListen {
                    addr,
                    token: args
                        .token_file
                        .as_deref()
                        .map(super::daemon::read_token)
                        .transpose()?,
                    hosts: Vec::new(),
                }),
                None => None,
            },
        },
        None,
        kiln_control::PolicyConfig::default(),
        false,
    )
    .await?;
    if let Some(addr) = args.ui_listen {
        out.say(&format!("==> dashboard: http://{addr}/"));
    }
    Ok(Some(daemon))
}

/// Submits the release and waits for its end.
async fn roll_out(
    c: &Client,
    spec: &Spec,
    req: &ApplyRequest,
    state: &Path,
    out: &Output,
) -> anyhow::Result<ExitCode> {
    let app = spec.name.as_str();
    let transfer = send_if_remote(c, spec, req, state, out).await?;
    out.say(&format!("==> rolling out {app}"));
    let number = submit(c, app, req, transfer.as_ref(), out).await?;
    wait(c, app, number, out).await
}

/// Prints the app's new events as they come; returns only if the daemon cannot be asked.
async fn follow(c: &Client, app: &str, out: &Output) -> anyhow::Result<()> {
    let mut seen = c
        .get(&format!("/v1/events?app={app}"))
        .await?
        .as_array()
        .and_then(|a| a.last())
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let events = c.get(&format!("/v1/events?app={app}&limit=50")).await?;
        let entries: Vec<Entry> = serde_json::from_value(events)?;
        let last = seen;
        for e in entries.iter().filter(|e| e.seq > last) {
            seen = e.seq;
            out.say(&format!("{} {:<26} {}", when(e.at_ms), e.kind, summary(e)));
        }
    }
}
