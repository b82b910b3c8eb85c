//! The router process (`kiln router`): a [`LocalPlane`] served on `<state>/router.sock`.
//!
//! It keeps serving the last tables it was given while no daemon is attached. Started while
//! another router serves the same state, it takes that one's listening sockets, apps, tables
//! and gates over (a handover: the sockets pass with `SCM_RIGHTS`, so none is closed and no
//! connection is refused), takes the control socket's name (a rename), and tells the old
//! one, which stops accepting, lets its connections finish their requests and exits.
//!
//! It exits on SIGTERM/SIGINT or a `shutdown` request (after draining), once handed over,
//! when its control socket's name is taken by another file or removed (its state is gone),
//! or when it serves no app and no daemon is attached.
//!
//! **API boundary:** it never starts or stops instances, never checks health, never reads
//! the ledger: what to route is the daemon's to say.

use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::wire::{Answer, Handover, Measurements, Request, RouterInfo};
use crate::{LocalPlane, PlaneError, fdpass};

/// The longest request line the router reads.
const MAX_REQUEST: u64 = 16 << 20;

/// How long a new router waits for the old one's sockets, and the old one for "done".
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// A router with no app and no daemon exits after this long (a daemon starting it attaches
/// well within it).
const IDLE_EXIT: Duration = Duration::from_secs(5);

/// The router's control socket in a state directory.
pub fn socket(state: &Path) -> PathBuf {
    state.join("router.sock")
}

/// The identity of the binary this process runs: a daemon whose own differs replaces the
/// router (after an upgrade of kiln).
pub fn binary_identity() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/exe") {
        Ok(m) => format!("{}:{}:{}:{}", m.dev(), m.ino(), m.size(), m.mtime()),
        Err(_) => String::from("unknown"),
    }
}

/// What the router process needs.
pub struct RouterConfig {
    /// The state directory.
    pub state: PathBuf,
    /// Its threads.
    pub workers: kiln_proxy::WorkersConfig,
    /// Its access log; none when `None`.
    pub access_log: Option<kiln_proxy::AccessLogConfig>,
    /// Marked changed to open the access log's file anew (the process's SIGHUP, after
    /// logrotate renamed it): lines from then on go to a file at the same path.
    pub reopen_access_log: tokio::sync::watch::Receiver<()>,
}

struct Shared {
    plane: LocalPlane,
    info: RouterInfo,
    attached: AtomicUsize,
    handing_over: AtomicBool,
    exit: tokio::sync::watch::Sender<Exit>,
    /// When the last control connection came: a router a daemon is about to attach to is
    /// not idle.
    last_contact: std::sync::Mutex<Instant>,
    /// True once the router this one took over from has exited (at once without one): until
    /// then its connections may still be finishing requests on an instance, so a drain
    /// waits for it.
    predecessor_gone: tokio::sync::watch::Receiver<bool>,
    /// The connection to the router this one handed over to, kept until this one exits.
    successor: std::sync::Mutex<Option<std::os::unix::net::UnixStream>>,
}

/// The longest a drain waits for the router handed over from to exit: its connections finish
/// within their apps' drain timeouts.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(60);

/// Why the router stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Running,
    /// Drain and go.
    Drain,
    /// Handed over: drain, and leave the socket's name to the successor.
    HandedOver,
}

