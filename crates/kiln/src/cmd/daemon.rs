//! `kiln serve`: the daemon — the controller, its API on `<state>/kiln.sock` (and optional
//! TCP with a bearer token), and the reconciler, feeding a router process (`kiln router`,
//! started when none serves the state). SIGTERM or Ctrl-C stops the daemon; the router and
//! the instances keep running, and a restarted daemon adopts them (`kiln down APP` is the way
//! to stop an app). It starts by raising its open-file limit to the hard limit
//! (`raise_open_file_limit`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use kiln_control::{Controller, ControllerConfig, RouterChoice};
use kiln_proxy::WorkersConfig;
use kiln_runtime::Provider;

use super::instance::{StoreImages, engines};
use super::signals::StopSignals;
use crate::output::Output;

/// `kiln serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Also serve the API on this TCP address (requires --token-file)
    #[arg(long, value_name = "ADDR", requires = "token_file")]
    pub api_listen: Option<SocketAddr>,

    /// File holding the bearer token TCP clients must send (on --api-listen, and for the
    /// dashboard's actions)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Serve the dashboard on this TCP address (plain HTTP; keep it on loopback or behind a
    /// TLS proxy): anyone reaching it may look, actions need the --token-file token
    #[arg(long, value_name = "ADDR")]
    pub ui_listen: Option<SocketAddr>,

    /// A host name the dashboard may be reached by, besides its address and localhost
    /// (requests naming another host are refused, against DNS rebinding); repeatable
    #[arg(long, value_name = "NAME", requires = "ui_listen")]
    pub ui_host: Vec<String>,

    /// The OCI runtime binary of the local provider
    #[arg(long, default_value = "runc", value_name = "BIN")]
    pub runtime: String,

    /// Serve the image store read-only over the OCI Distribution API on this address, for
    /// Docker Engines (Swarm nodes) to pull kiln's images by digest: plain HTTP on loopback,
    /// else TLS with a CA kiln makes in <state>/registry/
    #[arg(long, value_name = "ADDR", value_parser = registry_address)]
    pub registry_listen: Option<SocketAddr>,

    /// Serve the registry over plain HTTP on a non-loopback address too (each node's engine
    /// must then list it in insecure-registries)
    #[arg(long, requires = "registry_listen")]
    pub registry_insecure: bool,

    /// The daemon's deploy policy: a TOML file with a [policy] table as in kiln.toml (keys,
    /// require, source). Every release applied from now on must pass it as well as its own
    /// spec's [policy]; releases already recorded keep the policy they were applied under
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Start on a ledger that fails verification (an edited, re-chained or cut chain, a
    /// forged or missing checkpoint file, a lost ledger key): what failed and who accepted it
    /// are recorded in the ledger, and a new checkpoint is signed so later starts pass
    #[arg(long)]
    pub accept_broken_ledger: bool,
    /// The git sources to follow, declared in a TOML file (`[[source]]` tables with the
    /// keys of `kiln source add`): each is added at start (retried until its first fetch
    /// works) and replaced when the file says otherwise; sources added with `kiln source
    /// add` are left alone
    #[arg(long, value_name = "FILE")]
    pub sources: Option<PathBuf>,

    #[command(flatten)]
    pub router: RouterArgs,
}

/// Reads and validates the daemon's policy file (`--policy`); none asks for nothing.
pub fn load_policy(path: Option<&Path>) -> anyhow::Result<kiln_control::PolicyConfig> {
    let Some(path) = path else {
        return Ok(kiln_control::PolicyConfig::default());
    };
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the policy file {}", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let policy = kiln_spec::PolicySpec::parse(&source, &path.display().to_string(), dir)
        .map_err(|report| anyhow::anyhow!("invalid policy file:\n{report}"))?;
    Ok(kiln_control::PolicyConfig::from(&policy))
}

/// `--registry-listen`: an address nodes can reach, so not `0.0.0.0` or `::`, since image
/// references name it.
fn registry_address(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("{e} (expected IP:PORT, e.g. 10.0.0.1:5000)"))?;
    if addr.ip().is_unspecified() {
        return Err(format!(
            "{addr} is unspecified: nodes pull from the address image references name, so give \
             one they reach (e.g. this host's address on their network)"
        ));
    }
    Ok(addr)
}

/// Where the daemon serves its registry (`--registry-listen`, `--registry-insecure`).
#[derive(Debug, Clone, Copy)]
pub struct RegistryListen {
    /// The address.
    pub addr: SocketAddr,
    /// Plain HTTP even off loopback.
    pub insecure: bool,
}

