//! `RemotePlane`: the daemon's side of a router process. Each call is one connection to
//! `<state>/router.sock` (a line out, a line back), so calls never wait on each other (a
//! drain may take its app's whole drain timeout). One more connection stays open for the
//! daemon's life (the attachment): it tells the router a daemon feeds it, and tells the
//! daemon when the router it fed is gone (crashed, or replaced by a new one), so the daemon
//! feeds the next one everything again.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::PlaneError;
use crate::wire::{Answer, PROTOCOL, Request, RouterInfo};

/// The longest answer line the daemon reads (metrics of many apps).
const MAX_ANSWER: u64 = 64 << 20;

/// How the daemon starts a router process when none answers.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// The program (kiln's own binary).
    pub program: PathBuf,
    /// Its arguments (`--state DIR router …`).
    pub args: Vec<OsString>,
    /// Where its output goes (appended); inherited when `None`.
    pub log: Option<PathBuf>,
}

/// A router process, as the daemon drives it.
pub struct RemotePlane {
    socket: PathBuf,
    spawn: Option<Spawn>,
    /// The router's identity when last attached.
    boot: Mutex<Option<String>>,
    /// Set when the router attached to is not the one fed so far.
    resync: AtomicBool,
    /// Ends the attachment.
    stop: tokio::sync::watch::Sender<bool>,
}

