//! `RemotePlane`: the daemon's side of a router process. Each call is one connection to
//! `<state>/router.sock` (a line out, a line back), so calls never wait on each other (a
//! drain may take its app's whole drain timeout). One more connection stays open for the
//! daemon's life (the attachment): it tells the router a daemon feeds it, and tells the
//! daemon when the router it fed is gone (crashed, or replaced by a new one), so the daemon
//! feeds the next one everything again.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::PlaneError;
use crate::wire::{Answer, Request, RouterInfo};

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
    /// `binary`, or with other arguments than `spawn`'s.
    pub async fn attach(
        socket: &Path,
        spawn: Option<Spawn>,
        binary: &str,
    ) -> Result<Arc<RemotePlane>, PlaneError> {
        let (stop, _) = tokio::sync::watch::channel(false);
        let plane = Arc::new(RemotePlane {
            socket: socket.to_owned(),
            spawn,
            boot: Mutex::new(None),
            resync: AtomicBool::new(false),
            stop,
        });
        let mut info = plane.ensure_running().await?;
        if let Some(spawn) = &plane.spawn {
            let args: Vec<String> = spawn
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            if info.binary != binary || info.args != args {
                tracing::info!(pid = info.pid, old = %info.binary, new = %binary, old_args = ?info.args, new_args = ?args, "replacing the router: another binary or other flags");
                info = plane.replace(&info).await?;
            }
        }
        tracing::info!(
            pid = info.pid,
            apps = info.apps.len(),
            "attached to the router"
        );
        *lock(&plane.boot) = Some(info.boot.clone());
        tokio::spawn(Arc::clone(&plane).hold());
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

    /// Sends `request`, returns the router's answer (its `Error` as an error).
    pub(crate) async fn call(&self, request: &Request) -> Result<Answer, PlaneError> {
        let mut stream = self.connect().await?;
        match exchange(&mut stream, request).await? {
            Answer::Error { message } => Err(PlaneError::Router(message)),
            answer => Ok(answer),
        }
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

    /// The attachment: held open until the daemon detaches; when it breaks, the router is
    /// looked for (started again if gone) and, if it is another one, marked for a resync.
    async fn hold(self: Arc<Self>) {
        let mut stopped = self.stop.subscribe();
        loop {
            if *stopped.borrow() {
                return;
            }
            let attached = async {
                let mut stream = self.connect().await?;
                let info = match exchange(&mut stream, &Request::Hello { attach: true }).await? {
                    Answer::Hello(info) => info,
                    other => {
                        return Err(PlaneError::Router(format!("unexpected answer {other:?}")));
                    }
                };
                let changed = lock(&self.boot).replace(info.boot.clone()) != Some(info.boot);
                if changed {
                    tracing::info!(
                        pid = info.pid,
                        "the router changed: feeding it every app again"
                    );
                    self.resync.store(true, Ordering::Release);
                }
                // Nothing more is sent; the read ends when the router goes.
                let mut rest = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest).await;
                Ok::<(), PlaneError>(())
            };
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => return,
                result = attached => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "router attachment lost");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if hello(&self.socket).await.is_err()
                && let Some(spawn) = &self.spawn
            {
                tracing::warn!(socket = %self.socket.display(), "no router answers: starting one");
                if let Err(e) = start(spawn) {
                    tracing::error!(error = %e, "cannot start the router");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    let _ = self.wait_for(|_| true).await;
                }
            }
        }
    }
}

impl Drop for RemotePlane {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The identity of the router on `socket`.
pub async fn hello(socket: &Path) -> Result<RouterInfo, PlaneError> {
    let mut stream = UnixStream::connect(socket).await.map_err(|e| {
        PlaneError::Unavailable(format!("no router answers on {}: {e}", socket.display()))
    })?;
    match exchange(&mut stream, &Request::Hello { attach: false }).await? {
        Answer::Hello(info) => Ok(info),
        other => Err(PlaneError::Router(format!("unexpected answer {other:?}"))),
    }
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