impl ServeArgs {
    /// The registry the flags ask for.
    pub fn registry(&self) -> Option<RegistryListen> {
        self.registry_listen.map(|addr| RegistryListen {
            addr,
            insecure: self.registry_insecure,
        })
    }
}

/// The store as the registry reads it: a blob's file by digest, an image's referrers index.
impl kiln_control::registry::BlobFiles for StoreImages {
    fn open_blob(&self, digest: &kiln_runtime::Digest) -> std::io::Result<Option<std::fs::File>> {
        match std::fs::File::open(self.store().blob_path(digest)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn referrers_index(
        &self,
        subject: &kiln_runtime::Digest,
    ) -> Result<Option<kiln_runtime::Digest>, String> {
        self.store()
            .referrers_index(subject)
            .map_err(|e| e.to_string())
    }
}

/// How the daemon runs its router (for `kiln serve` and the daemon `kiln up` starts).
#[derive(Debug, Args)]
pub struct RouterArgs {
    /// Router threads [default: one per core this process may use]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub router_threads: Option<u16>,

    /// Pin each router thread to a core of its own [default: true when there is one thread per
    /// core]
    #[arg(long, value_name = "BOOL")]
    pub router_pin: Option<bool>,

    /// Log each response the router sends as one JSON line, appended to FILE, or to the
    /// router's standard output (its log) with `-`; SIGHUP to the router process (its pid is
    /// in `<state>/router.pid`) opens FILE anew after logrotate renamed it [default: no access
    /// log]
    #[arg(long, value_name = "FILE|-")]
    pub access_log: Option<std::path::PathBuf>,

    /// The share of responses the access log keeps, from 0 to 1; 5xx responses, and 499
    /// (the client gave up before the answer), are always logged [default: 1]
    #[arg(long, value_name = "RATE", requires = "access_log", value_parser = sample_rate)]
    pub access_log_sample: Option<f64>,
}

/// `--access-log-sample`: a number from 0 to 1.
fn sample_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("expected a number from 0 to 1, got {s:?}")),
    }
}

impl RouterArgs {
    /// The daemon's router: a process of its own (`kiln router`, started with these flags
    /// when none serves `state`), so that traffic outlives the daemon.
    pub fn choice(&self, state: &Path) -> anyhow::Result<RouterChoice> {
        let program = std::env::current_exe().context("cannot find kiln's own binary")?;
        // Replaced by an upgrade while this daemon runs: the new binary is at the same path.
        let program = match program.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(path) => std::path::PathBuf::from(path),
            None => program,
        };
        let mut args: Vec<std::ffi::OsString> =
            vec!["--state".into(), state.into(), "router".into()];
        if let Some(n) = self.router_threads {
            args.extend(["--router-threads".into(), n.to_string().into()]);
        }
        if let Some(pin) = self.router_pin {
            args.extend(["--router-pin".into(), pin.to_string().into()]);
        }
        if let Some(path) = &self.access_log {
            // The router runs in `/`: a relative path is the daemon's. Opened here first, so a
            // path the router could not write is this command's error, not a router that
            // never comes up.
            let path = if path.as_os_str() == "-" {
                path.clone()
            } else {
                let path = std::path::absolute(path).with_context(|| {
                    format!("cannot resolve the access log path {}", path.display())
                })?;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("cannot open the access log {}", path.display()))?;
                path
            };
            args.extend(["--access-log".into(), path.into_os_string()]);
        }
        if let Some(rate) = self.access_log_sample {
            args.extend(["--access-log-sample".into(), rate.to_string().into()]);
        }
        // Under systemd the journal takes its output as the daemon's; else a file of the
        // state, since the terminal that started the daemon may be long gone.
        let log = std::env::var_os("JOURNAL_STREAM")
            .is_none()
            .then(|| state.join("router.log"));
        Ok(RouterChoice::Process(Some(kiln_dataplane::Spawn {
            program,
            args,
            log,
        })))
    }

    /// The access log the flags ask for.
    pub fn access_log(&self) -> Option<kiln_proxy::AccessLogConfig> {
        let path = self.access_log.as_ref()?;
        Some(kiln_proxy::AccessLogConfig {
            target: if path.as_os_str() == "-" {
                kiln_proxy::AccessLogTarget::Stdout
            } else {
                kiln_proxy::AccessLogTarget::File(path.clone())
            },
            sample: self.access_log_sample.unwrap_or(1.0),
        })
    }

    /// The router's threads as the flags say.
    pub fn workers(&self) -> WorkersConfig {
        let mut config = match self.router_threads {
            Some(n) => WorkersConfig::new(usize::from(n)),
            None => WorkersConfig::per_core(),
        };
        if let Some(pin) = self.router_pin {
            config.pin = pin;
        }
        config
    }
}