impl RemotePlane {
    /// Attaches to the router serving `socket`, starting one with `spawn` when none answers,
    /// and replacing it (without a connection refused) when it runs another binary than
    /// `binary`, other arguments than `spawn`'s, or another protocol. A replacement that
    /// fails leaves the running router attached to: it goes on serving.
    pub async fn attach(
        socket: &Path,
        spawn: Option<Spawn>,
        binary: &str,
    ) -> Result<Arc<RemotePlane>, PlaneError> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let plane = Arc::new(RemotePlane {
            socket: socket.to_owned(),
            spawn,
            boot: Mutex::new(None),
            resync: AtomicBool::new(false),
            stop,
        });
        let info = plane.ensure_running().await?;
        if let Some(spawn) = &plane.spawn {
            let args: Vec<String> = spawn
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            if info.binary != binary || info.args != args || info.protocol != PROTOCOL {
                tracing::info!(pid = info.pid, old = %info.binary, new = %binary, old_args = ?info.args, new_args = ?args, "replacing the router: another binary, other flags or another protocol");
                if let Err(e) = plane.replace(&info).await {
                    tracing::warn!(pid = info.pid, error = %e, "the router could not be replaced: the running one goes on serving");
                }
            }
        }
        // Attached before this returns: a router with nothing to serve stays for the daemon
        // that is about to feed it.
        let (stream, info) = plane.attach_once().await?;
        tracing::info!(
            pid = info.pid,
            apps = info.apps.len(),
            "attached to the router"
        );
        *lock(&plane.boot) = Some(info.boot);
        tokio::spawn(hold(Arc::downgrade(&plane), stream, stopped));
        Ok(plane)
    }

    /// Whether the router changed since the last call (crashed and started again, or was
    /// replaced): then it must be fed every app again.
    pub fn take_resync(&self) -> bool {
        self.resync.swap(false, Ordering::AcqRel)
    }

    /// Ends the attachment: the router keeps serving what it was given (and exits once it
    /// serves nothing).
    pub fn detach(&self) {
        let _ = self.stop.send(true);
    }

    /// Asks the router to stop serving and exit once its requests in flight finished.
    pub async fn shutdown_router(&self) -> Result<(), PlaneError> {
        self.call(&Request::Shutdown).await.map(drop)
    }

    /// Sends `request`, returns the router's answer (its `Error` as an error). A change the
    /// router refuses because it is handing over is asked again (of the new router, once it
    /// has the socket's name). Every request but a drain (which waits for requests in
    /// flight, up to its app's drain timeout) gets an answer within [`CALL_TIMEOUT`], so a
    /// wedged router never holds the daemon up.
    pub(crate) async fn call(&self, request: &Request) -> Result<Answer, PlaneError> {
        for _ in 0..HANDOVER_RETRIES {
            let asked = async {
                let mut stream = self.connect().await?;
                exchange(&mut stream, request).await
            };
            let answer = if matches!(request, Request::Drain { .. }) {
                asked.await?
            } else {
                tokio::time::timeout(CALL_TIMEOUT, asked)
                    .await
                    .map_err(|_| {
                        PlaneError::Unavailable(format!(
                            "the router on {} did not answer within {CALL_TIMEOUT:?}",
                            self.socket.display()
                        ))
                    })??
            };
            match answer {
                Answer::HandingOver => tokio::time::sleep(Duration::from_millis(100)).await,
                Answer::Error { message } => return Err(PlaneError::Router(message)),
                answer => return Ok(answer),
            }
        }
        Err(PlaneError::Unavailable(format!(
            "the router on {} kept handing over",
            self.socket.display()
        )))
    }

    /// A connection to the router; while a new router takes the socket's name over (a
    /// handover), connecting is tried again for a moment.
    async fn connect(&self) -> Result<UnixStream, PlaneError> {
        let mut last = None;
        for _ in 0..30 {
            match UnixStream::connect(&self.socket).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(PlaneError::Unavailable(format!(
            "no router answers on {}: {}",
            self.socket.display(),
            last.map_or_else(String::new, |e| e.to_string())
        )))
    }

    /// Opens the attachment: a connection the router keeps for as long as the daemon runs.
    async fn attach_once(&self) -> Result<(UnixStream, RouterInfo), PlaneError> {
        let mut stream = self.connect().await?;
        match exchange(&mut stream, &Request::Hello { attach: true }).await? {
            Answer::Hello(info) => Ok((stream, info)),
            other => Err(unexpected(&other)),
        }
    }

    /// The running router's identity, once one runs (started if none answers).
    async fn ensure_running(&self) -> Result<RouterInfo, PlaneError> {
        if let Ok(info) = hello(&self.socket).await {
            return Ok(info);
        }
        let Some(spawn) = &self.spawn else {
            return Err(PlaneError::Unavailable(format!(
                "no router answers on {}",
                self.socket.display()
            )));
        };
        start(spawn)?;
        self.wait_for(|_| true).await
    }

    /// Starts a new router process, which takes the sockets over from `old`.
    async fn replace(&self, old: &RouterInfo) -> Result<RouterInfo, PlaneError> {
        let Some(spawn) = &self.spawn else {
            return Ok(old.clone());
        };
        start(spawn)?;
        self.wait_for(|info| info.boot != old.boot).await
    }

    async fn wait_for(
        &self,
        ready: impl Fn(&RouterInfo) -> bool,
    ) -> Result<RouterInfo, PlaneError> {
        let mut last = String::from("it did not answer");
        for _ in 0..300 {
            match hello(&self.socket).await {
                Ok(info) if ready(&info) => return Ok(info),
                Ok(_) => {}
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(PlaneError::Unavailable(format!(
            "the router started for {} did not come up in 15 s ({last}); see its log",
            self.socket.display()
        )))
    }

    /// After the attachment broke: starts a router if none answers.
    async fn revive(&self) {
        if hello(&self.socket).await.is_ok() {
            return;
        }
        let Some(spawn) = &self.spawn else { return };
        tracing::warn!(socket = %self.socket.display(), "no router answers: starting one");
        match start(spawn) {
            Ok(()) => {
                let _ = self.wait_for(|_| true).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the router");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// How long a call (but a drain) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a change refused during a handover is asked again (every 100 ms).
const HANDOVER_RETRIES: usize = 100;

/// The attachment: held open until the daemon detaches (or the plane is dropped); when it
/// breaks, the router is looked for (started again if gone) and, if it is another one, the
/// plane is marked for a resync.
async fn hold(
    plane: Weak<RemotePlane>,
    first: UnixStream,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut current = Some(first);
    loop {
        let stream = match current.take() {
            Some(s) => s,
            None => {
                let Some(p) = plane.upgrade() else { return };
                match p.attach_once().await {
                    Ok((s, info)) => {
                        let changed = lock(&p.boot).replace(info.boot.clone()) != Some(info.boot);
                        if changed {
                            tracing::info!(
                                pid = info.pid,
                                "the router changed: feeding it every app again"
                            );
                            p.resync.store(true, Ordering::Release);
                        }
                        s
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot attach to the router");
                        drop(p);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
        };
        let mut stream = stream;
        // Nothing more is sent; the read ends when the router goes.
        let mut rest = Vec::new();
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest) => {}
        }
        tracing::warn!("router attachment lost");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(p) = plane.upgrade() else { return };
        p.revive().await;
    }
}

pub(crate) fn unexpected(answer: &Answer) -> PlaneError {
    PlaneError::Router(format!("unexpected answer from the router: {answer:?}"))
}

impl Drop for RemotePlane {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The identity of the router on `socket`.
pub async fn hello(socket: &Path) -> Result<RouterInfo, PlaneError> {
    let asked = async {
        let mut stream = UnixStream::connect(socket).await.map_err(|e| {
            PlaneError::Unavailable(format!("no router answers on {}: {e}", socket.display()))
        })?;
        match exchange(&mut stream, &Request::Hello { attach: false }).await? {
            Answer::Hello(info) => Ok(info),
            other => Err(unexpected(&other)),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, asked)
        .await
        .map_err(|_| {
            PlaneError::Unavailable(format!(
                "the router on {} did not answer within {CALL_TIMEOUT:?}",
                socket.display()
            ))
        })?
}

/// One request and its answer on `stream`.
async fn exchange(stream: &mut UnixStream, request: &Request) -> Result<Answer, PlaneError> {
    let broken =
        |e: std::io::Error| PlaneError::Unavailable(format!("the router connection broke: {e}"));
    let mut line = serde_json::to_vec(request).map_err(|e| PlaneError::Invalid(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(broken)?;
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(&mut *stream, MAX_ANSWER));
    let mut answer = String::new();
    let n = reader.read_line(&mut answer).await.map_err(broken)?;
    if n == 0 {
        return Err(PlaneError::Unavailable(
            "the router closed the connection without an answer".to_owned(),
        ));
    }
    serde_json::from_str(&answer)
        .map_err(|e| PlaneError::Router(format!("the router sent an unreadable answer: {e}")))
}

/// Starts a router process in its own process group (a terminal's Ctrl-C for the daemon is
/// not its), reaped by a thread of this process when it exits first.
fn start(spawn: &Spawn) -> Result<(), PlaneError> {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(&spawn.program);
    command
        .args(&spawn.args)
        .stdin(std::process::Stdio::null())
        // Not the daemon's directory: it may go away while the router runs.
        .current_dir("/")
        .process_group(0);
    if let Some(log) = &spawn.log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| PlaneError::Router(format!("cannot open {}: {e}", log.display())))?;
        let copy = file
            .try_clone()
            .map_err(|e| PlaneError::Router(format!("cannot open {}: {e}", log.display())))?;
        command.stdout(copy).stderr(file);
    }
    let mut child = command.spawn().map_err(|e| {
        PlaneError::Router(format!(
            "cannot start the router ({}): {e}",
            spawn.program.display()
        ))
    })?;
    tracing::info!(pid = child.id(), "started a router process");
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