/// Runs the router until it is told to stop (`stop`, a `shutdown` request, a handover).
pub async fn run(
    mut cfg: RouterConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), PlaneError> {
    let path = socket(&cfg.state);
    let access_log = cfg
        .access_log
        .as_ref()
        .map(kiln_proxy::AccessLog::open)
        .transpose()
        .map_err(|e| PlaneError::Router(e.to_string()))?;
    let plane = LocalPlane::start_logged(cfg.workers, access_log)?;
    // Another router serving this state hands everything over; else this one starts empty.
    let predecessor = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(stream) => Some(receive(stream, &plane).await?),
        Err(_) => None,
    };
    let listener = bind(&path)?;
    let ours = inode(&path);
    let (exit, mut exiting) = tokio::sync::watch::channel(Exit::Running);
    let (gone, predecessor_gone) = tokio::sync::watch::channel(predecessor.is_none());
    let shared = Arc::new(Shared {
        plane,
        info: RouterInfo {
            pid: std::process::id(),
            boot: format!("{}-{}", std::process::id(), now_nanos()),
            binary: binary_identity(),
            args: std::env::args_os()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            apps: Vec::new(),
            protocol: crate::wire::PROTOCOL,
        },
        attached: AtomicUsize::new(0),
        handing_over: AtomicBool::new(false),
        exit,
        last_contact: std::sync::Mutex::new(Instant::now()),
        predecessor_gone,
        successor: std::sync::Mutex::new(None),
    });
    if let Some(old) = predecessor {
        // The name is ours now: the old router may stop accepting. It leaves by itself once
        // it sees the name taken, so a "done" it cannot take any more is no failure; its
        // exit (the connection closing) is when its last requests finished.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = finish_handover(&old) {
                tracing::warn!(error = %e, "the old router did not take \"done\"; it leaves by itself");
            }
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut &old, &mut rest);
            let _ = gone.send(true);
        });
    }
    let pid_file = cfg.state.join("router.pid");
    write_pid(&pid_file, &path, ours);
    let apps = shared.plane.app_names().await.len();
    tracing::info!(socket = %path.display(), pid = std::process::id(), apps, "router serving");
    let started = Instant::now();
    let mut idle_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    let why = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(Arc::clone(&shared), stream));
                }
                Err(e) => tracing::warn!(error = %e, "router control accept failed"),
            },
            () = &mut stop => break Exit::Drain,
            Ok(()) = cfg.reopen_access_log.changed() => {
                match shared.plane.reopen_access_log() {
                    Ok(()) => tracing::info!("access log reopened"),
                    Err(e) => tracing::warn!(error = %e, "cannot reopen the access log: lines go on to the file it had"),
                }
            }
            _ = exiting.changed() => {
                let why = *exiting.borrow();
                if why != Exit::Running {
                    break why;
                }
            }
            _ = tick.tick() => {
                if inode(&path) != ours {
                    tracing::info!(socket = %path.display(), "the control socket's name is gone or taken: stopping");
                    break Exit::HandedOver;
                }
                let quiet = shared
                    .last_contact
                    .lock()
                    .map_or(true, |t| t.elapsed() >= IDLE_EXIT);
                let idle = quiet
                    && shared.plane.app_names().await.is_empty()
                    && shared.attached.load(Ordering::Acquire) == 0;
                idle_since = if idle { idle_since.or(Some(Instant::now())) } else { None };
                if idle_since.is_some_and(|t| t.elapsed() >= IDLE_EXIT && started.elapsed() >= IDLE_EXIT) {
                    tracing::info!("no app to serve and no daemon attached: stopping");
                    break Exit::Drain;
                }
            }
        }
    };
    drop(listener);
    // Both names are the successor's after a handover (its pid file may be written at any
    // moment): only a router that stops for good removes them.
    if why != Exit::HandedOver && inode(&path) == ours {
        let _ = std::fs::remove_file(&path);
        if std::fs::read_to_string(&pid_file)
            .is_ok_and(|p| p.trim() == std::process::id().to_string())
        {
            let _ = std::fs::remove_file(&pid_file);
        }
    }
    tracing::info!(reason = ?why, "router stopping: connections finish their requests");
    shared.plane.shutdown().await;
    // The process exits next: lines still in the threads' buffers are written first.
    shared.plane.flush_access_log();
    Ok(())
}