/// The daemon's socket in a state directory.
pub fn socket(state: &Path) -> PathBuf {
    state.join("kiln.sock")
}

/// A started daemon: its controller and what stops it.
pub struct Daemon {
    /// The controller (for in-process use by `kiln up`).
    pub controller: Arc<Controller>,
    /// Where nodes pull kiln's images from, when the daemon serves its registry.
    pub registry: Option<kiln_control::registry::Endpoint>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// `<state>/daemon.lock`, held while the daemon runs.
    _lock: std::fs::File,
}

impl Daemon {
    /// Starts the controller, the reconciler and the API on `state`. Call inside a tokio
    /// runtime.
    pub async fn start(
        state: &Path,
        runtime: &str,
        router: RouterChoice,
        listen: Listen,
        registry: Option<RegistryListen>,
        policy: kiln_control::PolicyConfig,
        accept_broken_ledger: bool,
    ) -> anyhow::Result<Daemon> {
        raise_open_file_limit();
        std::fs::create_dir_all(state)
            .with_context(|| format!("cannot create the state directory {}", state.display()))?;
        // Before anything of the state is touched (the ledger's locks, the router's apps):
        // a second daemon on one state stops here, even one started at the same moment.
        let lock = lock_state(state)?;
        // Before anything acts on the ledger: a broken one is refused.
        check_ledger(state, accept_broken_ledger)?;
        let images = Arc::new(StoreImages::open(state)?);
        // Bound before the providers are made: a provider whose nodes pull images (Swarm)
        // takes `endpoint`, the reference prefix and whether TLS is on.
        let registry = match registry {
            Some(r) => Some(
                kiln_control::registry::Registry::bind(r.addr, r.insecure, state)
                    .await
                    .context("cannot start the registry")?,
            ),
            None => None,
        };
        let endpoint = registry.as_ref().map(|r| r.endpoint().clone());
        let engines = engines(state, runtime, images.clone()).await?;
        if let Some(e) = &endpoint {
            engines.set_registry(e.host());
        }
        let provider: Arc<dyn Provider> = engines;
        let controller = Controller::start(
            &ControllerConfig {
                state_dir: state.to_owned(),
                router,
                attestations: Some(images.clone()),
                policy,
            },
            provider,
        )
        .await
        .context("cannot start the controller")?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // The git branches it follows (`kiln source`), built and tested as `kiln build` and
        // `kiln test` would.
        controller
            .follow_sources(
                state.join("sources"),
                Arc::new(super::source::DaemonPipeline {
                    state: state.to_owned(),
                }),
                stopped.clone(),
            )
            .context("cannot follow the git sources")?;
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(
            Arc::clone(&controller).run(wait(stopped.clone())),
        ));
        tasks.push(tokio::spawn(sign_checkpoints(
            Arc::clone(&controller),
            wait(stopped.clone()),
        )));
        let sock = socket(state);
        let api = {
            let c = Arc::clone(&controller);
            let stop = wait(stopped.clone());
            tokio::spawn(async move {
                if let Err(e) = kiln_control::api::serve_unix(sock.clone(), c, stop).await {
                    tracing::error!(socket = %sock.display(), error = %e, "API stopped");
                }
            })
        };
        tasks.push(api);
        if let Some(registry) = registry {
            let e = registry.endpoint();
            match &e.ca {
                Some(ca) => tracing::info!(
                    address = %e.addr,
                    ca = %ca.display(),
                    install_as = %e.docker_ca_path(),
                    "registry serving over TLS: install the CA on each node"
                ),
                None => tracing::info!(address = %e.addr, "registry serving over plain HTTP"),
            }
            let files: Arc<dyn kiln_control::registry::BlobFiles> = images.clone();
            let stop = wait(stopped.clone());
            tasks.push(tokio::spawn(registry.serve(files, stop)));
        }
        if let Some(ui) = listen.ui {
            let c = Arc::clone(&controller);
            let stop = wait(stopped.clone());
            let addr = ui.addr;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for the dashboard on {addr}"))?;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the dashboard is served over plain HTTP off loopback: its token crosses the network in clear unless a TLS proxy fronts it");
            }
            let config = kiln_control::ui::UiConfig {
                token: ui.token,
                hosts: ui.hosts,
            };
            tasks.push(tokio::spawn(async move {
                if let Err(e) = kiln_control::ui::serve_ui_on(listener, config, c, stop).await {
                    tracing::error!(%addr, error = %e, "dashboard stopped");
                }
            }));
        }
        if let Some((addr, token)) = listen.api {
            let c = Arc::clone(&controller);
            let stop = wait(stopped.clone());
            // Bound here: a client started once the daemon is up finds it, and an address
            // that cannot be had stops the daemon with its reason instead of a log line.
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for the API on {addr}"))?;
            tasks.push(tokio::spawn(async move {
                if let Err(e) = kiln_control::api::serve_tcp_on(listener, token, c, stop).await {
                    tracing::error!(%addr, error = %e, "API stopped");
                }
            }));
        }
        // Wait until the socket answers, so clients started right after us find it.
        let client = kiln_control::client::Client::new(&socket(state));
        for _ in 0..200 {
            if client.alive().await {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Ok(Daemon {
            controller,
            registry: endpoint,
            stop,
            tasks,
            _lock: lock,
        })
    }

    /// Stops the API, the reconciler and the listeners; instances keep running.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // A clean stop leaves the head signed.
        if let Err(e) = self.controller.checkpoint() {
            tracing::error!(error = %e, "no ledger checkpoint at stop");
        }
        self.controller.shutdown().await;
    }
}

/// How often the daemon signs the ledger's head when it moved (and on every release).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Signs a checkpoint every [`CHECKPOINT_EVERY`] when the head moved, until `stop`.
async fn sign_checkpoints(
    controller: Arc<Controller>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = every.tick() => {
                if let Err(e) = controller.checkpoint() {
                    tracing::error!(error = %e, "no ledger checkpoint");
                }
            }
        }
    }
}

/// Verifies the ledger, its checkpoints included, and gives it a key at its first start
/// ([`kiln_ledger::Ledger::start`]). A ledger that fails is an error naming the first bad or
/// missing entry, unless `accept` (`--accept-broken-ledger`): then the acceptance is recorded.
fn check_ledger(state: &Path, accept: bool) -> anyhow::Result<()> {
    let path = state.join("ledger.db");
    let mut ledger = kiln_ledger::Ledger::open(&path)
        .with_context(|| format!("cannot open the ledger {}", path.display()))?;
    let files = kiln_ledger::AnchorFiles::in_state(state);
    let actor = accept.then(kiln_control::local_actor);
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX);
    match ledger
        .start(&files, actor.as_deref(), now)
        .context("cannot check the ledger")?
    {
        Ok(kiln_ledger::Start::Verified(r)) => {
            tracing::info!(events = r.events, head = %r.head, "ledger verified");
        }
        Ok(kiln_ledger::Start::Anchored { key, entries }) => tracing::info!(
            %key,
            entries,
            key_file = %files.key.display(),
            "ledger key made; the ledger's head is signed from now on"
        ),
        Ok(kiln_ledger::Start::Accepted(problem)) => tracing::warn!(
            %problem,
            actor = actor.as_deref().unwrap_or(""),
            "a broken ledger was accepted and recorded"
        ),
        Err(problem) => anyhow::bail!(
            "{problem}\nthe daemon does not act on a ledger that fails verification: find what \
             changed (`kiln verify`, `kiln history --export`), then start it with \
             --accept-broken-ledger to record that you accept the ledger as it is"
        ),
    }
    Ok(())
}

/// Tells systemd (a `Type=notify` unit: `$NOTIFY_SOCKET`, a path or an abstract `@name`)
/// where the daemon is: `READY=1` once its API answers, `STOPPING=1` when it stops. Without
/// a service manager it does nothing; one that cannot be told is logged, never fatal.
fn notify_service_manager(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let told = match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&socket),
    }
    .and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = told {
        tracing::warn!(socket = ?socket, error = %e, "cannot tell the service manager {state}");
    }
}

/// How long a new daemon waits for the lock of one that just died. A process the old
/// daemon was spawning when it was killed holds a copy of its descriptors (the lock's
/// among them) until it executes its program, which on a loaded machine can take a while.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes `<state>/daemon.lock` (an exclusive `flock`, released when the process ends however
/// it ends): one daemon per state directory.
fn lock_state(state: &Path) -> anyhow::Result<std::fs::File> {
    let path = state.join("daemon.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => anyhow::bail!(
                "a kiln daemon already serves {} (it holds {})",
                socket(state).display(),
                path.display()
            ),
            Err(e) => return Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
        }
    }
}