/// Binds the control socket under a temporary name and renames it over `path`, so a
/// predecessor's name is taken in one step and a client never finds no socket.
fn bind(path: &Path) -> Result<UnixListener, PlaneError> {
    let temporary = path.with_extension(format!("sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)
        .map_err(|e| PlaneError::Router(format!("cannot bind {}: {e}", temporary.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600)).map_err(
            |e| PlaneError::Router(format!("cannot restrict {}: {e}", temporary.display())),
        )?;
    }
    std::fs::rename(&temporary, path).map_err(|e| {
        PlaneError::Router(format!(
            "cannot rename {} to {}: {e}",
            temporary.display(),
            path.display()
        ))
    })?;
    Ok(listener)
}

/// Writes this process's id to `pid_file` (renamed into place: a reader never finds it half
/// written), while the control socket's name is still this router's.
fn write_pid(pid_file: &Path, socket: &Path, ours: Option<(u64, u64)>) {
    let temporary = pid_file.with_extension(format!("pid.{}", std::process::id()));
    if let Err(e) = std::fs::write(&temporary, format!("{}\n", std::process::id())) {
        tracing::warn!(file = %temporary.display(), error = %e, "cannot write the router's pid");
        return;
    }
    if inode(socket) != ours || std::fs::rename(&temporary, pid_file).is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
}

fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The new router's side of a handover: asks for it, serves what it gets. Returns the
/// connection on which to say "done" once the control socket's name is taken.
async fn receive(
    stream: std::os::unix::net::UnixStream,
    plane: &LocalPlane,
) -> Result<std::os::unix::net::UnixStream, PlaneError> {
    let (stream, handover, sockets) = tokio::task::spawn_blocking(move || ask(stream))
        .await
        .map_err(|e| PlaneError::Router(e.to_string()))?
        .map_err(|e| PlaneError::Router(format!("taking over from the running router: {e}")))?;
    let apps = handover.apps.len();
    plane.take_over(handover, sockets).await?;
    tracing::info!(apps, "took the running router's sockets and apps over");
    Ok(stream)
}

type Asked = (std::os::unix::net::UnixStream, Handover, Vec<OwnedFd>);

fn ask(stream: std::os::unix::net::UnixStream) -> std::io::Result<Asked> {
    stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    let mut line = serde_json::to_vec(&Request::Handoff).map_err(std::io::Error::other)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let sockets = fdpass::recv(&stream)?;
    let mut reader = std::io::BufReader::new(std::io::Read::take(&stream, MAX_REQUEST));
    let mut text = String::new();
    reader.read_line(&mut text)?;
    let handover: Handover = match serde_json::from_str::<Handover>(&text) {
        Ok(h) => h,
        Err(_) => {
            let why = serde_json::from_str::<Answer>(&text)
                .map_or_else(|e| e.to_string(), |a| format!("{a:?}"));
            return Err(std::io::Error::other(format!("no handover: {why}")));
        }
    };
    Ok((stream, handover, sockets))
}

fn finish_handover(stream: &std::os::unix::net::UnixStream) -> std::io::Result<()> {
    let mut writer = stream;
    writer.write_all(b"done\n")
}

/// One control connection: requests, one per line, each answered in turn.
async fn connection(shared: Arc<Shared>, stream: UnixStream) {
    if let Ok(mut t) = shared.last_contact.lock() {
        *t = Instant::now();
    }
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply(&mut write, &error(format!("unreadable request: {e}"))).await;
                return;
            }
        };
        match request {
            Request::Hello { attach: true } => {
                let _ = reply(&mut write, &Answer::Hello(info(&shared).await)).await;
                shared.attached.fetch_add(1, Ordering::AcqRel);
                // Held until the daemon goes (or this router does).
                let mut exit = shared.exit.subscribe();
                let mut rest = [0u8; 64];
                tokio::select! {
                    _ = reader.read(&mut rest) => {}
                    _ = exit.wait_for(|e| *e != Exit::Running) => {}
                }
                shared.attached.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            Request::Handoff => {
                let stream = match reader.into_inner().into_inner().reunite(write) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "handover connection");
                        return;
                    }
                };
                hand_over(&shared, stream).await;
                return;
            }
            other => {
                let answer = answer(&shared, other).await;
                if reply(&mut write, &answer).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn info(shared: &Shared) -> RouterInfo {
    RouterInfo {
        apps: shared.plane.app_names().await,
        ..shared.info.clone()
    }
}

fn error(message: String) -> Answer {
    Answer::Error { message }
}

async fn answer(shared: &Shared, request: Request) -> Answer {
    let changes = !matches!(
        request,
        Request::Hello { .. }
            | Request::Held { .. }
            | Request::Drain { .. }
            | Request::Snapshot { .. }
            | Request::Metrics
    );
    if changes && shared.handing_over.load(Ordering::Acquire) {
        return Answer::HandingOver;
    }
    let done = |r: Result<(), PlaneError>| r.map_or_else(|e| error(e.to_string()), |()| Answer::Ok);
    let plane = &shared.plane;
    match request {
        Request::Hello { .. } => Answer::Hello(info(shared).await),
        Request::PutApp { app } => plane.put_app(app).await.map_or_else(
            |e| error(e.to_string()),
            |had_table| Answer::Served { had_table },
        ),
        Request::RetainApps { names } => done(plane.retain_apps(&names).await),
        Request::RemoveApp { name } => done(plane.remove_app(&name).await),
        Request::SetRoute { name, table } => done(plane.set_route(&name, &table).await),
        Request::SetGate { name, gate } => done(plane.set_gate(&name, &gate).await),
        Request::Held { name } => plane
            .held(&name)
            .await
            .map_or_else(|e| error(e.to_string()), |held| Answer::Held { held }),
        Request::Drain { name, addr } => {
            // The router handed over from may still be finishing requests on it.
            let mut gone = shared.predecessor_gone.clone();
            let _ = tokio::time::timeout(PREDECESSOR_WAIT, gone.wait_for(|g| *g)).await;
            drain_answer(plane, &name, addr).await
        }
        Request::Snapshot {
            name,
            release,
            window_ms,
        } => plane
            .snapshot(&name, &release, Duration::from_millis(window_ms))
            .await
            .map_or_else(
                |e| error(e.to_string()),
                |s| Answer::Snapshot {
                    measurements: s.as_ref().map(Measurements::of),
                },
            ),
        Request::Metrics => Answer::Metrics {
            text: plane.metrics().await,
        },
        Request::Shutdown => {
            let _ = shared.exit.send(Exit::Drain);
            Answer::Ok
        }
        Request::Handoff => error("a handover is asked first on its connection".to_owned()),
    }
}

async fn drain_answer(plane: &LocalPlane, name: &str, addr: std::net::SocketAddr) -> Answer {
    plane.drain(name, addr).await.map_or_else(
        |e| error(e.to_string()),
        |o| Answer::Drained {
            drain: crate::wire::Drain::of(o),
        },
    )
}

async fn reply(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    answer: &Answer,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(answer).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

/// The old router's side of a handover: passes the sockets and state, waits for "done",
/// then stops. Changes are refused meanwhile (the daemon tries them again on the new one);
/// if the new router fails, this one goes on serving.
async fn hand_over(shared: &Arc<Shared>, stream: UnixStream) {
    if shared.handing_over.swap(true, Ordering::AcqRel) {
        tracing::warn!("a second handover was asked while one runs: refused");
        return;
    }
    let outcome = async {
        let (handover, sockets) = shared.plane.handover().await?;
        let stream = stream
            .into_std()
            .map_err(|e| PlaneError::Router(format!("the handover connection: {e}")))?;
        tokio::task::spawn_blocking(move || give(&stream, &handover, &sockets).map(|()| stream))
            .await
            .map_err(|e| PlaneError::Router(format!("the handover task: {e}")))?
            .map_err(|e| PlaneError::Router(format!("handing over: {e}")))
    }
    .await;
    match outcome {
        Ok(stream) => {
            tracing::info!("handed the sockets and apps to a new router process");
            // Held open until this process exits: its end tells the successor that no
            // request of this router's is in flight any more.
            if let Ok(mut kept) = shared.successor.lock() {
                *kept = Some(stream);
            }
            let _ = shared.exit.send(Exit::HandedOver);
        }
        Err(e) => {
            tracing::error!(error = %e, "handover failed: this router goes on serving");
            shared.handing_over.store(false, Ordering::Release);
        }
    }
}

fn give(
    stream: &std::os::unix::net::UnixStream,
    handover: &Handover,
    sockets: &[OwnedFd],
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    fdpass::send(stream, sockets)?;
    let mut line = serde_json::to_vec(handover).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut writer = stream;
    writer.write_all(&line)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut done = String::new();
    reader.read_line(&mut done)?;
    if done.trim() == "done" {
        Ok(())
    } else {
        Err(std::io::Error::other("the new router did not take over"))
    }
}