/// Raises the soft open-file limit to the hard one, and logs the limit once. Every API and
/// router connection, instance log and layer file is a descriptor, and the usual soft limit
/// (1024) runs out under a few hundred clients long before the host's own limit would.
/// Instances are unaffected: their bundle sets their own limit.
pub(super) fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    match (limit.current, limit.maximum) {
        // Only a finite hard limit is a value to raise to: an unlimited one is beyond what
        // the kernel takes for open files (`fs.nr_open`).
        (Some(soft), Some(hard)) if soft < hard => {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
                Err(e) => tracing::warn!(
                    limit = soft,
                    hard,
                    error = %e,
                    "cannot raise the open-file limit"
                ),
            }
        }
        (soft, hard) => tracing::info!(
            limit = %show(soft),
            hard = %show(hard),
            "the open-file limit is left as it is"
        ),
    }
}

/// The TCP listeners of a daemon: the API (address and token), the dashboard.
#[derive(Default)]
pub struct Listen {
    /// `--api-listen` with the token.
    pub api: Option<(SocketAddr, String)>,
    /// `--ui-listen`.
    pub ui: Option<UiListen>,
}

/// Where and how the dashboard is served.
pub struct UiListen {
    /// `--ui-listen`.
    pub addr: SocketAddr,
    /// The token its actions need; none makes it read-only.
    pub token: Option<String>,
    /// `--ui-host`.
    pub hosts: Vec<String>,
}

/// The bearer token in `file` (`--token-file`), trimmed; an empty one is an error.
pub fn read_token(file: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the token file {}", file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        file.display()
    );
    Ok(token)
}

pub fn serve(args: &ServeArgs, state: &Path, out: &Output) -> anyhow::Result<ExitCode> {
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let listen = Listen {
        api: args.api_listen.zip(token.clone()),
        ui: args.ui_listen.map(|addr| UiListen {
            addr,
            token: token.clone(),
            hosts: args.ui_host.clone(),
        }),
    };
    let ui_address = args.ui_listen;
    let policy = load_policy(args.policy.as_deref())?;
    let sources = match &args.sources {
        Some(file) => super::source::load_file(file)?,
        None => Vec::new(),
    };
    let rt = super::instance::tokio_runtime()?;
    rt.block_on(async {
        let mut signals = StopSignals::new()?;
        let daemon = tokio::select! {
            biased;
            // Nothing is served yet: stop here.
            stop = signals.recv() => return Ok(stop.exit_code()),
            daemon = Daemon::start(
                state,
                &args.runtime,
                args.router.choice(state)?,
                listen,
                args.registry(),
                policy,
                args.accept_broken_ledger,
            ) => daemon?,
        };
        if !sources.is_empty() {
            daemon.controller.declare_sources(sources).await;
        }
        let apps = daemon.controller.app_names().await;
        out.say(&format!(
            "kiln daemon serving {} ({} app{} restored); Ctrl-C or SIGTERM stops it, the router and instances keep running",
            socket(state).display(),
            apps.len(),
            if apps.len() == 1 { "" } else { "s" }
        ));
        if let Some(addr) = ui_address {
            out.say(&format!(
                "dashboard: http://{addr}/ ({})",
                if args.token_file.is_some() {
                    "actions need the token of --token-file"
                } else {
                    "read-only: no --token-file"
                }
            ));
        }
        match &daemon.registry {
            Some(e) if e.tls => out.say(&format!(
                "registry: https://{} (images as {}/kiln/<app>@sha256:…); nodes trust its CA {} \
                 installed as {}",
                e.host(),
                e.host(),
                e.ca.as_deref().map_or_else(String::new, |p| p.display().to_string()),
                e.docker_ca_path()
            )),
            Some(e) => out.say(&format!(
                "registry: http://{} (images as {}/kiln/<app>@sha256:…)",
                e.host(),
                e.host()
            )),
            None => {}
        }
        notify_service_manager("READY=1");
        signals.recv().await;
        notify_service_manager("STOPPING=1");
        out.say("kiln daemon stopping: requests in flight may finish (Ctrl-C again stops at once)");
        tokio::select! {
            () = daemon.stop() => out.say("kiln daemon stopped"),
            _ = signals.recv() => out.say("kiln daemon stopped without waiting"),
        }
        Ok(ExitCode::SUCCESS)
    })
}
